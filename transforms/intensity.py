"""Intensity transforms. MONAI already has most of what landmark work needs, and we use it as is:

- histogram equalisation for radiographs: ``monai.transforms.HistogramNormalized``;
- random intensity shift / scale: ``RandShiftIntensityd``, ``RandScaleIntensityd``
  (also ``RandAdjustContrastd``, ``RandGaussianNoised``).

The gap filled here is a *robust* percentile normalisation that can ignore the background: for
MR and CT the zero background dominates the histogram and MONAI's
``ScaleIntensityRangePercentiles`` (no ``nonzero`` option) then maps the anatomy poorly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = ["RobustNormalize", "RobustNormalized"]


class RobustNormalize(Transform):
    """Map the ``lower``..``upper`` percentiles of an image to ``out_range`` (per channel).

    Args:
        lower, upper: percentiles in [0, 100].
        out_range: target of the two percentiles, e.g. ``(0, 1)``.
        nonzero: compute the percentiles over non-zero voxels only (the background of MR/CT).
        clip: clip the result to ``out_range``.

    Shapes: ``(C, *spatial)`` in, same shape and type out; a constant channel maps to ``out_range[0]``.
    """

    def __init__(self, lower: float = 1.0, upper: float = 99.0, out_range: tuple[float, float] = (0.0, 1.0),
                 nonzero: bool = False, clip: bool = True):
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.lower, self.upper = lower, upper
        self.out_range = (float(out_range[0]), float(out_range[1]))
        self.nonzero = nonzero
        self.clip = clip

    def __call__(self, img: Any) -> Any:
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        out = torch.empty_like(x)
        lo_out, hi_out = self.out_range
        q = torch.tensor([self.lower / 100.0, self.upper / 100.0])
        for c in range(x.shape[0]):
            ch = x[c]
            vals = ch[ch != 0] if self.nonzero else ch.reshape(-1)
            if vals.numel() == 0:
                out[c] = lo_out
                continue
            if vals.numel() > 2**24:  # torch.quantile's input limit; a strided subsample is plenty
                vals = vals[:: vals.numel() // 2**24 + 1]
            lo, hi = torch.quantile(vals.float(), q).tolist()
            if hi <= lo:
                out[c] = lo_out
                continue
            out[c] = (ch - lo) / (hi - lo) * (hi_out - lo_out) + lo_out
        if self.clip:
            out = out.clamp(min(lo_out, hi_out), max(lo_out, hi_out))
        return convert_to_dst_type(out, dst=img, dtype=torch.float32)[0]


class RobustNormalized(MapTransform):
    """Dictionary wrapper of :class:`RobustNormalize`."""

    def __init__(self, keys: KeysCollection, lower: float = 1.0, upper: float = 99.0,
                 out_range: tuple[float, float] = (0.0, 1.0), nonzero: bool = False, clip: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = RobustNormalize(lower, upper, out_range, nonzero, clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d
