"""Random training patches cut from the preprocessed (resampled, not resized) image.

:class:`RandLandmarkPatch` crops a patch of ``patch_size`` voxels (or ``patch_size_mm`` millimetres,
per axis, converted with the image's own voxel size, so anisotropic volumes work) from a
channel-first image. A share ``landmark_share`` of the patches is centred on a randomly chosen
landmark (plus a uniform jitter of up to ``jitter_mm`` per axis); the rest start uniformly at
random. A patch that would leave the image is moved inside it; along an axis where the image is
smaller than the patch, the whole axis is kept and padded symmetrically.

The crop and the pad are MONAI's ``SpatialCrop`` and ``SpatialPad``, which record themselves in the
MetaTensor affine (the geometry rule, DESIGN section 3): landmarks stay in world mm, and
:class:`~heatmark.transforms.WorldToVoxeld` afterwards gives their position on the patch grid.
Landmarks that fall outside the patch are then off the grid, and the loss
(:class:`heatmark.training.HeatmapLoss`) masks them like missing ones.

:func:`without_fixed_size` is the bundle's image preprocessing for patches (the resize to
``input_size`` left out); :func:`patch_voxels` turns a bundle's ``patch_size`` / ``patch_size_mm`` into voxels of its
``spacing_mm`` grid (what the sliding-window inferer uses as ``roi_size``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from heatmark.core.axes import per_axis
from heatmark.core.geometry import spacing_from_affine, world_to_voxel
from heatmark.transforms.points import as_landmark_tensor
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCrop,
    CenterSpatialCropd,
    MapTransform,
    Randomizable,
    Resize,
    Resized,
    ResizeWithPadOrCrop,
    ResizeWithPadOrCropd,
    SpatialCrop,
    SpatialPad,
    SpatialPadd,
)

__all__ = ["FIXED_SIZE_TRANSFORMS", "RandLandmarkPatch", "RandLandmarkPatchd", "patch_voxels", "without_fixed_size"]

#: MONAI transforms that bring every image to one fixed size (the whole-input network's ``input_size``)
FIXED_SIZE_TRANSFORMS = (ResizeWithPadOrCrop, ResizeWithPadOrCropd, Resize, Resized, CenterSpatialCrop,
                         CenterSpatialCropd, SpatialPad, SpatialPadd)


def without_fixed_size(transforms: Sequence[Any] | None) -> list[Any]:
    """A bundle's ``image_preprocessing`` for patches and sliding windows: the same transforms without
    those that bring the image to one fixed size (:data:`FIXED_SIZE_TRANSFORMS`, e.g. the
    ``ResizeWithPadOrCropd`` to ``input_size``), so patches and windows see the resampled image at
    its own size. Base.yaml applies it when ``patch_size`` / ``patch_size_mm`` is set."""
    return [t for t in (transforms or []) if not isinstance(t, FIXED_SIZE_TRANSFORMS)]


def patch_voxels(patch_size: Any = None, patch_size_mm: Any = None, spacing_mm: Any = None,
                 spatial_dims: int = 3) -> tuple[int, ...] | None:
    """A patch size in voxels per axis, or None (no patches: the whole input).

    Args:
        patch_size: voxels per axis (one number or ``spatial_dims``), or None.
        patch_size_mm: millimetres per axis, or None; converted with ``spacing_mm`` (mm per voxel,
            one number or one per axis) and rounded, at least 1 voxel.
        spatial_dims: 2 or 3.

    Raises:
        ValueError: both sizes given, a size below 1 voxel, ``patch_size_mm`` without a spacing.
    """
    if patch_size is not None and patch_size_mm is not None:
        raise ValueError("give patch_size (voxels) or patch_size_mm (mm), not both")
    if patch_size is not None:
        size = per_axis(patch_size, spatial_dims, name="patch_size", cast=float)
        if any(v < 1 or v != int(v) for v in size):
            raise ValueError(f"patch_size must be whole numbers of voxels >= 1, got {patch_size!r}")
        return tuple(int(v) for v in size)
    if patch_size_mm is None:
        return None
    mm = per_axis(patch_size_mm, spatial_dims, name="patch_size_mm", cast=float)
    if spacing_mm is None:
        raise ValueError("patch_size_mm needs spacing_mm (mm per voxel) to convert it to voxels")
    spacing = per_axis(spacing_mm, spatial_dims, name="spacing_mm", cast=float)
    if any(not v > 0 for v in mm) or any(not s > 0 for s in spacing):
        raise ValueError(f"patch_size_mm and spacing_mm must be > 0, got {patch_size_mm!r} and {spacing_mm!r}")
    return tuple(max(1, round(m / s)) for m, s in zip(mm, spacing))


class RandLandmarkPatch(Randomizable):
    """Crop a random patch from a channel-first MetaTensor ``(C, *S)``; see the module documentation.

    Args:
        patch_size: patch in voxels of the image's grid, one number or one per axis.
        patch_size_mm: the patch in mm per axis instead (converted with the image's voxel size).
        landmark_share: probability in [0, 1] that a patch is centred on a landmark (one of the
            landmarks inside the image, chosen uniformly); otherwise, or without such landmarks,
            the patch position is uniform.
        jitter_mm: half-width (mm, one number or one per axis) of the uniform offset added to the
            landmark centre; None: a quarter of the patch per axis.
        pad_mode: ``SpatialPad`` mode for images smaller than the patch (``"constant"`` pads 0).

    ``__call__(img, landmarks=None, randomize=True)``: ``landmarks`` ``(N, D)`` world mm (RAS; NaN
    rows missing); returns the patch, a MetaTensor ``(C, *patch)`` whose affine maps patch voxels
    to world mm. ``start`` (voxel index of the patch's first voxel on the image grid, may be
    negative where padded) holds the last draw.
    """

    def __init__(self, patch_size: int | Sequence[int] | None = None, patch_size_mm: float | Sequence[float] | None = None,
                 landmark_share: float = 0.5, jitter_mm: float | Sequence[float] | None = None,
                 pad_mode: str = "constant"):
        if (patch_size is None) == (patch_size_mm is None):
            raise ValueError("RandLandmarkPatch needs exactly one of patch_size (voxels) and patch_size_mm (mm)")
        if not 0.0 <= float(landmark_share) <= 1.0:
            raise ValueError(f"landmark_share must be in [0, 1], got {landmark_share!r}")
        self.patch_size = patch_size
        self.patch_size_mm = patch_size_mm
        self.landmark_share = float(landmark_share)
        self.jitter_mm = jitter_mm
        self.pad_mode = pad_mode
        self.start: tuple[int, ...] | None = None

    def size_for(self, img: MetaTensor) -> tuple[int, ...]:
        """The patch size in voxels of ``img``'s grid ``(D,)``."""
        d = img.ndim - 1
        if self.patch_size is not None:
            return patch_voxels(self.patch_size, None, None, d)
        spacing = spacing_from_affine(img.affine, d).tolist()
        return patch_voxels(None, self.patch_size_mm, spacing, d)

    def randomize(self, shape: Sequence[int], size: Sequence[int], centres: np.ndarray | None = None,
                  jitter: Sequence[float] = ()) -> None:
        """Draw ``start`` for an image of ``shape`` voxels; ``centres`` ``(M, D)``: landmark voxels
        inside the image; ``jitter``: half-widths in voxels."""
        free = [max(s - p, 0) for s, p in zip(shape, size)]
        use_landmark = centres is not None and len(centres) > 0 and self.R.uniform() < self.landmark_share
        if use_landmark:
            centre = centres[self.R.randint(len(centres))] + np.array([self.R.uniform(-j, j) for j in jitter])
            start = [int(np.clip(np.round(c - (p - 1) / 2.0), 0, f)) for c, p, f in zip(centre, size, free)]
        else:
            start = [int(self.R.randint(f + 1)) for f in free]
        # where the image is smaller than the patch, SpatialPad centres it: record that offset
        self.start = tuple(st if s >= p else -((p - s) // 2) for st, s, p in zip(start, shape, size))

    def __call__(self, img: MetaTensor, landmarks: Any = None, randomize: bool = True) -> MetaTensor:
        if not isinstance(img, MetaTensor):
            raise TypeError(f"RandLandmarkPatch needs a MetaTensor carrying its affine, got {type(img).__name__}")
        d = img.ndim - 1
        shape = tuple(int(s) for s in img.shape[1:])
        size = self.size_for(img)
        if randomize:
            centres = None
            if landmarks is not None and self.landmark_share > 0:
                vox = world_to_voxel(as_landmark_tensor(landmarks, d), img.affine).cpu().numpy()
                inside = np.isfinite(vox).all(1) & ((vox >= -0.5) & (vox <= np.array(shape) - 0.5)).all(1)
                centres = vox[inside]
            spacing = spacing_from_affine(img.affine, d).numpy()
            if self.jitter_mm is None:
                jitter = [p / 4.0 for p in size]
            else:
                jitter = [j / s for j, s in zip(per_axis(self.jitter_mm, d, name="jitter_mm", cast=float), spacing)]
            self.randomize(shape, size, centres, jitter)
        if self.start is None:
            raise RuntimeError("RandLandmarkPatch: call with randomize=True first")
        crop_start = [max(st, 0) for st in self.start]
        out = SpatialCrop(roi_start=crop_start, roi_end=[st + p for st, p in zip(crop_start, size)])(img)
        if tuple(out.shape[1:]) != tuple(size):
            out = SpatialPad(spatial_size=size, method="symmetric", mode=self.pad_mode)(out)
        return out


class RandLandmarkPatchd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandLandmarkPatch`: one draw per call, the same crop for all
    ``keys`` (images on the same grid), landmark centres from ``d[landmarks_key]`` (world mm;
    the landmarks themselves are not changed). Arguments as :class:`RandLandmarkPatch`."""

    def __init__(self, keys: KeysCollection, landmarks_key: str | None = "landmarks",
                 patch_size: int | Sequence[int] | None = None, patch_size_mm: float | Sequence[float] | None = None,
                 landmark_share: float = 0.5, jitter_mm: float | Sequence[float] | None = None,
                 pad_mode: str = "constant", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.landmarks_key = landmarks_key
        self.patcher = RandLandmarkPatch(patch_size, patch_size_mm, landmark_share, jitter_mm, pad_mode)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandLandmarkPatchd:
        super().set_random_state(seed, state)
        self.patcher.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # the draw happens on the first key
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        landmarks = d.get(self.landmarks_key) if self.landmarks_key is not None else None
        first = True
        for key in self.key_iterator(d):
            d[key] = self.patcher(d[key], landmarks if first else None, randomize=first)
            first = False
        return d
