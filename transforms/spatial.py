"""Landmark-aware spatial transforms that MONAI's affine bookkeeping cannot cover.

- Elastic deformation has no affine: :class:`RandLandmarkElastic` warps the image with a smooth
  random displacement field and moves world landmarks with the numerical inverse of that same
  field; landmarks that leave the field of view become NaN (missing).
- Flips are recorded in the affine by MONAI (``Flip`` updates it), so world landmarks stay on
  their anatomy; what a flip does change is which landmark *looks* like which: a left eye becomes
  a right eye. :class:`RandLandmarkFlipd` flips with MONAI and swaps configured left/right pairs.

Displacement convention: for output voxel ``q`` the image is sampled at input position
``q + u(q)`` (a backward warp, in voxels of the image grid); a landmark at input position ``p``
moves to the ``q`` that solves ``q + u(q) = p``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Flip, MapTransform, Randomizable, Transform
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from heatmark.core.geometry import spacing_from_affine, voxel_to_world, world_to_voxel
from heatmark.transforms.points import as_landmark_tensor

__all__ = [
    "RandLandmarkElastic",
    "RandLandmarkElasticd",
    "SwapLandmarkPairs",
    "RandLandmarkFlipd",
]


def _sample(field: torch.Tensor, points: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Multilinear interpolation of a ``(C, *S)`` field at voxel positions ``(M, D)`` -> ``(M, C)``."""
    d = points.shape[-1]
    shape = torch.tensor(field.shape[1:], dtype=points.dtype, device=points.device)
    norm = 2.0 * points / (shape - 1).clamp(min=1) - 1.0
    grid = norm.flip(-1).reshape(1, -1, *([1] * (d - 1)), d).to(field.dtype)  # grid_sample wants (x=last axis, ...)
    out = F.grid_sample(field.unsqueeze(0), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.reshape(field.shape[0], -1).T.to(points.dtype)


def _warp(image: torch.Tensor, field: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Backward-warp a ``(C, *S)`` image: ``out(q) = image(q + u(q))``, ``field`` = ``u`` as ``(D, *S)`` voxels."""
    d = field.shape[0]
    spatial = image.shape[1:]
    axes = [torch.arange(s, dtype=field.dtype, device=field.device) for s in spatial]
    ident = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *S)
    pos = ident + field
    scale = torch.tensor([max(s - 1, 1) for s in spatial], dtype=field.dtype, device=field.device)
    norm = 2.0 * pos / scale.reshape(d, *([1] * d)) - 1.0
    grid = norm.flip(0).permute(*range(1, d + 1), 0).unsqueeze(0)  # (1, *S, D) with x = last array axis
    src = image.unsqueeze(0)
    dtype = src.dtype
    out = F.grid_sample(src.float(), grid.float(), mode=mode, padding_mode=padding_mode, align_corners=True)
    return out[0].to(dtype)


class RandLandmarkElastic(Randomizable, Transform):
    """Smooth random elastic deformation of an image, with the matching map for landmarks.

    The displacement field is drawn on a coarse control grid (one control point every
    ``control_spacing_mm``, values ~ N(0, ``magnitude_mm``) per axis) and interpolated to every voxel
    (bicubic in 2D, trilinear in 3D). Its largest displacement gradient is capped at
    ``max_gradient`` (< 1) so the deformation never folds and has a unique inverse.

    Call :meth:`randomize` with the image, then :meth:`__call__` on every image of the case, then
    :meth:`map_points` on the landmarks. The image's affine is unchanged (the grid is the same).

    Args:
        prob: probability of deforming at all.
        control_spacing_mm: distance between control points, scalar or per axis.
        magnitude_mm: standard deviation of control-point displacements.
        max_gradient: cap on ``max |du_i/dx_j|`` (voxel units) to keep the map invertible.
        mode, padding_mode: ``grid_sample`` interpolation for images (``"nearest"`` for labels).
        max_iter, tol: fixed-point inversion of the field for landmarks; a landmark whose
            residual stays above ``tol`` voxels, or that ends outside the image, becomes NaN.
    """

    def __init__(
        self,
        prob: float = 0.5,
        control_spacing_mm: float | Sequence[float] = 40.0,
        magnitude_mm: float = 3.0,
        max_gradient: float = 0.5,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        max_iter: int = 50,
        tol: float = 1e-3,
    ):
        if not 0.0 < max_gradient < 1.0:
            raise ValueError(f"max_gradient must be in (0, 1) for an invertible deformation, got {max_gradient}")
        self.prob = prob
        self.control_spacing_mm = control_spacing_mm
        self.magnitude_mm = magnitude_mm
        self.max_gradient = max_gradient
        self.mode = mode
        self.padding_mode = padding_mode
        self.max_iter = max_iter
        self.tol = tol
        self._do = False
        self.field: torch.Tensor | None = None

    def randomize(self, image: torch.Tensor | None = None) -> None:  # type: ignore[override]
        self._do = self.R.rand() < self.prob
        self.field = None
        if not self._do or image is None:
            return
        spatial = tuple(image.shape[1:])
        d = len(spatial)
        affine = image.affine if isinstance(image, MetaTensor) else torch.eye(d + 1, dtype=torch.float64)
        spacing = spacing_from_affine(affine, d).numpy()
        ctrl_mm = np.asarray(ensure_tuple_rep(self.control_spacing_mm, d), dtype=np.float64)
        extent_mm = np.asarray(spatial) * spacing
        n_ctrl = [max(2, int(math.ceil(e / c)) + 1) for e, c in zip(extent_mm, ctrl_mm)]
        coarse = self.R.normal(0.0, self.magnitude_mm, size=(d, *n_ctrl)) / spacing.reshape(d, *([1] * d))
        coarse_t = torch.as_tensor(coarse, dtype=torch.float32).unsqueeze(0)
        mode = "bicubic" if d == 2 else "trilinear"
        field = F.interpolate(coarse_t, size=spatial, mode=mode, align_corners=True)[0].to(torch.float64)
        grad = max(float(torch.gradient(field[i], dim=j)[0].abs().max()) for i in range(d) for j in range(d))
        if grad > self.max_gradient:
            field = field * (self.max_gradient / grad)
        self.field = field

    def __call__(self, image: torch.Tensor, randomize: bool = True, mode: str | None = None) -> torch.Tensor:
        if randomize:
            self.randomize(image)
        if not self._do or self.field is None:
            return image
        if tuple(image.shape[1:]) != tuple(self.field.shape[1:]):
            raise ValueError(f"image grid {tuple(image.shape[1:])} differs from the field's {tuple(self.field.shape[1:])}")
        out = _warp(torch.as_tensor(image), self.field.to(image.device), mode or self.mode, self.padding_mode)
        return convert_to_dst_type(out, dst=image)[0]  # same grid: affine and meta carry over

    def map_points(self, points_voxel: torch.Tensor) -> torch.Tensor:
        """Move voxel landmarks ``(N, D)`` of the input grid to the deformed grid (float64).

        Solves ``q + u(q) = p`` by fixed-point iteration ``q <- p - u(q)`` (a contraction, since
        the field's gradient is below 1). Unconverged or out-of-view points become NaN.
        """
        p = as_landmark_tensor(points_voxel)
        if not self._do or self.field is None:
            return p.clone()
        field = self.field
        ok = torch.isfinite(p).all(-1)
        q = torch.where(ok.unsqueeze(-1), p, torch.zeros_like(p))
        p0 = q.clone()
        for _ in range(self.max_iter):
            q_new = p0 - _sample(field, q)
            done = (q_new - q).abs().max() < self.tol * 1e-3
            q = q_new
            if done:
                break
        residual = (q + _sample(field, q) - p0).norm(dim=-1)
        shape = torch.tensor(field.shape[1:], dtype=q.dtype)
        inside = ((q >= -0.5) & (q <= shape - 0.5)).all(-1)
        keep = ok & inside & (residual < self.tol)
        return torch.where(keep.unsqueeze(-1), q, torch.full_like(q, float("nan")))


class RandLandmarkElasticd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandLandmarkElastic`.

    Args:
        keys: image keys, all on the same grid (the first is the reference for affine and shape).
        landmark_keys: world landmarks ``(N, D)`` to move with the field.
        mode: interpolation per image key (e.g. ``("bilinear", "nearest")`` for image and label).
        other args: as :class:`RandLandmarkElastic`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        landmark_keys: KeysCollection = "landmarks",
        prob: float = 0.5,
        control_spacing_mm: float | Sequence[float] = 40.0,
        magnitude_mm: float = 3.0,
        max_gradient: float = 0.5,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str = "zeros",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.landmark_keys = [landmark_keys] if isinstance(landmark_keys, str) else list(landmark_keys)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.elastic = RandLandmarkElastic(prob, control_spacing_mm, magnitude_mm, max_gradient, padding_mode=padding_mode)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.elastic.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.elastic.randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == []:
            return d
        ref = d[first]
        self.randomize(ref)
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.elastic(d[key], randomize=False, mode=mode)
        affine = ref.affine if isinstance(ref, MetaTensor) else None
        for key in self.landmark_keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"landmark key {key!r} not in data")
            if affine is None:
                raise TypeError(f"d[{first!r}] must be a MetaTensor to move world landmarks")
            vox = world_to_voxel(as_landmark_tensor(d[key]), affine)
            d[key] = voxel_to_world(self.elastic.map_points(vox), affine)
        return d


class SwapLandmarkPairs(Transform):
    """Swap rows of ``(N, D)`` landmarks for each configured pair ``(i, j)`` (0-based indices)."""

    def __init__(self, pairs: Sequence[Sequence[int]]):
        self.pairs = [tuple(int(i) for i in p) for p in pairs]
        seen: set[int] = set()
        for p in self.pairs:
            if len(p) != 2 or p[0] == p[1] or seen & set(p):
                raise ValueError(f"landmark pairs must be disjoint pairs of distinct indices, got {pairs}")
            seen |= set(p)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        out = as_landmark_tensor(points).clone()
        n = out.shape[0]
        for i, j in self.pairs:
            if max(i, j) >= n:
                raise IndexError(f"landmark pair ({i}, {j}) out of range for {n} landmarks")
            out[[i, j]] = out[[j, i]]
        return out


class RandLandmarkFlipd(Randomizable, MapTransform):
    """Randomly flip images along ``spatial_axis`` (MONAI ``Flip``, which updates the affine) and
    swap the configured left/right landmark pairs.

    World landmarks need no moving (the affine keeps them on the anatomy); the swap makes channel
    "left X" follow the structure that now looks like a left X. Without ``pairs`` only midline
    landmarks are meaningful after a left/right flip.
    """

    def __init__(
        self,
        keys: KeysCollection,
        landmark_keys: KeysCollection = "landmarks",
        prob: float = 0.5,
        spatial_axis: int | Sequence[int] | None = 0,
        pairs: Sequence[Sequence[int]] = (),
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.landmark_keys = [landmark_keys] if isinstance(landmark_keys, str) else list(landmark_keys)
        self.prob = prob
        self.flipper = Flip(spatial_axis=spatial_axis)
        self.swapper = SwapLandmarkPairs(pairs)
        self._do = False

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.rand() < self.prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do:
            return d
        for key in self.key_iterator(d):
            d[key] = self.flipper(d[key])
        for key in self.landmark_keys:
            if key in d:
                d[key] = self.swapper(d[key])
            elif not self.allow_missing_keys:
                raise KeyError(f"landmark key {key!r} not in data")
        return d
