"""DICOM: single files (``.dcm``, ``.dicom``, ``.ima`` or any file with the ``DICM`` marker) and
folders holding one series.

* Single frame: :class:`monai.data.PydicomReader` for the pixels (rescale slope/intercept
  applied; ITK/GDCM when pydicom cannot decode them), the geometry from the tags, turned into an
  affine by the loader: ``PixelSpacing`` (calibrated, at the patient) wins, projection
  radiographs without it use ``ImagerPixelSpacing`` (at the detector; MONAI ignores this tag),
  then ``NominalScannedPixelSpacing``; ImagePositionPatient/ImageOrientationPatient place the
  image in the patient frame. ``MONOCHROME1`` is inverted so that bright means dense.
* Several frames: ITK/GDCM (:func:`~heatmark.transforms.io.itk.read_with_itk`).
* A folder: ITK/GDCM series reading (one series per folder), slice positions checked with
  pydicom first (duplicate or unevenly spaced slices are refused).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ITKReader, PydicomReader
from monai.utils import optional_import

from heatmark.transforms.io.base import MAX_VOXELS, ImageData, ImageLoadError, ImageReader, check_size, fmt, read_failed
from heatmark.transforms.io.itk import read_with_itk

itk, _has_itk = optional_import("itk", allow_namespace_pkg=True)
pydicom, _has_pydicom = optional_import("pydicom")

__all__ = ["DicomFileReader", "DicomSeriesReader", "has_dicom_marker"]

_SPACING_TAGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


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
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception:
            raise ImageLoadError(path, "the DICOM file has no image (Rows/Columns missing)") from None
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        check_size(path, (cols, rows) + ((frames,) if frames > 1 else ()), spp, max_voxels=max_voxels)
        if frames > 1:  # multi-frame volume: ITK/GDCM knows the per-frame geometry
            return read_with_itk(path, self.format)

        arr, channel_dim = self._pixels(path)
        inverted = False
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
            signed = int(getattr(ds, "PixelRepresentation", 0) or 0)
            lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            icpt = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            arr = (slope * (lo_raw + hi_raw) + 2 * icpt) - arr.astype(np.float64)
            inverted = True

        spacing, source, zero_tag = None, None, None
        for tag in _SPACING_TAGS:
            v = _dicom_floats(ds, tag, 2)
            if v is None:
                if getattr(ds, tag, None) is not None:
                    raise ImageLoadError(path, f"the DICOM tag {tag} is malformed ({getattr(ds, tag)!r})")
                continue
            if not np.all(np.isfinite(v)) or np.any(v < 0) or (np.any(v == 0) and not np.all(v == 0)):
                raise ImageLoadError(path, f"the DICOM tag {tag} holds an invalid spacing {fmt(v)}")
            if np.all(v == 0):
                zero_tag = zero_tag or tag
                continue  # zero spacing means 'unknown'
            spacing, source = (float(v[1]), float(v[0])), tag  # tags are (row spacing, column spacing)
            break
        ipp = _dicom_floats(ds, "ImagePositionPatient", 3)
        iop = _dicom_floats(ds, "ImageOrientationPatient", 6)
        patient = None
        if ipp is not None and iop is not None and np.all(np.isfinite(ipp)) and np.all(np.isfinite(iop)):
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
        )

    def _pixels(self, path: Path) -> tuple[np.ndarray, Any]:
        """Pixels of a single frame with axis 0 = columns, and the channel axis."""
        try:
            reader = PydicomReader(affine_lps_to_ras=True, swap_ij=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ImageOrientationPatient.*")
                arr, meta = reader.get_data(reader.read(str(path)))
            return np.asarray(arr), meta.get("original_channel_dim")
        except Exception as e:  # e.g. a compressed transfer syntax pydicom cannot decode: try GDCM
            try:
                ireader = ITKReader(affine_lps_to_ras=True)
                arr, meta = ireader.get_data(ireader.read(str(path)))
                arr, channel_dim = np.asarray(arr), meta.get("original_channel_dim")
                if arr.ndim >= 3 and arr.shape[2] == 1 and len(meta.get("spatial_shape", ())) == 3:
                    arr = arr[:, :, 0]
                    channel_dim = -1 if arr.ndim == 3 else float("nan")
                return arr, channel_dim
            except Exception:
                raise read_failed(path, self.format, e) from e


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
        if len(uids) > 1:
            raise ImageLoadError(path, f"the folder contains {len(uids)} DICOM series; put each series in its own folder")
        names = [str(n) for n in gen.GetFileNames(uids[0])]
        try:
            first = pydicom.dcmread(names[0], stop_before_pixels=True)
            rows, cols = int(first.Rows), int(first.Columns)
            spp = int(getattr(first, "SamplesPerPixel", 1) or 1)
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        check_size(path, (cols, rows, len(names)), spp, max_voxels=max_voxels)
        if len(names) > 2:
            _check_slice_positions(path, names)
        reader = ITKReader(affine_lps_to_ras=True)
        try:
            img = itk.imread(names if len(names) > 1 else names[0])
            arr, meta = reader.get_data(img)
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        return ImageData(
            array=np.asarray(arr),
            affine=np.asarray(meta["affine"], dtype=np.float64),
            channel_dim=meta.get("original_channel_dim"),
        )


def _check_slice_positions(path: Path, names: Sequence[str]) -> None:
    """Refuse series with duplicate or unevenly spaced slices (ITK would assume even spacing)."""
    pos, ori = [], None
    for n in names:
        try:
            ds = pydicom.dcmread(n, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"])
        except Exception:
            return
        p = _dicom_floats(ds, "ImagePositionPatient", 3)
        if p is None:
            return
        if ori is None:
            ori = _dicom_floats(ds, "ImageOrientationPatient", 6)
        pos.append(p)
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


def _dicom_floats(ds: Any, keyword: str, n: int) -> np.ndarray | None:
    """A multi-valued numeric DICOM attribute as ``n`` floats, or None if absent or malformed."""
    val = getattr(ds, keyword, None)
    if val is None or val == "":
        return None
    values = [val] if isinstance(val, (str, bytes, int, float)) else list(val)
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n else None
