"""``heatmark predict BUNDLE INPUT OUTPUT``: run a trained bundle over many images, resumably.

The model of a MONAI bundle (``models/model.pt``, the network's ``state_dict``, or ``--model``) is
loaded once and run over every input image with the bundle's own ``inference#preprocessing`` (the
training preprocessing without landmarks, so training and prediction cannot drift apart) and
``inference#postprocessing`` (:class:`heatmark.engines.DecodeLandmarksd`: heatmaps -> world mm).
The configs are read with MONAI's ``ConfigParser`` from ``configs/train.yaml`` +
``configs/inference.yaml`` (+ ``--config`` overlays) with ``bundle_root`` set to the bundle; only
the keys prediction needs are built (no dataset is touched): ``inference#preprocessing``,
``inference#postprocessing``, ``network_def``, ``landmark_names``, ``spatial_dims``,
``output_stride``, ``ckpt_path``, ``measurements``, ``amp`` / ``amp_dtype``, and ``image_spacing``
(overridden by ``--spacing`` before anything is built; ``--pixel-units`` sets
``inference#loader#allow_pixel_units``).

INPUT is an image file, a folder (scanned for ``.nii``/``.nii.gz``, ``.mha``/``.mhd``,
``.nrrd``/``.nhdr``, ``.png``/``.jpg``/``.jpeg``/``.bmp``/``.tif``/``.tiff``, DICOM files; with a
3D bundle a folder of DICOM slices is one series; ``--recursive`` descends into subfolders,
``--pattern GLOB`` chooses files by name), or a ``.txt``/``.lst`` file listing one path per line
(relative to the list's folder; blank lines and ``#`` comments are skipped).

Layout of OUTPUT::

    landmarks.csv          case,landmark,name,x_mm,y_mm[,z_mm],confidence (RAS mm, stated in
                           the first comment line), every case done, sorted by case
    measurements.csv       case,<measurement names...> when the bundle defines `measurements`
    errors.csv             case,path,error: every input that could not be processed (header only
                           when none failed)
    <case>.mrk.json        per case, 3D Slicer markups (LPS, as Slicer writes them); and/or
    <case>.fcsv / .json    per --format (fcsv in RAS; heatmark's plain JSON in RAS)
    <case>_heatmaps.nii.gz with --save-heatmaps: the network output, landmarks along the 4th axis
                           (2D: X x Y x 1 x N), with the output grid's affine
    <case>_overlay.png     with --overlays
    .heatmark/run.json     what produced the folder (model and config hashes, options)
    .heatmark/cases/<case>.json   per-case state: the landmarks, confidence, measurements and
                           files of a case done, or the error of a case that failed

Resuming: every file is written to a temporary name and renamed (:mod:`heatmark.fileio`). A case's
own files are written as soon as it is done, then its state file, which is the commit mark. The
aggregate tables are regenerated from the states after each batch (at most once a second) and at
the end, also after Ctrl-C, so they are always complete files that agree with the states. A rerun
into the same OUTPUT skips the cases whose state says done for the same input path with all the
requested files present (``--overwrite`` redoes them); failed cases are retried. A folder written
with another model, other configs or another ``--spacing`` is refused unless ``--overwrite``.
Rows are sorted by case, numbers written at full precision, and every forward pass runs at the full
``--batch-size`` (partial batches are padded), so an interrupted and resumed run gives the same
``landmarks.csv`` as an uninterrupted one with the same options, byte for byte.

Exit status: 0 all inputs done (or skipped as done before), 1 some failed (see errors.csv),
2 usage errors (missing bundle or model, no inputs, bad option), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heatmark.fileio import TMP_PREFIX, atomic_path, atomic_write_text, csv_cell, csv_text, safe_case_name

__all__ = [
    "PredictUsageError",
    "PredictOptions",
    "PredictSummary",
    "add_predict_parser",
    "cmd_predict",
    "main",
    "run_predict",
    "find_inputs",
    "assign_case_names",
    "FORMATS",
    "DEFAULT_FORMATS",
    "IMAGE_SUFFIXES",
    "STATE_DIR",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Per-case landmark formats (``csv`` is the aggregate ``landmarks.csv``).
FORMATS = ("csv", "mrk.json", "fcsv", "json")
DEFAULT_FORMATS = ("csv", "mrk.json")
#: File name endings taken from a folder (case-insensitive); ``.nii.gz`` before ``.gz``-less names.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".bmp",
                  ".tif", ".tiff", ".dcm", ".dicom", ".ima")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# stripped from file names to make case names (longest first)
_STRIP_SUFFIXES = (".nii.gz", ".img.gz", ".nii", ".img", ".hdr") + IMAGE_SUFFIXES[2:]
LIST_SUFFIXES = (".txt", ".lst")
#: Folder inside OUTPUT holding the run description and the per-case states.
STATE_DIR = ".heatmark"
STATE_VERSION = 1
#: Least time between two rewrites of the aggregate tables during a run (seconds).
AGGREGATE_INTERVAL_S = 1.0


class PredictUsageError(Exception):
    """A usage mistake (missing bundle or model, no inputs, bad option): one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# options and summary


