"""Sliding-window inference for patch-trained models, dense or streamed (DESIGN section 7b).

:func:`landmark_inferer` builds what a bundle's ``validate#inferer`` (and so ``inference#inferer``
and ``evaluate.yaml``'s evaluator) runs, from the bundle's ``patch_size`` / ``sw_*`` keys:

- no patch size: MONAI's ``SimpleInferer``, the network on the whole input (today's behaviour);
- a patch size: MONAI's ``SlidingWindowInferer`` with ``roi_size`` = the patch, ``overlap``,
  blending ``mode`` and ``sw_batch_size``. Heatmaps are stitched on the image's own grid (padded
  where the image is smaller than a window, and cropped back), so
  :class:`~heatmark.evaluation.DecodeLandmarksd` decodes them with the image's MetaTensor affine;
- a patch size and ``stream=True``: :class:`StreamingSlidingWindowInferer`, the same windows,
  weights and stitched values without a full ``(N, *S)`` heatmap buffer; it returns
  :class:`LocalHeatmaps`, which :class:`~heatmark.evaluation.DecodeLandmarksd` decodes to the
  same landmarks as the dense stitched heatmaps.

Why streaming: MONAI's ``SlidingWindowInferer`` allocates the whole output, ``N x volume`` floats
(32 landmarks on a 512 x 512 x 400 grid: 13 GB) plus a count map. The streaming inferer visits the
windows in MONAI's raster order and batches (first spatial axis outermost), and accumulates the
weighted outputs and weights only for the rows the windows not yet finished cover. Rows that no
later window reaches are final: they are normalised (value sum / weight sum, exactly as MONAI
does), scanned for each channel's running maximum (first occurrence in row-major order, as
``argmax`` over the whole grid), minimum and finiteness, and dropped once no pending peak
neighbourhood needs them. Per channel it keeps the ``K = 2 r + 1`` voxels per axis around the
peak (``r`` = the decoding window, at least 1), shifted inside the grid at the border exactly
where decoding would cut its neighbourhood. Memory: one slab buffer, allocated once and reused
(rows that are done are dropped by moving the few still needed to its front), of
``N x (R + K) x S_1 x S_2`` floats, where ``R`` is the most rows one batch of windows spans:
``roi_0`` when a batch stays within one row of windows, up to ``roi_0`` + the scan interval when it
straddles two; about ``R / S_0`` of the dense buffer, plus the network's own activations. Per
window it weights the output in place (not under constant blending) and adds it to the slab; each
final row is scanned twice (maximum and minimum).

Network output grids coarser than the input (``output_stride``) are stitched as MONAI does
(window offsets scaled by ``output size / roi size``); ``roi_size`` and the scan interval should
then be multiples of the stride.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from heatmark.core.axes import per_axis
from heatmark.core.geometry import output_to_input_voxels, voxel_to_world
from heatmark.evaluation.decoding import METHODS, DecodedLandmarks, _refine
from monai.data import MetaTensor
from monai.data.utils import (
    compute_importance_map,
    dense_patch_slices,
    get_valid_patch_size,
)
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep, fall_back_tuple

__all__ = ["BLEND_MODES", "LocalHeatmaps", "StreamingSlidingWindowInferer", "landmark_inferer", "sliding_window_settings"]

#: MONAI's blending of overlapping windows
BLEND_MODES = ("gaussian", "constant")


def sliding_window_settings(patch_size: Sequence[int] | None, overlap: float = 0.25, mode: str = "gaussian",
                            sw_batch_size: int = 1, stream: bool = False) -> dict | None:
    """The inferer settings a model file records (None without patches): plain values."""
    if patch_size is None:
        return None
    return {"patch_size": [int(p) for p in patch_size], "overlap": float(overlap), "mode": str(mode),
            "sw_batch_size": int(sw_batch_size), "stream": bool(stream)}


def landmark_inferer(patch_size: Sequence[int] | None = None, overlap: float = 0.25, mode: str = "gaussian",
                     sw_batch_size: int = 1, stream: bool = False, window: int | Sequence[int] = 1) -> Inferer:
    """The inferer for a bundle's settings; see the module documentation.

    Args:
        patch_size: window (roi) size in voxels of the input grid per axis; None: whole input.
        overlap: share of a window overlapping its neighbour, in [0, 1).
        mode: ``"gaussian"`` or ``"constant"`` blending (MONAI's importance map).
        sw_batch_size: windows per network call.
        stream: :class:`StreamingSlidingWindowInferer` instead of the dense stitching.
        window: the decoding window half-width (output voxels; ``weighted_mean`` decoding), so the
            streamed neighbourhoods hold what decoding reads.

    Raises:
        ValueError: a bad value, naming it.
    """
    if patch_size is None:
        return SimpleInferer()
    roi = tuple(int(p) for p in patch_size)
    if any(p < 1 for p in roi):
        raise ValueError(f"patch_size must be >= 1 voxel per axis, got {list(patch_size)}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"sw_overlap must be in [0, 1), got {overlap!r}")
    if mode not in BLEND_MODES:
        raise ValueError(f"sw_mode must be one of {BLEND_MODES}, got {mode!r}")
    if int(sw_batch_size) < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size!r}")
    if stream:
        return StreamingSlidingWindowInferer(roi, overlap=float(overlap), mode=mode, sw_batch_size=int(sw_batch_size),
                                             window=window)
    return SlidingWindowInferer(roi_size=roi, sw_batch_size=int(sw_batch_size), overlap=float(overlap), mode=mode,
                                padding_mode="constant", cval=0.0)


@dataclass
class LocalHeatmaps:
    """Stitched heatmap values around each channel's peak, instead of the whole heatmaps.

    Attributes:
        values: ``(B, N, *K)`` float32 stitched values of the box around the peak (output grid).
        origin: ``(B, N, D)`` int64 output-grid voxel index of the box's first voxel.
        peak: ``(B, N)`` float64 maximum of the channel over the whole grid (NaN if it held none).
        low: ``(B, N)`` float64 minimum of the channel over the whole grid.
        finite: ``(B, N)`` bool: every value of the channel was finite.
        shape: the full output grid's spatial shape ``(D,)`` (the image's own grid, cropped back).
        radius: the box half-width per axis it was built for (the decoding window, at least 1).
    """

    values: torch.Tensor
    origin: torch.Tensor
    peak: torch.Tensor
    low: torch.Tensor
    finite: torch.Tensor
    shape: tuple[int, ...]
    radius: tuple[int, ...] = ()

    def __getitem__(self, index: slice) -> LocalHeatmaps:
        """Select images (batch axis) with a slice."""
        return LocalHeatmaps(self.values[index], self.origin[index], self.peak[index], self.low[index],
                             self.finite[index], self.shape, self.radius)

    def decode(self, method: str = "quadratic", window: int | Sequence[int] = 1,
               output_stride: int | Sequence[int] | None = None, affine: Any = None) -> DecodedLandmarks:
        """What :func:`heatmark.evaluation.decode_heatmaps` gives on the full stitched heatmaps
        (same argument meanings); the box holds every sample that decoding reads."""
        b, n, *k = self.values.shape
        d = len(k)
        if method not in METHODS:
            raise ValueError(f"unknown decoding method {method!r}; choose one of {METHODS}")
        w = per_axis(window, d, "window", default=1)
        if method == "weighted_mean" and self.radius and any(wi > r for wi, r in zip(w, self.radius)):
            raise ValueError(f"decoding window {list(w)} is wider than the streamed boxes (radius {list(self.radius)}); "
                             "give the streaming inferer the same window (landmark_inferer(..., window=...))")
        flat = self.values.reshape(b * n, -1).float()
        index = flat.max(dim=1).indices
        box = _refine(flat, index, k, method, w)
        voxel = box + self.origin.reshape(b * n, d).to(box.device, torch.float64)
        peak = self.peak.reshape(-1).to(box.device)
        has_peak = self.finite.reshape(-1).to(box.device) & (peak > self.low.reshape(-1).to(box.device))
        voxel = torch.where(has_peak.unsqueeze(-1), voxel, torch.full_like(voxel, float("nan")))
        confidence = torch.where(has_peak, peak, torch.zeros_like(peak)).reshape(b, n)
        voxel = output_to_input_voxels(voxel, output_stride).reshape(b, n, d)
        world = None if affine is None else voxel_to_world(voxel, affine)
        return DecodedLandmarks(voxel=voxel, world=world, confidence=confidence)


class _ChannelPeaks:
    """Running per-channel maximum, minimum, finiteness and peak box over finalised rows of one image."""

    def __init__(self, n: int, shape: Sequence[int], radius: Sequence[int], device: torch.device):
        self.shape = tuple(int(s) for s in shape)
        self.box = tuple(min(2 * r + 1, s) for r, s in zip(radius, self.shape))
        self.radius = tuple(radius)
        self.best = torch.full((n,), float("-inf"), dtype=torch.float64)
        self.low = torch.full((n,), float("inf"), dtype=torch.float64)
        self.finite = torch.ones(n, dtype=torch.bool)
        self.position = torch.zeros(n, len(self.shape), dtype=torch.long)
        self.pending = torch.zeros(n, dtype=torch.bool)
        self.values = torch.zeros(n, *self.box, dtype=torch.float32, device=device)
        self.origin = torch.zeros(n, len(self.shape), dtype=torch.long)

    def box_start(self, channel: int) -> list[int]:
        """Grid index of the first voxel of ``channel``'s box (centred on the peak, kept inside)."""
        return [int(min(max(p - r, 0), s - k)) for p, r, s, k in
                zip(self.position[channel].tolist(), self.radius, self.shape, self.box)]

    def update(self, region: torch.Tensor, row0: int) -> None:
        """Scan final rows ``region`` ``(N, rows, *S_rest)`` starting at grid row ``row0``.

        Two passes over the region (``max`` and ``amin``, both NaN-propagating, so a channel whose
        maximum and minimum are finite holds only finite values); channels with a NaN or an infinity
        are rescanned with NaN read as ``-inf`` (they decode to missing, but keep a maximum)."""
        flat = region.reshape(region.shape[0], -1)  # a view when the rows span the full grid width
        best, index = flat.max(dim=1)
        low = flat.amin(dim=1)
        bad = ~(torch.isfinite(best) & torch.isfinite(low))
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            clean = torch.nan_to_num(flat[rows], nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
            best[rows], index[rows] = clean.max(dim=1)
            low[rows] = flat[rows].amin(dim=1)
            self.finite[bad.cpu()] = False
        self.low = torch.minimum(self.low, low.double().cpu())
        better = (best.double().cpu() > self.best).nonzero().flatten().tolist()
        rest = region.shape[2:]
        for c in better:
            self.best[c] = float(best[c])
            i = int(index[c])
            coords = np.unravel_index(i, (region.shape[1], *rest))
            self.position[c] = torch.tensor([coords[0] + row0, *coords[1:]])
            self.pending[c] = True

    def extract(self, buffer: torch.Tensor, buffer_row0: int, final_rows: int, last: bool) -> None:
        """Copy the boxes of pending channels whose rows are all final from ``buffer`` (normalised
        values ``(N, rows, *S_rest)`` of grid rows ``buffer_row0 ...``)."""
        for c in self.pending.nonzero().flatten().tolist():
            start = self.box_start(c)
            if not last and start[0] + self.box[0] > final_rows:
                continue
            sl = tuple(slice(s, s + k) for s, k in zip([start[0] - buffer_row0, *start[1:]], self.box))
            self.values[c] = buffer[c][sl]
            self.origin[c] = torch.tensor(start)
            self.pending[c] = False

    def keep_from(self, final_rows: int) -> int:
        """First grid row still needed: boxes of pending peaks and of peaks yet to come."""
        need = final_rows - self.box[0]
        for c in self.pending.nonzero().flatten().tolist():
            need = min(need, self.box_start(c)[0])
        return max(need, 0)


class StreamingSlidingWindowInferer(Inferer):
    """MONAI's sliding-window inference (same windows, padding, weights and stitched values) that
    returns :class:`LocalHeatmaps` instead of the full heatmaps; see the module documentation.

    Args:
        roi_size: window size in input voxels per axis.
        overlap: share of a window overlapping its neighbour, in [0, 1).
        mode: ``"gaussian"`` or ``"constant"`` blending; ``sigma_scale``: MONAI's Gaussian width.
        sw_batch_size: windows per network call (windows of one image).
        window: decoding window half-width (output voxels), so the boxes hold what decoding reads.
        cval: padding value for images smaller than a window.

    ``__call__(inputs (B, C, *S), network)`` -> :class:`LocalHeatmaps` with ``N`` channels; after
    a call, ``rows_held`` is the most output-grid rows (first spatial axis) its slab held at once.
    """

    def __init__(self, roi_size: Sequence[int], overlap: float = 0.25, mode: str = "gaussian",
                 sigma_scale: float = 0.125, sw_batch_size: int = 1, window: int | Sequence[int] = 1,
                 cval: float = 0.0):
        super().__init__()
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = float(overlap)
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.sw_batch_size = int(sw_batch_size)
        self.window = window
        self.cval = float(cval)
        self.rows_held = 0

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> LocalHeatmaps:
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        d = x.ndim - 2
        self.rows_held = 0
        results = [self._one(x[i:i + 1], network, d, *args, **kwargs) for i in range(x.shape[0])]
        return LocalHeatmaps(values=torch.cat([r.values for r in results]), origin=torch.cat([r.origin for r in results]),
                             peak=torch.cat([r.peak for r in results]), low=torch.cat([r.low for r in results]),
                             finite=torch.cat([r.finite for r in results]), shape=results[0].shape,
                             radius=results[0].radius)

    def _one(self, x: torch.Tensor, network: Callable, d: int, *args: Any, **kwargs: Any) -> LocalHeatmaps:
        """One image ``(1, C, *S)``."""
        size = tuple(int(s) for s in x.shape[2:])
        roi = fall_back_tuple(self.roi_size, size)
        pad = []
        for k in range(d - 1, -1, -1):  # F.pad order: last axis first, as MONAI
            diff = max(roi[k] - size[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        if any(pad):
            x = F.pad(x, pad=pad, mode="constant", value=self.cval)
        pad_before = [pad[2 * (d - 1 - k)] for k in range(d)]
        image_size = tuple(max(s, r) for s, r in zip(size, roi))
        scan = _get_scan_interval(image_size, roi, d, ensure_tuple_rep(self.overlap, d))
        slices = dense_patch_slices(image_size, roi, scan)
        order = sorted(range(len(slices)), key=lambda i: slices[i][0].start)  # raster order (MONAI's already)
        weight = compute_importance_map(get_valid_patch_size(image_size, roi), mode=self.mode,
                                        sigma_scale=self.sigma_scale, device=x.device, dtype=x.dtype)[None, None]

        # input-grid rows each batch spans, from its first window's first row to the furthest stop so far
        spans, furthest = [], 0
        for b0 in range(0, len(order), self.sw_batch_size):
            furthest = max([furthest] + [slices[i][0].stop for i in order[b0:b0 + self.sw_batch_size]])
            spans.append((slices[order[b0]][0].start, furthest))
        state: dict[str, Any] = {}
        # MONAI's batches: consecutive windows in raster order (so the network sees the same batches)
        for b0 in range(0, len(order), self.sw_batch_size):
            batch = order[b0:b0 + self.sw_batch_size]
            win = torch.cat([x[(slice(None), slice(None), *slices[i])] for i in batch])
            out = network(win, *args, **kwargs)
            if not state:
                state = self._start(out, roi, image_size, size, pad_before, x.device, x.dtype, weight, spans)
            w = state["weight"]
            for j, i in enumerate(batch):
                osl = [slice(int(s.start * z), int(s.stop * z)) for s, z in zip(slices[i], state["zoom"])]
                self._grow(state, osl[0].stop)
                rows = slice(osl[0].start - state["row0"], osl[0].stop - state["row0"])
                seg = out[j]
                if not state["unit"]:  # constant blending: the weights are all 1
                    seg *= w[0]  # in the network's output; as MONAI rounds it (addcmul_ would not)
                state["acc"][(slice(None), rows, *osl[1:])] += seg.to(state["acc"].dtype)
                state["wsum"][(rows, *osl[1:])] += w[0, 0]
            # rows before the next window's first row get no more contributions
            nxt = b0 + self.sw_batch_size
            last = nxt >= len(order)
            final_to = state["out_size"][0] if last else int(slices[order[nxt]][0].start * state["zoom"][0])
            self._finalise(state, final_to, last)
        self.rows_held = max(self.rows_held, state["most_rows"])
        peaks: _ChannelPeaks = state["peaks"]
        return LocalHeatmaps(values=peaks.values[None], origin=peaks.origin[None], peak=peaks.best[None].clone(),
                             low=peaks.low[None].clone(), finite=peaks.finite[None].clone(), shape=peaks.shape,
                             radius=peaks.radius)

    def _start(self, out: torch.Tensor, roi: Sequence[int], image_size: Sequence[int], size: Sequence[int],
               pad_before: Sequence[int], device: torch.device, dtype: torch.dtype, weight: torch.Tensor,
               spans: Sequence[tuple[int, int]]) -> dict:
        """Buffers and geometry from the first network output ``(b, N, *O)``. The slab buffer is
        allocated once: the most output rows one batch of windows spans, plus one peak box."""
        n, seg_shape = out.shape[1], tuple(out.shape[2:])
        zoom = [o / float(r) for o, r in zip(seg_shape, roi)]
        if seg_shape != tuple(roi):
            weight = F.interpolate(weight, seg_shape, mode="nearest-exact")
        out_size = [int(s * z) for s, z in zip(image_size, zoom)]
        # the image's own grid inside the padded output grid, as MONAI crops it back
        crop = [(round(p * z), round((p + s) * z)) for p, s, z in zip(pad_before, size, zoom)]
        d = len(seg_shape)
        radius = [max(1, r) for r in per_axis(self.window, d, "window", default=1)]
        grid = [hi - lo for lo, hi in crop]
        peaks = _ChannelPeaks(n, grid, radius, device)
        rows = max(int(stop * zoom[0]) - int(start * zoom[0]) for start, stop in spans) + peaks.box[0]
        rows = min(rows, out_size[0])
        return {"zoom": zoom, "weight": weight.to(dtype), "unit": bool((weight == 1).all()), "out_size": out_size,
                "crop": crop, "row0": 0, "rows": 0, "most_rows": 0, "done": 0,
                "acc": torch.empty(n, rows, *out_size[1:], dtype=dtype, device=device),
                "wsum": torch.empty(rows, *out_size[1:], dtype=dtype, device=device), "peaks": peaks}

    @staticmethod
    def _grow(state: dict, stop: int) -> None:
        """Hold padded-output rows up to ``stop``: zero the rows ``rows .. stop - row0`` of the slab
        buffer (reallocated only where its first size falls short: images padded to the window)."""
        need = stop - state["row0"]
        have = state["rows"]
        if need <= have:
            return
        acc, wsum = state["acc"], state["wsum"]
        if need > acc.shape[1]:
            bigger = acc.new_empty(acc.shape[0], need, *acc.shape[2:])
            bigger[:, :have] = acc[:, :have]
            wbigger = wsum.new_empty(need, *wsum.shape[1:])
            wbigger[:have] = wsum[:have]
            state["acc"], state["wsum"] = acc, wsum = bigger, wbigger
        acc[:, have:need].zero_()
        wsum[have:need].zero_()
        state["rows"] = need
        state["most_rows"] = max(state["most_rows"], need)

    @staticmethod
    def _drop(state: dict, drop: int) -> None:
        """Forget the first ``drop`` held rows: move the rest to the front of the buffer, in chunks
        of at most ``drop`` rows so that no chunk overlaps its destination."""
        acc, wsum, keep = state["acc"], state["wsum"], state["rows"] - drop
        for s in range(0, keep, drop):
            e = min(s + drop, keep)
            acc[:, s:e] = acc[:, drop + s:drop + e]
            wsum[s:e] = wsum[drop + s:drop + e]
        state["rows"] = keep
        state["row0"] += drop

    @staticmethod
    def _finalise(state: dict, final_to: int, last: bool) -> None:
        """Rows ``state["done"] .. final_to`` (padded output grid) get no more windows: normalise,
        scan for peaks, copy the boxes that are complete, drop the rows no longer needed."""
        row0, done, crop = state["row0"], state["done"], state["crop"]
        if final_to > done:
            rows = slice(done - row0, final_to - row0)
            wsum = state["wsum"][rows]
            if not bool((wsum == 1).all()):  # constant blending without overlap: nothing to divide
                state["acc"][:, rows] /= wsum
            state["done"] = final_to
            lo, hi = max(done, crop[0][0]), min(final_to, crop[0][1])
            if hi > lo:
                region = state["acc"][(slice(None), slice(lo - row0, hi - row0), *[slice(a, b) for a, b in crop[1:]])]
                state["peaks"].update(region, lo - crop[0][0])
        peaks: _ChannelPeaks = state["peaks"]
        crop = state["crop"]
        final_rows = max(min(state["done"], crop[0][1]) - crop[0][0], 0)
        view = state["acc"][(slice(None), slice(0, state["rows"]), *[slice(a, b) for a, b in crop[1:]])]
        peaks.extract(view, row0 - crop[0][0], final_rows, last)
        keep = peaks.keep_from(final_rows) + crop[0][0]  # padded-output row
        drop = min(keep, state["done"]) - row0
        if drop > 0:
            StreamingSlidingWindowInferer._drop(state, drop)
