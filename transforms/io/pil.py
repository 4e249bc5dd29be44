"""PNG, JPEG, BMP and TIFF pictures through :class:`monai.data.PILReader`.

The array is ``(W, H[, C])`` (axis 0 = x); the files carry no spacing, so the loader uses the
user's (``world_frame == "image"``). Palette, bilevel and exotic colour modes are converted to
L / RGB(A) first; multi-page files and decompression bombs are refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import PILReader
from monai.utils import optional_import

from heatmark.transforms.io.base import MAX_VOXELS, ImageData, ImageLoadError, ImageReader, check_size, describe, read_failed

PILImage, _has_pil = optional_import("PIL.Image")

__all__ = ["PilReader"]


class PilReader(ImageReader):
    """``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff`` (one frame/page)."""

    name = "pil"
    format = "PNG/JPEG/BMP/TIFF"
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

    def read(self, path: Path, *, max_voxels: int = MAX_VOXELS) -> ImageData:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PILImage.DecompressionBombWarning)
                with PILImage.open(str(path)) as probe:
                    size, n_frames, bands = probe.size, int(getattr(probe, "n_frames", 1) or 1), len(probe.getbands())
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
            raise ImageLoadError(path, f"the image is too large to be read safely ({describe(e)})") from e
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        check_size(path, size, bands, max_voxels=max_voxels)
        if n_frames > 1:
            raise ImageLoadError(path, f"the file holds {n_frames} frames/pages; only single-image files are supported")
        reader = PILReader(reverse_indexing=True)  # array (W, H[, C]): axis 0 = x
        try:
            with PILImage.open(str(path)) as img:
                img.load()
                arr, meta = reader.get_data(_normalize_mode(img))
                arr = np.array(arr)  # own the memory before the file is closed
        except Exception as e:
            raise read_failed(path, self.format, e) from e
        return ImageData(
            array=arr,
            affine=None,
            channel_dim=meta.get("original_channel_dim"),
            world_frame="image",
            header_spacing=False,
        )


def _normalize_mode(img: Any) -> Any:
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