@dataclass
class PredictOptions:
    """Everything ``heatmark predict`` takes; see :func:`add_predict_parser` for the meaning."""

    bundle: str | os.PathLike
    input: str | os.PathLike
    output: str | os.PathLike
    model: str | os.PathLike | None = None
    configs: Sequence[str] = ()
    device: str = "auto"
    batch_size: int = 1
    num_workers: int | None = None  # None: min(4, cpus)
    spacing: Sequence[float] | None = None
    pixel_units: bool = False
    amp: bool | None = None  # None: the bundle's `amp`, on CUDA only
    save_heatmaps: bool = False
    overlays: bool = False
    formats: Sequence[str] = DEFAULT_FORMATS
    overwrite: bool = False
    recursive: bool = False
    pattern: str | None = None
    progress: bool = True


@dataclass
class PredictSummary:
    """What a run did. ``failures`` are ``(case, path, error)`` of this run."""

    output: Path
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed else EXIT_OK

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        text = (f"{self.processed} processed, {self.skipped} skipped (done before), {self.failed} failed "
                f"in {self.seconds:.1f} s ({rate:.2f} cases/s); results in {self.output}")
        if self.failed:
            text += f" (failures listed in {self.output / 'errors.csv'})"
        return text


# ----------------------------------------------------------------------------------------------
# small helpers


_WRAPPERS = ("applying transform", "Failed to instantiate", "Component to instantiate")


def _describe(exc: BaseException) -> str:
    """A one-line reason: the innermost cause of MONAI's "applying transform" wrappers."""
    from heatmark.transforms.io import ImageLoadError

    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__
    for e in chain:
        if isinstance(e, ImageLoadError):
            return e.problem
    # skip MONAI's wrappers ("applying transform ...", "Failed to instantiate ...")
    inner = next((e for e in chain if not str(e).startswith(_WRAPPERS)), chain[-1])
    msg = " ".join(str(inner).split())
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{type(inner).__name__}: {msg}" if msg else type(inner).__name__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _per_axis(value: Any, d: int) -> np.ndarray:
    if value is None:
        return np.ones(d)
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    return np.repeat(arr, d) if arr.size == 1 else arr[:d]


# ----------------------------------------------------------------------------------------------
# inputs and case names


def has_dicom_marker(path: Path) -> bool:
    from heatmark.transforms.io import has_dicom_marker as marker  # lazy: keeps `heatmark --help` fast

    return marker(path)


def _is_dicom_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(_DICOM_SUFFIXES):
        return True
    return "." not in name and has_dicom_marker(path)


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(IMAGE_SUFFIXES) or ("." not in name and has_dicom_marker(path))


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


