"""DICOM: single files (``.dcm``, ``.dicom``, ``.ima`` or any file with the ``DICM`` marker) and
folders holding one series.

* Every numeric tag the readers use (size, bits, rescale, spacing, thickness, position,
  orientation: :data:`NUMERIC_TAGS`) is parsed first; a malformed value is an
  :class:`~heatmark.transforms.io.base.ImageLoadError` naming the file, the tag (keyword and
  number) and the value.
* Single frame: :class:`monai.data.PydicomReader` for the pixels (rescale slope/intercept
  applied; ITK/GDCM when pydicom cannot decode them), the geometry from the tags, turned into an
  affine by the loader: ``PixelSpacing`` (calibrated, at the patient) wins, projection
  radiographs without it use ``ImagerPixelSpacing`` (at the detector; MONAI ignores this tag),
  then ``NominalScannedPixelSpacing``; ImagePositionPatient/ImageOrientationPatient place the
  image in the patient frame. ``MONOCHROME1`` is inverted so that bright means dense.
* Colour (``SamplesPerPixel`` 3: secondary captures, photographs): decoded by pydicom and handed
  to the loader as RGB channels (``ImageData.colour``), which it turns into luminance like a
  PNG's. ``YBR_FULL`` / ``YBR_FULL_422`` (JPEG's YCbCr) are converted to RGB exactly (linear,
  unrounded), so that the luminance is their Y channel; ``PlanarConfiguration`` 0 and 1 both.
* Several frames: ITK/GDCM (:func:`~heatmark.transforms.io.itk.read_with_itk`); colour frames
  become a grey volume (the samples decoded by pydicom as above, else as GDCM delivers them).
* A folder: ITK/GDCM series reading (one series per folder), every file's header checked with
  pydicom first (malformed values, naming the file; duplicate or unevenly spaced slices are
  refused). A colour series becomes a grey volume (RGB as GDCM delivers it).
* Compressed pixel data that no installed decoder reads (neither pydicom's plugins nor GDCM) is
  one error naming the transfer syntax.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ITKReader, PydicomReader
from monai.utils import optional_import

from heatmark.transforms.io.base import (
    LUMA,
    MAX_VOXELS,
    ImageData,
    ImageLoadError,
    ImageReader,
    check_size,
    describe,
    fmt,
    read_failed,
)
from heatmark.transforms.io.itk import read_with_itk

itk, _has_itk = optional_import("itk", allow_namespace_pkg=True)
pydicom, _has_pydicom = optional_import("pydicom")
pydicom_pixels, _has_pydicom_pixels = optional_import("pydicom.pixels")  # pydicom >= 3

__all__ = ["NUMERIC_TAGS", "DicomFileReader", "DicomSeriesReader", "has_dicom_marker"]

_SPACING_TAGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")

#: The numeric tags read by heatmark, MONAI or ITK/GDCM, with their number of values; each one
#: present in a file must hold that many finite numbers (integers for :data:`_INTEGER_TAGS`).
NUMERIC_TAGS: dict[str, int] = {
    "Rows": 1,
    "Columns": 1,
    "NumberOfFrames": 1,
    "SamplesPerPixel": 1,
    "PlanarConfiguration": 1,
    "BitsAllocated": 1,
    "BitsStored": 1,
    "HighBit": 1,
    "PixelRepresentation": 1,
    "RescaleSlope": 1,
    "RescaleIntercept": 1,
    "PixelSpacing": 2,
    "ImagerPixelSpacing": 2,
    "NominalScannedPixelSpacing": 2,
    "SliceThickness": 1,
    "SpacingBetweenSlices": 1,
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
}
_INTEGER_TAGS = frozenset(
    {"Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PlanarConfiguration", "BitsAllocated", "BitsStored",
     "HighBit", "PixelRepresentation"}
)
_RGB, _YBR = "RGB", ("YBR_FULL", "YBR_FULL_422")


def has_dicom_marker(path: os.PathLike | str) -> bool:
    """True when the file carries the DICOM Part 10 marker (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class DicomFileReader(ImageReader):
    """One DICOM file: a 2D image, or a 3D volume when it holds several frames."""

    name = "dicom"
    format = "DICOM"
    suffixes = (".dcm", ".dicom", ".ima")
    inputs_hint = "any file with the DICM marker"

    def sniff(self, path: Path) -> bool:
        return has_dicom_marker(path)

    def read(self, path: Path, *, max_voxels: int = MAX_VOXELS) -> ImageData:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        tags = _tag_numbers(path, ds)
        if "Rows" not in tags or "Columns" not in tags:
            raise ImageLoadError(path, "the DICOM file has no image (Rows/Columns missing)")
        rows, cols = int(tags["Rows"][0]), int(tags["Columns"][0])
        frames = int(tags["NumberOfFrames"][0]) if "NumberOfFrames" in tags else 1
        frames = frames or 1
        spp = int(tags["SamplesPerPixel"][0]) if "SamplesPerPixel" in tags else 1
        if spp not in (1, 3):
            raise ImageLoadError(
                path, f"the DICOM file has {spp} samples per pixel; 1 (grey) or 3 (colour) are supported"
            )
        check_size(path, (cols, rows) + ((frames,) if frames > 1 else ()), spp, max_voxels=max_voxels)
        if frames > 1:  # multi-frame volume: ITK/GDCM knows the per-frame geometry
            try:
                data = read_with_itk(path, self.format)
            except ImageLoadError as e:
                cause = e.__cause__ or e
                raise _decode_failed(path, ds, [("ITK/GDCM", cause)]) or e from cause
            if spp == 3:  # GDCM rounds and clips its YBR -> RGB conversion: pydicom's samples, when it decodes them
                data.colour = True
                try:
                    rgb = _decode_rgb(path, pydicom.dcmread(str(path))).transpose(2, 1, 0, 3)  # (x, y, frame, 3)
                except Exception:
                    rgb = None
                if rgb is not None and rgb.shape == data.array.shape and data.channel_dim in (-1, 3):
                    data.array = rgb
            return data

        arr, channel_dim = self._pixels(path, ds, colour=spp == 3)
        inverted = False
        if spp == 1 and _text(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
            bits = int(_first(tags, "BitsStored", 0) or _first(tags, "BitsAllocated", 16) or 16)
            signed = int(_first(tags, "PixelRepresentation", 0))
            lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            slope = float(_first(tags, "RescaleSlope", 1.0) or 1.0)
            icpt = float(_first(tags, "RescaleIntercept", 0.0))
            arr = (slope * (lo_raw + hi_raw) + 2 * icpt) - arr.astype(np.float64)
            inverted = True

        spacing, source, zero_tag = None, None, None
        for tag in _SPACING_TAGS:
            v = tags.get(tag)
            if v is None:
                continue
            if np.any(v < 0) or (np.any(v == 0) and not np.all(v == 0)):
                raise ImageLoadError(path, f"the DICOM tag {tag} {_tag_number(tag)} holds an invalid spacing {fmt(v)}")
            if np.all(v == 0):
                zero_tag = zero_tag or tag
                continue  # zero spacing means 'unknown'
            spacing, source = (float(v[1]), float(v[0])), tag  # tags are (row spacing, column spacing)
            break
        ipp, iop = tags.get("ImagePositionPatient"), tags.get("ImageOrientationPatient")
        patient = None
        if ipp is not None and iop is not None:
            r, c = iop[:3], iop[3:]
            if np.linalg.norm(r) > 1e-6 and np.linalg.norm(c) > 1e-6 and np.linalg.norm(np.cross(r, c)) > 1e-3:
                r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
                patient = (ipp, r, c)
            else:
                warnings.warn(f"{path}: ImageOrientationPatient {fmt(iop)} is degenerate; using the image frame", stacklevel=2)
        return ImageData(
            array=arr,
            affine=None,
            channel_dim=channel_dim,
            world_frame="RAS" if patient is not None else "image",
            header_spacing=spacing is not None,
            spacing=spacing,
            spacing_source=source,
            zero_spacing_tag=zero_tag,
            patient_plane=patient,
            intensity_inverted=inverted,
            colour=spp == 3,
        )

    def _pixels(self, path: Path, header: Any, colour: bool) -> tuple[np.ndarray, Any]:
        """Pixels of a single frame with axis 0 = columns, and the channel axis (colour: RGB last)."""
        try:
            if colour:
                return np.swapaxes(_decode_rgb(path, pydicom.dcmread(str(path))), 0, 1), -1
            reader = PydicomReader(affine_lps_to_ras=True, swap_ij=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ImageOrientationPatient.*")
                arr, meta = reader.get_data(reader.read(str(path)))
            return np.asarray(arr), meta.get("original_channel_dim")
        except ImageLoadError:
            raise
        except Exception as e:  # e.g. a compressed transfer syntax pydicom cannot decode: try GDCM
            try:
                ireader = ITKReader(affine_lps_to_ras=True)
                arr, meta = ireader.get_data(ireader.read(str(path)))
                arr, channel_dim = np.asarray(arr), meta.get("original_channel_dim")
                if arr.ndim >= 3 and arr.shape[2] == 1 and len(meta.get("spatial_shape", ())) == 3:
                    arr = arr[:, :, 0]
                    channel_dim = -1 if arr.ndim == 3 else float("nan")
                return arr, channel_dim
            except Exception as e2:
                raise _decode_failed(path, header, [("pydicom", e), ("ITK/GDCM", e2)]) or read_failed(
                    path, self.format, e
                ) from e


class DicomSeriesReader(ImageReader):
    """A folder holding one DICOM series, read as a 3D volume."""

    name = "dicom_series"
    format = "DICOM series"
    reads_folders = True
    inputs_hint = "a folder holding one series"

    def read(self, path: Path, *, max_voxels: int = MAX_VOXELS) -> ImageData:
        try:
            gen = itk.GDCMSeriesFileNames.New()
            gen.SetUseSeriesDetails(True)
            gen.AddSeriesRestriction("0008|0021")  # series date, as MONAI's ITKReader
            gen.SetDirectory(str(path))
            uids = list(gen.GetSeriesUIDs())
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        if not uids:
            raise ImageLoadError(path, "the folder contains no readable DICOM files")
        # every file's values first: a malformed one would otherwise split the series (GDCM
        # groups files by their geometry tags) or surface later as a parse error without a name
        series = [[str(n) for n in gen.GetFileNames(uid)] for uid in uids]
        headers: dict[str, tuple[Any, dict[str, np.ndarray]]] = {}
        for name in (n for names in series for n in names):
            where = f"its file '{os.path.relpath(name, path)}': "
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=list(NUMERIC_TAGS))
            except Exception as e:
                raise ImageLoadError(path, where + read_failed(Path(name), "DICOM", e).problem) from e
            headers[name] = (ds, _tag_numbers(path, ds, where))
        if len(uids) > 1:
            raise ImageLoadError(path, f"the folder contains {len(uids)} DICOM series; put each series in its own folder")
        names = series[0]
        first, tags = headers[names[0]]
        if "Rows" not in tags or "Columns" not in tags:
            where = os.path.relpath(names[0], path)
            raise ImageLoadError(path, f"its file '{where}' has no image (Rows/Columns missing)")
        rows, cols = int(tags["Rows"][0]), int(tags["Columns"][0])
        spp = int(_first(tags, "SamplesPerPixel", 1))
        check_size(path, (cols, rows, len(names)), spp, max_voxels=max_voxels)
        if len(names) > 2:
            _check_slice_positions(path, [headers[n][1] for n in names])
        reader = ITKReader(affine_lps_to_ras=True)
        try:
            img = itk.imread(names if len(names) > 1 else names[0])
            arr, meta = reader.get_data(img)
        except Exception as e:
            raise _decode_failed(path, first, [("ITK/GDCM", e)]) or read_failed(path, self.format, e) from e
        return ImageData(
            array=np.asarray(arr),
            affine=np.asarray(meta["affine"], dtype=np.float64),
            channel_dim=meta.get("original_channel_dim"),
            colour=spp == 3,
        )


def _check_slice_positions(path: Path, tags: Sequence[dict[str, np.ndarray]]) -> None:
    """Refuse series with duplicate or unevenly spaced slices (ITK would assume even spacing)."""
    if any("ImagePositionPatient" not in t for t in tags):
        return
    pos = [t["ImagePositionPatient"] for t in tags]
    ori = tags[0].get("ImageOrientationPatient")
    if ori is None:
        return
    normal = np.cross(ori[:3], ori[3:])
    if np.linalg.norm(normal) < 1e-6:
        return
    z = np.sort(np.asarray(pos) @ (normal / np.linalg.norm(normal)))
    gaps = np.diff(z)
    if np.any(gaps < 1e-4):
        raise ImageLoadError(path, "the DICOM series has two slices at the same position (duplicate slices)")
    mean = float(gaps.mean())
    worst = float(np.abs(gaps - mean).max())
    if worst > max(0.05 * mean, 1e-3):
        raise ImageLoadError(
            path,
            f"the DICOM series has uneven slice spacing (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm; "
            "missing slices?)",
        )


# --------------------------------------------------------------------------------------------
# tag values


def _tag_numbers(path: Path, ds: Any, where: str = "") -> dict[str, np.ndarray]:
    """The :data:`NUMERIC_TAGS` present (and not empty) in ``ds``, as float64 arrays.

    Raises:
        ImageLoadError: on ``path``, one line naming the tag (keyword and number) and its
            value, for a value that is not a number, not finite, not an integer where one is
            expected or has the wrong number of values; ``where`` is put before the problem
            (the file of a series).
    """
    out: dict[str, np.ndarray] = {}
    for keyword, count in NUMERIC_TAGS.items():
        if keyword not in ds:
            continue
        integer = keyword in _INTEGER_TAGS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's "Invalid value for VR IS": reported below
                value = ds[keyword].value
        except Exception as e:  # pydicom refused to convert it (strict reading mode)
            raise _bad_value(path, where, keyword, _raw_text(ds, keyword), count, integer) from e
        multi = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        values = list(value) if multi else [value]
        if all(v is None or (isinstance(v, (str, bytes)) and not _value_text(v)) for v in values):
            continue  # absent or empty (type 2 tags may be empty)
        try:
            numbers = np.asarray([_number(v, integer) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            numbers = None
        if numbers is None or numbers.size != count:
            text = "\\".join(_value_text(v) for v in values)
            raise _bad_value(path, where, keyword, text, count, integer)
        out[keyword] = numbers
    return out


def _number(value: Any, integer: bool) -> float:
    if isinstance(value, bytes):
        value = value.decode("ascii")
    if isinstance(value, str):
        value = value.strip(" \0")
    x = float(value)
    if not math.isfinite(x) or (integer and not x.is_integer()):
        raise ValueError(value)
    return x


def _bad_value(path: Path, where: str, keyword: str, text: str, count: int, integer: bool) -> ImageLoadError:
    kind = "integer" if integer else "number"
    expected = f"a finite {kind} is expected" if count == 1 else f"{count} finite {kind}s separated by \\ are expected"
    return ImageLoadError(
        path, f"{where}the DICOM tag {keyword} {_tag_number(keyword)} holds an invalid value '{text}' ({expected})"
    )


def _tag_number(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else ""


def _value_text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip(" \0")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 64 else text[:64] + "..."


def _raw_text(ds: Any, keyword: str) -> str:
    """The stored bytes of a tag as text, for messages (when pydicom cannot convert them)."""
    try:
        raw = ds.get_item(pydicom.datadict.tag_for_keyword(keyword)).value
    except Exception:
        return "?"
    return _value_text(raw) if isinstance(raw, (bytes, str)) else _value_text(repr(raw))


def _first(tags: dict[str, np.ndarray], keyword: str, default: float) -> float:
    v = tags.get(keyword)
    return float(v[0]) if v is not None else default


def _text(value: Any) -> str:
    """A code string (possibly an enum, as pydicom 3 reports them) upper-cased."""
    return str(getattr(value, "value", value)).strip(" \0").upper()


# --------------------------------------------------------------------------------------------
# pixels


def _decode_rgb(path: Path, ds: Any) -> np.ndarray:
    """The ``([Frames,] Rows, Columns, 3)`` RGB samples of a colour file.

    pydicom >= 3 decodes without its own colour conversion and says what it returned; YBR_FULL
    (and YBR_FULL_422, whose chroma pydicom upsamples) are converted here, exactly; other
    interpretations (YBR_ICT, YBR_RCT of JPEG 2000) are left to the decoder's RGB conversion.
    """
    photometric = _text(getattr(ds, "PhotometricInterpretation", ""))
    if _has_pydicom_pixels and hasattr(pydicom_pixels, "get_decoder"):
        decoder = pydicom_pixels.get_decoder(ds.file_meta.TransferSyntaxUID)
        arr, info = decoder.as_array(ds, raw=True)
        photometric = _text(info.get("photometric_interpretation", photometric))
        if photometric != _RGB and photometric not in _YBR:
            arr, info = decoder.as_array(ds)
            photometric = _text(info.get("photometric_interpretation", photometric))
    else:  # pydicom 2 returns YBR as stored (and renames upsampled YBR_FULL_422 to YBR_FULL)
        arr = ds.pixel_array
        photometric = _text(getattr(ds, "PhotometricInterpretation", photometric))
    arr = np.asarray(arr)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ImageLoadError(path, f"the colour DICOM pixels have an unexpected shape {arr.shape}")
    if photometric == _RGB:
        return arr
    if photometric in _YBR:
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        return _ybr_full_to_rgb(arr, bits)
    raise ImageLoadError(
        path,
        f"colour DICOM with PhotometricInterpretation {photometric or '(none)'} is not supported "
        "(RGB, YBR_FULL or YBR_FULL_422 expected)",
    )


def _ybr_full_to_rgb(ybr: np.ndarray, bits: int) -> np.ndarray:
    """YBR_FULL (ITU-R 601 full range, as JPEG) to RGB in float64, unrounded and unclipped: the
    exact inverse of Y = LUMA . RGB, so that the loader's luminance of the result is Y."""
    kr, kg, kb = LUMA
    offset = 2.0 ** (bits - 1)
    y = ybr[..., 0].astype(np.float64)
    cb = ybr[..., 1].astype(np.float64) - offset
    cr = ybr[..., 2].astype(np.float64) - offset
    r = y + 2.0 * (1.0 - kr) * cr
    b = y + 2.0 * (1.0 - kb) * cb
    g = y - (kr * (r - y) + kb * (b - y)) / kg
    return np.stack([r, g, b], axis=-1)


def _decode_failed(path: Path, ds: Any, errors: Sequence[tuple[str, BaseException]]) -> ImageLoadError | None:
    """The error for compressed pixel data no decoder read, naming the transfer syntax; None
    when the transfer syntax is not a compressed one (the caller's own error applies)."""
    try:
        uid = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID))
        compressed = bool(uid.is_compressed)
    except Exception:
        return None
    if not compressed:
        return None
    name = uid.name if uid.name != str(uid) else "an unknown compression"
    tried = "; ".join(f"{who}: {describe(e)}" for who, e in errors)
    return ImageLoadError(
        path,
        f"its pixel data are compressed as {name} ({uid}) and cannot be decoded: no installed decoder reads "
        f"them, or they are damaged ({tried})",
    )
