"""Fine patches for the coarse-to-fine cascade: resample an image onto a small grid centred on a
world point, the grid's affine recorded in the output (DESIGN section 7b).

A patch grid has ``size`` voxels per axis of ``spacing_mm`` mm, the axis directions of the source
image (an oblique or flipped image gives an oblique or flipped patch; after ``Orientationd`` RAS
they are the RAS axes up to the image's own obliquity), and its centre voxel ``(size - 1) / 2`` at
the given world point. :func:`patch_affine` builds that affine; :class:`ResamplePatch` resamples
with MONAI's ``SpatialResample(dst_affine=...)``, so the output ``MetaTensor``'s affine *is* the
patch affine: world landmarks stay in mm, :class:`~heatmark.transforms.WorldToVoxeld` gives their
patch voxels, and decoding maps patch voxels back to world through the same affine. Outside the
source image the patch is zero-padded.

Training (:class:`RandFinePatchd`): the centre is a landmark's true position plus a random
jitter in mm that should resemble the coarse stage's errors: Gaussian with ``jitter_mm``
standard deviation per world axis, and with probability ``outlier_prob`` a uniform draw within
``+-outlier_mm`` per axis instead (the coarse stage's rarer large misses). Landmarks that fall
outside the patch keep their world position; the loss masks them (they are off the grid).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, SpatialResample, Transform

from heatmark.core.axes import per_axis
from heatmark.core.geometry import as_affine, world_to_voxel
from heatmark.transforms.points import as_landmark_tensor

__all__ = ["patch_affine", "inside_patch", "ResamplePatch", "ResamplePatchd", "RandFinePatchd", "patch_datalist"]


def patch_affine(center_mm: Sequence[float] | np.ndarray | torch.Tensor, spacing_mm: float | Sequence[float],
                 size: int | Sequence[int], reference_affine: Any) -> torch.Tensor:
    """The ``(D+1, D+1)`` affine (float64) of a patch grid centred on a world point.

    Args:
        center_mm: ``(D,)`` world point (mm, RAS) at the patch's centre voxel ``(size - 1) / 2``.
        spacing_mm: patch voxel size in mm, one number or one per patch axis.
        size: patch voxels per axis, one number or one per axis.
        reference_affine: the source image's affine (``(D+1, D+1)``, or MONAI's 4x4 for 2D): the
            patch axes take its directions (unit columns of its linear part).

    Raises:
        ValueError: a non-finite centre, a singular reference affine, or bad spacing/size.
    """
    c = torch.as_tensor(np.asarray(center_mm, dtype=np.float64)).reshape(-1)
    d = c.numel()
    if not torch.isfinite(c).all():
        raise ValueError(f"patch centre {c.tolist()} is not finite")
    sp = torch.tensor(per_axis(spacing_mm, d, name="spacing_mm", cast=float), dtype=torch.float64)
    n = torch.tensor(per_axis(size, d, name="size", cast=int), dtype=torch.float64)
    if not (sp > 0).all() or not (n >= 1).all():
        raise ValueError(f"patch spacing_mm must be > 0 and size >= 1, got {sp.tolist()} and {n.tolist()}")
    ref = as_affine(reference_affine, d)
    lin = ref[:d, :d]
    norms = torch.linalg.vector_norm(lin, dim=0)
    if not (norms > 0).all() or abs(float(torch.linalg.det(lin))) < 1e-12:
        raise ValueError("the reference affine is singular: no patch axes to take")
    lin_p = lin / norms * sp  # unit directions scaled to the patch spacing, per column
    out = torch.eye(d + 1, dtype=torch.float64)
    out[:d, :d] = lin_p
    out[:d, d] = c - lin_p @ ((n - 1) / 2)
    return out


def inside_patch(points_mm: Any, affine: Any, size: Sequence[int]) -> np.ndarray:
    """``(N,)`` bool: world points (mm) within the patch grid (voxel centres' half-voxel hull);
    False for missing (NaN) points."""
    pts = np.asarray(as_landmark_tensor(points_mm))
    vox = world_to_voxel(pts, np.asarray(torch.as_tensor(affine, dtype=torch.float64)))
    hi = np.asarray(size, dtype=np.float64) - 0.5
    with np.errstate(invalid="ignore"):
        return np.all(np.isfinite(vox) & (vox >= -0.5) & (vox <= hi), axis=-1)


class ResamplePatch(Transform):
    """Resample a channel-first ``MetaTensor`` image onto the patch grid centred on a world point.

    Args:
        spacing_mm: patch voxel size in mm (one number or one per axis).
        size: patch voxels per axis.
        mode, padding_mode: interpolation and padding (MONAI ``SpatialResample``); the patch is
            zero-padded outside the image by default.

    ``__call__(image, center_mm)`` returns a ``(C, *size)`` float32 ``MetaTensor`` whose affine is
    :func:`patch_affine` (voxel -> world mm).
    """

    def __init__(self, spacing_mm: float | Sequence[float], size: int | Sequence[int], mode: str = "bilinear",
                 padding_mode: str = "zeros"):
        self.spacing_mm = spacing_mm
        self.size = size
        self.mode = mode
        self.padding_mode = padding_mode
        self.resampler = SpatialResample(dtype=torch.float32)

    def affine(self, image: MetaTensor, center_mm: Any) -> torch.Tensor:
        """The patch affine for ``image`` and ``center_mm`` (see :func:`patch_affine`)."""
        if not isinstance(image, MetaTensor):
            raise TypeError(f"the image must be a MetaTensor carrying its affine, got {type(image).__name__}")
        return patch_affine(center_mm, self.spacing_mm, self.size, image.affine)

    def __call__(self, image: MetaTensor, center_mm: Any) -> MetaTensor:  # type: ignore[override]
        dst = self.affine(image, center_mm)
        d = dst.shape[0] - 1
        size = per_axis(self.size, d, name="size", cast=int)
        src_affine = torch.as_tensor(image.affine, dtype=torch.float64)
        if src_affine.shape[0] != d + 1:  # MONAI's 4x4 affine of a 2D image: give the patch the same form
            full = torch.eye(src_affine.shape[0], dtype=torch.float64)
            full[:d, :d], full[:d, -1] = dst[:d, :d], dst[:d, d]
            dst = full
        image = MetaTensor(image.as_tensor().to(torch.float32), affine=src_affine)
        out = self.resampler(image, dst_affine=dst, spatial_size=tuple(size), mode=self.mode,
                             padding_mode=self.padding_mode)
        out = MetaTensor(out.as_tensor().contiguous(), affine=torch.as_tensor(dst, dtype=torch.float64))
        return out


class ResamplePatchd(MapTransform):
    """Dictionary wrapper of :class:`ResamplePatch`: ``d[key]`` becomes the patch centred on the world
    point ``d[center_key]`` ``(D,)`` (mm), or on landmark ``d[landmark_index_key]`` of
    ``d[landmark_key]`` when ``center_key`` is absent. Landmarks are not touched (world mm)."""

    def __init__(self, keys: KeysCollection, spacing_mm: float | Sequence[float], size: int | Sequence[int],
                 center_key: str = "patch_center", landmark_key: str = "landmarks",
                 landmark_index_key: str = "patch_landmark", mode: str = "bilinear", padding_mode: str = "zeros",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.patch = ResamplePatch(spacing_mm, size, mode, padding_mode)
        self.center_key, self.landmark_key, self.landmark_index_key = center_key, landmark_key, landmark_index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.center_key in d:
            center = np.asarray(torch.as_tensor(d[self.center_key], dtype=torch.float64)).reshape(-1)
        elif self.landmark_index_key in d and self.landmark_key in d:
            center = np.asarray(as_landmark_tensor(d[self.landmark_key]))[int(d[self.landmark_index_key])]
        else:
            raise KeyError(f"ResamplePatchd needs d[{self.center_key!r}] (world mm) or d[{self.landmark_index_key!r}] "
                           f"with d[{self.landmark_key!r}]")
        for key in self.key_iterator(d):
            d[key] = self.patch(d[key], center)
        d[self.center_key] = torch.as_tensor(center, dtype=torch.float64)
        return d


class RandFinePatchd(Randomizable, MapTransform):
    """Training patches of the fine stage: centred on one landmark's true position plus a random
    jitter (mm) shaped like the coarse stage's errors.

    The landmark is ``d[landmark_index_key]`` when present (validation lists one entry per case
    and landmark, :func:`patch_datalist`), else drawn uniformly among the case's present
    landmarks. The jitter per world axis is ``N(0, jitter_mm)``; with probability
    ``outlier_prob`` it is drawn uniformly within ``+-outlier_mm`` instead. Writes the patch
    image, ``d[center_key]`` (world mm) and ``d[landmark_index_key]``. With ``only_center`` the
    other landmarks become missing (NaN) so a validation scores the centred landmark alone;
    otherwise they keep their world position and the loss masks those outside the patch.

    Args:
        keys: image keys (resampled onto the same patch grid).
        spacing_mm, size, mode, padding_mode: the patch grid, as :class:`ResamplePatch`.
        jitter_mm: standard deviation of the centre's offset from the landmark, mm, one number or
            one per world axis.
        outlier_prob: share of draws with a large offset.
        outlier_mm: half-width of the large offsets' uniform range, mm (one or one per axis).
        landmark_key: the world landmarks ``(N, D)``.
    """

    def __init__(self, keys: KeysCollection, spacing_mm: float | Sequence[float], size: int | Sequence[int],
                 jitter_mm: float | Sequence[float] = 0.0, outlier_prob: float = 0.0,
                 outlier_mm: float | Sequence[float] = 0.0, landmark_key: str = "landmarks",
                 center_key: str = "patch_center", landmark_index_key: str = "patch_landmark",
                 only_center: bool = False, mode: str = "bilinear", padding_mode: str = "zeros",
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= float(outlier_prob) <= 1.0:
            raise ValueError(f"outlier_prob must be within [0, 1], got {outlier_prob}")
        self.patch = ResamplePatch(spacing_mm, size, mode, padding_mode)
        self.jitter_mm, self.outlier_prob, self.outlier_mm = jitter_mm, float(outlier_prob), outlier_mm
        self.landmark_key, self.center_key, self.landmark_index_key = landmark_key, center_key, landmark_index_key
        self.only_center = only_center
        self._offset: np.ndarray | None = None
        self._index: int | None = None

    def randomize(self, data: Any = None) -> None:
        """Draw the landmark (when ``data`` is the landmark array and no index is given) and the offset."""
        points, index = data if data is not None else (None, None)
        d = points.shape[-1] if points is not None else 3
        if index is None and points is not None:
            present = np.flatnonzero(np.isfinite(points).all(-1))
            if not len(present):
                raise ValueError("RandFinePatchd: the case has no landmark to centre a patch on")
            index = int(present[self.R.randint(len(present))])
        self._index = index
        std = np.asarray(per_axis(self.jitter_mm, d, name="jitter_mm", cast=float))
        wide = np.asarray(per_axis(self.outlier_mm, d, name="outlier_mm", cast=float))
        if self.R.rand() < self.outlier_prob:
            self._offset = self.R.uniform(-1.0, 1.0, size=d) * wide
        else:
            self._offset = self.R.normal(0.0, 1.0, size=d) * std

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        points = np.asarray(as_landmark_tensor(d[self.landmark_key]))
        given = d.get(self.landmark_index_key)
        self.randomize((points, None if given is None else int(given)))
        index = int(self._index)  # type: ignore[arg-type]
        truth = points[index]
        if not np.isfinite(truth).all():
            if not self.only_center:  # a training draw: take a present landmark instead
                self.randomize((points, None))
                index = int(self._index)  # type: ignore[arg-type]
                truth = points[index]
            else:  # a validation entry whose landmark this case lacks: nothing to score
                present = points[np.isfinite(points).all(-1)]
                if not len(present):
                    raise ValueError("RandFinePatchd: the case has no landmark to centre a patch on")
                truth = np.full(points.shape[-1], np.nan)
                self._offset = present[0]  # any patch inside the anatomy; all landmarks missing
        center = np.where(np.isfinite(truth), truth, 0.0) + self._offset
        for key in self.key_iterator(d):
            d[key] = self.patch(d[key], center)
        d[self.center_key] = torch.as_tensor(center, dtype=torch.float64)
        d[self.landmark_index_key] = index
        if self.only_center:
            kept = np.full_like(points, np.nan)
            kept[index] = truth
            d[self.landmark_key] = torch.as_tensor(kept, dtype=torch.float64)
        return d


def patch_datalist(datalist: Sequence[Mapping[str, Any]], num_landmarks: int, seed: int = 0,
                   landmark_index_key: str = "patch_landmark", seed_key: str = "patch_seed",
                   landmarks: Sequence[int] | None = None) -> list[dict]:
    """One entry per case and landmark (``landmarks``: the indices, default all) for a fine-stage
    validation: each case's dict with ``landmark_index_key`` and a distinct integer ``seed_key``
    (``seed`` + position), so a ``SeededRandomd`` draws the same jitter at every validation."""
    chosen = list(range(int(num_landmarks))) if landmarks is None else [int(i) for i in landmarks]
    out = []
    for case in datalist:
        for i in chosen:
            out.append({**dict(case), landmark_index_key: i, seed_key: int(seed) + len(out)})
    return out
