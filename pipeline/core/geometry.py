"""The one place where world and voxel coordinates meet.

Conventions (DESIGN section 3):

- World coordinates are millimetres in RAS, as MONAI's readers report them.
- Voxel coordinates index the array axes of a channel-first image ``(C, *spatial)``: point
  ``(i, j[, k])`` is the centre of voxel ``image[:, i, j(, k)]``; for 2D images axis 0 is x.
- ``world = A @ [voxel, 1]`` with ``A`` the image's current ``(D+1, D+1)`` affine (MetaTensor
  ``.affine``; a 4x4 affine of a 2D image is reduced to 3x3 with :func:`monai.data.utils.to_affine_nd`).

Every spatial transform acts on the image and MONAI records it in the affine; landmarks stay in
world coordinates and are converted with the *final* affine right before they are needed. No
other module inverts an affine to move points.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data.utils import to_affine_nd

__all__ = [
    "as_affine",
    "world_to_voxel",
    "voxel_to_world",
    "spacing_from_affine",
    "sigma_mm_to_voxels",
    "output_stride_matrix",
    "output_to_input_voxels",
    "input_to_output_voxels",
    "output_grid_affine",
    "nifti_affine",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence


def as_affine(affine: ArrayLike, spatial_dims: int) -> torch.Tensor:
    """Return ``affine`` as a float64 tensor of shape ``(..., D+1, D+1)`` for ``spatial_dims`` D.

    Accepts a single affine or a batch ``(B, R, R)``; MONAI's 4x4 affines of 2D images are reduced.
    """
    a = torch.as_tensor(np.asarray(affine) if not isinstance(affine, torch.Tensor) else affine)
    a = a.detach().to(torch.float64)
    if a.ndim == 2:
        if a.shape[0] != spatial_dims + 1:
            a = torch.as_tensor(to_affine_nd(spatial_dims, a), dtype=torch.float64)
        return a
    if a.ndim == 3:
        if a.shape[-1] != spatial_dims + 1:
            a = torch.stack([torch.as_tensor(to_affine_nd(spatial_dims, x), dtype=torch.float64) for x in a])
        return a
    raise ValueError(f"affine must have shape (R, R) or (B, R, R), got {tuple(a.shape)}")


def _apply(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Apply ``(..., D+1, D+1)`` ``affine`` to ``(..., N, D)`` points (float64)."""
    d = points.shape[-1]
    lin = affine[..., :d, :d]
    off = affine[..., :d, d]
    return points @ lin.transpose(-1, -2) + off.unsqueeze(-2)


def _points(points: ArrayLike, device: torch.device | None) -> tuple[torch.Tensor, bool, torch.dtype | None]:
    was_numpy = not isinstance(points, torch.Tensor)
    dtype = None if was_numpy else points.dtype
    p = torch.as_tensor(np.asarray(points, dtype=np.float64) if was_numpy else points)
    p = p.to(dtype=torch.float64, device=device)
    if p.ndim < 2:
        raise ValueError(f"points must have shape (..., N, D), got {tuple(p.shape)}")
    return p, was_numpy, dtype


def world_to_voxel(points: ArrayLike, affine: ArrayLike) -> torch.Tensor | np.ndarray:
    """Map world points (mm, RAS) to continuous voxel indices of the image with ``affine``.

    Args:
        points: ``(N, D)`` or ``(B, N, D)`` world coordinates in mm; NaN rows stay NaN.
        affine: the image's current affine, ``(D+1, D+1)`` (or MONAI's 4x4 for 2D), or a batch
            ``(B, R, R)`` matching batched points.

    Returns:
        Voxel coordinates of the same shape, float64, as a numpy array if ``points`` was not a
        tensor, else a tensor on the points' device.
    """
    device = points.device if isinstance(points, torch.Tensor) else None
    p, was_numpy, _ = _points(points, device)
    a = as_affine(affine, p.shape[-1]).to(p.device)
    out = _apply(p, torch.linalg.inv(a))
    return out.cpu().numpy() if was_numpy else out


def voxel_to_world(points: ArrayLike, affine: ArrayLike) -> torch.Tensor | np.ndarray:
    """Map continuous voxel indices to world points (mm, RAS) through ``affine``.

    Shapes and return type as :func:`world_to_voxel`.
    """
    device = points.device if isinstance(points, torch.Tensor) else None
    p, was_numpy, _ = _points(points, device)
    a = as_affine(affine, p.shape[-1]).to(p.device)
    out = _apply(p, a)
    return out.cpu().numpy() if was_numpy else out


