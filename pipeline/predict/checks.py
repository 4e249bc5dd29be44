"""Plausibility checks of ``heatmark predict``: images too small or too empty to be answered, and
landmarks predicted outside the image.

Before inference, each image as loaded (``inference#loader``: its own grid, before any resampling)
must have, per axis, at least ``predict_min_voxels`` voxels and an extent of at least
``predict_min_extent_mm`` (default: ``predict_min_extent_fraction``, 1/8, of the network input's
field of view ``input_size x spacing_mm``), and hold at least ``predict_min_distinct_values``
distinct intensity values (a single non-zero voxel has 2). An image that fails is that case's error
in ``errors.csv``, with the reason and the config key. The keys live in the shipped ``base.yaml``
(prediction section); a bundle or a ``--config`` overlay may change them.

After inference, a landmark predicted more than ``predict_max_outside_mm`` outside the image's
field of view (the outer faces of its voxels; default: ``predict_min_extent_fraction`` of the
shortest axis of the network input's field of view, 24 mm for 192 x 240 mm) is set missing: NaN in the case's files,
empty cells in ``landmarks.csv``, measurements using it empty; the case is done, and the reason
("landmark 3 (Orbitale) predicted 212 mm outside the image; set missing") is a row of
``warnings.csv`` and a line on stderr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from heatmark.predict.errors import CaseError

__all__ = ["ImageChecks", "CheckImaged", "GEOMETRY_KEY", "outside_mm", "refuse_outside"]

#: Key under which :class:`CheckImaged` leaves the loaded image's ``(spatial_shape, affine)``.
GEOMETRY_KEY = "heatmark_image_geometry"

# above this many voxels, distinct values are first counted on a strided sample
_SAMPLE = 1 << 20


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" if v < 100 else f"{v:.0f}" for v in values)


def _at_least_distinct(data: torch.Tensor, n: int) -> int:
    """The number of distinct values of ``data`` when below ``n``; some number >= ``n`` otherwise
    (counted on a strided sample first, so a large image costs no full sort)."""
    flat = data.reshape(-1)
    if flat.numel() > _SAMPLE:
        k = int(torch.unique(flat[:: flat.numel() // _SAMPLE + 1]).numel())
        if k >= n:
            return k
    return int(torch.unique(flat).numel())


@dataclass(frozen=True)
class ImageChecks:
    """What an image must have to be answered (see the module documentation).

    Attributes:
        min_voxels: voxels per axis.
        min_extent_mm: mm per axis (empty: no limit).
        min_distinct_values: distinct intensity values.
        max_outside_mm: how far outside the image a predicted landmark may lie before it is set missing.
    """

    min_voxels: int = 8
    min_extent_mm: tuple[float, ...] = ()
    min_distinct_values: int = 16
    max_outside_mm: float = 10.0

    def problem(self, image: Any) -> str | None:
        """Why ``image`` (channel-first ``MetaTensor`` with an affine) is implausible; None if fine."""
        shape = tuple(int(s) for s in image.shape[1:])
        nd = len(shape)
        if min(shape, default=0) < self.min_voxels:
            return (f"the image is too small to be plausible: {' x '.join(map(str, shape))} voxels; at least "
                    f"{self.min_voxels} per axis (predict_min_voxels)")
        if self.min_extent_mm and getattr(image, "affine", None) is not None:
            affine = np.asarray(torch.as_tensor(image.affine, dtype=torch.float64))
            spacing = np.linalg.norm(affine[:nd, :nd], axis=0)
            extent = [n * float(s) for n, s in zip(shape, spacing)]
            need = list(self.min_extent_mm)[:nd]
            if any(e < m for e, m in zip(extent, need)):
                return (f"the image is too small to be plausible: {_mm(extent)} mm; at least {_mm(need)} mm "
                        "(predict_min_extent_mm)")
        if self.min_distinct_values > 1:
            data = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
            k = _at_least_distinct(data, self.min_distinct_values)
            if k < self.min_distinct_values:
                return (f"the image holds only {k} distinct intensity values; at least {self.min_distinct_values} "
                        "(predict_min_distinct_values)")
        return None


class CheckImaged:
    """Dictionary transform placed right after the loader in ``inference#preprocessing``: raise
    :class:`CaseError` for an implausible image, else pass it on, leaving its geometry
    ``(spatial_shape, affine)`` under :data:`GEOMETRY_KEY` for the check of the predictions."""

    def __init__(self, checks: ImageChecks, key: str = "image"):
        self.checks = checks
        self.key = key

    def __call__(self, data: Mapping) -> dict:
        image = data[self.key]
        problem = self.checks.problem(image)
        if problem is not None:
            raise CaseError(problem)
        d = dict(data)
        affine = getattr(image, "affine", None)
        d[GEOMETRY_KEY] = None if affine is None else (
            tuple(int(s) for s in image.shape[1:]), np.asarray(torch.as_tensor(affine, dtype=torch.float64)).copy())
        return d


def outside_mm(points: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """``(N,)`` distance in mm of each world point from the image's field of view (the outer faces
    of its voxels; 0 inside, NaN for a missing point)."""
    pts = np.asarray(points, dtype=np.float64)
    nd = len(shape)
    affine = np.asarray(affine, dtype=np.float64)
    lin, off = affine[:nd, :nd], affine[:nd, nd]
    try:
        vox = np.linalg.solve(lin, (pts - off).T).T
    except np.linalg.LinAlgError:  # the loader refuses singular affines; never a reason to fail here
        return np.zeros(len(pts))
    inside = np.clip(vox, -0.5, np.asarray(shape, dtype=np.float64) - 0.5)
    return np.linalg.norm((vox - inside) @ lin.T, axis=1)


def refuse_outside(world: np.ndarray, geometry: tuple[Sequence[int], np.ndarray] | None, names: Sequence[str],
                   max_outside_mm: float) -> tuple[np.ndarray, list[str]]:
    """``world`` with the landmarks farther than ``max_outside_mm`` outside the image set missing
    (NaN), and one warning per such landmark."""
    if geometry is None or not math.isfinite(max_outside_mm):
        return world, []
    dist = outside_mm(world, *geometry)
    far = np.flatnonzero(np.isfinite(dist) & (dist > max_outside_mm))
    if not len(far):
        return world, []
    world = np.array(world, dtype=np.float64, copy=True)
    world[far] = np.nan
    return world, [f"landmark {i + 1} ({names[i]}) predicted {dist[i]:.0f} mm outside the image; set missing"
                   for i in far]
