"""Gaussian heatmap targets as MONAI transforms, on :func:`heatmark.core.heatmaps.gaussian_heatmaps`.

Training does not need these: the losses build targets on the training device from voxel
landmarks. They exist for users who want heatmaps in their own pipelines, and for visualisation.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from heatmark.core.geometry import sigma_mm_to_voxels, world_to_voxel
from heatmark.core.heatmaps import gaussian_heatmaps
from heatmark.transforms.points import as_landmark_tensor

__all__ = ["GaussianHeatmap", "GaussianHeatmapd"]

SIGMA_UNITS = ("voxel", "mm")


class GaussianHeatmap(Transform):
    """Heatmaps ``(N, *spatial)`` for voxel landmarks ``(N, D)``, exact at sub-voxel positions.

    Args:
        sigma: Gaussian width: scalar, per landmark ``(N,)`` or per landmark and axis ``(N, D)``.
        sigma_units: ``"voxel"`` (of the target grid) or ``"mm"`` (converted through the affine's
            spacing, so a round blob in mm stays round on an anisotropic grid).
        gamma: ``None`` for peak 1, else Payer et al.'s scaling ``gamma / ((2 pi)^(D/2) prod sigma)``.
        dtype: output dtype.

    A NaN landmark gives an all-zero channel.
    """

    def __init__(self, sigma: float | Sequence = 2.0, sigma_units: str = "voxel", gamma: float | None = None,
                 dtype: torch.dtype = torch.float32):
        if sigma_units not in SIGMA_UNITS:
            raise ValueError(f"sigma_units must be one of {SIGMA_UNITS}, got {sigma_units!r}")
        self.sigma = sigma
        self.sigma_units = sigma_units
        self.gamma = gamma
        self.dtype = dtype

    def __call__(self, points: torch.Tensor, spatial_shape: Sequence[int], affine: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            points: ``(N, D)`` voxel coordinates on the target grid.
            spatial_shape: the target grid.
            affine: the grid's affine; required when ``sigma_units="mm"``.
        """
        pts = as_landmark_tensor(points)
        sigma = self.sigma
        if self.sigma_units == "mm":
            if affine is None:
                raise ValueError("sigma_units='mm' needs the image affine to convert sigma to voxels")
            sigma = sigma_mm_to_voxels(sigma, affine, pts.shape[-1])
        return gaussian_heatmaps(pts, spatial_shape, sigma=sigma, gamma=self.gamma, dtype=self.dtype)


class GaussianHeatmapd(MapTransform):
    """Heatmaps on the grid of ``d[ref_key]`` for the world landmarks ``d[key]`` (mm, RAS).

    The landmarks are mapped to voxels through the reference image's current affine (the geometry
    rule), so call this after the last spatial transform. The result is a MetaTensor
    ``(N, *spatial)`` with the reference image's affine and meta, stored under ``heatmap_keys``
    (default ``"heatmap"``; one per key).
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "image",
        heatmap_keys: KeysCollection = "heatmap",
        sigma: float | Sequence = 2.0,
        sigma_units: str = "mm",
        gamma: float | None = None,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.heatmap_keys = [heatmap_keys] if isinstance(heatmap_keys, str) else list(heatmap_keys)
        if len(self.heatmap_keys) != len(self.keys):
            raise ValueError("heatmap_keys must have one entry per key")
        self.generator = GaussianHeatmap(sigma=sigma, sigma_units=sigma_units, gamma=gamma, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        if not isinstance(ref, MetaTensor):
            raise TypeError(f"d[{self.ref_key!r}] must be a MetaTensor carrying its affine")
        spatial_shape = ref.shape[1:]
        for key, out_key in self.key_iterator(d, self.heatmap_keys):
            voxel = world_to_voxel(as_landmark_tensor(d[key]), ref.affine)
            hm = self.generator(voxel, spatial_shape, affine=ref.affine)
            meta = {k: v for k, v in ref.meta.items() if k != "affine"}
            d[out_key] = MetaTensor(hm, affine=ref.affine.clone(), meta=meta)
        return d
