"""From heatmaps to landmark positions: peak, sub-voxel refinement, voxel -> world (DESIGN section 7).

One landmark per channel (:func:`decode_heatmaps`): the integer argmax of each channel, refined to
a sub-voxel position on the network's output grid, mapped to the input grid when the network
downsamples (``output_stride``), and to world millimetres through the input image's affine with
:func:`heatmark.core.geometry.voxel_to_world` (the only place affines are applied).

Several landmarks of one kind in one channel (:func:`decode_peaks`): local maxima above a
threshold, refined the same way, then greedy non-maximum suppression by world distance.

Refinement methods (``method``):

``"argmax"``
    The integer voxel of the maximum (error up to half a voxel per axis).
``"quadratic"``
    Payer et al.'s per-axis three-point parabola through ``f(-1), f(0), f(+1)`` around the argmax
    along each axis: ``offset = 0.5 (f(-1) - f(+1)) / (f(-1) - 2 f(0) + f(+1))``, clamped to
    ``[-0.5, 0.5]``; 0 on the image border and where the denominator is ``>= 0`` (no strict
    maximum). On a Gaussian of width ``s`` voxels its bias is at most 0.048 / 0.021 / 0.012 / 0.005
    voxel for ``s`` = 1 / 1.5 / 2 / 3, which meets the 0.05-voxel target for ``s >= 1``.
``"gaussian"``
    The same parabola fitted to ``log f`` (the three-point Gaussian fit). A separable Gaussian is
    a parabola in the log domain along every axis, so the fit is exact for the Gaussian targets the
    networks are trained to reproduce, at any width; it matters for narrow peaks, notably on
    coarse output grids (``output_stride``), where a peak is only ~1 output voxel wide. Where any
    of the three samples is ``<= 0`` the log is undefined and the plain parabola is used instead.
``"weighted_mean"``
    The intensity-weighted mean position in a ``(2 window + 1)^D`` box around the argmax
    (negative values clipped to 0; the box is cut at the image border). Unbiased for a symmetric
    peak when the box holds the whole peak (``window`` >= ~3 sigma); a box cut by the border or
    by a neighbouring peak pulls the estimate. A box whose weights are all 0 gives the argmax.

Confidence is the heatmap value at the integer argmax (the refined peak value of a smooth peak
is higher by a few per cent at most; the raw sample is simpler and monotone in the network output).

Output stride: a network that average-pools its input by ``s`` (kernel = stride = ``s``, no
padding, as in Payer's Downsampling-Net) puts in output voxel ``i`` the mean of input voxels
``i s, ..., i s + s - 1``, whose centre is ``i s + (s - 1) / 2``. So a continuous output position
``u`` maps to the input position ``u s + (s - 1) / 2`` (per axis). Equivalently, the output
grid's affine is ``A_in @ [[s, (s-1)/2], [0, 1]]`` per axis, which is what MONAI records for such
a downsampling.

Shared channels (:func:`decode_channel_groups`, the bundle's ``channel_groups``): a one-landmark
channel decodes as above; a shared channel gives up to ``max_peaks`` peaks through
:func:`decode_peaks` (candidates >= ``threshold`` x the channel's maximum, non-maximum suppression
at ``min_distance_mm`` world mm, the same refinement, confidence = peak value), which are then
assigned to the group's landmark names:

- ordered groups (``order`` a RAS direction, e.g. ``"R"`` for names listed right first, as
  ``[R x, L x]``): :func:`assign_by_order`, an optimal assignment (Hungarian) of the peaks to a
  reference configuration of the names spaced evenly along that world axis, centred on the centre
  of the input image. For a pair it gives the peak with the larger RAS x to the "R" name; a lone
  peak goes to the name of its side of the image centre. World axes are RAS through the image's
  affine, so an image stored with a flipped x axis is assigned by anatomy, not by array index.
- unordered groups: the peaks fill the group's slots by decreasing confidence (written as
  ``<group>#1``, ``<group>#2`` ...); validation orders them to the truth by optimal matching.

A channel with any non-finite value, or with no peak at all (constant, e.g. all zero), decodes to
a NaN position with confidence 0: the missing-landmark form used everywhere else.

All arithmetic is batched over batch and landmarks on the heatmaps' device; half-precision
heatmaps are cast to float32 first, and positions are float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from scipy.optimize import linear_sum_assignment

from heatmark.core.axes import per_axis
from heatmark.core.geometry import output_to_input_voxels, voxel_to_world, world_to_voxel
from heatmark.core.heatmaps import ORDER_AXES, ChannelGroups

__all__ = ["DecodedLandmarks", "Peaks", "decode_heatmaps", "decode_peaks", "decode_channel_groups",
           "assign_by_order", "METHODS"]

Method = Literal["quadratic", "gaussian", "weighted_mean", "argmax"]
METHODS: tuple[str, ...] = ("quadratic", "gaussian", "weighted_mean", "argmax")

IntOrSeq = int | Sequence[int]


@dataclass
class DecodedLandmarks:
    """Decoded positions of ``N`` landmarks in each of ``B`` images.

    Attributes:
        voxel: ``(B, N, D)`` float64 continuous voxel indices on the *input* grid (after the
            output-stride mapping); NaN rows for channels without a peak.
        world: ``(B, N, D)`` float64 world coordinates in mm (RAS) through the input grid's
            affine, or ``None`` when no affine was given.
        confidence: ``(B, N)`` float64 heatmap value at the integer argmax; 0 where ``voxel`` is NaN.
    """

    voxel: torch.Tensor
    world: torch.Tensor | None
    confidence: torch.Tensor

    @property
    def found(self) -> torch.Tensor:
        """``(B, N)`` bool: the channel had a peak (position is finite)."""
        return torch.isfinite(self.voxel).all(dim=-1)


class Peaks(NamedTuple):
    """Peaks of one channel, sorted by decreasing confidence.

    ``world``: ``(K, D)`` float64 world coordinates in mm (voxel indices of the input grid when no
    affine was given); ``confidence``: ``(K,)`` float64 heatmap values at the integer maxima.
    """

    world: torch.Tensor
    confidence: torch.Tensor


# ----------------------------------------------------------------------------------------------
# small helpers


def _as_float(heatmaps: torch.Tensor) -> torch.Tensor:
    """float32/float64 heatmaps unchanged; anything else (bf16, fp16, integers) cast to float32."""
    if heatmaps.dtype in (torch.float32, torch.float64):
        return heatmaps
    return heatmaps.to(torch.float32)


def _strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides of a contiguous array of ``shape``."""
    return tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))


