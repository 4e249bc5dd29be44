"""Image loading with physical spacing, as MONAI transforms.

:class:`LoadLandmarkImage` turns a path into a channel-first ``MetaTensor`` (float32 by default)
whose ``.affine`` maps voxel indices to world millimetres (DESIGN section 3). It uses MONAI's
readers and fills the gaps they leave for landmark work:

==========================  ===============================================================
input                       reader
==========================  ===============================================================
``.nii``, ``.nii.gz``,      :class:`monai.data.NibabelReader` (RAS affine as nibabel reports
``.img``/``.hdr``           it; header checked first, without reading the voxels)
``.mha``, ``.mhd``,         :class:`monai.data.ITKReader` with ``affine_lps_to_ras=True``
``.nrrd``, ``.nhdr``        (ITK stores LPS; x and y are negated); header checked first
folder of DICOM files       ITK/GDCM series reading (one series per folder), then
                            :meth:`ITKReader.get_data`; slice positions checked with pydicom
single DICOM file           one frame: :class:`monai.data.PydicomReader` for the pixels
                            (rescale slope/intercept applied), the affine built here from
                            the tags (see below); several frames: ITKReader
``.png``, ``.jpg``,         :class:`monai.data.PILReader` (array ``(W, H)``, axis 0 = x),
``.jpeg``, ``.bmp``,        spacing from the user
``.tif``, ``.tiff``
==========================  ===============================================================

A file with another (or no) suffix is read as DICOM when it carries the ``DICM`` marker.

World frame
-----------
* 3D: RAS millimetres, as MONAI's readers report them. The affine is ``4x4``.
* 2D: the affine is ``3x3`` and maps voxel ``(i, j)`` (``i`` = array axis 0 = x = column
  index, ``j`` = axis 1 = y = row index) to world ``(x, y)`` in mm. All readers are made to
  agree on that axis order (what they return natively: PILReader ``(W, H)``; PydicomReader
  ``(Columns, Rows)`` with its default ``swap_ij``; ITKReader ``(x, y)`` for a 2D MHA but
  ``(x, y, 1)`` for a single DICOM file; nibabel the stored ``(x, y)`` order).

  - PNG/JPEG/BMP/TIFF, and DICOM files without ImagePositionPatient/ImageOrientationPatient
    (typical of CR/DX radiographs): the *image frame*, not an anatomical one. The centre of
    pixel ``(0, 0)`` is world ``(0, 0)``, x grows along the columns (to the right), y down
    the rows: ``world = (i * sx, j * sy)``. ``meta["world_frame"] == "image"``.
  - NIfTI, MHA/NRRD and DICOM with ImagePositionPatient and ImageOrientationPatient: the RAS
    patient frame restricted to the plane of the image. Normally that is RAS (x, y)
    (``meta["world_axes"] == "RA"``); for an image in a coronal or sagittal plane the RAS
    pair the plane is parallel to is used ("RS", "AS") and an oblique plane is projected onto
    the closest pair, with a warning. A 2D MHA written by ITK at origin ``(ox, oy)`` thus has
    ``world = (-(ox + i*sx), -(oy + j*sy))``. ``meta["world_frame"] == "RAS"``.

Spacing
-------
``meta["spacing"]`` is the voxel size in mm per array axis (the affine's column norms).
DICOM: ``PixelSpacing`` (row spacing, column spacing) — calibrated, at the patient — wins;
projection radiographs without it use ``ImagerPixelSpacing`` (at the detector; MONAI ignores
this tag); then ``NominalScannedPixelSpacing``. Note that the DICOM tags list the row spacing
(``sy``) first, while ``spacing=`` and ``meta["spacing"]`` are in array-axis order ``(sx, sy)``.
The user's ``spacing`` is used where the file has none (PNG & co., DICOM without any spacing
tag or with spacing 0); a file's own spacing wins over it, with a warning if they differ.
A 2D image with no spacing at all is an error unless ``allow_pixel_units=True``: then the
spacing is 1 and ``meta["spacing_units"] == "pixel"`` (otherwise ``"mm"``).

Colour
------
Radiographs are grayscale. RGB(A) images whose colour channels are identical become one
channel; alpha is dropped; palette/bilevel/CMYK images are converted by PIL first. Genuinely
coloured images are converted to luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) with a
warning, unless ``keep_color=True``, which keeps the three channels first ``(3, W, H)``.
DICOM ``MONOCHROME1`` images are inverted so that bright means dense, as in MONOCHROME2
(``meta["intensity_inverted"]``).
"""

