"""MONAI engines for landmark heatmap regression.

- :class:`LandmarkPrepareBatch` hands the network the image and the loss the landmarks' voxel
  positions on the input grid ``(B, N, D)`` (targets are rendered on the device by the loss).
- :class:`LandmarkTrainer` is MONAI's ``SupervisedTrainer`` with mixed precision on the engine's
  own device type (bf16 autocast also on CPU; fp16 with a grad scaler on CUDA), the loss computed
  in float32 outside autocast, and non-finite losses or gradients detected: the step is skipped
  and counted, and training stops with a clear error after ``max_nonfinite`` in a row.
- :class:`LandmarkEvaluator` is ``SupervisedEvaluator`` with the same autocast rule.
- :class:`DecodeLandmarksd` (postprocessing) decodes predicted heatmaps into voxel and world
  positions, confidences and point errors in mm; :class:`LandmarkErrorMetric` reduces them for the
  engines' metrics; :class:`EvaluationWriter` writes the evaluation files at the end of a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.workflow import Workflow
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import CheckpointSaver
from monai.transforms import MapTransform
from monai.utils import CommonKeys as Keys

from heatmark.decoding import decode_heatmaps
from heatmark.metrics import DEFAULT_OUTLIER_RADII, DEFAULT_RADII, point_errors, radius_key, summarize

__all__ = [
    "LandmarkPrepareBatch",
    "LandmarkTrainer",
    "LandmarkEvaluator",
    "DecodeLandmarksd",
    "LandmarkErrorMetric",
    "EvaluationWriter",
    "NonFiniteError",
    "autocast_context",
    "latest_checkpoint",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "TrainingCheckpoint",
    "EarlyStopping",
    "TimeLimit",
    "TimeCosineLR",
]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


def _amp_dtype(amp_kwargs: Mapping[str, Any] | None, device: torch.device) -> torch.dtype:
    dtype = (amp_kwargs or {}).get("dtype")
    if isinstance(dtype, str):
        dtype = _AMP_DTYPES[dtype.lower()]
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    if device.type == "cpu" and dtype != torch.bfloat16:
        raise ValueError("mixed precision on CPU supports bfloat16 only (amp_kwargs={'dtype': 'bfloat16'})")
    return dtype


def autocast_context(device: torch.device | str, enabled: bool, amp_kwargs: Mapping[str, Any] | None = None):
    """``torch.autocast`` on ``device``'s type (MONAI's engines hard-code ``"cuda"``)."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_amp_dtype(amp_kwargs, device))


class LandmarkPrepareBatch(PrepareBatch):
    """``(image, landmarks_voxel)`` from a collated batch dictionary, moved to ``device``."""

    def __init__(self, image_key: str = "image", target_key: str = "landmarks_voxel"):
        self.image_key = image_key
        self.target_key = target_key

    def __call__(self, batchdata: Mapping[Hashable, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        target = torch.as_tensor(batchdata[self.target_key]).to(device=device, non_blocking=non_blocking)
        return image, target


def _grads_finite(params: Sequence[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.detach().float().abs().max() for g in grads])).all())


def _handle_exception(engine: Engine, e: BaseException) -> None:
    """ignite's exception handling, except that Ctrl-C skips the ``EXCEPTION_RAISED`` handlers
    (MONAI's ``StatsHandler`` would log it with a full stack trace): :meth:`LandmarkTrainer.run`
    reports it in one line."""
    if isinstance(e, KeyboardInterrupt):
        raise e
    Engine._handle_exception(engine, e)


class LandmarkTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for heatmap regression; same arguments plus:

    Args:
        nonfinite_policy: ``"skip"`` (skip the optimiser step, count it) or ``"raise"`` (stop at
            the first non-finite loss or gradient).
        max_nonfinite: with ``"skip"``, stop with :class:`NonFiniteError` after this many
            consecutive non-finite steps.

    ``amp=True`` autocasts on the engine's device: ``amp_kwargs={"dtype": "bfloat16"}`` (default
    on CPU) or ``"float16"`` (default on CUDA, with a gradient scaler). Counters land in
    ``engine.state.metrics`` as ``nonfinite_steps`` and the mean predicted peak of the last
    iteration in ``engine.state.output["peak"]`` (watch it: collapse to zero is the trivial optimum).
    """

    def __init__(self, *args: Any, nonfinite_policy: str = "skip", max_nonfinite: int = 10, **kwargs: Any):
        if nonfinite_policy not in ("skip", "raise"):
            raise ValueError(f"nonfinite_policy must be 'skip' or 'raise', got {nonfinite_policy!r}")
        amp_kwargs = dict(kwargs.pop("amp_kwargs", None) or {})
        amp = bool(kwargs.pop("amp", False))
        device = torch.device(kwargs.get("device", args[0] if args else "cpu"))
        if amp:
            amp_kwargs["dtype"] = _amp_dtype(amp_kwargs, device)
        super().__init__(*args, amp=amp, amp_kwargs=amp_kwargs, **kwargs)
        self._use_scaler = amp and device.type == "cuda" and amp_kwargs.get("dtype") == torch.float16
        self.nonfinite_policy = nonfinite_policy
        self.max_nonfinite = int(max_nonfinite)
        self.state.nonfinite_steps = 0
        self.state.nonfinite_in_a_row = 0

    def run(self) -> None:  # type: ignore[override]
        """Run training; like MONAI's, but the gradient scaler exists only for fp16 on CUDA (MONAI
        builds a CUDA scaler whenever ``amp`` is on, which bf16 and CPU runs do not want).

        Ctrl-C (``KeyboardInterrupt``) stops training with a message naming the last complete
        checkpoint (when a :class:`TrainingCheckpoint` is attached) and how to continue, and exits
        with status 130 (``SystemExit(130)``, the shell's convention for SIGINT)."""
        import signal
        import threading

        self.scaler = torch.amp.GradScaler("cuda") if self._use_scaler else None
        # Ctrl-C is also remembered: a KeyboardInterrupt raised where Python ignores exceptions
        # (a finaliser, a callback) would otherwise be lost; the next iteration raises it again
        self._sigint = False
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                self._sigint = True
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGINT, on_sigint)
        if not self.has_event_handler(self._raise_if_interrupted, Events.ITERATION_STARTED):
            self.add_event_handler(Events.ITERATION_STARTED, self._raise_if_interrupted)
        try:
            Workflow.run(self)
        except KeyboardInterrupt:
            ckpt_dir = getattr(self.state, "checkpoint_dir", None)
            last = latest_checkpoint(ckpt_dir, getattr(self.state, "checkpoint_prefix", "checkpoint")) \
                if ckpt_dir else None
            where = f"the last complete checkpoint is {last}; rerun with --resume true to continue" if last \
                else "no checkpoint was saved yet"
            logger.error("training interrupted at epoch %s iteration %s; %s", self.state.epoch, self.state.iteration,
                         where)
            raise SystemExit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _raise_if_interrupted(self, engine: Engine) -> None:
        if self._sigint:
            raise KeyboardInterrupt

    _handle_exception = _handle_exception

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _nonfinite(self, what: str) -> None:
        self.state.nonfinite_steps += 1
        self.state.nonfinite_in_a_row += 1
        self.state.metrics["nonfinite_steps"] = self.state.nonfinite_steps
        msg = (f"non-finite {what} at epoch {self.state.epoch}, iteration {self.state.iteration}: step skipped "
               f"({self.state.nonfinite_in_a_row} in a row, {self.state.nonfinite_steps} in total)")
        if self.nonfinite_policy == "raise" or self.state.nonfinite_in_a_row >= self.max_nonfinite:
            raise NonFiniteError(msg + "; stopping. Lower the learning rate, check the data, or disable amp.")
        logger.warning(msg)
        self.optimizer.zero_grad(set_to_none=True)

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast_context(engine.state.device, engine.amp, engine.amp_kwargs):
            pred = engine.inferer(inputs, engine.network)
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = engine.loss_function(pred, targets).mean()  # the loss casts to float32 itself
        engine.state.output[Keys.LOSS] = loss
        engine.state.output["peak"] = float(pred.detach().float().flatten(2).amax(-1).mean())
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(loss):
            self._nonfinite("loss")
            return engine.state.output
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.scaler.unscale_(engine.optimizer)
            if not _grads_finite(self._params()):
                self.scaler.update()  # lowers the scale; the step is skipped
                self._nonfinite("gradient")
                return engine.state.output
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if not _grads_finite(self._params()):
                self._nonfinite("gradient")
                return engine.state.output
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        self.state.nonfinite_in_a_row = 0
        return engine.state.output


class LandmarkEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose ``amp`` autocasts on the engine's device type (bf16 on CPU)."""

    def __init__(self, *args: Any, **kwargs: Any):
        amp_kwargs = dict(kwargs.pop("amp_kwargs", None) or {})
        device = torch.device(kwargs.get("device", args[0] if args else "cpu"))
        if kwargs.get("amp"):
            amp_kwargs["dtype"] = _amp_dtype(amp_kwargs, device)
        super().__init__(*args, amp_kwargs=amp_kwargs, **kwargs)

    _handle_exception = _handle_exception

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        with engine.mode(engine.network), autocast_context(engine.state.device, engine.amp, engine.amp_kwargs):
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class DecodeLandmarksd(MapTransform):
    """Postprocessing: decode predicted heatmaps of a batch into landmarks.

    Reads ``d[pred_key]`` ``(B, N, *S)``, the input image ``d[image_key]`` (its affine maps input
    voxels to world), and optionally the true world landmarks ``d[truth_key]`` ``(B, N, D)``.
    Writes ``pred_voxel`` (input grid), ``pred_world`` (mm, RAS), ``confidence`` ``(B, N)`` and, with
    truth, ``errors_mm`` ``(B, N)`` (NaN where the truth is missing, inf where nothing was detected).

    Args:
        method, window: refinement, see :func:`heatmark.decoding.decode_heatmaps`.
        output_stride: the network's output stride (``network.output_stride`` where it has one).
    """

    def __init__(self, pred_key: str = Keys.PRED, image_key: str = Keys.IMAGE, truth_key: str | None = "landmarks",
                 method: str = "quadratic", window: int = 1, output_stride: Sequence[int] | None = None):
        super().__init__(pred_key, allow_missing_keys=False)
        self.pred_key, self.image_key, self.truth_key = pred_key, image_key, truth_key
        self.method, self.window = method, window
        self.output_stride = tuple(output_stride) if output_stride is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        affine = getattr(image, "affine", None)
        if affine is None:
            raise ValueError(f"d[{self.image_key!r}] carries no affine: cannot map landmarks to world coordinates")
        pred = d[self.pred_key]
        if affine.ndim == 2:
            affine = affine.unsqueeze(0).expand(pred.shape[0], -1, -1)
        dec = decode_heatmaps(torch.as_tensor(pred).detach(), method=self.method, window=self.window,
                              output_stride=self.output_stride, affine=affine.to(pred.device))
        d["pred_voxel"] = dec.voxel
        d["pred_world"] = dec.world
        d["confidence"] = dec.confidence
        if self.truth_key is not None and self.truth_key in d:
            truth = torch.as_tensor(d[self.truth_key]).detach().to(torch.float64).cpu().numpy()
            d["errors_mm"] = point_errors(dec.world.cpu().numpy(), truth)
        return d