def find_inputs(source: str | os.PathLike, recursive: bool = False, pattern: str | None = None,
                spatial_dims: int | None = None, exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The images named by ``source`` (a file, a folder or a ``.txt``/``.lst`` list), in order.

    Folders: files with an image ending (:data:`IMAGE_SUFFIXES`) or matching ``pattern`` (on the
    name or the path below the folder), hidden entries and ``exclude`` folders skipped; with
    ``spatial_dims == 3`` a folder of DICOM slices is one input. Duplicates are dropped.

    Raises:
        PredictUsageError: ``source`` does not exist, or names no inputs.
    """
    src = Path(os.path.expanduser(os.fspath(source)))
    if not src.exists():
        if src.is_symlink():
            try:
                os.stat(src)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise PredictUsageError(f"input not found: {src} is a symbolic link loop") from None
            raise PredictUsageError(f"input not found: {src} is a broken symbolic link (to {os.readlink(src)})")
        raise PredictUsageError(f"input not found: {src}")
    if src.is_file():
        found = _read_list(src) if src.name.lower().endswith(LIST_SUFFIXES) else [src]
    elif src.is_dir():
        found = _scan_folder(src, recursive, pattern, spatial_dims, [Path(os.path.abspath(e)) for e in exclude])
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
                             and not _inside(Path(os.path.abspath(here / d)), exclude))
        for name in sorted(filenames):
            p = here / name
            if name.startswith(".") or _inside(Path(os.path.abspath(p)), exclude):
                continue
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


def _base_name(path: Path) -> str:
    name = path.name
    lower = name.lower()
    for s in _STRIP_SUFFIXES:
        if lower.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return name if path.is_dir() or "." not in name.strip(".") else name.rsplit(".", 1)[0]


def assign_case_names(paths: Sequence[Path], reserved: Sequence[str] = ()) -> list[str]:
    """One case name per input: the file name without its image ending, sanitised with
    :func:`heatmark.fileio.safe_case_name`; names that clash (case-insensitively) with each other
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
        return safe_case_name("_".join([*prefix, bases[i]]))

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
# the bundle


@dataclass
class _Bundle:
    root: Path
    network: Any
    preprocessing: Callable
    postprocessing: Callable
    names: list[str]
    spatial_dims: int
    output_stride: tuple[int, ...]
    measurements: list[dict]
    measurement_names: list[str]
    device: Any
    amp: bool
    amp_kwargs: dict
    fingerprint: dict
    image_key: str = "image"
    pred_key: str = "pred"


def _resolve_device(name: str):
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise PredictUsageError(f"--device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PredictUsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PredictUsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        with contextlib.suppress(Exception):
            torch.empty(0, device=device)
            return device
        raise PredictUsageError(f"--device {name}: not available")
    return device


def bundle_config_files(bundle: Path, main: Sequence[str], extra: Sequence[str] = ()) -> list[Path]:
    """``bundle/configs/<main...>`` followed by the overlays ``extra`` (a path, or a name in
    ``configs/``); ``FileNotFoundError`` names the first one missing."""
    configs = Path(bundle) / "configs"
    files = [configs / name for name in main]
    for name in extra:
        p = Path(name)
        files.append(p if p.is_file() else configs / name)
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"config not found: {f}")
    return files


def _state_dict(obj: Any) -> Mapping[str, Any]:
    import torch

    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("model", "network", "state_dict", "net"):
            if isinstance(obj.get(key), Mapping):
                return _state_dict(obj[key])
    raise ValueError("it holds no network state_dict (expected a dict of tensors, or one under "
                     "'model'/'network'/'state_dict')")


def _load_bundle(opts: PredictOptions) -> _Bundle:
    import torch

    bundle = Path(os.path.expanduser(os.fspath(opts.bundle)))
    if not bundle.is_dir():
        raise PredictUsageError(f"bundle folder not found: {bundle}")
    if not (bundle / "configs").is_dir():
        raise PredictUsageError(f"{bundle} is not a bundle folder (no configs/ inside)")
    try:
        files = bundle_config_files(bundle, ("train.yaml", "inference.yaml"), opts.configs)
    except FileNotFoundError as e:
        raise PredictUsageError(str(e)) from None

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
    except Exception as e:  # noqa: BLE001 - one clear line
        raise PredictUsageError(f"cannot read the bundle configs {[str(f) for f in files]}: {_describe(e)}") from None
    parser["bundle_root"] = str(bundle)
    if opts.spacing is not None:
        parser["image_spacing"] = [float(s) for s in opts.spacing]
    if opts.pixel_units:
        if "inference#loader" not in parser:
            raise PredictUsageError(f"--pixel-units: bundle {bundle} has no `inference#loader` to configure")
        parser["inference#loader#allow_pixel_units"] = True

    def get(key: str, default: Any = ..., what: str = ""):
        if default is not ... and key not in parser:
            return default
        try:
            return parser.get_parsed_content(key)
        except Exception as e:  # noqa: BLE001
            raise PredictUsageError(f"bundle {bundle}: cannot build {key!r}{what}: {_describe(e)}") from None

    names = [str(n) for n in get("landmark_names")]
    spatial_dims = int(get("spatial_dims"))
    preprocessing = get("inference#preprocessing", what=" (with --spacing)" if opts.spacing is not None else "")
    postprocessing = get("inference#postprocessing")
    network = get("network_def")
    stride = get("output_stride", None) or getattr(network, "output_stride", None)
    output_stride = tuple(int(s) for s in _per_axis(stride, spatial_dims))
    measurements = list(get("measurements", []) or [])
    from heatmark.metrics import measure

    try:
        measurement_names = list(measure(np.full((len(names), spatial_dims), np.nan), names, measurements))
    except (ValueError, KeyError, TypeError) as e:
        raise PredictUsageError(f"bundle {bundle}: bad `measurements`: {e}") from None

    model = Path(os.path.expanduser(os.fspath(opts.model))) if opts.model else Path(get("ckpt_path"))
    if not model.is_file():
        raise PredictUsageError(f"model not found: {model} (train the bundle first, or pass --model PATH)")
    try:
        state = _state_dict(torch.load(model, map_location="cpu", weights_only=True))
        network.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise PredictUsageError(f"cannot load the model {model} into the bundle's network_def: "
                                f"{_describe(e).splitlines()[0][:300]}") from None

    device = _resolve_device(opts.device)
    bundle_amp = bool(get("amp", False))
    amp = bool(opts.amp) if opts.amp is not None else (bundle_amp and device.type == "cuda")
    amp_dtype = str(get("amp_dtype", "float16")) if device.type == "cuda" else "bfloat16"
    network = network.to(device).eval()

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    fingerprint = {
        "model_sha256": _sha256(model),
        "configs_sha256": h.hexdigest(),
        "image_spacing": None if opts.spacing is None else [float(s) for s in opts.spacing],
        "pixel_units": bool(opts.pixel_units),
        "landmark_names": names,
        "spatial_dims": spatial_dims,
    }
    return _Bundle(root=bundle, network=network, preprocessing=preprocessing, postprocessing=postprocessing,
                   names=names, spatial_dims=spatial_dims, output_stride=output_stride, measurements=measurements,
                   measurement_names=measurement_names, device=device, amp=amp,
                   amp_kwargs={"dtype": amp_dtype}, fingerprint=fingerprint,
                   image_key=str(getattr(postprocessing, "image_key", "image")),
                   pred_key=str(getattr(postprocessing, "pred_key", "pred")))


# ----------------------------------------------------------------------------------------------
# data loading: a case or an error record, never an exception


class _CaseDataset:
    """Map-style dataset: item ``i`` is ``{"case", "path", "image"}`` (preprocessed) or, when
    anything goes wrong, ``{"case", "path", "error"}`` with the reason in words."""

    def __init__(self, items: Sequence[tuple[str, str]], transform: Callable, spatial_dims: int,
                 image_key: str = "image"):
        self.items = list(items)
        self.transform = transform
        self.spatial_dims = spatial_dims
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        import torch

        case, path = self.items[index]
        try:
            image = self.transform({self.image_key: path})[self.image_key]
            affine = getattr(image, "affine", None)
            if affine is None:
                raise ValueError("preprocessing lost the image's affine (world coordinates)")
            if image.ndim != self.spatial_dims + 1:
                raise ValueError(f"preprocessed image has shape {tuple(image.shape)}; expected channel + "
                                 f"{self.spatial_dims} spatial axes")
            data = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image, dtype=torch.float32)
            if not torch.isfinite(data).all():
                raise ValueError("preprocessing produced non-finite values (NaN or infinity)")
            return {"case": case, "path": path, "image": data.contiguous(),
                    "affine": torch.as_tensor(affine, dtype=torch.float64).clone()}
        except Exception as e:  # noqa: BLE001 - every failure becomes a record, the batch goes on
            return {"case": case, "path": path, "error": _describe(e)}


