"""Landmarks in the data dictionary: loading them (world mm, RAS) and converting them to the voxel
grid of an image through that image's *current* affine.

Landmarks are stored in the data dictionary as a float64 tensor ``(N, D)`` of world coordinates;
NaN rows are missing landmarks. They are not listed in the ``keys`` of MONAI's spatial transforms:
those act on the image and record what they did in its affine (the geometry rule, DESIGN section 3),
so a single :class:`WorldToVoxeld` right before targets are built is all the bookkeeping needed.
:func:`heatmark.core.geometry.world_to_voxel` gives the same numbers as MONAI's
``ApplyTransformToPointsd(refer_keys=..., invert_affine=True)`` (checked in the tests) without its
``(C, N, D)`` channel convention, and also for 2D images: MONAI 1.6.1's transform fails on 2D points
whenever a 4x4 affine is involved (a 2D MetaTensor's affine is 4x4).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from heatmark.core.geometry import world_to_voxel
from heatmark.landmarks import Landmarks, read_landmarks

__all__ = [
    "as_landmark_tensor",
    "LoadLandmarks",
    "LoadLandmarksd",
    "WorldToVoxel",
    "WorldToVoxeld",
]


def as_landmark_tensor(points: Any, spatial_dims: int | None = None) -> torch.Tensor:
    """Return landmarks as a float64 CPU tensor ``(N, D)``; ``None`` entries become NaN rows."""
    if isinstance(points, torch.Tensor):
        t = points.detach().to(torch.float64)
        if isinstance(t, MetaTensor):
            t = t.as_tensor()
    else:
        rows = [[np.nan] * (spatial_dims or 0) if r is None else r for r in points] if isinstance(points, list) else points
        t = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    if t.ndim != 2 or t.shape[-1] not in (2, 3):
        raise ValueError(f"landmarks must have shape (N, 2) or (N, 3), got {tuple(t.shape)}")
    if spatial_dims is not None and t.shape[-1] != spatial_dims:
        raise ValueError(f"expected {spatial_dims}D landmarks, got {t.shape[-1]}D")
    return t


class LoadLandmarks(Transform):
    """Load one case's landmarks as a float64 tensor ``(N, D)`` in world mm (RAS).

    Accepts a landmark file path (any format of :func:`heatmark.landmarks.read_landmarks`), a
    :class:`heatmark.landmarks.Landmarks`, or coordinates (nested lists / array, ``None`` for a
    missing landmark).

    Args:
        names: landmark names to select and order (missing names become NaN rows); needed when the
            files do not all list the same landmarks.
        spatial_dims: expected dimensionality (2 or 3); 2D landmarks read from Slicer files (which
            always store x, y, z) are reduced to x, y.
        case: which case to pick from multi-case files.
    """

    def __init__(self, names: Sequence[str] | None = None, spatial_dims: int | None = None, case: str | None = None):
        self.names = list(names) if names is not None else None
        self.spatial_dims = spatial_dims
        self.case = case

    def __call__(self, src: Any, case: str | None = None) -> torch.Tensor:
        """``src`` as ``(N, D)`` world mm; ``case`` (default: the one given at construction) picks
        the case of a multi-case file."""
        if isinstance(src, (str, os.PathLike)):
            src = read_landmarks(src, case=case if case is not None else self.case, names=self.names,
                                 spatial_dims=self.spatial_dims)
        if isinstance(src, Landmarks):
            return as_landmark_tensor(src.coords, self.spatial_dims)
        return as_landmark_tensor(src, self.spatial_dims)


class LoadLandmarksd(MapTransform):
    """Dictionary wrapper of :class:`LoadLandmarks`: replaces ``d[key]`` by the ``(N, D)`` tensor;
    the case of a multi-case landmark file is ``d["case"]``. Stateless per call, so datasets may
    run it from several threads at once."""

    def __init__(self, keys: KeysCollection, names: Sequence[str] | None = None, spatial_dims: int | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadLandmarks(names=names, spatial_dims=spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            case = d.get("case")
            d[key] = self.loader(d[key], case=str(case) if case is not None else None)
        return d


def _affine_of(image: Any) -> torch.Tensor:
    if isinstance(image, MetaTensor):
        return image.affine
    raise TypeError(f"the reference image must be a MetaTensor carrying its affine, got {type(image).__name__}")


class WorldToVoxel(Transform):
    """World points ``(N, D)`` in mm to continuous voxel indices of the grid with ``affine``."""

    def __call__(self, points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
        return world_to_voxel(as_landmark_tensor(points), affine)


class WorldToVoxeld(MapTransform):
    """Write the voxel position of world landmarks ``d[key]`` on the grid of ``d[ref_key]``.

    Use it after the last spatial transform. By default the result goes to ``f"{key}_voxel"`` and
    the world landmarks stay untouched. (The way back, voxel -> world, happens once, in decoding:
    :func:`heatmark.evaluation.decoding.decode_heatmaps` with the image's affine.)
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "image", output_keys: KeysCollection | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        if output_keys is None:
            output_keys = [f"{k}_voxel" for k in self.keys]
        self.output_keys = [output_keys] if isinstance(output_keys, str) else list(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError("output_keys must have one entry per key")
        self.converter = WorldToVoxel()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine = _affine_of(d[self.ref_key])
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.converter(d[key], affine)
        return d