def _gather_rows(errors: np.ndarray) -> np.ndarray:
    """Concatenate the error rows of all ranks when running distributed (equal-size shards not needed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return errors
    from monai.utils import evenly_divisible_all_gather

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
        self.images: list[tuple[str, np.ndarray, np.ndarray, int]] = []  # (case, image, affine, row)

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
                                affine.detach().cpu().numpy(), first_row + i))
        self.pred.append(pred)
        if isinstance(batch, Mapping) and self.truth_key in batch:
            self.truth.append(torch.as_tensor(batch[self.truth_key]).double().cpu().numpy())

    def write(self, engine: Engine) -> None:
        from heatmark.fileio import safe_case_name
        from heatmark.reports import plot_overlay, write_evaluation

        pred = np.concatenate(self.pred) if self.pred else np.zeros((0, len(self.names), 2))
        truth = np.concatenate(self.truth) if self.truth else None
        errors = point_errors(pred, truth) if truth is not None else None
        files = write_evaluation(self.output_dir, errors, self.cases, self.names, pred, truth, radii=self.radii,
                                 outlier_radii=self.outlier_radii)
        for case, image, affine, row in self.images:
            files[f"overlay_{case}"] = plot_overlay(
                image, affine, pred[row], self.output_dir / f"overlay_{safe_case_name(case)}.png",
                truth_world=truth[row] if truth is not None else None, names=self.names, title=case)
        engine.state.evaluation_files = files


def _checkpoints_by_step(directory: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """Checkpoint files ``<prefix>*<number>.pt`` in ``directory``, oldest (lowest number) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    from heatmark.fileio import TMP_PREFIX

    found = []
    for p in d.glob(f"{prefix}*.pt"):
        if p.name.startswith(TMP_PREFIX) or not p.is_file():
            continue  # a write in progress (or killed): never a checkpoint
        digits = "".join(ch if ch.isdigit() else " " for ch in p.stem).split()
        found.append((int(digits[-1]) if digits else -1, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """Path of the most recent complete training checkpoint in ``directory`` (highest iteration
    in ignite's ``<prefix>_<name>_<number>.pt`` names), or None. Temporary files are ignored."""
    found = _checkpoints_by_step(directory, prefix)
    return str(found[-1]) if found else None


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler writing every checkpoint to a temporary file and renaming it, with the
    destination's usual permissions (ignite's own atomic mode leaves files readable by the owner
    only, which is why MONAI turns it off); a fixed ``filename`` replaces ignite's names."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None):
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        from heatmark.fileio import atomic_path

        path = self.dirname / (self.filename or filename)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def remove(self, filename: str) -> None:
        path = self.dirname / (self.filename or filename)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written atomically, so a run
    killed at any moment leaves either the previous checkpoint or the new one, never half of one."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for attr, fixed in (("_final_checkpoint", self._final_filename),
                            ("_key_metric_checkpoint", kwargs.get("key_metric_filename")),
                            ("_interval_checkpoint", None)):
            ckpt = getattr(self, attr)
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(self.save_dir, fixed)


