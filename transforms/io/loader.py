"""Image loading with physical spacing, as MONAI transforms.

:class:`LoadLandmarkImage` turns a path into a channel-first ``MetaTensor`` (float32 by default)
whose ``.affine`` maps voxel indices to world millimetres (DESIGN section 3). It uses MONAI's
readers, through the reader registry (:func:`~heatmark.transforms.io.registry.reader_for` picks
one :class:`~heatmark.transforms.io.base.ImageReader` per file), and fills the gaps they leave
for landmark work:

==========================  ===============================================================
input                       reader
==========================  ===============================================================
``.nii``, ``.nii.gz``,      :class:`monai.data.NibabelReader` (RAS affine as nibabel reports
``.hdr``/``.img`` (.gz)     it; header checked first, without reading the voxels)
``.mha``, ``.mhd``,         :class:`monai.data.ITKReader` with ``affine_lps_to_ras=True``
``.nrrd``, ``.nhdr``        (ITK stores LPS; x and y are negated); header checked first
folder of DICOM files       ITK/GDCM series reading (one series per folder), then
                            :meth:`ITKReader.get_data`; slice positions checked with pydicom
single DICOM file           one frame: :class:`monai.data.PydicomReader` for the pixels
                            (rescale slope/intercept applied; colour: pydicom), the affine
                            built here from the tags (see below); several frames: ITKReader
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
Colour DICOM (``SamplesPerPixel`` 3: RGB, or YBR_FULL / YBR_FULL_422, whose luminance is their Y
channel) follows the same rules, for a single frame and for multi-frame files and series too
(a grey volume; ``keep_color=True`` keeps ``(3, W, H, D)``); pixel spacing and geometry are
those of a grey DICOM. DICOM ``MONOCHROME1`` images are inverted so that bright means dense, as
in MONOCHROME2 (``meta["intensity_inverted"]``). A malformed numeric DICOM value (a
``NumberOfFrames`` of ``1A``, a ``PixelSpacing`` of ``0.5\\abc``) is an error naming the file,
the tag and the value.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from heatmark.core.fileio import missing_path_reason
from heatmark.transforms.io.base import (
    LUMA,
    MAX_VOXELS,
    ImageData,
    ImageLoadError,
    ImageReader,
    describe,
    fmt,
    read_failed,
)
from heatmark.transforms.io.registry import reader_for
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import get_equivalent_dtype

__all__ = ["LoadLandmarkImage", "LoadLandmarkImaged"]

_RAS = "RAS"


# --------------------------------------------------------------------------------------------
# small helpers


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


# --------------------------------------------------------------------------------------------
# array transform


class LoadLandmarkImage(Transform):
    """Load a 2D or 3D image as a channel-first ``MetaTensor`` with a world (mm) affine.

    See the module docstring for the world frame of 2D images, spacing and colour rules, and
    :mod:`heatmark.transforms.io` for the formats (any reader added with
    :func:`~heatmark.transforms.io.registry.register_reader` is used too). Every failure raises
    :class:`ImageLoadError` naming the file.

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
        self._check_path(path)
        reader = reader_for(path)
        try:
            raw = reader.read(path, max_voxels=self.max_voxels)
        except ImageLoadError:
            raise
        except Exception as e:  # a reader that let another exception through: name the file all the same
            raise read_failed(path, reader.format, e) from e
        img = self._finish(path, reader, raw)
        return img if self.image_only else (img, dict(img.meta))

    # ---------------------------------------------------------------- file checks
    @staticmethod
    def _check_path(path: Path) -> None:
        """Refuse a missing, unreadable, empty or special path before choosing a reader."""
        if not path.exists():
            if path.is_symlink():
                raise ImageLoadError(path, missing_path_reason(path))
            parent = path.parent
            hint = "" if parent.is_dir() else f" (the folder '{parent}' does not exist either)"
            raise ImageLoadError(path, f"the file does not exist{hint}")
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise ImageLoadError(path, "the folder is not readable (permission denied)")
            return
        if not path.is_file():
            raise ImageLoadError(path, "not a regular file")
        if not os.access(path, os.R_OK):
            raise ImageLoadError(path, "the file is not readable (permission denied)")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "the file is empty (0 bytes)")

    # ---------------------------------------------------------------- common tail
    def _finish(self, path: Path, reader: ImageReader, raw: ImageData) -> MetaTensor:
        arr, affine = raw.array, raw.affine
        # channel first
        ch = raw.channel_dim
        if ch is None or (isinstance(ch, float) and math.isnan(ch)) or ch == "no_channel":
            arr = arr[None]
        else:
            arr = np.moveaxis(arr, int(ch), 0)
        nchan, spatial = arr.shape[0], arr.shape[1:]
        nd = len(spatial)
        if nd not in (2, 3) or (nchan > 1 and not raw.colour and (nd == 3 or not reader.colour_2d)):
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
            affine, world_axes, units = self._affine_2d(path, reader, raw, affine, world_axes)
        affine = np.asarray(affine, dtype=np.float64) + 0.0  # no -0.0 entries
        self._check_affine(path, affine, nd)

        # values
        np_dtype = get_equivalent_dtype(self.dtype, np.ndarray)
        torch_dtype = get_equivalent_dtype(self.dtype, torch.Tensor)
        try:
            data = np.ascontiguousarray(arr).astype(np_dtype, copy=False)
        except (TypeError, ValueError) as e:
            raise ImageLoadError(path, f"its voxel type {arr.dtype} cannot be converted to {np_dtype} ({describe(e)})") from e
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
            "world_frame": raw.world_frame,
            "world_axes": world_axes,
            "format": reader.format,
            "intensity_inverted": bool(raw.intensity_inverted),
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
        return np.tensordot(LUMA, arr.astype(np.float64), axes=(0, 0))[None]

    def _affine_2d(self, path: Path, reader: ImageReader, raw: ImageData, affine: np.ndarray | None, world_axes: str):
        """The 3x3 affine of a 2D image, with the user spacing / pixel-unit fallback."""
        user = self.spacing
        if affine is None:  # no geometry header: the file's spacing tags (DICOM), else the user's
            sp = raw.spacing
            if sp is not None and user is not None and not np.allclose(sp, user, rtol=1e-4):
                warnings.warn(
                    f"{path}: spacing {fmt(user)} given but the file's {raw.spacing_source} says "
                    f"{fmt(sp)} (x, y); using the file's",
                    stacklevel=3,
                )
            units = "mm"
            if sp is None:
                zero = raw.zero_spacing_tag
                why = f"the {reader.format} tag {zero} is 0\\0, which means unknown" if zero else None
                sp, units = (user, "mm") if user is not None else self._fallback_spacing(path, why)
            if raw.patient_plane is not None:
                ipp, r, c = raw.patient_plane
                a4 = np.eye(4)
                a4[:3, 0] = r * sp[0]
                a4[:3, 1] = c * sp[1]
                a4[:3, 2] = np.cross(r, c)
                a4[:3, 3] = ipp
                a4[:2] *= -1.0  # LPS -> RAS
                a3, axes = _reduce_affine_to_2d(a4, (0, 1), path)
                return a3, axes, units
            return np.diag([sp[0], sp[1], 1.0]), "RA", units
        # header-based 2D affine (NIfTI, ITK); zero spacing means 'unknown'
        affine = np.asarray(affine, dtype=np.float64)
        norms = np.linalg.norm(affine[:2, :2], axis=0)
        if not raw.header_spacing or np.all(norms == 0):
            sp, units = (user, "mm") if user is not None else self._fallback_spacing(path)
            return np.diag([sp[0], sp[1], 1.0]), "RA", units
        if user is not None and np.all(np.isfinite(norms)) and not np.allclose(norms, user, rtol=1e-4):
            warnings.warn(f"{path}: spacing {fmt(user)} given but the file says {fmt(norms)}; using the file's", stacklevel=3)
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
            raise ImageLoadError(path, f"its voxel spacing is zero along an axis (spacing {fmt(norms)})")
        det = abs(float(np.linalg.det(lin)))
        if det <= 1e-6 * float(np.prod(norms)):
            raise ImageLoadError(path, "its orientation matrix is singular (axes are parallel); the header is damaged")


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