def _collate(items: Sequence[dict]) -> dict:
    """Keep error records aside; stack the good cases, one group per preprocessed shape."""
    import torch

    errors = [it for it in items if "error" in it]
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        if "error" not in it:
            groups.setdefault(tuple(it["image"].shape), []).append(it)
    batches = [{"cases": [m["case"] for m in members], "paths": [m["path"] for m in members],
                "images": torch.stack([m["image"] for m in members]),
                "affines": torch.stack([m["affine"] for m in members])}
               for members in groups.values()]
    return {"errors": errors, "groups": batches}


# ----------------------------------------------------------------------------------------------
# inference


class _CaseFailure(Exception):
    pass


def _infer(bundle: _Bundle, images, affines, pad_to: int = 1, keep_heatmaps: bool = False) -> list[dict | str]:
    """Network + decoding for one stacked group; per case a result dict or an error string.

    The forward pass always runs on ``pad_to`` images (a smaller group is padded with copies of
    its last image): kernels may compute differently for different batch sizes (on CPU, batch 1
    differs from batch 2 in the last bits), and a case's result must not depend on which cases
    share its batch, or a resumed run would not reproduce an uninterrupted one.
    """
    import torch
    from monai.data import MetaTensor

    from heatmark.engines import autocast_context

    b = images.shape[0]
    x = images.to(bundle.device, non_blocking=True)
    if b < pad_to:
        x = torch.cat([x, x[-1:].expand(pad_to - b, *x.shape[1:])])
    with torch.inference_mode():
        with autocast_context(bundle.device, bundle.amp, bundle.amp_kwargs):
            pred = bundle.network(x)
        pred = pred[:b].float()
        if pred.ndim != bundle.spatial_dims + 2 or pred.shape[:2] != (b, len(bundle.names)):
            raise _CaseFailure(f"the network output has shape {tuple(pred.shape)}; expected "
                               f"({b}, {len(bundle.names)}, ...) heatmaps")
        finite = torch.isfinite(pred.flatten(1)).all(dim=1).cpu()
        try:
            out = bundle.postprocessing({bundle.pred_key: pred,
                                         bundle.image_key: MetaTensor(images, affine=affines)})
        except Exception as e:  # noqa: BLE001
            raise _CaseFailure(f"decoding failed: {_describe(e)}") from e
        world = torch.as_tensor(out["pred_world"]).detach().double().cpu().numpy()
        conf = torch.as_tensor(out["confidence"]).detach().double().cpu().numpy()
        heat = pred.cpu() if keep_heatmaps else None
    results: list[dict | str] = []
    for i in range(b):
        if not bool(finite[i]):
            results.append("the network output holds non-finite values (NaN/inf)" +
                           (" under mixed precision; try without --amp" if bundle.amp else ""))
        elif np.isnan(world[i]).all():
            results.append("decoding failed: no landmark could be located (the heatmaps are flat)")
        else:
            results.append({"world": world[i], "confidence": conf[i], "image": images[i], "affine": affines[i].numpy(),
                            "heatmap": None if heat is None else heat[i]})
    return results


