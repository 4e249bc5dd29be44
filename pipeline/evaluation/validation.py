"""What a MONAI evaluator computes from predicted heatmaps: the postprocessing that decodes them
into world landmarks (:class:`DecodeLandmarksd`), the ignite metric over point errors
(:class:`LandmarkErrorMetric`) and the handler that writes the evaluation files
(:class:`EvaluationWriter`). Bundles plug them into ``validate#evaluator`` and ``evaluator``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.transforms import MapTransform
from monai.utils import CommonKeys as Keys
from monai.utils import evenly_divisible_all_gather

from heatmark.core.fileio import safe_case_name
from heatmark.core.heatmaps import ChannelGroups
from heatmark.evaluation.decoding import DecodedLandmarks, decode_channel_groups, decode_heatmaps
from heatmark.evaluation.metrics import (DEFAULT_OUTLIER_RADII, DEFAULT_RADII, match_points, point_errors,
                                         radius_key, summarize)
from heatmark.evaluation.reports import image_source, original_or, plot_overlay, write_evaluation
from heatmark.evaluation.sliding_window import LocalHeatmaps

__all__ = ["DecodeLandmarksd", "LandmarkErrorMetric", "EvaluationWriter"]


class DecodeLandmarksd(MapTransform):
    """Postprocessing: decode predicted heatmaps of a batch into landmarks.

    Reads ``d[pred_key]`` ``(B, N, *S)``, the input image ``d[image_key]`` (its affine maps input
    voxels to world), and optionally the true world landmarks ``d[truth_key]`` ``(B, N, D)``.
    Writes ``pred_voxel`` (input grid), ``pred_world`` (mm, RAS), ``confidence`` ``(B, N)`` and, with
    truth, ``errors_mm`` ``(B, N)`` (NaN where the truth is missing, inf where nothing was detected).

    Args:
        method, window: refinement, see :func:`heatmark.decoding.decode_heatmaps`.
        output_stride: the network's output stride (``network.output_stride`` where it has one).
        channel_groups: the bundle's channel layout when landmarks share channels
            (:func:`heatmark.evaluation.decoding.decode_channel_groups`); the prediction then has
            ``C`` channels and the outputs still ``N`` landmarks. With the truth present, the
            instances of each unordered group are put in the order of the true instances they match
            best (Hungarian matching, no radius), so ``errors_mm`` are the matched errors.
    """

    def __init__(self, pred_key: str = Keys.PRED, image_key: str = Keys.IMAGE, truth_key: str | None = "landmarks",
                 method: str = "quadratic", window: int = 1, output_stride: Sequence[int] | None = None,
                 channel_groups: ChannelGroups | None = None):
        super().__init__(pred_key, allow_missing_keys=False)
        self.pred_key, self.image_key, self.truth_key = pred_key, image_key, truth_key
        self.method, self.window = method, window
        self.output_stride = tuple(output_stride) if output_stride is not None else None
        self.channel_groups = None if channel_groups is None or channel_groups.is_identity else channel_groups

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        affine = getattr(image, "affine", None)
        if affine is None:
            raise ValueError(f"d[{self.image_key!r}] carries no affine: cannot map landmarks to world coordinates")
        pred = d[self.pred_key]
        if affine.ndim == 2:
            affine = affine.unsqueeze(0).expand(len(pred.values) if isinstance(pred, LocalHeatmaps) else pred.shape[0],
                                                -1, -1)
        if isinstance(pred, LocalHeatmaps):  # streamed sliding windows: the boxes around the peaks
            if self.channel_groups is not None:
                raise ValueError("streamed sliding windows (sw_stream) do not support shared channels (channel_groups)")
            dec = pred.decode(method=self.method, window=self.window, output_stride=self.output_stride, affine=affine)
        elif self.channel_groups is None:
            dec = decode_heatmaps(torch.as_tensor(pred).detach(), method=self.method, window=self.window,
                                  output_stride=self.output_stride, affine=affine.to(pred.device))
        else:
            dec = decode_channel_groups(torch.as_tensor(pred).detach(), self.channel_groups, method=self.method,
                                        window=self.window, output_stride=self.output_stride,
                                        affine=affine.to(pred.device), input_shape=tuple(image.shape[2:]))
        truth = None
        if self.truth_key is not None and self.truth_key in d:
            truth = torch.as_tensor(d[self.truth_key]).detach().to(torch.float64).cpu().numpy()
            if self.channel_groups is not None:
                dec = self._order_to_truth(dec, truth)
        d["pred_voxel"] = dec.voxel
        d["pred_world"] = dec.world
        d["confidence"] = dec.confidence
        if truth is not None:
            d["errors_mm"] = point_errors(dec.world.cpu().numpy(), truth)
        return d

    def _order_to_truth(self, dec: DecodedLandmarks, truth: np.ndarray) -> DecodedLandmarks:
        """Unordered groups' instances permuted within each group to the true instances they match."""
        order = torch.arange(truth.shape[1]).repeat(truth.shape[0], 1)  # (B, N) source column per column
        world = dec.world.cpu().numpy()
        for g in self.channel_groups.groups:
            if not g.shared or g.order != "unordered":
                continue
            cols = np.asarray(g.landmarks)
            for b in range(truth.shape[0]):
                pairs = match_points(world[b, cols], truth[b, cols], max_distance_mm=1e12).pairs
                free_dst = [j for j in range(len(cols)) if j not in set(pairs[:, 1].tolist())]
                free_src = [j for j in range(len(cols)) if j not in set(pairs[:, 0].tolist())]
                dst = list(pairs[:, 1]) + free_dst
                src = list(pairs[:, 0]) + free_src
                order[b, cols[dst]] = torch.as_tensor(cols[src])
        idx = order.to(dec.voxel.device)

        def take(x: torch.Tensor) -> torch.Tensor:
            return torch.gather(x, 1, idx.unsqueeze(-1).expand_as(x) if x.ndim == 3 else idx)

        return DecodedLandmarks(voxel=take(dec.voxel), world=take(dec.world), confidence=take(dec.confidence))


