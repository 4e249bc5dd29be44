"""The one Gaussian heatmap function, used by the transform, the losses, the benchmarks and tests.

A heatmap for landmark ``n`` at continuous voxel position ``p`` with per-axis width ``s`` is

.. math::  h(x) = c \\prod_d \\exp\\left(-\\frac{(x_d - p_d)^2}{2 s_d^2}\\right)

evaluated at every voxel centre ``x`` (integer indices). ``c = 1`` (peak 1) by default; with
``gamma`` it is Payer et al.'s (2019) scaling ``c = gamma / ((2 pi)^(D/2) prod_d s_d)``, which
keeps the integral fixed and makes a learned sigma meaningful.

The product is separable, so we evaluate ``D`` one-dimensional Gaussians per landmark (cheap, in
float64 for sub-voxel exactness and differentiable in ``sigma``) and write the full tensor once
with a broadcast product: ``O(N * voxels)`` and one output-sized write, on any device. Points that
are NaN (missing landmarks) give an all-zero channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["gaussian_heatmaps", "broadcast_sigma"]


def broadcast_sigma(sigma: torch.Tensor | float | Sequence, batch: int, num: int, dims: int, *,
                    device: torch.device | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Broadcast a Gaussian width to ``(B, N, D)``.

    Accepted shapes: scalar, ``(N,)`` (per landmark), ``(N, D)`` (per landmark and axis),
    ``(B, N, D)``; a ``(D,)`` vector is ambiguous with ``(N,)`` and only accepted when ``N != D``
    or as ``(1, D)``. Gradients flow through (no copy of a tensor that requires grad).
    """
    s = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    s = s.to(device=device, dtype=dtype)
    if s.ndim == 0:
        s = s.reshape(1, 1, 1)
    elif s.ndim == 1:
        if s.shape[0] == num:
            s = s.reshape(1, num, 1)
        elif s.shape[0] == dims:
            s = s.reshape(1, 1, dims)
        else:
            raise ValueError(f"sigma of shape {tuple(s.shape)} matches neither N={num} landmarks nor D={dims} axes")
    elif s.ndim == 2:
        s = s.unsqueeze(0)
    elif s.ndim != 3:
        raise ValueError(f"sigma must be a scalar, (N,), (N, D) or (B, N, D); got shape {tuple(s.shape)}")
    try:
        return s.expand(batch, num, dims)
    except RuntimeError as e:
        raise ValueError(f"sigma of shape {tuple(s.shape)} does not broadcast to (B, N, D)=({batch}, {num}, {dims})") from e


#: Per-axis factors below exp(-25) ~ 1.4e-11 are exactly 0 (far below the 1e-5 accuracy target).
_LOG_CUTOFF = 25.0
_TAIL = math.exp(-_LOG_CUTOFF) * (1.0 + 1e-9)  # values at the cut-off become 0

_POSITIONS: dict[tuple, torch.Tensor] = {}