def _infer_group(bundle: _Bundle, group: dict, pad_to: int = 1, keep_heatmaps: bool = False) -> list[dict | str]:
    try:
        return _infer(bundle, group["images"], group["affines"], pad_to, keep_heatmaps)
    except Exception as e:  # noqa: BLE001
        if len(group["cases"]) == 1:
            return [str(e) if isinstance(e, _CaseFailure) else f"inference failed: {_describe(e)}"]
    # isolate the culprit: one case at a time
    out: list[dict | str] = []
    for i in range(len(group["cases"])):
        out.extend(_infer_group(bundle, {"cases": group["cases"][i:i + 1], "images": group["images"][i:i + 1],
                                         "affines": group["affines"][i:i + 1]}, pad_to, keep_heatmaps))
    return out


# ----------------------------------------------------------------------------------------------
# outputs


def _case_files(case: str, opts: PredictOptions) -> list[str]:
    files = [f"{case}.{fmt}" for fmt in opts.formats if fmt != "csv"]
    if opts.save_heatmaps:
        files.append(f"{case}_heatmaps.nii.gz")
    if opts.overlays:
        files.append(f"{case}_overlay.png")
    return files


def _save_heatmaps(path: Path, heatmap: Any, grid_affine: np.ndarray, output_stride: Sequence[int]) -> None:
    import nibabel as nib

    data = np.asarray(heatmap, dtype=np.float32)  # (N, *S)
    data = np.moveaxis(data, 0, -1)  # (*S, N)
    if data.ndim == 3:  # 2D: X x Y x 1 x N
        data = data[:, :, None, :]
    from heatmark.geometry import nifti_affine, output_grid_affine

    img = nib.Nifti1Image(np.ascontiguousarray(data), nifti_affine(output_grid_affine(grid_affine, output_stride)))
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"heatmark heatmaps; landmarks along axis 4"
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _write_case(out: Path, case: str, result: dict, bundle: _Bundle, opts: PredictOptions) -> dict:
    """Write one case's own files (atomically); returns the case's state payload."""
    from heatmark.landmarks import Landmarks, write_landmarks
    from heatmark.metrics import measure

    lm = Landmarks(result["world"], bundle.names)
    for fmt in opts.formats:
        if fmt != "csv":
            write_landmarks(out / f"{case}.{fmt}", lm, case=case if fmt == "json" else None)
    if opts.save_heatmaps:
        _save_heatmaps(out / f"{case}_heatmaps.nii.gz", result["heatmap"], result["affine"], bundle.output_stride)
    if opts.overlays:
        from heatmark.reports import plot_overlay

        plot_overlay(result["image"], result["affine"], lm.coords, out / f"{case}_overlay.png",
                     names=bundle.names, title=case)
    values = measure(lm.coords, bundle.names, bundle.measurements) if bundle.measurements else {}
    return {
        "coords": [None if np.isnan(p).any() else [float(v) for v in p] for p in lm.coords],
        "confidence": [float(c) for c in result["confidence"]],
        "measurements": {k: (None if math.isnan(v) else float(v)) for k, v in values.items()},
        "files": _case_files(case, opts),
    }


