"""MetaImage and NRRD images through :class:`monai.data.ITKReader` with ``affine_lps_to_ras=True``
(ITK stores LPS; x and y are negated). The header is checked first, without reading the voxels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from monai.data import ITKReader
from monai.utils import optional_import

from heatmark.transforms.io.base import MAX_VOXELS, ImageData, ImageLoadError, ImageReader, check_size, fmt, read_failed

itk, _has_itk = optional_import("itk", allow_namespace_pkg=True)

__all__ = ["ItkReader", "read_with_itk"]


class ItkReader(ImageReader):
    """``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``."""

    name = "itk"
    format = "MetaImage/NRRD"
    suffixes = (".mha", ".mhd", ".nrrd", ".nhdr")

    def read(self, path: Path, *, max_voxels: int = MAX_VOXELS) -> ImageData:
        try:
            io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        if io is None:
            raise ImageLoadError(path, f"cannot read it: damaged or not a {self.format} file (no ITK reader accepts it)")
        try:
            io.SetFileName(str(path))
            io.ReadImageInformation()
            ndim = int(io.GetNumberOfDimensions())
            shape = [int(io.GetDimensions(i)) for i in range(ndim)]
            sp = [float(io.GetSpacing(i)) for i in range(ndim)]
            comps = int(io.GetNumberOfComponents())
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        check_size(path, shape, comps, max_voxels=max_voxels)
        if not all(math.isfinite(s) and s > 0 for s in sp):  # ITK itself refuses zero spacing
            raise ImageLoadError(path, f"the header declares an invalid voxel spacing {fmt(sp)}; spacing must be positive")
        return read_with_itk(path, self.format)


def read_with_itk(path: Path, what: str) -> ImageData:
    """Pixels and RAS affine of one file through MONAI's ITKReader (header checks done by the
    caller); ``what`` is the format named if it fails."""
    reader = ITKReader(affine_lps_to_ras=True)
    try:
        arr, meta = reader.get_data(reader.read(str(path)))
    except Exception as e:
        raise read_failed(path, what, e) from e
    return ImageData(
        array=np.asarray(arr),
        affine=np.asarray(meta["affine"], dtype=np.float64),
        channel_dim=meta.get("original_channel_dim"),
    )
