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

Shared channels (:class:`ChannelGroups`, the bundle key ``channel_groups``): several landmarks of one
kind (a left/right pair, vertebrae, teeth) may share one output channel. Their Gaussians are
rendered as usual and combined by the **maximum** over the channel's landmarks
(``gaussian_heatmaps(..., channels=...)``), so every peak keeps its height (1, or the gamma scaling)
where two instances overlap, which a sum would not; a missing instance is an all-zero channel and so
simply absent from the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["gaussian_heatmaps", "broadcast_sigma", "combine_channels", "ChannelGroup", "ChannelGroups",
           "GROUP_ORDERS", "ORDER_AXES"]


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
    channels: Sequence[Sequence[int]] | None = None,
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
        channels: ``None`` for one channel per point; else ``C`` lists of point indices, the
            points of each output channel, combined by the maximum (:func:`combine_channels`).

    Returns:
        ``(B, N, *spatial_shape)`` (or ``(N, *spatial_shape)`` for unbatched points) on the points'
        device; ``(B, C, *spatial_shape)`` with ``channels``.
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
    if channels is not None:
        out = combine_channels(out, channels)
    return out[0] if unbatched else out


def combine_channels(heatmaps: torch.Tensor, channels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-landmark heatmaps ``(B, N, *S)`` -> per-channel heatmaps ``(B, C, *S)``: channel ``c`` is the
    voxel-wise maximum of the landmarks ``channels[c]`` (a one-landmark channel is that landmark's map).

    The maximum keeps each instance's peak height where instances overlap; its gradient goes to the
    largest of the combined maps (shared evenly on ties), so a learned sigma still trains.
    """
    n = heatmaps.shape[1]
    parts = []
    for c, members in enumerate(channels):
        idx = [int(i) for i in members]
        if not idx or min(idx) < 0 or max(idx) >= n:
            raise ValueError(f"channel {c} lists landmarks {idx}; expected a non-empty list of indices in [0, {n})")
        parts.append(heatmaps[:, idx[0]] if len(idx) == 1 else heatmaps[:, idx].amax(dim=1))
    return torch.stack(parts, dim=1)


# ----------------------------------------------------------------------------------------------
# channel groups: which landmarks share an output channel

#: ``order`` of a shared group: a RAS direction (names listed from the most R/L/A/P/S/I instance on),
#: or ``"unordered"`` (interchangeable instances, written as ``<group>#<k>``).
GROUP_ORDERS: tuple[str, ...] = ("R", "L", "A", "P", "S", "I", "unordered")
#: RAS direction -> (world axis, sign): ``R`` = +x, ``L`` = -x, ``A`` = +y, ``P`` = -y, ``S`` = +z, ``I`` = -z.
ORDER_AXES: dict[str, tuple[int, int]] = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1),
                                          "I": (2, -1)}


@dataclass(frozen=True)
class ChannelGroup:
    """The landmarks of one output channel.

    Attributes:
        name: the group's name (the landmark's own name for a one-landmark channel).
        landmarks: indices into the landmark names, in the order the configuration lists them.
        order: a key of :data:`ORDER_AXES` (the listed names run from the instance farthest in that
            RAS direction to the nearest), ``"unordered"``, or ``None`` for a one-landmark channel.
        max_peaks: at most this many peaks are decoded (1 <= max_peaks <= len(landmarks)).
        min_distance_mm: non-maximum suppression distance between two peaks, world mm.
        threshold: a peak counts when it is >= threshold x the channel's maximum (a fraction).
    """

    name: str
    landmarks: tuple[int, ...]
    order: str | None = None
    max_peaks: int = 1
    min_distance_mm: float = 0.0
    threshold: float = 0.0

    @property
    def shared(self) -> bool:
        """More than one landmark in the channel."""
        return len(self.landmarks) > 1


class ChannelGroups:
    """How ``N`` landmarks map to ``C`` output channels (the bundle key ``channel_groups``).

    The configuration is ``None`` (one channel per landmark) or a list of shared groups, each a dict
    ``{"name": str, "landmarks": [names], "order": "R" | "L" | "A" | "P" | "S" | "I" | "unordered",
    "max_peaks": int (optional), "min_distance_mm": float (optional), "threshold": float (optional)}``.
    Landmarks in no group keep a channel of their own. Channels are numbered in the order of the
    landmark names: a group's channel comes at its first landmark.

    Args:
        config: the list above, or ``None``.
        landmark_names: the ``N`` landmark names.
        min_distance_mm: default non-maximum suppression distance (world mm) of a group.
        threshold: default relative peak threshold of a group.

    Raises:
        ValueError: naming the group and the problem (unknown or repeated landmark, bad order ...).
    """

    def __init__(self, config: Sequence[Mapping] | None, landmark_names: Sequence[str], min_distance_mm: float = 5.0,
                 threshold: float = 0.25):
        names = [str(n) for n in landmark_names]
        self.landmark_names = names
        lookup = {n: i for i, n in enumerate(names)}
        owner: dict[int, ChannelGroup] = {}
        for g, spec in enumerate(config or ()):
            where = f"channel_groups[{g}]"
            if not isinstance(spec, Mapping):
                raise ValueError(f"{where} must be a mapping with name, landmarks and order; got {spec!r}")
            unknown = set(spec) - {"name", "landmarks", "order", "max_peaks", "min_distance_mm", "threshold"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
            name = spec.get("name")
            if not isinstance(name, str) or not name or "#" in name:
                raise ValueError(f"{where}: `name` must be a non-empty string without '#', got {name!r}")
            members = list(spec.get("landmarks") or ())
            if len(members) < 2:
                raise ValueError(f"{where} ({name}): `landmarks` must list at least two landmark names, got {members!r}")
            idx = []
            for m in members:
                if m not in lookup:
                    raise ValueError(f"{where} ({name}): unknown landmark {m!r}; known: {names}")
                if lookup[m] in owner or lookup[m] in idx:
                    raise ValueError(f"{where} ({name}): landmark {m!r} is already in a channel group")
                idx.append(lookup[m])
            order = spec.get("order")
            if order not in GROUP_ORDERS:
                raise ValueError(f"{where} ({name}): `order` must be one of {list(GROUP_ORDERS)}, got {order!r}")
            max_peaks = spec.get("max_peaks") if spec.get("max_peaks") is not None else len(idx)
            if not isinstance(max_peaks, int) or not 1 <= max_peaks <= len(idx):
                raise ValueError(f"{where} ({name}): `max_peaks` must be an integer in [1, {len(idx)}], got {max_peaks!r}")
            dist = float(spec.get("min_distance_mm") if spec.get("min_distance_mm") is not None else min_distance_mm)
            thr = float(spec.get("threshold") if spec.get("threshold") is not None else threshold)
            if not dist >= 0 or not 0 <= thr <= 1:
                raise ValueError(f"{where} ({name}): min_distance_mm must be >= 0 and threshold in [0, 1], got "
                                 f"{dist} and {thr}")
            group = ChannelGroup(name, tuple(idx), order, max_peaks, dist, thr)
            for i in idx:
                owner[i] = group
        groups: list[ChannelGroup] = []
        seen: set[str] = set()
        for i, n in enumerate(names):
            group = owner.get(i, ChannelGroup(n, (i,)))
            if group.name in seen and group.shared:
                continue
            if group.shared and group.name in names and group.name not in [names[j] for j in group.landmarks]:
                raise ValueError(f"channel group name {group.name!r} is also a landmark name")
            seen.add(group.name)
            groups.append(group)
        self.groups = groups

    @classmethod
    def from_config(cls, config: Sequence[Mapping] | None, landmark_names: Sequence[str],
                    min_distance_mm: float = 5.0, threshold: float = 0.25) -> ChannelGroups:
        """The same as the constructor (the name bundle configs use)."""
        return cls(config, landmark_names, min_distance_mm, threshold)

    @property
    def num_channels(self) -> int:
        """C, the network's output channels."""
        return len(self.groups)

    @property
    def num_landmarks(self) -> int:
        """N."""
        return len(self.landmark_names)

    @property
    def is_identity(self) -> bool:
        """One channel per landmark, in the landmarks' order (no shared channel)."""
        return all(not g.shared for g in self.groups)

    @property
    def members(self) -> list[list[int]]:
        """Per channel, the landmark indices it holds (the ``channels`` of :func:`gaussian_heatmaps`)."""
        return [list(g.landmarks) for g in self.groups]

    @property
    def channel_of(self) -> list[int]:
        """Per landmark, its channel index (``N`` integers)."""
        out = [0] * self.num_landmarks
        for c, g in enumerate(self.groups):
            for i in g.landmarks:
                out[i] = c
        return out

    def output_names(self) -> list[str]:
        """The ``N`` names predictions are written under: landmark names, except the members of an
        unordered group, which become ``<group>#1`` ... ``<group>#K`` (instances by decreasing
        confidence)."""
        out = list(self.landmark_names)
        for g in self.groups:
            if g.shared and g.order == "unordered":
                for k, i in enumerate(g.landmarks):
                    out[i] = f"{g.name}#{k + 1}"
        return out

    def to_config(self) -> list[dict] | None:
        """The shared groups as plain values with every default resolved (``None`` without any): what a
        model file records and what :class:`ChannelGroups` reads back to the same groups."""
        shared = [{"name": g.name, "landmarks": [self.landmark_names[i] for i in g.landmarks], "order": g.order,
                   "max_peaks": g.max_peaks, "min_distance_mm": g.min_distance_mm, "threshold": g.threshold}
                  for g in self.groups if g.shared]
        return shared or None

    def __repr__(self) -> str:
        return f"ChannelGroups({self.num_landmarks} landmarks -> {self.num_channels} channels, {self.to_config()})"