class _Store:
    """The per-case states of an OUTPUT folder, in memory and under ``.heatmark/cases``."""

    def __init__(self, out: Path, bundle: _Bundle):
        self.out = out
        self.dir = out / STATE_DIR / "cases"
        self.bundle = bundle
        self.states: dict[str, dict] = {}

    def load(self) -> None:
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.json")):
            if p.name.startswith(TMP_PREFIX):
                continue
            try:
                s = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable: as if absent, the case is redone
            if (isinstance(s, dict) and s.get("version") == STATE_VERSION and s.get("case") == p.name[:-5]
                    and s.get("status") in ("done", "failed") and self._valid(s)):
                self.states[s["case"]] = s

    def _valid(self, s: dict) -> bool:
        if s["status"] == "failed":
            return True
        coords = s.get("coords")
        d = self.bundle.spatial_dims
        return (s.get("landmark_names") == self.bundle.names and isinstance(coords, list)
                and len(coords) == len(self.bundle.names)
                and all(c is None or (isinstance(c, list) and len(c) == d) for c in coords))

    def is_done(self, case: str, path: str, opts: PredictOptions) -> bool:
        s = self.states.get(case)
        return (s is not None and s["status"] == "done" and s.get("source") == os.path.abspath(path)
                and all((self.out / f).is_file() for f in _case_files(case, opts)))

    def _remove_files(self, case: str, keep: Sequence[str] = ()) -> None:
        old = self.states.get(case)
        for f in (old or {}).get("files", []):
            if f not in keep and Path(f).name == f and f.startswith(case):
                with contextlib.suppress(OSError):
                    (self.out / f).unlink()

    def put(self, state: dict) -> None:
        case = state["case"]
        self._remove_files(case, keep=state.get("files", []))
        atomic_write_text(self.dir / f"{case}.json", json.dumps(state, allow_nan=False) + "\n")
        self.states[case] = state

    def drop(self, case: str) -> None:
        self._remove_files(case)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{case}.json").unlink()
        self.states.pop(case, None)

    def write_aggregates(self, opts: PredictOptions) -> None:
        from heatmark.landmarks import CSV_FRAME_COMMENT, Landmarks, write_landmark_table

        b = self.bundle
        done = sorted(c for c, s in self.states.items() if s["status"] == "done")
        failed = sorted(c for c, s in self.states.items() if s["status"] == "failed")
        if "csv" in opts.formats:
            path = self.out / "landmarks.csv"
            if done:
                table, conf = {}, {}
                for c in done:
                    s = self.states[c]
                    coords = np.array([p if p is not None else [np.nan] * b.spatial_dims for p in s["coords"]],
                                      dtype=np.float64)
                    table[c] = Landmarks(coords, b.names)
                    conf[c] = np.asarray(s["confidence"], dtype=np.float64)
                write_landmark_table(path, table, confidence=conf)
            else:
                header = ["case", "landmark", "name", *("x_mm", "y_mm", "z_mm")[: b.spatial_dims], "confidence"]
                atomic_write_text(path, csv_text([header], comment=CSV_FRAME_COMMENT))
        if b.measurement_names:
            rows: list[list[Any]] = [["case", *b.measurement_names]]
            for c in done:
                m = self.states[c].get("measurements") or {}
                rows.append([c, *("" if m.get(n) is None else csv_cell(float(m[n])) for n in b.measurement_names)])
            atomic_write_text(self.out / "measurements.csv", csv_text(rows))
        rows = [["case", "path", "error"]]
        rows += [[c, self.states[c].get("path", ""), self.states[c].get("error", "")] for c in failed]
        atomic_write_text(self.out / "errors.csv", csv_text(rows))


def _remove_debris(folders: Sequence[Path]) -> None:
    """Delete temporary files left by a killed run (``TMP_PREFIX``; see heatmark.fileio)."""
    for folder in folders:
        if folder.is_dir():
            for p in folder.glob(TMP_PREFIX + "*"):
                with contextlib.suppress(OSError):
                    p.unlink()