class TrainingCheckpoint:
    """Save the whole training state every ``save_interval`` epochs, atomically, and resume from it.

    The saved objects are ``save_dict`` (network, optimizer, scheduler, loss with its learned sigma,
    ...) plus the trainer itself (epoch and iteration counters), which is added when the handler is
    attached, so a bundle config needs no circular reference to the trainer. With ``resume=True``
    the newest complete checkpoint in ``save_dir`` is loaded at the start of the run
    (``torch.load(weights_only=True)``: a checkpoint holding arbitrary pickled objects is refused)
    and training continues from its epoch and iteration; without a checkpoint it starts afresh.

    Files: ``<save_dir>/<file_prefix>_iteration=<k>.pt``, ``n_saved`` kept. In distributed runs
    every rank loads and only rank 0 saves (``save=False`` elsewhere).

    A state holding a non-finite floating value (network, loss, optimizer...) is never saved: the
    previous checkpoint is kept and an error is logged. Beside the checkpoints, ``run.json``
    (:attr:`RUN_FILE`) records the MLflow run id of the training (``engine.state.mlflow_run_id``,
    set by :class:`heatmark.tracking.MLflowExtrasHandler`) and the checkpoint. On resume the engine
    state gets ``resumed_from`` (checkpoint path), ``resumed_at_iteration`` and
    ``resumed_from_run`` (the recorded MLflow run id or None), which the MLflow handler logs.
    """

    RUN_FILE = "run.json"

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], resume: bool = False,
                 save_interval: int = 1, n_saved: int = 1, file_prefix: str = "checkpoint",
                 map_location: str | torch.device | None = None, save: bool = True):
        self.save = bool(save)
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.resume = bool(resume)
        self.save_interval = int(save_interval)
        self.n_saved = n_saved
        self.file_prefix = file_prefix
        self.map_location = map_location
        self.to_save: dict[str, Any] = {}
        self.loaded_from: str | None = None

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        self.to_save = {**self.save_dict, "trainer": engine}
        engine.state.checkpoint_dir = str(self.save_dir)
        engine.state.checkpoint_prefix = self.file_prefix
        self.saver = Checkpoint(self.to_save, AtomicDiskSaver(self.save_dir), filename_prefix=self.file_prefix,
                                n_saved=self.n_saved, global_step_transform=lambda e, _: e.state.iteration)
        if self.save:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._save)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)

    def _nonfinite_entries(self) -> list[str]:
        """Names of the saved objects' floating tensors holding NaN or inf."""
        bad: list[str] = []

        def walk(value: Any, name: str) -> None:
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    bad.append(name)
            elif isinstance(value, Mapping):
                for k, v in value.items():
                    walk(v, f"{name}.{k}")
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(v, f"{name}.{i}")

        for key, obj in self.to_save.items():
            if key != "trainer" and hasattr(obj, "state_dict"):
                walk(obj.state_dict(), key)
        return bad

    def _save(self, engine: Engine) -> None:
        bad = self._nonfinite_entries()
        if bad:
            logger.error("not saving a checkpoint at epoch %d, iteration %d: non-finite values in %s%s; "
                         "the previous checkpoint (%s) is kept", engine.state.epoch, engine.state.iteration,
                         ", ".join(bad[:5]), " ..." if len(bad) > 5 else "",
                         latest_checkpoint(self.save_dir, self.file_prefix))
            return
        self.saver(engine)
        # checkpoints of an earlier (interrupted) run are not tracked by this saver: keep the newest
        for old in _checkpoints_by_step(self.save_dir, self.file_prefix)[: -self.n_saved or None]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        self._write_run_file(engine)

    def _write_run_file(self, engine: Engine) -> None:
        import json

        from heatmark.fileio import atomic_write_text

        info = {"mlflow_run_id": getattr(engine.state, "mlflow_run_id", None),
                "checkpoint": latest_checkpoint(self.save_dir, self.file_prefix),
                "epoch": engine.state.epoch, "iteration": engine.state.iteration}
        try:
            atomic_write_text(self.save_dir / self.RUN_FILE, json.dumps(info, indent=1) + "\n")
        except OSError as e:  # bookkeeping only: never stop a training
            logger.warning("could not write %s: %s", self.save_dir / self.RUN_FILE, e)

    def _read_run_file(self) -> dict[str, Any]:
        import json

        path = self.save_dir / self.RUN_FILE
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable %s: %s", path, e)
            return {}
        return info if isinstance(info, dict) else {}

    def load(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        path = latest_checkpoint(self.save_dir, self.file_prefix)
        if path is None:
            logger.info("resume requested but no checkpoint in %s: starting from scratch", self.save_dir)
            return
        try:
            checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - surface as one clear message
            raise RuntimeError(f"cannot resume from {path}: {e}") from e
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.to_save, checkpoint=checkpoint)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(f"checkpoint {path} is at epoch {engine.state.epoch}, beyond max_epochs={prior_max_epochs}; "
                             "raise max_epochs to train further")
        engine.state.max_epochs = prior_max_epochs
        self.loaded_from = path
        engine.state.resumed_from = path
        engine.state.resumed_at_iteration = int(engine.state.iteration)
        engine.state.resumed_from_run = self._read_run_file().get("mlflow_run_id")
        logger.info("resumed from %s at epoch %d, iteration %d", path, engine.state.epoch, engine.state.iteration)