def _gather_rows(errors: np.ndarray) -> np.ndarray:
    """Concatenate the error rows of all ranks when running distributed (equal-size shards not needed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return errors
    return evenly_divisible_all_gather(torch.as_tensor(errors, dtype=torch.float64), concat=True).cpu().numpy()


class LandmarkErrorMetric(Metric):
    """One statistic of the point errors (mm) over an epoch, from ``errors_mm`` of the engine output.

    Args:
        statistic: ``"mean"`` (MRE), ``"sd"``, ``"median"``, ``"max"``, ``"sdr"`` (share in percent of
            landmarks with error <= ``radius`` mm, among those present in the truth) or
            ``"outliers"`` (count of errors > ``radius`` mm).
        radius: for ``"sdr"`` and ``"outliers"``.
    """

    STATISTICS = ("mean", "sd", "median", "max", "sdr", "outliers", "outliers_pct")

    def __init__(self, statistic: str = "mean", radius: float | None = None,
                 output_transform: Callable = lambda out: out["errors_mm"], device: str | torch.device = "cpu"):
        if statistic not in self.STATISTICS:
            raise ValueError(f"statistic must be one of {self.STATISTICS}, got {statistic!r}")
        if statistic in ("sdr", "outliers", "outliers_pct") and radius is None:
            raise ValueError(f"statistic {statistic!r} needs a radius in mm")
        self.statistic, self.radius = statistic, radius
        self._rows: list[np.ndarray] = []
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._rows = []

    def update(self, output: Any) -> None:
        self._rows.append(np.asarray(output, dtype=np.float64).reshape(-1, np.asarray(output).shape[-1]))

    def compute(self) -> float:
        if not self._rows:
            return float("nan")
        errors = _gather_rows(np.concatenate(self._rows))
        radii = () if self.radius is None else (self.radius,)
        s = summarize(errors, radii=radii, outlier_radii=radii)
        if self.statistic in ("sdr", "outliers", "outliers_pct"):
            return float(s[f"{self.statistic}_{radius_key(self.radius)}mm"])
        return float(s[self.statistic])


class EvaluationWriter:
    """Collect decoded landmarks over an evaluation run and write the evaluation files at the end.

    Attach to an evaluator whose postprocessing includes :class:`DecodeLandmarksd`. At
    ``EPOCH_COMPLETED`` it writes (atomically) ``metrics.json``, ``per_landmark.csv``, ``errors.csv``,
    ``predictions.csv`` and plots to ``output_dir`` through :func:`heatmark.reports.write_evaluation`
    and keeps the paths in ``engine.state.evaluation_files``.
    """

    def __init__(self, output_dir: str | os.PathLike, names: Sequence[str], case_key: str = "case",
                 truth_key: str = "landmarks", radii: Sequence[float] = DEFAULT_RADII,
                 outlier_radii: Sequence[float] = DEFAULT_OUTLIER_RADII, overlays: int = 3,
                 image_key: str = Keys.IMAGE):
        self.overlays = int(overlays)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.names = list(names)
        self.case_key, self.truth_key = case_key, truth_key
        self.radii, self.outlier_radii = tuple(radii), tuple(outlier_radii)
        self._reset()

    def _reset(self) -> None:
        self.cases: list[str] = []
        self.pred: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        # (case, network-grid image, its affine, row, source of the original image or None)
        self.images: list[tuple[str, np.ndarray, np.ndarray, int, dict | None]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        out, batch = engine.state.output, engine.state.batch
        pred = torch.as_tensor(out["pred_world"]).cpu().numpy()
        cases = batch.get(self.case_key) if isinstance(batch, Mapping) else None
        n = pred.shape[0]
        self.cases.extend([str(c) for c in cases] if cases is not None else [str(len(self.cases) + i) for i in range(n)])
        image = out.get(self.image_key)
        first_row = len(self.cases) - n
        for i in range(n):
            if len(self.images) >= self.overlays or image is None:
                break
            affine = image.affine[i] if image.affine.ndim == 3 else image.affine
            self.images.append((self.cases[first_row + i], image[i, 0].detach().float().cpu().numpy(),
                                affine.detach().cpu().numpy(), first_row + i, image_source(image[i])))
        self.pred.append(pred)
        if isinstance(batch, Mapping) and self.truth_key in batch:
            self.truth.append(torch.as_tensor(batch[self.truth_key]).double().cpu().numpy())

    def write(self, engine: Engine) -> None:
        pred = np.concatenate(self.pred) if self.pred else np.zeros((0, len(self.names), 2))
        truth = np.concatenate(self.truth) if self.truth else None
        errors = point_errors(pred, truth) if truth is not None else None
        files = write_evaluation(self.output_dir, errors, self.cases, self.names, pred, truth, radii=self.radii,
                                 outlier_radii=self.outlier_radii)
        for case, image, affine, row, source in self.images:
            image, affine = original_or(source, image, affine)  # drawn on the original image when readable
            files[f"overlay_{case}"] = plot_overlay(
                image, affine, pred[row], self.output_dir / f"overlay_{safe_case_name(case)}.png",
                truth_world=truth[row] if truth is not None else None, names=self.names, title=case)
        engine.state.evaluation_files = files