from __future__ import annotations

import errno
import math
import os
import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.transforms import MapTransform, Transform
from monai.utils import get_equivalent_dtype, optional_import

itk, _has_itk = optional_import("itk", allow_namespace_pkg=True)
pydicom, _has_pydicom = optional_import("pydicom")
nib, _has_nib = optional_import("nibabel")
PILImage, _has_pil = optional_import("PIL.Image")

__all__ = ["ImageLoadError", "LoadLandmarkImage", "LoadLandmarkImaged", "MAX_VOXELS"]

#: Default ceiling on ``channels * voxels`` of one image; larger declared sizes are refused
#: from the header, before any allocation.
MAX_VOXELS = 2**31

_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".img.gz")
_ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_KIND_NAMES = {
    "nifti": "NIfTI",
    "itk": "MetaImage/NRRD",
    "dicom": "DICOM",
    "dicom_series": "DICOM series",
    "pil": "PNG/JPEG/BMP/TIFF",
}
_RAS = "RAS"
_LUMA = np.array([0.299, 0.587, 0.114])


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the file and says what is wrong.

    Attributes:
        path: the file or folder that failed.
        problem: the problem in words, without the file name.
    """

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot load image '{self.path}': {problem}")


# --------------------------------------------------------------------------------------------
# small helpers


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz", ".img.gz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def has_dicom_marker(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 marker (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _describe(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    # ITK: "/path/itkMetaImageIO.cxx:490: ITK ERROR: MetaImageIO(0x55..): <text>" -> "<text>"
    msg = re.sub(r"^\S+\.(?:cxx|hxx|h):\d+:\s*ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", msg)
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _fmt(values: Any) -> str:
    """``(0.4, 0.5)`` for a sequence of numbers (no numpy reprs in messages)."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in np.ravel(np.asarray(values, dtype=np.float64))) + ")"


def _check_spacing_arg(spacing: float | Sequence[float] | None) -> tuple[float, float] | None:
    """Validate the user's 2D spacing. ``None``/0 means 'not given'; returns ``(sx, sy)``."""
    if spacing is None:
        return None
    vals = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if vals.size == 1:
        vals = np.repeat(vals, 2)
    if vals.size != 2:
        raise ValueError(f"spacing must be a number or (sx, sy) in mm for 2D images, got {spacing!r}")
    if not np.all(np.isfinite(vals)) or np.any(vals < 0):
        raise ValueError(f"spacing must be finite and positive (mm), got {spacing!r}")
    if np.all(vals == 0):
        return None
    if np.any(vals == 0):
        raise ValueError(f"spacing must be positive in every direction (mm), got {spacing!r}")
    return float(vals[0]), float(vals[1])


