"""Which images a run takes, and the case name of each.

INPUT is an image file, a folder or a ``.txt``/``.lst`` file listing one path per line (relative to
the list's folder; blank lines and ``#`` comments are skipped). A folder is scanned for the endings
of :data:`IMAGE_SUFFIXES` (the image reader registry's, :mod:`heatmark.transforms.io`) and DICOM
files without an ending; the ``.img`` of an ``a.hdr`` + ``a.img`` pair is read through its header
and not taken twice; with a 3D bundle a folder of DICOM slices is one series; ``recursive``
descends into subfolders (but not into folders holding a heatmark state folder ``.heatmark``,
i.e. earlier outputs, nor into the ``exclude`` folders: OUTPUT), ``pattern`` chooses files by name.

Every input gets a case name (:func:`assign_case_names`): the file name without its image ending,
made safe for file names (``[A-Za-z0-9_-]``, no dot) and unique. Every file a case writes is named
by :func:`case_file_name`: the case name and the suffix of its kind (:data:`CASE_FILE_SUFFIXES`).
As case names hold no dot, the text after a file name's first dot tells the kind (``mrk.json``,
``fcsv``, ``json``, ``nii.gz``, ``png``: all different) and the text before it the case, so no two
cases can ever name the same file (:func:`parse_case_file_name` reads it back), nor a table
(``landmarks.csv``...: ``csv`` is no case kind).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path

from heatmark.core.fileio import missing_path_reason, safe_case_name
from heatmark.predict.errors import PredictUsageError
from heatmark.transforms.io import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    has_dicom_marker,
    image_suffix,
    is_companion_file,
)

__all__ = ["IMAGE_SUFFIXES", "LIST_SUFFIXES", "STATE_DIR", "CASE_FILE_SUFFIXES", "CASE_FILE_KINDS",
           "check_input", "find_inputs", "assign_case_names", "is_case_name", "case_file_name", "case_file_names",
           "parse_case_file_name"]

#: Endings of a file listing the inputs.
LIST_SUFFIXES = (".txt", ".lst")

#: Folder inside OUTPUT holding the run description and the per-case states; a folder holding one
#: is an earlier OUTPUT, never scanned for inputs.
STATE_DIR = ".heatmark"

#: The files of a case: kind -> suffix after the case name. Each suffix holds a dot, and the texts
#: after the first dot differ between kinds (see the module documentation).
CASE_FILE_SUFFIXES = {"mrk.json": ".mrk.json", "fcsv": ".fcsv", "json": ".json",
                      "heatmaps": "_heatmaps.nii.gz", "overlay": "_overlay.png"}
CASE_FILE_KINDS = tuple(CASE_FILE_SUFFIXES)

_CASE_NAME = re.compile(r"[A-Za-z0-9_-]+")


# ----------------------------------------------------------------------------------------------
# what a file is


def _is_dicom_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    return "." not in name and has_dicom_marker(path)


def _is_image_file(path: Path) -> bool:
    """A file a reader of the registry takes by its ending, or a DICOM file without an ending."""
    return image_suffix(path.name) is not None or ("." not in path.name and has_dicom_marker(path))


def _is_dicom_series(folder: Path) -> bool:
    """A folder holding two or more DICOM files directly (one series, for 3D bundles)."""
    count = 0
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return False
    for p in entries:
        if not p.name.startswith(".") and p.is_file() and _is_dicom_file(p):
            count += 1
            if count >= 2:
                return True
    return False


# ----------------------------------------------------------------------------------------------
# discovery


def _read_list(path: Path) -> list[Path]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise PredictUsageError(f"cannot read the input list {path}: {e}") from None
    out = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(os.path.expanduser(entry))
        if not p.is_absolute():
            p = path.parent / p
        out.append(Path(os.path.normpath(p)))
    if not out:
        raise PredictUsageError(f"the input list {path} names no images")
    return out


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def check_input(source: str | os.PathLike) -> Path:
    """``source`` as a Path, after checking it exists (``input not found: ...`` otherwise)."""
    src = Path(os.path.expanduser(os.fspath(source)))
    if not src.exists():
        reason = "" if not src.is_symlink() else f": {missing_path_reason(src)}"
        raise PredictUsageError(f"input not found: {src}{reason}")
    return src


def find_inputs(source: str | os.PathLike, recursive: bool = False, pattern: str | None = None,
                spatial_dims: int | None = None, exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The images named by ``source`` (a file, a folder or a ``.txt``/``.lst`` list), in order.

    Folders: files with an image ending (:data:`IMAGE_SUFFIXES`) or matching ``pattern`` (on the
    name or the path below the folder), hidden entries, ``exclude`` folders (compared by their
    real path), subfolders holding a ``.heatmark`` state folder (earlier outputs) and companion
    files (the ``.img`` beside its ``.hdr``) skipped; with ``spatial_dims == 3`` a folder of DICOM
    slices is one input. Duplicates are dropped.

    Raises:
        PredictUsageError: ``source`` does not exist, or names no inputs.
    """
    src = check_input(source)
    if src.is_file():
        found = _read_list(src) if src.name.lower().endswith(LIST_SUFFIXES) else [src]
    elif src.is_dir():
        found = _scan_folder(src, recursive, pattern, spatial_dims, [Path(os.path.realpath(e)) for e in exclude])
        if not found:
            what = f"matching {pattern!r}" if pattern else "image files (" + ", ".join(IMAGE_SUFFIXES) + ")"
            hint = "" if recursive else "; use --recursive to look into subfolders"
            raise PredictUsageError(f"no inputs found in {src}: no {what}{hint}")
    else:
        raise PredictUsageError(f"input is neither a file nor a folder: {src}")
    unique, seen = [], set()
    for p in found:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _scan_folder(root: Path, recursive: bool, pattern: str | None, spatial_dims: int | None,
                 exclude: Sequence[Path]) -> list[Path]:
    if spatial_dims == 3 and _is_dicom_series(root):
        return [root]

    def wanted(p: Path) -> bool:
        if pattern is None:
            return _is_image_file(p)
        rel = p.relative_to(root).as_posix()
        return fnmatch.fnmatch(p.name, pattern) or fnmatch.fnmatch(rel, pattern)

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not _inside(Path(os.path.realpath(here / d)), exclude)
                             and not os.path.isdir(here / d / STATE_DIR))  # an earlier OUTPUT
        for name in sorted(filenames):
            p = here / name
            if name.startswith(".") or _inside(Path(os.path.realpath(p)), exclude) or is_companion_file(p):
                continue  # hidden, excluded, or read through its sibling (a.img of a.hdr + a.img)
            if wanted(p):
                found.append(p)
        if spatial_dims == 3:
            series = [d for d in dirnames if _is_dicom_series(here / d)]
            for d in series:
                if pattern is None or fnmatch.fnmatch(d, pattern):
                    found.append(here / d)
            dirnames[:] = [d for d in dirnames if d not in series]
        if not recursive:
            break
    return sorted(found, key=lambda p: p.as_posix())