def spacing_from_affine(affine: ArrayLike, spatial_dims: int) -> torch.Tensor:
    """Voxel size in mm along each array axis: the column norms of the affine's linear part.

    Returns ``(D,)`` for one affine or ``(B, D)`` for a batch, float64.
    """
    a = as_affine(affine, spatial_dims)
    return torch.linalg.vector_norm(a[..., :spatial_dims, :spatial_dims], dim=-2)


def sigma_mm_to_voxels(sigma_mm: ArrayLike | float, affine: ArrayLike, spatial_dims: int) -> torch.Tensor:
    """Convert a Gaussian width in mm (scalar, ``(N,)`` or ``(N, D)``) to voxels per array axis.

    Returns ``(N, D)`` (or ``(1, D)`` for a scalar) float64; with a batch of affines ``(B, N, D)``.
    """
    s = torch.as_tensor(np.asarray(sigma_mm, dtype=np.float64) if not isinstance(sigma_mm, torch.Tensor) else sigma_mm)
    s = s.to(torch.float64)
    if s.ndim == 0:
        s = s.reshape(1, 1)
    elif s.ndim == 1:
        s = s[:, None]
    spacing = spacing_from_affine(affine, spatial_dims)
    if spacing.ndim == 2:
        return s.unsqueeze(0) / spacing[:, None, :]
    return s / spacing


def output_stride_matrix(output_stride: int | Sequence[int] | None, spatial_dims: int) -> torch.Tensor:
    """``(D+1, D+1)`` map from a network's output-grid voxels to its input-grid voxels.

    An output voxel ``u`` of a network that average-pools by ``s`` (kernel = stride = ``s``, as in
    Payer's Downsampling-Net) averages input voxels ``u s .. u s + s - 1``, so its centre is input
    position ``u s + (s - 1) / 2`` per axis. ``None`` or 1 is the identity. This is the one place
    the convention lives: decoding, the loss targets and saved heatmaps all derive from it.
    """
    if output_stride is None:
        st = [1.0] * spatial_dims
    elif isinstance(output_stride, (int, np.integer)):
        st = [float(output_stride)] * spatial_dims
    else:
        st = [float(v) for v in output_stride]
        if len(st) == 1:
            st = st * spatial_dims
    if len(st) != spatial_dims or any(v < 1 for v in st):
        raise ValueError(f"output_stride needs 1 or {spatial_dims} positive values, got {output_stride!r}")
    m = torch.eye(spatial_dims + 1, dtype=torch.float64)
    for i, v in enumerate(st):
        m[i, i] = v
        m[i, spatial_dims] = (v - 1.0) / 2.0
    return m


def output_to_input_voxels(points: torch.Tensor, output_stride: int | Sequence[int] | None) -> torch.Tensor:
    """``(..., D)`` continuous output-grid voxel positions -> input-grid voxels (float64)."""
    m = output_stride_matrix(output_stride, points.shape[-1])
    if torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype)):
        return points
    return _apply(points.to(torch.float64), m.to(points.device))


def input_to_output_voxels(points: torch.Tensor, output_stride: int | Sequence[int] | None) -> torch.Tensor:
    """``(..., D)`` input-grid voxel positions -> the network's output grid (float64); the inverse
    of :func:`output_to_input_voxels`."""
    m = output_stride_matrix(output_stride, points.shape[-1])
    if torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype)):
        return points
    return _apply(points.to(torch.float64), torch.linalg.inv(m).to(points.device))


def output_grid_affine(affine: ArrayLike, output_stride: int | Sequence[int] | None = None) -> np.ndarray:
    """Affine of a network's output grid from the input grid's ``(D+1, D+1)`` affine:
    ``A_out = A_in @ output_stride_matrix(stride)``."""
    a = np.asarray(affine, dtype=np.float64)
    return a @ output_stride_matrix(output_stride, a.shape[0] - 1).numpy()


def nifti_affine(affine: ArrayLike) -> np.ndarray:
    """A 4x4 affine for writing NIfTI from a 2D ``(3, 3)`` or 3D ``(4, 4)`` one (2D world x, y; z = 0)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4):
        return a.copy()
    if a.shape != (3, 3):
        raise ValueError(f"affine must be 3x3 or 4x4, got {a.shape}")
    out = np.eye(4)
    out[:2, :2], out[:2, 3] = a[:2, :2], a[:2, 2]
    return out
