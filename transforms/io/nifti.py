"""NIfTI-1/2 and Analyze (``.hdr``/``.img`` pair) images through :class:`monai.data.NibabelReader`.

The affine is the RAS affine nibabel reports. The header is checked first, without reading the
voxels: declared size, spacing when there is no sform/qform (nibabel would silently use
``abs(pixdim)`` or 1 mm), and a non-finite sform/qform (MONAI would silently fall back on the
qform).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from monai.data import NibabelReader
from monai.utils import optional_import

from heatmark.transforms.io.base import MAX_VOXELS, ImageData, ImageLoadError, ImageReader, check_size, fmt, read_failed

nib, _has_nib = optional_import("nibabel")

__all__ = ["NiftiReader"]


class NiftiReader(ImageReader):
    """``.nii``, ``.nii.gz`` and NIfTI/Analyze pairs (``.hdr`` + ``.img``, ``.hdr.gz`` + ``.img.gz``)."""

    name = "nifti"
    format = "NIfTI"
    suffixes = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")
    colour_2d = False
    # nibabel pairs a.img with a.hdr and a.img.gz with a.hdr.gz; the header file is the input
    companions = {".img": (".hdr",), ".img.gz": (".hdr.gz",)}

    def read(self, path: Path, *, max_voxels: int = MAX_VOXELS) -> ImageData:
        try:
            header_img = nib.load(str(path))
            shape = tuple(int(s) for s in header_img.shape)
            header_affine = np.asarray(header_img.affine, dtype=np.float64)
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        check_size(path, shape, max_voxels=max_voxels)
        hdr = _raw_header(header_img)  # nibabel 'fixes' bad pixdim on load
        no_xform = hdr is not None and not int(hdr.get("sform_code", 0)) and not int(hdr.get("qform_code", 0))
        if no_xform and "pixdim" in hdr:  # the spacing comes from pixdim alone
            pixdim = np.asarray(hdr["pixdim"][1 : 1 + min(len(shape), 3)], dtype=np.float64)
            volume = len(shape) >= 3 and shape[2] > 1  # a 2D image without spacing falls back on the user's
            if np.any(pixdim < 0) or (volume and np.any(pixdim == 0)):  # nibabel would silently use abs() or 1 mm
                raise ImageLoadError(
                    path,
                    f"the header declares an invalid voxel spacing (pixdim) {fmt(pixdim)}; spacing must be positive",
                )
        if not np.all(np.isfinite(header_affine)):  # MONAI would silently replace it by the qform
            raise ImageLoadError(path, "its orientation/spacing header (sform/qform) holds non-finite values (NaN or infinity)")
        reader = NibabelReader(squeeze_non_spatial_dims=True)
        try:
            arr, meta = reader.get_data(reader.read(str(path)))
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        return ImageData(
            array=np.asarray(arr),
            affine=np.asarray(meta["affine"], dtype=np.float64),
            channel_dim=meta.get("original_channel_dim"),
        )


def _raw_header(img: Any) -> Any:
    """The header as stored (no nibabel fixes), or None if it cannot be re-read."""
    try:
        holder = img.file_map["header"] if "header" in img.file_map else img.file_map["image"]
        with nib.openers.ImageOpener(holder.filename) as f:
            return type(img.header).from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 - the checks on it are extras
        return None