# ----------------------------------------------------------------------------------------------
# case names


def _base_name(path: Path) -> str:
    name = path.name
    suffix = image_suffix(name)
    if suffix is not None and len(name) > len(suffix):
        return name[: -len(suffix)]
    return name if path.is_dir() or "." not in name.strip(".") else name.rsplit(".", 1)[0]


def _case_name(text: str) -> str:
    """``text`` as a case name: :func:`heatmark.core.fileio.safe_case_name`, dots made ``_``."""
    return safe_case_name(text).replace(".", "_")


def assign_case_names(paths: Sequence[Path], reserved: Sequence[str] = ()) -> list[str]:
    """One case name per input: the file name without its image ending, sanitised with
    :func:`heatmark.core.fileio.safe_case_name` and dots replaced by ``_`` (``a.mrk.nii.gz`` ->
    ``a_mrk``; see the module documentation for why); names that clash (case-insensitively) with each other
    or with a ``reserved`` name (cases of other inputs already in OUTPUT) get their parent folders
    prefixed, one more at a time, then a ``-2``, ``-3`` ... suffix. Deterministic for a given list;
    no two inputs share a name."""
    reserved_cf = {r.casefold() for r in reserved}
    bases = [_base_name(p) for p in paths]
    parents = [list(Path(os.path.abspath(p)).parent.parts)[1:] for p in paths]  # without the root
    levels = [0] * len(paths)

    def name_of(i: int) -> str:
        k = levels[i]
        prefix = parents[i][len(parents[i]) - k:] if k else []
        return _case_name("_".join([*prefix, bases[i]]))

    names = [name_of(i) for i in range(len(paths))]
    while True:
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n.casefold(), []).append(i)
        clashing = [g for key, g in groups.items() if len(g) > 1 or key in reserved_cf]
        changed = False
        for group in clashing:
            for i in group:
                if levels[i] < len(parents[i]):
                    levels[i] += 1
                    names[i] = name_of(i)
                    changed = True
        if not clashing or not changed:
            break
    taken = {n.casefold() for n in names} | reserved_cf
    seen: set[str] = set(reserved_cf)
    for i, n in enumerate(names):
        if n.casefold() in seen:
            k = 2
            while f"{n}-{k}".casefold() in taken:
                k += 1
            names[i] = f"{n}-{k}"
            taken.add(names[i].casefold())
        seen.add(names[i].casefold())
    return names


# ----------------------------------------------------------------------------------------------
# the files of a case


def is_case_name(name: object) -> bool:
    """``name`` can be a case name: letters, digits, ``_`` and ``-`` only (no dot)."""
    return isinstance(name, str) and _CASE_NAME.fullmatch(name) is not None


def case_file_name(case: str, kind: str) -> str:
    """THE name of the file of ``kind`` (:data:`CASE_FILE_KINDS`) of ``case``; every writer, the
    resume check and the cleanup use it. Raises ValueError for a name that is not a case name."""
    if not is_case_name(case):
        raise ValueError(f"not a case name (letters, digits, '_' and '-' only): {case!r}")
    return case + CASE_FILE_SUFFIXES[kind]


def case_file_names(case: str, opts) -> list[str]:
    """The files of ``case`` that the options ``opts`` (:class:`~heatmark.predict.PredictOptions`:
    ``formats``, ``save_heatmaps``, ``overlays``) ask for; ``csv`` is the table, no case file."""
    kinds = [f for f in opts.formats if f != "csv"]
    kinds += ["heatmaps"] * bool(opts.save_heatmaps) + ["overlay"] * bool(opts.overlays)
    return [case_file_name(case, k) for k in kinds]


def parse_case_file_name(name: str) -> tuple[str, str] | None:
    """``(case, kind)`` of a case file name from :func:`case_file_name`; None for any other name."""
    for kind, suffix in CASE_FILE_SUFFIXES.items():
        if name.endswith(suffix) and is_case_name(name[: -len(suffix)]):
            return name[: -len(suffix)], kind
    return None