def _check_run_file(out: Path, store: _Store, bundle: _Bundle, opts: PredictOptions) -> None:
    """Refuse to mix results of another model/config/spacing unless --overwrite (then drop them)."""
    run_file = out / STATE_DIR / "run.json"
    previous = None
    if run_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint")
    if store.states and previous != bundle.fingerprint:
        if not opts.overwrite:
            what = "an unknown run" if previous is None else ", ".join(
                k.replace("_sha256", "") for k in bundle.fingerprint if previous.get(k) != bundle.fingerprint[k])
            raise PredictUsageError(f"{out} holds results of another model or settings ({what} differ); "
                                    "choose another OUTPUT folder or pass --overwrite to replace them")
        for case in list(store.states):
            store.drop(case)
    doc = {"fingerprint": bundle.fingerprint, "bundle": str(bundle.root.resolve()),
           "options": {"formats": list(opts.formats), "save_heatmaps": opts.save_heatmaps,
                       "overlays": opts.overlays, "amp": bundle.amp, "device": str(bundle.device)}}
    atomic_write_text(run_file, json.dumps(doc, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# the run


def _check_options(opts: PredictOptions) -> PredictOptions:
    formats: list[str] = []
    for item in opts.formats or ():
        for f in str(item).split(","):
            f = f.strip().lower().lstrip(".")
            if not f:
                continue
            if f not in FORMATS:
                raise PredictUsageError(f"--format {f!r}: choose among {', '.join(FORMATS)}")
            if f not in formats:
                formats.append(f)
    if not formats:
        raise PredictUsageError(f"--format: choose at least one of {', '.join(FORMATS)}")
    if int(opts.batch_size) < 1:
        raise PredictUsageError(f"--batch-size must be at least 1, got {opts.batch_size}")
    workers = min(4, os.cpu_count() or 1) if opts.num_workers is None else int(opts.num_workers)
    if workers < 0:
        raise PredictUsageError(f"--num-workers must be 0 or more, got {opts.num_workers}")
    spacing = None
    if opts.spacing is not None:
        spacing = [float(s) for s in np.atleast_1d(np.asarray(opts.spacing, dtype=np.float64))]
        if not spacing or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise PredictUsageError(f"--spacing must be positive numbers (mm), got {opts.spacing}")
    return PredictOptions(**{**opts.__dict__, "formats": tuple(formats), "batch_size": int(opts.batch_size),
                             "num_workers": workers, "spacing": spacing})


def run_predict(opts: PredictOptions, log: Callable[[str], None] | None = None) -> PredictSummary:
    """Run a bundle over the inputs; see the module documentation. Raises PredictUsageError."""
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = _check_options(opts)
    out = Path(os.path.expanduser(os.fspath(opts.output)))
    if out.exists() and not out.is_dir():
        raise PredictUsageError(f"OUTPUT exists and is not a folder: {out}")
    src = Path(os.path.expanduser(os.fspath(opts.input)))
    if src.is_dir() and os.path.abspath(src) == os.path.abspath(out):
        raise PredictUsageError("OUTPUT must not be the INPUT folder")
    bundle = _load_bundle(opts)
    paths = find_inputs(src, opts.recursive, opts.pattern, bundle.spatial_dims, exclude=[out])
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))

    out.mkdir(parents=True, exist_ok=True)
    store = _Store(out, bundle)
    _remove_debris([out, store.dir, out / STATE_DIR])
    store.load()
    _check_run_file(out, store, bundle, opts)
    # cases of other inputs already in OUTPUT keep their names; the same input keeps one name
    sources = {os.path.abspath(p) for p in paths}
    cases = assign_case_names(paths, reserved=[c for c, s in store.states.items() if s.get("source") not in sources])
    current = {os.path.abspath(p): c for p, c in zip(paths, cases)}
    for case, s in list(store.states.items()):
        if s.get("source") in current and current[s["source"]] != case:
            store.drop(case)  # superseded: that input now has another name (the input set changed)

    summary = PredictSummary(output=out, total=len(paths))
    todo = []
    for p, c in zip(paths, cases):
        if not opts.overwrite and store.is_done(c, str(p), opts):
            summary.skipped += 1
        else:
            todo.append((c, str(p)))

    def fail(case: str, path: str, error: str) -> None:
        store.put({"version": STATE_VERSION, "case": case, "status": "failed", "path": path,
                   "source": os.path.abspath(path), "error": error})
        summary.failed += 1
        summary.failures.append((case, path, error))
        say(f"failed: {case} ({path}): {error}")

    dataset = _CaseDataset(todo, bundle.preprocessing, bundle.spatial_dims, bundle.image_key)
    workers = min(opts.num_workers, -(-len(todo) // opts.batch_size))  # no idle worker processes
    loader = torch.utils.data.DataLoader(dataset, batch_size=opts.batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate,
                                         pin_memory=bundle.device.type == "cuda")
    bar = tqdm(total=len(todo), unit="case", desc="predict", disable=not opts.progress or not todo,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    last_write = time.monotonic()
    iterator = None
    try:
        iterator = iter(loader)
        for batch in iterator:
            for rec in batch["errors"]:
                fail(rec["case"], rec["path"], rec["error"])
                bar.update(1)
            for group in batch["groups"]:
                results = _infer_group(bundle, group, opts.batch_size, opts.save_heatmaps)
                for case, path, result in zip(group["cases"], group["paths"], results):
                    if isinstance(result, str):
                        fail(case, path, result)
                    else:
                        try:
                            payload = _write_case(out, case, result, bundle, opts)
                        except (KeyboardInterrupt, SystemExit):
                            raise
                        except Exception as e:  # noqa: BLE001
                            fail(case, path, f"writing the outputs failed: {_describe(e)}")
                        else:
                            store.put({"version": STATE_VERSION, "case": case, "status": "done", "path": path,
                                       "source": os.path.abspath(path), "landmark_names": bundle.names,
                                       "spatial_dims": bundle.spatial_dims, **payload})
                            summary.processed += 1
                    bar.update(1)
            if summary.failed:
                bar.set_postfix(failed=summary.failed, refresh=False)
            if time.monotonic() - last_write >= AGGREGATE_INTERVAL_S:
                store.write_aggregates(opts)
                last_write = time.monotonic()
    except KeyboardInterrupt:
        summary.interrupted = True
    except BaseException:
        with contextlib.suppress(Exception):
            store.write_aggregates(opts)  # consistent tables for what is done, then the error
        raise
    finally:
        bar.close()
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()
    store.write_aggregates(opts)
    summary.seconds = time.perf_counter() - t0
    return summary


# ----------------------------------------------------------------------------------------------
# command line


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _spacing(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected mm per axis like 0.1 or 0.1,0.1, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"spacing must be positive numbers (mm), got {text!r}")
    return values


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder with configs/ and models/model.pt")
    p.add_argument("input", help="an image, a folder of images, or a .txt/.lst file listing paths "
                                 "(one per line, relative to the list's folder)")
    p.add_argument("output", help="output folder (created; a rerun into it resumes)")
    p.add_argument("--model", metavar="PATH", help="network weights (default: the bundle's ckpt_path, "
                                                   "models/model.pt)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="extra overlay config after train.yaml + inference.yaml (in configs/ or a path; repeatable)")
    p.add_argument("--recursive", action="store_true", help="look for images in subfolders too")
    p.add_argument("--pattern", metavar="GLOB", help="take the files whose name (or path below INPUT) matches, "
                                                     "e.g. '*_t1.nii.gz'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1, help="cases per forward pass (default 1)")
    p.add_argument("--num-workers", type=_int_at_least(0), default=None,
                   help="data loading processes (default min(4, CPUs); 0 loads in the main process)")
    p.add_argument("--spacing", type=_spacing, metavar="MM[,MM]",
                   help="pixel spacing in mm for images without one (PNG/JPEG...); "
                        "overrides the bundle's image_spacing")
    p.add_argument("--pixel-units", action="store_true",
                   help="accept images without any spacing as 1 mm per pixel (results are then in pixel units)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (fp16 on CUDA, bf16 on CPU; default: the bundle's amp, on CUDA only)")
    p.add_argument("--format", action="append", metavar="FMT", dest="formats",
                   help=f"outputs among {', '.join(FORMATS)}; repeatable or comma-separated "
                        f"(default: {','.join(DEFAULT_FORMATS)}); csv is the table landmarks.csv")
    p.add_argument("--save-heatmaps", action="store_true", help="write <case>_heatmaps.nii.gz (network output grid)")
    p.add_argument("--overlays", action="store_true", help="write <case>_overlay.png")
    p.add_argument("--overwrite", action="store_true", help="redo cases already done in OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``predict`` command to ``subparsers`` (of ``argparse``); returns its parser."""
    p = subparsers.add_parser(
        "predict", help="run a trained bundle over images: landmarks in world mm (CSV, Slicer)",
        description="Run the model of BUNDLE over INPUT and write landmarks in world mm (RAS) to OUTPUT: "
                    "landmarks.csv, one Slicer .mrk.json per case, measurements.csv, errors.csv. Bad inputs are "
                    "listed in errors.csv and do not stop the run; a rerun into the same OUTPUT resumes.",
        epilog="Exit status: 0 all done, 1 some inputs failed, 2 usage error, 130 interrupted.")
    _add_arguments(p)
    p.set_defaults(func=cmd_predict)
    return p


def _options_from_args(args: argparse.Namespace) -> PredictOptions:
    return PredictOptions(
        bundle=args.bundle, input=args.input, output=args.output, model=args.model,
        configs=tuple(args.config or ()), device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, spacing=args.spacing, pixel_units=args.pixel_units, amp=args.amp,
        save_heatmaps=args.save_heatmaps, overlays=args.overlays,
        formats=tuple(args.formats) if args.formats else DEFAULT_FORMATS, overwrite=args.overwrite,
        recursive=args.recursive, pattern=args.pattern, progress=not args.quiet)


def cmd_predict(args: argparse.Namespace) -> int:
    """``heatmark predict``: returns the exit status (0, 1, 2 or 130)."""
    try:
        summary = run_predict(_options_from_args(args))
    except PredictUsageError as e:
        print(f"heatmark predict: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("heatmark predict: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"heatmark predict: {summary.line()}")
    if summary.interrupted:
        print(f"heatmark predict: interrupted; the files in {summary.output} are consistent for the cases done. "
              "Run the same command again to resume.", file=sys.stderr)
    return summary.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m heatmark.predict BUNDLE INPUT OUTPUT [options]``."""
    parser = argparse.ArgumentParser(prog="heatmark")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