def _unravel(flat_index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(M,)`` flat indices into ``shape`` -> ``(M, D)`` int64 voxel indices."""
    return torch.stack([(flat_index // st) % n for st, n in zip(_strides(shape), shape)], dim=-1)


# ----------------------------------------------------------------------------------------------
# sub-voxel refinement of given integer maxima, shared by both decoders


def _axis_neighbours(flat: torch.Tensor, index: torch.Tensor, voxel: torch.Tensor,
                     shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples around each maximum along every axis.

    Args:
        flat: ``(M, V)`` heatmaps flattened over space (may be an expanded view).
        index: ``(M,)`` flat index of each maximum; ``voxel``: its ``(M, D)`` voxel index.

    Returns:
        ``f0 (M, 1)``, ``f_minus (M, D)``, ``f_plus (M, D)`` (float64) and ``inside (M, D)``: both
        neighbours along the axis exist. Missing neighbours repeat the centre sample.
    """
    sizes = torch.tensor(list(shape), device=voxel.device)
    st = torch.tensor(_strides(shape), device=voxel.device)
    has_minus = voxel > 0
    has_plus = voxel < sizes - 1
    centre = index.unsqueeze(-1)
    minus = torch.where(has_minus, centre - st, centre)
    plus = torch.where(has_plus, centre + st, centre)
    samples = torch.gather(flat, 1, torch.cat([centre, minus, plus], dim=1)).to(torch.float64)
    d = len(shape)
    return samples[:, :1], samples[:, 1:1 + d], samples[:, 1 + d:], has_minus & has_plus


def _parabola_offset(f0: torch.Tensor, fm: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through ``(-1, fm), (0, f0), (1, fp)``; NaN where there is no strict maximum."""
    denom = fm - 2.0 * f0 + fp
    offset = 0.5 * (fm - fp) / denom
    return torch.where(denom < 0, offset, torch.full_like(offset, float("nan")))


def _quadratic(flat: torch.Tensor, index: torch.Tensor, voxel: torch.Tensor, shape: Sequence[int],
               log_domain: bool) -> torch.Tensor:
    """Per-axis three-point parabola refinement, ``(M, D)`` float64 positions.

    With ``log_domain`` the parabola is fitted to ``log f`` where all three samples are positive
    (exact for Gaussians) and to ``f`` elsewhere. Offsets are clamped to ``[-0.5, 0.5]`` and are 0
    on the border or without a strict maximum.
    """
    f0, fm, fp, inside = _axis_neighbours(flat, index, voxel, shape)
    offset = _parabola_offset(f0, fm, fp)
    if log_domain:
        positive = (f0 > 0) & (fm > 0) & (fp > 0)
        tiny = torch.finfo(torch.float64).tiny  # keeps log() finite where the result is discarded
        log_offset = _parabola_offset(f0.clamp(min=tiny).log(), fm.clamp(min=tiny).log(), fp.clamp(min=tiny).log())
        offset = torch.where(positive, log_offset, offset)
    usable = inside & torch.isfinite(offset)
    offset = torch.where(usable, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))
    return voxel.to(torch.float64) + offset


def _window_offsets(window: Sequence[int], device: torch.device) -> torch.Tensor:
    """All integer offsets of a ``prod(2 w + 1)``-voxel box, ``(K, D)`` int64."""
    axes = [torch.arange(-w, w + 1, device=device) for w in window]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(window))


def _weighted_mean(flat: torch.Tensor, voxel: torch.Tensor, shape: Sequence[int],
                   window: Sequence[int]) -> torch.Tensor:
    """Intensity-weighted mean position (negative values clipped) in a box around each maximum; ``(M, D)``."""
    sizes = torch.tensor(list(shape), device=voxel.device)
    st = torch.tensor(_strides(shape), device=voxel.device)
    pos = voxel.unsqueeze(1) + _window_offsets(window, voxel.device)  # (M, K, D)
    inside = ((pos >= 0) & (pos < sizes)).all(dim=-1)  # (M, K)
    index = (torch.minimum(pos.clamp(min=0), sizes - 1) * st).sum(dim=-1)
    weight = torch.gather(flat, 1, index).to(torch.float64).clamp(min=0)
    weight = torch.where(inside & torch.isfinite(weight), weight, torch.zeros_like(weight))
    total = weight.sum(dim=1, keepdim=True)
    mean = (weight.unsqueeze(-1) * pos.to(torch.float64)).sum(dim=1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(total > 0, mean, voxel.to(torch.float64))


def _refine(flat: torch.Tensor, index: torch.Tensor, shape: Sequence[int], method: str,
            window: Sequence[int]) -> torch.Tensor:
    """Sub-voxel positions ``(M, D)`` float64 of the maxima at flat ``index`` ``(M,)`` of ``flat`` ``(M, V)``."""
    voxel = _unravel(index, shape)
    if method == "argmax":
        return voxel.to(torch.float64)
    if method in ("quadratic", "gaussian"):
        return _quadratic(flat, index, voxel, shape, log_domain=method == "gaussian")
    if method == "weighted_mean":
        return _weighted_mean(flat, voxel, shape, window)
    raise ValueError(f"unknown decoding method {method!r}; choose one of {METHODS}")


def _check_method(method: str, window: IntOrSeq, dims: int) -> tuple[int, ...]:
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose one of {METHODS}")
    w = per_axis(window, dims, "window", default=1)
    if any(v < 0 for v in w):
        raise ValueError(f"window half-widths must be >= 0, got {w}")
    return w


def _world(voxel: torch.Tensor, affine: torch.Tensor | np.ndarray | Sequence | None) -> torch.Tensor | None:
    return None if affine is None else voxel_to_world(voxel, affine)


# ----------------------------------------------------------------------------------------------
# one landmark per channel


def decode_heatmaps(
    heatmaps: torch.Tensor,
    method: Method = "quadratic",
    window: IntOrSeq = 1,
    output_stride: IntOrSeq | None = None,
    affine: torch.Tensor | np.ndarray | Sequence | None = None,
    mask: torch.Tensor | None = None,
) -> DecodedLandmarks:
    """Decode one landmark per channel.

    Args:
        heatmaps: ``(B, N, *S)`` network output (``D = len(S)`` spatial axes) on any device, any
            float dtype (half precision is cast to float32 first).
        method: ``"quadratic"`` (Payer's per-axis parabola), ``"gaussian"`` (the parabola on
            ``log f``, exact for Gaussian peaks), ``"weighted_mean"`` or ``"argmax"``; see the
            module documentation.
        window: half-width of the ``weighted_mean`` box, an int or one per axis (output voxels).
        output_stride: average-pooling factor between the input grid and the heatmap grid, an int
            or one per axis; output position ``u`` maps to input position ``u s + (s - 1) / 2``.
        affine: the *input* image's affine, ``(R, R)`` or ``(B, R, R)`` (MONAI's 4x4 for 2D is
            accepted); when given, positions are also returned in world mm.
        mask: optional bool ``(*S)``, ``(B, 1, *S)`` or ``(B, N, *S)`` (broadcast to the heatmaps):
            the maximum is searched where it is True only (a channel with no True voxel has no
            peak); the sub-voxel refinement and the confidence use the unmasked heatmap values.

    Returns:
        :class:`DecodedLandmarks` with ``voxel (B, N, D)`` on the input grid, ``world (B, N, D)``
        or ``None``, ``confidence (B, N)``; float64 on the heatmaps' device.
    """
    if heatmaps.ndim < 3:
        raise ValueError(f"heatmaps must have shape (B, N, *spatial), got {tuple(heatmaps.shape)}")
    b, n, *shape = heatmaps.shape
    w = _check_method(method, window, len(shape))
    flat = _as_float(heatmaps).reshape(b * n, -1)
    if mask is None:
        peak, index = flat.max(dim=1)
    else:
        allowed = torch.as_tensor(mask, dtype=torch.bool, device=flat.device).expand(heatmaps.shape).reshape(b * n, -1)
        _, index = flat.masked_fill(~allowed, float("-inf")).max(dim=1)
        peak = torch.where(allowed.any(dim=1), flat.gather(1, index[:, None])[:, 0], torch.full_like(flat[:, 0], float("nan")))
    low = flat.amin(dim=1)
    has_peak = torch.isfinite(peak) & torch.isfinite(low) & (peak > low)  # max/amin propagate NaN
    voxel = _refine(flat, index, shape, method, w)
    voxel = torch.where(has_peak.unsqueeze(-1), voxel, torch.full_like(voxel, float("nan")))
    confidence = torch.where(has_peak, peak.to(torch.float64), torch.zeros_like(peak, dtype=torch.float64))
    voxel = output_to_input_voxels(voxel, output_stride).reshape(b, n, len(shape))
    return DecodedLandmarks(voxel=voxel, world=_world(voxel, affine), confidence=confidence.reshape(b, n))


# ----------------------------------------------------------------------------------------------
# several landmarks of one kind in one channel


def _single_channel(heatmap: torch.Tensor, affine, spatial_dims: int | None) -> torch.Tensor:
    """``(*S)`` or ``(1, *S)`` -> ``(*S)``; ``D`` from ``spatial_dims``, else a 3x3 affine (2D), else ``ndim``."""
    if spatial_dims is None:
        affine_rank = None if affine is None else (affine.shape if hasattr(affine, "shape") else np.shape(affine))[-1]
        if affine_rank == 3:
            spatial_dims = 2
        else:
            spatial_dims = 3 if heatmap.ndim >= 3 else heatmap.ndim
    if heatmap.ndim == spatial_dims + 1:
        if heatmap.shape[0] != 1:
            raise ValueError(f"decode_peaks takes one channel, got {heatmap.shape[0]} (shape {tuple(heatmap.shape)})")
        heatmap = heatmap[0]
    if heatmap.ndim != spatial_dims or spatial_dims not in (1, 2, 3):
        raise ValueError(f"heatmap must have shape (*spatial) or (1, *spatial) with {spatial_dims} spatial axes, "
                         f"got {tuple(heatmap.shape)}")
    return heatmap


def _local_maxima(heatmap: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat indices of voxels that are maximal in their 3^D neighbourhood and ``>= threshold``."""
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[heatmap.ndim - 1]
    pooled = pool(heatmap[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
    return torch.nonzero(((heatmap == pooled) & (heatmap >= threshold)).reshape(-1)).squeeze(1)


def _suppress(points: np.ndarray, min_distance: float, max_peaks: int | None) -> list[int]:
    """Greedy non-maximum suppression of ``(K, D)`` points sorted by decreasing score.

    Keeps the best remaining point and drops every point closer than ``min_distance`` to it, until
    none remain or ``max_peaks`` are kept. Iterations = number kept; each is one vectorised pass.
    """
    alive = np.ones(len(points), dtype=bool)
    kept: list[int] = []
    while alive.any() and (max_peaks is None or len(kept) < max_peaks):
        i = int(np.argmax(alive))
        kept.append(i)
        alive &= np.linalg.norm(points - points[i], axis=1) >= min_distance
        alive[i] = False
    return kept


def decode_peaks(
    heatmap: torch.Tensor,
    threshold: float,
    min_distance_mm: float,
    affine: torch.Tensor | np.ndarray | Sequence | None = None,
    max_peaks: int | None = None,
    method: Method = "quadratic",
    window: IntOrSeq = 1,
    output_stride: IntOrSeq | None = None,
    spatial_dims: int | None = None,
) -> Peaks:
    """Decode all peaks of one channel (a landmark kind that occurs several times).

    Candidates are voxels that equal the maximum of their ``3^D`` neighbourhood and are
    ``>= threshold`` (non-finite values never qualify); each is refined with ``method`` (as in
    :func:`decode_heatmaps`), mapped to the input grid (``output_stride``) and to world mm
    (``affine``); then, best first, every candidate closer than ``min_distance_mm`` (world
    distance) to a kept one is suppressed.

    Args:
        heatmap: ``(*S)`` or ``(1, *S)``. A 3-axis tensor is taken as a 3D volume unless
            ``spatial_dims=2`` or the affine is 3x3.
        threshold: minimum peak value.
        min_distance_mm: minimum world distance between two kept peaks (voxels without affine).
        affine: the input grid's affine ``(R, R)``; ``None`` works in input voxel units.
        max_peaks: keep at most this many (the most confident).

    Returns:
        :class:`Peaks` ``(world (K, D), confidence (K,))``, float64 on the heatmap's device,
        sorted by decreasing confidence (ties: lower flat index first).
    """
    h = _single_channel(heatmap, affine, spatial_dims)
    shape = tuple(h.shape)
    w = _check_method(method, window, len(shape))
    h = _as_float(h)
    h = torch.where(torch.isfinite(h), h, torch.full_like(h, float("-inf")))
    index = _local_maxima(h, threshold)
    flat = h.reshape(1, -1)
    score = flat[0, index]
    order = torch.sort(score, descending=True, stable=True).indices
    index, score = index[order], score[order]
    voxel = output_to_input_voxels(_refine(flat.expand(len(index), -1), index, shape, method, w), output_stride)
    world = voxel if affine is None else voxel_to_world(voxel, affine)
    kept = torch.as_tensor(_suppress(world.cpu().numpy(), float(min_distance_mm), max_peaks),
                           dtype=torch.long, device=world.device)
    return Peaks(world=world[kept], confidence=score[kept].to(torch.float64))


# ----------------------------------------------------------------------------------------------
# shared channels: peaks -> instance names


def assign_by_order(world: np.ndarray, num_slots: int, order: str, centre: np.ndarray) -> np.ndarray:
    """Slot (name position in the group) of each peak of an ordered group.

    The names are a reference configuration along one world (RAS) axis: slot ``j`` of ``M`` sits at
    ``(M - 1) / 2 - j`` along the direction ``order`` (``"R"``: +x, ``"L"``: -x, ``"A"``: +y, ``"P"``:
    -y, ``"S"``: +z, ``"I"``: -z), so the first name is the farthest in that direction. Peaks,
    taken relative to ``centre``, are assigned to slots by the optimal assignment (Hungarian) that
    maximises ``sum(coordinate x slot position)``; with all ``M`` peaks this sorts them along the
    axis (the centre does not matter); with fewer, a peak on the positive side of the centre takes
    an early slot and one on the negative side a late one.

    Args:
        world: ``(K, D)`` peak positions in world mm (RAS), ``K <= num_slots``.
        num_slots: ``M``, the group's names.
        order: a key of :data:`heatmark.core.heatmaps.ORDER_AXES`.
        centre: ``(D,)`` world mm, the input image's centre.

    Returns:
        ``(K,)`` int slot of each peak.
    """
    p = np.asarray(world, dtype=np.float64)
    if order not in ORDER_AXES:
        raise ValueError(f"order must be one of {sorted(ORDER_AXES)}, got {order!r}")
    axis, sign = ORDER_AXES[order]
    if axis >= p.shape[-1]:
        raise ValueError(f"order {order!r} needs world axis {axis}, but the points have {p.shape[-1]} coordinates")
    if len(p) > num_slots:
        raise ValueError(f"{len(p)} peaks for {num_slots} names")
    if len(p) == 0:
        return np.zeros(0, dtype=np.int64)
    coord = sign * (p[:, axis] - float(np.asarray(centre, dtype=np.float64)[axis]))
    slots = (num_slots - 1) / 2.0 - np.arange(num_slots)
    rows, cols = linear_sum_assignment(-coord[:, None] * slots[None, :])
    out = np.empty(len(p), dtype=np.int64)
    out[rows] = cols
    return out


def _affines(affine, b: int, device) -> torch.Tensor | None:
    if affine is None:
        return None
    a = torch.as_tensor(affine, dtype=torch.float64, device=device)
    return a.unsqueeze(0).expand(b, -1, -1) if a.ndim == 2 else a


def decode_channel_groups(
    heatmaps: torch.Tensor,
    groups: ChannelGroups,
    method: Method = "quadratic",
    window: IntOrSeq = 1,
    output_stride: IntOrSeq | None = None,
    affine: torch.Tensor | np.ndarray | Sequence | None = None,
    input_shape: Sequence[int] | None = None,
) -> DecodedLandmarks:
    """Decode ``C`` channels, some shared, into the ``N`` landmarks of ``groups``.

    Args:
        heatmaps: ``(B, C, *S)`` network output, ``C = groups.num_channels``.
        groups: the channel layout (:class:`heatmark.core.heatmaps.ChannelGroups`).
        method, window, output_stride, affine: as :func:`decode_heatmaps`.
        input_shape: the input grid's spatial shape (the centre used by ordered groups); default
            ``S x output_stride``.

    Returns:
        :class:`DecodedLandmarks` ``(B, N, ...)`` in the order of ``groups.landmark_names``: each
        landmark of a shared channel gets its assigned peak and that peak's value as confidence, or
        NaN / 0 when the channel had fewer peaks (see the module documentation).
    """
    if heatmaps.ndim < 3 or heatmaps.shape[1] != groups.num_channels:
        raise ValueError(f"heatmaps must have shape (B, {groups.num_channels}, *spatial) for {groups!r}, got "
                         f"{tuple(heatmaps.shape)}")
    b, _, *shape = heatmaps.shape
    d = len(shape)
    single = decode_heatmaps(heatmaps, method=method, window=window, output_stride=output_stride, affine=affine)
    device = heatmaps.device
    voxel = torch.full((b, groups.num_landmarks, d), float("nan"), dtype=torch.float64, device=device)
    world = None if affine is None else voxel.clone()
    confidence = torch.zeros((b, groups.num_landmarks), dtype=torch.float64, device=device)
    affines = _affines(affine, b, device)
    stride = per_axis(output_stride, d, "output_stride", default=1)
    size = list(input_shape) if input_shape is not None else [n * s for n, s in zip(shape, stride)]
    centre_voxel = torch.tensor([(n - 1) / 2.0 for n in size], dtype=torch.float64, device=device)
    for c, g in enumerate(groups.groups):
        if not g.shared:
            i = g.landmarks[0]
            voxel[:, i], confidence[:, i] = single.voxel[:, c], single.confidence[:, c]
            if world is not None:
                world[:, i] = single.world[:, c]
            continue
        for k in range(b):
            h = _as_float(heatmaps[k, c])
            top = float(h.max()) if torch.isfinite(h).all() else math.nan
            if not top > 0:
                continue  # no peak: the group's landmarks stay missing
            a = None if affines is None else affines[k]
            peaks = decode_peaks(h, threshold=g.threshold * top, min_distance_mm=g.min_distance_mm, affine=a,
                                 max_peaks=g.max_peaks, method=method, window=window, output_stride=output_stride,
                                 spatial_dims=d)
            if len(peaks.confidence) == 0:
                continue
            if g.order == "unordered":
                slots = np.arange(len(peaks.confidence))
            else:
                centre = centre_voxel if a is None else voxel_to_world(centre_voxel[None], a)[0]
                slots = assign_by_order(peaks.world.cpu().numpy(), len(g.landmarks), g.order, centre.cpu().numpy())
            idx = torch.as_tensor([g.landmarks[j] for j in slots], dtype=torch.long, device=device)
            confidence[k, idx] = peaks.confidence
            if a is None:
                voxel[k, idx] = peaks.world
            else:
                world[k, idx] = peaks.world
                voxel[k, idx] = world_to_voxel(peaks.world, a)
    return DecodedLandmarks(voxel=voxel, world=world, confidence=confidence)