class EarlyStopping:
    """Stop training when the validator's key metric has not improved for ``patience`` validations.

    Attach to the trainer (``train#handlers``) after the ``ValidationHandler``; it reads the
    validator's ``best_metric_epoch`` (MONAI tracks it with the evaluator's ``metric_cmp_fn``), so
    no handler has to refer back to the trainer. ``patience <= 0`` disables it.
    """

    def __init__(self, validator: Engine, patience: int = 0, val_interval: int = 1):
        self.validator = validator
        self.patience = int(patience)
        self.val_interval = max(1, int(val_interval))

    def attach(self, engine: Engine) -> None:
        if self.patience > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.val_interval), self)

    def __call__(self, engine: Engine) -> None:
        best_epoch = getattr(self.validator.state, "best_metric_epoch", -1)
        if best_epoch is None or best_epoch < 0:
            return
        stale = (engine.state.epoch - best_epoch) // self.val_interval
        if stale >= self.patience:
            logger.info("early stopping at epoch %d: no improvement of %s since epoch %d", engine.state.epoch,
                        getattr(self.validator.state, "key_metric_name", "the key metric"), best_epoch)
            engine.terminate()


class TimeLimit:
    """Stop training cleanly after ``minutes`` of wall time (checked after every iteration; the
    epoch in progress is cut short, checkpoint handlers still run at the end). ``minutes <= 0``
    disables it. Used by ``heatmark demo`` to bound training time."""

    def __init__(self, minutes: float = 0.0):
        self.minutes = float(minutes)
        self._start: float | None = None

    def attach(self, engine: Engine) -> None:
        if self.minutes > 0:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        import time

        self._start = time.monotonic()

    def __call__(self, engine: Engine) -> None:
        import time

        if self._start is not None and time.monotonic() - self._start >= 60.0 * self.minutes:
            logger.info("time limit of %.1f min reached at epoch %d, iteration %d: stopping",
                        self.minutes, engine.state.epoch, engine.state.iteration)
            engine.terminate()


class TimeCosineLR:
    """Cosine learning-rate annealing over a wall-time budget of ``minutes`` (pair it with
    :class:`TimeLimit` of the same length): before every iteration each parameter group's rate is
    ``eta_min + (initial_lr - eta_min) * (1 + cos(pi * t / T)) / 2`` with ``t`` the minutes since
    the trainer started, so a run cut by a time limit still ends at a small rate whatever the
    speed of the machine. ``initial_lr`` is kept in the optimizer's param groups (and so in its
    checkpoint), as torch's schedulers do; after a resume the clock starts again from zero.
    ``minutes <= 0`` disables it."""

    def __init__(self, optimizer: torch.optim.Optimizer, minutes: float = 0.0, eta_min: float = 0.0):
        self.optimizer = optimizer
        self.minutes = float(minutes)
        self.eta_min = float(eta_min)
        self._start: float | None = None

    def attach(self, engine: Engine) -> None:
        if self.minutes > 0:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def _started(self, engine: Engine) -> None:
        import time

        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._start = time.monotonic()

    def lr_factor(self, elapsed_s: float) -> float:
        """The cosine factor in [0, 1] after ``elapsed_s`` seconds."""
        import math

        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed_s / (60.0 * self.minutes))))

    def __call__(self, engine: Engine) -> None:
        import time

        if self._start is None:
            return
        f = self.lr_factor(time.monotonic() - self._start)
        for group in self.optimizer.param_groups:
            group["lr"] = self.eta_min + (group["initial_lr"] - self.eta_min) * f