def _reduce_affine_to_2d(affine: np.ndarray, keep: Sequence[int], path: Path) -> tuple[np.ndarray, str]:
    """Reduce a 4x4 affine to the 3x3 affine of the 2D image spanned by array axes ``keep``.

    World rows: RAS (x, y) unless the image plane is closer to another RAS pair; returns the
    3x3 affine and the world axis letters (e.g. ``"RA"``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (3, 3):
        return affine.copy(), "RA"
    lin = affine[:3, list(keep)]
    trans = affine[:3, 3]
    norms = np.linalg.norm(lin, axis=0)
    best, best_det = (0, 1), -1.0
    for pair in ((0, 1), (0, 2), (1, 2)):
        d = abs(float(np.linalg.det(lin[list(pair)])))
        if d > best_det * (1 + 1e-9):
            best, best_det = pair, d
    full = float(np.prod(norms))
    if full > 0 and best_det > 0 and best_det < (1 - 1e-3) * full:
        warnings.warn(
            f"{path}: the 2D image plane is oblique to the RAS axes; its 2D world coordinates are "
            f"the projection onto the {_RAS[best[0]]}{_RAS[best[1]]} plane",
            stacklevel=3,
        )
    out = np.eye(3)
    out[:2, :2] = lin[list(best)]
    out[:2, 2] = trans[list(best)]
    return out, _RAS[best[0]] + _RAS[best[1]]


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


# --------------------------------------------------------------------------------------------
# array transform


class LoadLandmarkImage(Transform):
    """Load a 2D or 3D image as a channel-first ``MetaTensor`` with a world (mm) affine.

    See the module docstring for formats, the world frame of 2D images, spacing and colour
    rules. Every failure raises :class:`ImageLoadError` naming the file.

    Args:
        spatial_dims: 2 or 3 to require that many spatial dimensions (``None``: accept either).
            With 2, a 3D volume with exactly one singleton axis (e.g. ``(X, Y, 1)``) is
            squeezed to 2D; any other mismatch is an error.
        spacing: ``(sx, sy)`` mm or a scalar, for 2D images whose file has no spacing
            (PNG/JPEG/BMP/TIFF, DICOM without a spacing tag). ``sx`` is along array axis 0
            (columns). ``None`` or 0: not given.
        allow_pixel_units: accept a 2D image without any spacing, with spacing 1 and
            ``meta["spacing_units"] = "pixel"``.
        keep_color: keep genuinely coloured images as 3 channels instead of luminance.
        dtype: output dtype (numpy or torch), float32 by default.
        image_only: return only the image (default), else ``(image, meta dict)`` like
            :class:`monai.transforms.LoadImage`.
        max_voxels: refuse images whose header declares more than this many values
            (channels x voxels), before reading them.
        allow_constant: accept an image whose voxels all have the same value (refused by
            default: landmarks cannot be localised in it).

    The returned ``MetaTensor`` has shape ``(C, *spatial)`` with ``C == 1`` for grayscale, an
    affine of shape ``(D+1, D+1)``, and ``meta`` keys ``filename_or_obj``, ``affine``,
    ``original_affine`` (the load-time affine), ``spacing`` (mm per array axis),
    ``spatial_dims``, ``spatial_shape``, ``spacing_units`` (``"mm"``/``"pixel"``), ``space``
    (``"RAS"``), ``world_frame`` (``"RAS"``/``"image"``), ``world_axes`` (e.g. ``"RAS"``,
    ``"RA"``), ``format``, ``intensity_inverted`` and ``original_channel_dim`` (0). The key
    set is the same for every format so that images of mixed formats collate.
    """

    def __init__(
        self,
        spatial_dims: int | None = None,
        spacing: float | Sequence[float] | None = None,
        allow_pixel_units: bool = False,
        keep_color: bool = False,
        dtype: Any = np.float32,
        image_only: bool = True,
        max_voxels: int = MAX_VOXELS,
        allow_constant: bool = False,
    ) -> None:
        if spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.spacing = _check_spacing_arg(spacing)
        self.allow_pixel_units = bool(allow_pixel_units)
        self.keep_color = bool(keep_color)
        self.dtype = dtype
        self.image_only = image_only
        self.max_voxels = int(max_voxels)
        self.allow_constant = bool(allow_constant)

    # ---------------------------------------------------------------- entry point
    def __call__(self, filename: os.PathLike | str):
        if isinstance(filename, (list, tuple)):
            raise ImageLoadError(str(filename), "expected one file or one DICOM folder, got a list")
        if not isinstance(filename, (str, os.PathLike)):
            raise ImageLoadError(repr(filename), f"expected a file path, got {type(filename).__name__}")
        path = Path(os.path.expanduser(os.fspath(filename)))
        kind = self._kind(path)
        if kind == "nifti":
            arr, affine, info = self._read_nifti(path)
        elif kind == "itk":
            arr, affine, info = self._read_itk(path)
        elif kind == "dicom_series":
            arr, affine, info = self._read_dicom_series(path)
        elif kind == "dicom":
            arr, affine, info = self._read_dicom_file(path)
        else:
            arr, affine, info = self._read_pil(path)
        img = self._finish(path, kind, arr, affine, info)
        return img if self.image_only else (img, dict(img.meta))

    # ---------------------------------------------------------------- file checks
    def _kind(self, path: Path) -> str:
        if not path.exists():
            if path.is_symlink():
                try:
                    os.stat(path)
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise ImageLoadError(path, "it is a symbolic link loop (the links point at each other)") from None
                target = os.readlink(path)
                raise ImageLoadError(path, f"it is a broken symbolic link (its target '{target}' does not exist)")
            parent = path.parent
            hint = "" if parent.is_dir() else f" (the folder '{parent}' does not exist either)"
            raise ImageLoadError(path, f"the file does not exist{hint}")
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise ImageLoadError(path, "the folder is not readable (permission denied)")
            return "dicom_series"
        if not path.is_file():
            raise ImageLoadError(path, "not a regular file")
        if not os.access(path, os.R_OK):
            raise ImageLoadError(path, "the file is not readable (permission denied)")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "the file is empty (0 bytes)")
        suffix = _suffix(path)
        if suffix in _NIFTI_SUFFIXES:
            return "nifti"
        if suffix in _ITK_SUFFIXES:
            return "itk"
        if suffix in _PIL_SUFFIXES:
            return "pil"
        if suffix in _DICOM_SUFFIXES or has_dicom_marker(path):
            return "dicom"
        raise ImageLoadError(
            path,
            f"unsupported file type '{suffix or path.name}'; supported: NIfTI (.nii, .nii.gz), "
            "MetaImage/NRRD (.mha, .mhd, .nrrd, .nhdr), DICOM (.dcm or a folder of a series), "
            "PNG/JPEG/BMP/TIFF",
        )

    def _check_size(self, path: Path, shape: Sequence[int], components: int = 1) -> None:
        dims = [int(s) for s in shape]
        if any(s <= 0 for s in dims):
            raise ImageLoadError(path, f"the header declares an empty or invalid size {tuple(dims)}")
        total = math.prod(dims) * max(int(components), 1)
        if total > self.max_voxels:
            raise ImageLoadError(
                path,
                f"the header declares an image of size {tuple(dims)} ({total:,} values), more than the "
                f"limit of {self.max_voxels:,}; the header is probably damaged",
            )

    @staticmethod
    def _read_failed(path: Path, kind: str, exc: BaseException) -> ImageLoadError:
        if isinstance(exc, ImageLoadError):
            return exc
        if isinstance(exc, MemoryError):
            return ImageLoadError(path, "not enough memory to read the image")
        return ImageLoadError(
            path, f"cannot read it: truncated, damaged or not a {_KIND_NAMES[kind]} file ({_describe(exc)})"
        )

    @staticmethod
    def _raw_nifti_header(img: Any) -> Any:
        """The header as stored (no nibabel fixes), or None if it cannot be re-read."""
        try:
            holder = img.file_map["header"] if "header" in img.file_map else img.file_map["image"]
            with nib.openers.ImageOpener(holder.filename) as f:
                return type(img.header).from_fileobj(f, check=False)
        except Exception:  # noqa: BLE001 - the checks on it are extras
            return None

    # ---------------------------------------------------------------- readers
    def _read_nifti(self, path: Path):
        try:
            header_img = nib.load(str(path))
            shape = tuple(int(s) for s in header_img.shape)
            header_affine = np.asarray(header_img.affine, dtype=np.float64)
        except Exception as e:
            raise self._read_failed(path, "nifti", e) from e
        self._check_size(path, shape)
        hdr = self._raw_nifti_header(header_img)  # nibabel 'fixes' bad pixdim on load
        no_xform = hdr is not None and not int(hdr.get("sform_code", 0)) and not int(hdr.get("qform_code", 0))
        if no_xform and "pixdim" in hdr:  # the spacing comes from pixdim alone
            pixdim = np.asarray(hdr["pixdim"][1 : 1 + min(len(shape), 3)], dtype=np.float64)
            volume = len(shape) >= 3 and shape[2] > 1  # a 2D image without spacing falls back on the user's
            if np.any(pixdim < 0) or (volume and np.any(pixdim == 0)):  # nibabel would silently use abs() or 1 mm
                raise ImageLoadError(
                    path,
                    f"the header declares an invalid voxel spacing (pixdim) {_fmt(pixdim)}; spacing must be positive",
                )
        if not np.all(np.isfinite(header_affine)):  # MONAI would silently replace it by the qform
            raise ImageLoadError(path, "its orientation/spacing header (sform/qform) holds non-finite values (NaN or infinity)")
        reader = NibabelReader(squeeze_non_spatial_dims=True)
        try:
            arr, meta = reader.get_data(reader.read(str(path)))
        except Exception as e:
            raise self._read_failed(path, "nifti", e) from e
        arr = np.asarray(arr)
        return arr, np.asarray(meta["affine"], dtype=np.float64), {
            "channel_dim": meta.get("original_channel_dim"),
            "world_frame": "RAS",
            "header_spacing": True,
        }

    def _read_itk(self, path: Path):
        try:
            io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        except Exception as e:
            raise self._read_failed(path, "itk", e) from e
        if io is None:
            raise ImageLoadError(path, "cannot read it: damaged or not a MetaImage/NRRD file (no ITK reader accepts it)")
        try:
            io.SetFileName(str(path))
            io.ReadImageInformation()
            ndim = int(io.GetNumberOfDimensions())
            shape = [int(io.GetDimensions(i)) for i in range(ndim)]
            sp = [float(io.GetSpacing(i)) for i in range(ndim)]
            comps = int(io.GetNumberOfComponents())
        except Exception as e:
            raise self._read_failed(path, "itk", e) from e
        self._check_size(path, shape, comps)
        if not all(math.isfinite(s) and s > 0 for s in sp):  # ITK itself refuses zero spacing
            raise ImageLoadError(path, f"the header declares an invalid voxel spacing {_fmt(sp)}; spacing must be positive")
        return self._read_itk_image(path, "itk")

    def _read_itk_image(self, path: Path, kind: str):
        """Pixels and RAS affine of one file through MONAI's ITKReader (header checks done by the caller)."""
        reader = ITKReader(affine_lps_to_ras=True)
        try:
            arr, meta = reader.get_data(reader.read(str(path)))
        except Exception as e:
            raise self._read_failed(path, kind, e) from e
        return np.asarray(arr), np.asarray(meta["affine"], dtype=np.float64), {
            "channel_dim": meta.get("original_channel_dim"),
            "world_frame": "RAS",
            "header_spacing": True,
        }

    def _read_dicom_series(self, path: Path):
        try:
            gen = itk.GDCMSeriesFileNames.New()
            gen.SetUseSeriesDetails(True)
            gen.AddSeriesRestriction("0008|0021")  # series date, as MONAI's ITKReader
            gen.SetDirectory(str(path))
            uids = list(gen.GetSeriesUIDs())
        except Exception as e:
            raise self._read_failed(path, "dicom_series", e) from e
        if not uids:
            raise ImageLoadError(path, "the folder contains no readable DICOM files")
        if len(uids) > 1:
            raise ImageLoadError(
                path, f"the folder contains {len(uids)} DICOM series; put each series in its own folder"
            )
        names = [str(n) for n in gen.GetFileNames(uids[0])]
        try:
            first = pydicom.dcmread(names[0], stop_before_pixels=True)
            rows, cols = int(first.Rows), int(first.Columns)
            spp = int(getattr(first, "SamplesPerPixel", 1) or 1)
        except Exception as e:
            raise self._read_failed(path, "dicom_series", e) from e
        self._check_size(path, (cols, rows, len(names)), spp)
        if len(names) > 2:
            self._check_slice_positions(path, names)
        reader = ITKReader(affine_lps_to_ras=True)
        try:
            img = itk.imread(names if len(names) > 1 else names[0])
            arr, meta = reader.get_data(img)
        except Exception as e:
            raise self._read_failed(path, "dicom_series", e) from e
        return np.asarray(arr), np.asarray(meta["affine"], dtype=np.float64), {
            "channel_dim": meta.get("original_channel_dim"),
            "world_frame": "RAS",
            "header_spacing": True,
        }

    @staticmethod
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

    def _read_dicom_file(self, path: Path):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as e:
            raise self._read_failed(path, "dicom", e) from e
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception:
            raise ImageLoadError(path, "the DICOM file has no image (Rows/Columns missing)") from None
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        self._check_size(path, (cols, rows) + ((frames,) if frames > 1 else ()), spp)
        if frames > 1:  # multi-frame volume: ITK/GDCM knows the per-frame geometry
            return self._read_itk_image(path, "dicom")

        # single frame: pixels from PydicomReader (axis 0 = columns), geometry from the tags
        try:
            reader = PydicomReader(affine_lps_to_ras=True, swap_ij=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ImageOrientationPatient.*")
                arr, meta = reader.get_data(reader.read(str(path)))
            arr, channel_dim = np.asarray(arr), meta.get("original_channel_dim")
        except Exception as e:  # e.g. a compressed transfer syntax pydicom cannot decode: try GDCM
            try:
                ireader = ITKReader(affine_lps_to_ras=True)
                arr, meta = ireader.get_data(ireader.read(str(path)))
                arr, channel_dim = np.asarray(arr), meta.get("original_channel_dim")
                if arr.ndim >= 3 and arr.shape[2] == 1 and len(meta.get("spatial_shape", ())) == 3:
                    arr = arr[:, :, 0]
                    channel_dim = -1 if arr.ndim == 3 else float("nan")
            except Exception:
                raise self._read_failed(path, "dicom", e) from e

        inverted = False
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
            lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(getattr(ds, "PixelRepresentation", 0) or 0) else (0, 2**bits - 1)
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            icpt = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            arr = (slope * (lo_raw + hi_raw) + 2 * icpt) - arr.astype(np.float64)
            inverted = True

        spacing = None
        source = None
        zero_tag = None
        for tag in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
            v = _dicom_floats(ds, tag, 2)
            if v is None:
                if getattr(ds, tag, None) is not None:
                    raise ImageLoadError(path, f"the DICOM tag {tag} is malformed ({getattr(ds, tag)!r})")
                continue
            if not np.all(np.isfinite(v)) or np.any(v < 0) or (np.any(v == 0) and not np.all(v == 0)):
                raise ImageLoadError(path, f"the DICOM tag {tag} holds an invalid spacing {_fmt(v)}")
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
                warnings.warn(f"{path}: ImageOrientationPatient {_fmt(iop)} is degenerate; using the image frame", stacklevel=2)
        return arr, None, {
            "channel_dim": channel_dim,
            "world_frame": "RAS" if patient is not None else "image",
            "header_spacing": spacing is not None,
            "dicom_spacing": spacing,
            "dicom_spacing_source": source,
            "dicom_zero_spacing_tag": zero_tag,
            "dicom_patient": patient,
            "intensity_inverted": inverted,
        }

    def _read_pil(self, path: Path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PILImage.DecompressionBombWarning)
                with PILImage.open(str(path)) as probe:
                    size, n_frames, bands = probe.size, int(getattr(probe, "n_frames", 1) or 1), len(probe.getbands())
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
            raise ImageLoadError(path, f"the image is too large to be read safely ({_describe(e)})") from e
        except Exception as e:
            raise self._read_failed(path, "pil", e) from e
        self._check_size(path, size, bands)
        if n_frames > 1:
            raise ImageLoadError(path, f"the file holds {n_frames} frames/pages; only single-image files are supported")
        reader = PILReader(reverse_indexing=True)  # array (W, H[, C]): axis 0 = x
        try:
            with PILImage.open(str(path)) as img:
                img.load()
                arr, meta = reader.get_data(_pil_normalize_mode(img))
                arr = np.array(arr)  # own the memory before the file is closed
        except Exception as e:
            raise self._read_failed(path, "pil", e) from e
        return arr, None, {"channel_dim": meta.get("original_channel_dim"), "world_frame": "image", "header_spacing": False}

    # ---------------------------------------------------------------- common tail
    def _finish(self, path: Path, kind: str, arr: np.ndarray, affine: np.ndarray | None, info: dict) -> MetaTensor:
        # channel first
        ch = info.get("channel_dim")
        if ch is None or (isinstance(ch, float) and math.isnan(ch)) or ch == "no_channel":
            arr = arr[None]
        else:
            arr = np.moveaxis(arr, int(ch), 0)
        nchan, spatial = arr.shape[0], arr.shape[1:]
        nd = len(spatial)
        if nd not in (2, 3) or (nchan > 1 and (nd == 3 or kind == "nifti")):
            shape = tuple(spatial) + ((nchan,) if nchan > 1 else ())
            raise ImageLoadError(
                path, f"it is a {len(shape)}D image of shape {shape}; a single 2D image or 3D volume is expected"
            )

        # dimensionality
        world_axes = _RAS if nd == 3 else "RA"
        if self.spatial_dims == 3 and nd == 2:
            raise ImageLoadError(path, f"a 3D volume is expected but this is a 2D image of shape {tuple(spatial)}")
        if self.spatial_dims == 2 and nd == 3:
            singles = [a for a in range(3) if spatial[a] == 1]
            if len(singles) == 0:
                raise ImageLoadError(path, f"a 2D image is expected but this is a 3D volume of shape {tuple(spatial)}")
            squeeze = 2 if 2 in singles else singles[-1]
            keep = [a for a in range(3) if a != squeeze]
            arr = np.squeeze(arr, axis=squeeze + 1)
            if affine is not None:
                affine, world_axes = _reduce_affine_to_2d(affine, keep, path)
            nd = 2
            spatial = arr.shape[1:]
        elif nd == 2 and affine is not None and affine.shape == (4, 4):
            affine, world_axes = _reduce_affine_to_2d(affine, (0, 1), path)

        # colour
        if arr.shape[0] > 1:
            arr = self._to_gray(path, arr)

        # geometry
        units = "mm"
        if nd == 2:
            affine, world_axes, units = self._affine_2d(path, kind, affine, info, world_axes)
        affine = np.asarray(affine, dtype=np.float64) + 0.0  # no -0.0 entries
        self._check_affine(path, affine, nd)

        # values
        np_dtype = get_equivalent_dtype(self.dtype, np.ndarray)
        torch_dtype = get_equivalent_dtype(self.dtype, torch.Tensor)
        try:
            data = np.ascontiguousarray(arr).astype(np_dtype, copy=False)
        except (TypeError, ValueError) as e:
            raise ImageLoadError(path, f"its voxel type {arr.dtype} cannot be converted to {np_dtype} ({_describe(e)})") from e
        # fast path: the float64 sum of finite float32/float16 values cannot overflow
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(np.sum(data, dtype=np.float64)):
            finite = np.isfinite(data)
            if not finite.all():
                n_nan = int(np.isnan(data).sum())
                n_inf = int(data.size - finite.sum() - n_nan)
                converted = data.dtype != arr.dtype
                raise ImageLoadError(
                    path,
                    f"it contains non-finite voxel values ({n_nan} NaN, {n_inf} infinite"
                    + (f" after conversion from {arr.dtype} to {data.dtype})" if converted else ")"),
                )
        if not self.allow_constant and data.size > 0:
            lo, hi = data.min(), data.max()
            if lo == hi:
                raise ImageLoadError(
                    path,
                    f"all voxels have the same value ({float(lo):.6g}); a constant image carries no information "
                    "to localise landmarks in",
                )
        tensor = torch.as_tensor(data).to(torch_dtype)

        affine_t = torch.as_tensor(affine, dtype=torch.float64)
        spacing = np.linalg.norm(affine[:nd, :nd], axis=0)
        meta = {
            "filename_or_obj": str(path),
            "original_affine": affine.copy(),
            "spacing": spacing,
            "spatial_dims": nd,
            "spatial_shape": np.asarray(spatial, dtype=np.int64),
            "spacing_units": units,
            "space": "RAS",
            "world_frame": info.get("world_frame", "RAS"),
            "world_axes": world_axes,
            "format": _KIND_NAMES[kind],
            "intensity_inverted": bool(info.get("intensity_inverted", False)),
            "original_channel_dim": 0,
        }
        return MetaTensor(tensor, affine=affine_t, meta=meta)

    def _to_gray(self, path: Path, arr: np.ndarray) -> np.ndarray:
        c = arr.shape[0]
        if c in (2, 4):  # gray+alpha, RGB+alpha: drop alpha
            arr = arr[: c - 1]
            c -= 1
        if c == 1:
            return arr
        if c != 3:
            raise ImageLoadError(path, f"it has {c} channels; grayscale or RGB is expected")
        if np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
            return arr[:1]
        if self.keep_color:
            return arr
        warnings.warn(
            f"{path}: colour image converted to grayscale (luminance); pass keep_color=True to keep the channels",
            stacklevel=3,
        )
        return np.tensordot(_LUMA, arr.astype(np.float64), axes=(0, 0))[None]

    def _affine_2d(self, path: Path, kind: str, affine: np.ndarray | None, info: dict, world_axes: str):
        """The 3x3 affine of a 2D image, with the user spacing / pixel-unit fallback."""
        user = self.spacing
        if kind == "dicom" and affine is None:
            sp = info.get("dicom_spacing")
            patient = info.get("dicom_patient")
            if sp is not None and user is not None and not np.allclose(sp, user, rtol=1e-4):
                warnings.warn(
                    f"{path}: spacing {_fmt(user)} given but the file's {info.get('dicom_spacing_source')} says "
                    f"{_fmt(sp)} (x, y); using the file's",
                    stacklevel=3,
                )
            units = "mm"
            if sp is None:
                zero = info.get("dicom_zero_spacing_tag")
                why = f"the DICOM tag {zero} is 0\\0, which means unknown" if zero else None
                sp, units = (user, "mm") if user is not None else self._fallback_spacing(path, why)
            if patient is not None:
                ipp, r, c = patient
                a4 = np.eye(4)
                a4[:3, 0] = r * sp[0]
                a4[:3, 1] = c * sp[1]
                a4[:3, 2] = np.cross(r, c)
                a4[:3, 3] = ipp
                a4[:2] *= -1.0  # LPS -> RAS
                a3, axes = _reduce_affine_to_2d(a4, (0, 1), path)
                return a3, axes, units
            return np.diag([sp[0], sp[1], 1.0]), "RA", units
        if affine is None:  # PIL: spacing only from the user
            sp, units = (user, "mm") if user is not None else self._fallback_spacing(path)
            return np.diag([sp[0], sp[1], 1.0]), "RA", units
        # header-based 2D affine (NIfTI, ITK); zero spacing means 'unknown'
        affine = np.asarray(affine, dtype=np.float64)
        norms = np.linalg.norm(affine[:2, :2], axis=0)
        if not info.get("header_spacing", True) or np.all(norms == 0):
            sp, units = (user, "mm") if user is not None else self._fallback_spacing(path)
            return np.diag([sp[0], sp[1], 1.0]), "RA", units
        if user is not None and np.all(np.isfinite(norms)) and not np.allclose(norms, user, rtol=1e-4):
            warnings.warn(f"{path}: spacing {_fmt(user)} given but the file says {_fmt(norms)}; using the file's", stacklevel=3)
        return affine, world_axes, "mm"

    def _fallback_spacing(self, path: Path, why: str | None = None) -> tuple[tuple[float, float], str]:
        if self.allow_pixel_units:
            return (1.0, 1.0), "pixel"
        raise ImageLoadError(
            path,
            f"the image has no pixel spacing ({why or 'no spacing in the file'}); give its spacing in mm "
            "(spacing=..., --spacing) or accept pixel units explicitly (allow_pixel_units=True)",
        )

    @staticmethod
    def _check_affine(path: Path, affine: np.ndarray, nd: int) -> None:
        if affine.shape != (nd + 1, nd + 1):
            raise ImageLoadError(path, f"internal error: affine of shape {affine.shape} for a {nd}D image")
        if not np.all(np.isfinite(affine)):
            raise ImageLoadError(path, "its orientation/spacing header holds non-finite values (NaN or infinity)")
        lin = affine[:nd, :nd]
        norms = np.linalg.norm(lin, axis=0)
        if np.any(norms <= 0):
            raise ImageLoadError(path, f"its voxel spacing is zero along an axis (spacing {_fmt(norms)})")
        det = abs(float(np.linalg.det(lin)))
        if det <= 1e-6 * float(np.prod(norms)):
            raise ImageLoadError(path, "its orientation matrix is singular (axes are parallel); the header is damaged")


def _pil_normalize_mode(img):
    """PILReader converter: palette, bilevel and exotic colour modes to L / RGB(A)."""
    mode = img.mode
    if mode in ("P", "PA"):
        return img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
    if mode == "1":
        return img.convert("L")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    if mode in ("La", "RGBa"):
        return img.convert("LA" if mode == "La" else "RGBA")
    return img


# --------------------------------------------------------------------------------------------
# dictionary transform


class LoadLandmarkImaged(MapTransform):
    """Dictionary wrapper of :class:`LoadLandmarkImage`, with the key/meta handling of
    :class:`monai.transforms.LoadImaged`.

    Args:
        keys: keys of the paths to load.
        allow_missing_keys: skip keys that are absent.
        image_only: store only the ``MetaTensor`` (default). With ``False`` the meta dict is
            also stored under ``meta_keys`` or ``f"{key}_{meta_key_postfix}"``.
        meta_keys, meta_key_postfix, overwriting: as in ``LoadImaged``.
        kwargs: passed to :class:`LoadLandmarkImage` (``spatial_dims``, ``spacing``,
            ``allow_pixel_units``, ``keep_color``, ``dtype``, ``max_voxels``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        allow_missing_keys: bool = False,
        image_only: bool = True,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = "meta_dict",
        overwriting: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self._loader = LoadLandmarkImage(image_only=image_only, **kwargs)
        if not isinstance(meta_key_postfix, str):
            raise TypeError(f"meta_key_postfix must be a str but is {type(meta_key_postfix).__name__}.")
        self.meta_keys = (None,) * len(self.keys) if meta_keys is None else tuple(
            [meta_keys] if isinstance(meta_keys, str) else meta_keys
        )
        if len(self.keys) != len(self.meta_keys):
            raise ValueError(f"meta_keys should have the same length as keys, got {len(self.keys)} and {len(self.meta_keys)}.")
        self.meta_key_postfix = (meta_key_postfix,) * len(self.keys)
        self.overwriting = overwriting

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            out = self._loader(d[key])
            if self._loader.image_only:
                d[key] = out
                continue
            d[key], meta = out
            meta_key = meta_key or f"{key}_{postfix}"
            if meta_key in d and not self.overwriting:
                raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
            d[meta_key] = meta
        return d
