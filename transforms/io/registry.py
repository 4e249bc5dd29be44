"""The reader registry: which :class:`~heatmark.transforms.io.base.ImageReader` reads a path.

Every reader declares the file name endings it reads once (``ImageReader.suffixes``); the
loader, input discovery and messages all derive from :data:`READERS`:

* :func:`reader_for` picks the reader of a path: a folder goes to the first reader that reads
  folders (a DICOM series); a file to the reader of its longest registered suffix
  (case-insensitive); a file with no registered suffix to the first reader that recognises its
  content (:meth:`ImageReader.sniff`: the ``DICM`` marker of DICOM files).
* :data:`IMAGE_SUFFIXES`, :data:`DICOM_SUFFIXES`, :func:`image_suffix` and
  :func:`is_companion_file` are what a folder scan needs to find images.

A new format is one :class:`ImageReader` subclass passed to :func:`register_reader`; nothing
else changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from heatmark.transforms.io.base import ImageLoadError, ImageReader
from heatmark.transforms.io.dicom import DicomFileReader, DicomSeriesReader
from heatmark.transforms.io.itk import ItkReader
from heatmark.transforms.io.nifti import NiftiReader
from heatmark.transforms.io.pil import PilReader

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "READERS",
    "image_suffix",
    "is_companion_file",
    "reader_for",
    "register_reader",
]

#: The registered readers, in order of precedence (for folders and content sniffing; suffixes
#: are unique to one reader). Change it through :func:`register_reader`.
READERS: list[ImageReader] = []


def register_reader(reader: ImageReader) -> ImageReader:
    """Add ``reader`` to :data:`READERS` (last) and return it.

    Raises:
        TypeError: ``reader`` is not an :class:`ImageReader` instance.
        ValueError: its name is empty or taken, a suffix is not lowercase ``".ext"`` or is
            already read by another reader, or a companion suffix is not one of its suffixes.
    """
    if not isinstance(reader, ImageReader):
        raise TypeError(f"expected an ImageReader instance, got {type(reader).__name__}")
    if not reader.name or any(r.name == reader.name for r in READERS):
        raise ValueError(f"reader name {reader.name!r} is empty or already registered")
    claimed = {s: r for r in READERS for s in r.suffixes}
    for s in reader.suffixes:
        if not (isinstance(s, str) and len(s) > 1 and s.startswith(".") and s == s.lower()):
            raise ValueError(f"{reader!r}: suffix {s!r} must be a lowercase file name ending starting with '.'")
        if s in claimed:
            raise ValueError(f"{reader!r}: suffix {s!r} is already read by {claimed[s]!r}")
    for s in reader.companions:
        if s not in reader.suffixes:
            raise ValueError(f"{reader!r}: companion suffix {s!r} is not one of its suffixes")
    READERS.append(reader)
    return reader


def _suffixes_longest_first() -> tuple[str, ...]:
    ordered = [s for r in READERS for s in r.suffixes]
    return tuple(sorted(ordered, key=len, reverse=True))  # stable: registry order among equal lengths


def _reader_of_suffix(suffix: str) -> ImageReader:
    return next(r for r in READERS if suffix in r.suffixes)


def image_suffix(name: os.PathLike | str) -> str | None:
    """The registered suffix the file name ends with (lowercase; longest match, case-insensitive),
    else ``None``. ``"Scan.NII.GZ"`` -> ``".nii.gz"``; ``"notes.txt"``, ``"IM0001"`` -> None."""
    base = os.path.basename(os.fspath(name)).lower()
    for s in _suffixes_longest_first():
        if base.endswith(s) and len(base) > len(s):
            return s
    return None


def reader_for(path: os.PathLike | str) -> ImageReader:
    """The reader of a file or folder (see the module docstring).

    Only a folder test and, for a file without a registered suffix, the content sniffing touch
    the file system: a missing file with a known suffix still gets its reader.

    Raises:
        ImageLoadError: no reader reads it; the message names the file and lists the suffixes
            (and other inputs) that are supported.
    """
    p = Path(os.fspath(path))
    if p.is_dir():
        for r in READERS:
            if r.reads_folders:
                return r
        raise ImageLoadError(p, f"it is a folder, and no image reader reads folders; supported: {_supported()}")
    suffix = image_suffix(p.name)
    if suffix is not None:
        return _reader_of_suffix(suffix)
    for r in READERS:
        if r.sniff(p):
            return r
    raise ImageLoadError(p, f"unsupported file type '{p.suffix.lower() or p.name}'; supported: {_supported()}")


def _supported() -> str:
    """``NIfTI (.nii, .nii.gz, ...), ..., DICOM series (a folder holding one series)``."""
    parts = []
    for r in READERS:
        inputs = list(r.suffixes) + ([r.inputs_hint] if r.inputs_hint else [])
        parts.append(f"{r.format} ({', '.join(inputs)})")
    return "; ".join(parts)


def is_companion_file(path: os.PathLike | str) -> bool:
    """True for a file that is read through another file of the same case, which a folder scan
    must therefore not take as a second image: a NIfTI/Analyze pair's ``.img`` (``.img.gz``)
    when its ``.hdr`` (``.hdr.gz``) sibling exists; the header file is the input. A lone
    ``.img`` is not a companion (loading it reports what is missing)."""
    p = Path(os.fspath(path))
    suffix = image_suffix(p.name)
    if suffix is None:
        return False
    stem = p.name[: len(p.name) - len(suffix)]
    for primary in _reader_of_suffix(suffix).companions.get(suffix, ()):
        for candidate in (primary, primary.upper()):  # a.img + a.hdr, A.IMG + A.HDR
            if (p.parent / (stem + candidate)).is_file():
                return True
    return False


for _reader in (NiftiReader(), ItkReader(), PilReader(), DicomFileReader(), DicomSeriesReader()):
    register_reader(_reader)
del _reader

#: Every suffix the built-in readers read, longest first (``.nii.gz`` before ``.nii``), for
#: folder scans and messages. Readers registered later are seen by :func:`image_suffix` and
#: :func:`reader_for`, not here.
IMAGE_SUFFIXES: tuple[str, ...] = _suffixes_longest_first()
#: Suffixes of single DICOM files (a suffix-less file with the ``DICM`` marker is DICOM too:
#: :func:`~heatmark.transforms.io.dicom.has_dicom_marker`).
DICOM_SUFFIXES: tuple[str, ...] = DicomFileReader.suffixes