def _positions(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Voxel-centre positions ``0 .. length-1`` (cached per device and dtype)."""
    key = (length, str(device), dtype)
    x = _POSITIONS.get(key)
    if x is None:
        if len(_POSITIONS) > 64:
            _POSITIONS.clear()
        x = _POSITIONS[key] = torch.arange(length, dtype=dtype, device=device)
    return x


def gaussian_heatmaps(
    points: torch.Tensor,
    spatial_shape: Sequence[int],
    sigma: torch.Tensor | float | Sequence = 2.0,
    gamma: float | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Gaussian heatmaps for a batch of points in voxel units.

    Args:
        points: ``(B, N, D)`` (or ``(N, D)``) continuous voxel coordinates along the array axes of
            the target grid; NaN (any coordinate) marks a missing landmark.
        spatial_shape: the grid, ``D`` integers.
        sigma: Gaussian width in voxels of the target grid: scalar, ``(N,)``, ``(N, D)`` or
            ``(B, N, D)`` (see :func:`broadcast_sigma`); may require grad. To give sigma in mm, convert
            it first with :func:`heatmark.core.geometry.sigma_mm_to_voxels`.
        gamma: ``None`` for peak-1 heatmaps; else Payer's scaling ``gamma / ((2 pi)^(D/2) prod sigma)``.
        dtype: dtype of the returned tensor.
        compute_dtype: dtype of the per-axis 1-D Gaussians (float64 keeps sub-voxel positions
            exact; the cost is ``O(N * sum(shape))``, negligible).

    Returns:
        ``(B, N, *spatial_shape)`` (or ``(N, *spatial_shape)`` for unbatched points) on the points'
        device.
    """
    unbatched = points.ndim == 2
    if unbatched:
        points = points.unsqueeze(0)
    if points.ndim != 3:
        raise ValueError(f"points must have shape (B, N, D) or (N, D), got {tuple(points.shape)}")
    b, n, d = points.shape
    shape = tuple(int(x) for x in spatial_shape)
    if len(shape) != d:
        raise ValueError(f"spatial_shape {shape} has {len(shape)} axes but points have D={d}")
    device = points.device
    p = points.to(compute_dtype)
    # A plain number as sigma with peak-1 targets needs no (B, N, D) sigma tensor: small tensor
    # operations dominate the 2D timings, so the common case avoids them.
    scalar_sigma = isinstance(sigma, (int, float)) and gamma is None
    s = None if scalar_sigma else broadcast_sigma(sigma, b, n, d, device=device, dtype=compute_dtype)
    # NaN/inf rows are missing landmarks (zero channel); the all-present, peak-1 case skips the
    # per-landmark scaling (a finite sum means every coordinate is finite)
    scale: torch.Tensor | None = None
    if not math.isfinite(float(p.sum())):
        present = torch.isfinite(p).all(dim=-1)  # (B, N)
        p = torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)
        scale = present.to(compute_dtype)
    if gamma is not None:
        g_scale = torch.as_tensor(gamma, dtype=compute_dtype, device=device) / (
            (2.0 * math.pi) ** (d / 2.0) * s.prod(dim=-1))
        scale = g_scale if scale is None else scale * g_scale

    needs_grad = torch.is_grad_enabled() and (p.requires_grad or (s is not None and s.requires_grad))
    # allocate the output before any temporaries so the allocator can reuse one large block
    out = None if needs_grad else torch.empty((b, n, *shape), dtype=dtype, device=device)
    # the 1-D Gaussians of all axes at once on a common axis of length max(shape): (D, B, N, L)
    x = _positions(max(shape), device, compute_dtype)
    z = x - p.permute(2, 0, 1).unsqueeze(-1)
    z = z * (1.0 / float(sigma)) if s is None else z / s.permute(2, 0, 1).unsqueeze(-1)
    arg = -0.5 * z * z if needs_grad else z.square_().mul_(-0.5)
    # Values below exp(-_LOG_CUTOFF) are set to exactly 0: far tails would otherwise underflow
    # into denormal floats, which are ~100x slower in exp and in the products below.
    if needs_grad:
        g = F.threshold(torch.exp(arg.clamp(min=-_LOG_CUTOFF)), _TAIL, 0.0)
        if scale is not None:
            g = torch.cat([g[:1] * scale.unsqueeze(-1), g[1:]])
    else:
        g = F.threshold_(arg.clamp_(min=-_LOG_CUTOFF).exp_(), _TAIL, 0.0)
        if scale is not None:
            g[0] *= scale.unsqueeze(-1)
    g = g.to(dtype)
    factors = []
    for axis, length in enumerate(shape):
        view = [b, n] + [1] * d
        view[2 + axis] = length
        factors.append(g[axis, :, :, :length].contiguous().reshape(view))
    partial = factors[0]
    for f in factors[1:-1]:
        partial = partial * f
    if out is None:
        out = partial * factors[-1]
    else:
        torch.mul(partial, factors[-1], out=out)
    return out[0] if unbatched else out
