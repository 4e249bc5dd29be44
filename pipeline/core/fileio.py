"""Files: atomic writes (every output is written to a temporary name in the same folder and
renamed into place, so an interrupted run never leaves a half-written file behind), CSV cells,
safe case names and SHA-256 checksums."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_text", "sha256_file", "missing_path_reason", "safe_case_name", "csv_cell", "csv_text",
           "TMP_PREFIX"]

#: Prefix of the temporary files; anything starting with it in an output folder is debris of an
#: interrupted write and may be deleted.
TMP_PREFIX = ".heatmark-tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file lives in the destination folder (same file system, so ``os.replace`` is
    atomic) and keeps the destination's suffixes so that writers choosing a format by extension
    (nibabel, ITK, matplotlib) still work. On any exception the temporary file is removed and the
    destination is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if path.suffixes else ""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (newlines are written as given)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)


def missing_path_reason(path: str | os.PathLike) -> str:
    """Why an existing-looking ``path`` cannot be opened, for messages: ``"it is a symbolic link loop
    (the links point at each other)"``, ``"it is a broken symbolic link (its target '...' does not
    exist)"``, or ``"it does not exist"``."""
    p = Path(path)
    if p.is_symlink():
        try:
            os.stat(p)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "it is a symbolic link loop (the links point at each other)"
        return f"it is a broken symbolic link (its target '{os.readlink(p)}' does not exist)"
    return "it does not exist"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_case_name(name: str, max_length: int = 120) -> str:
    """A case name usable as one file name inside an output folder.

    Path separators, ``..``, leading dots and any character outside ``[A-Za-z0-9._-]`` are
    replaced by ``_``, so a name derived from an input file can never point outside the folder.
    """
    s = _UNSAFE.sub("_", str(name)).strip("._") or "case"
    s = s.replace("..", "_")
    return s[:max_length]


def csv_cell(value: Any) -> str:
    """A CSV cell: floats in full precision (the shortest text that reads back exactly; ``inf``
    kept), NaN as an empty cell, anything else as text."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        return "" if math.isnan(value) else repr(value)
    return str(value)


def csv_text(rows: Sequence[Sequence[Any]], comment: str | None = None) -> str:
    """CSV text of ``rows`` (cells through :func:`csv_cell`), after an optional ``# comment`` line."""
    buf = io.StringIO()
    if comment:
        buf.write(comment + "\n")
    csv.writer(buf, lineterminator="\n").writerows([[csv_cell(v) for v in row] for row in rows])
    return buf.getvalue()
