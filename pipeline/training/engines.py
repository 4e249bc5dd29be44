"""MONAI engines for landmark heatmap regression.

- :class:`LandmarkPrepareBatch` hands the network the image and the loss the landmarks' voxel
  positions on the input grid ``(B, N, D)`` (targets are rendered on the device by the loss).
- :class:`LandmarkTrainer` is MONAI's ``SupervisedTrainer`` with mixed precision on the engine's
  own device type (bf16 autocast also on CPU; fp16 with a grad scaler on CUDA), the loss computed
  in float32 outside autocast, and non-finite losses or gradients detected: the step is skipped
  and counted, and training stops with a clear error after ``max_nonfinite`` in a row.
- :class:`LandmarkEvaluator` is ``SupervisedEvaluator`` with the same autocast rule.

Ctrl-C and checkpoint failures (:class:`~heatmark.training.checkpoint.CheckpointError`: a full or
read-only disk, no checkpoint that loads on resume) stop training with one log line and exit status
130 or 1, without the tracebacks the engines' handlers would otherwise log.

What an evaluator computes from the network output (decoding, metrics, evaluation files) lives in
:mod:`heatmark.evaluation.validation`; checkpoints in :mod:`heatmark.training.checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.engines.workflow import Workflow
from monai.utils import CommonKeys as Keys

from heatmark.training.checkpoint import RESUME_HINT, CheckpointError, latest_checkpoint

__all__ = [
    "LandmarkPrepareBatch",
    "LandmarkTrainer",
    "LandmarkEvaluator",
    "NonFiniteError",
    "autocast_context",
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


#: stops that :meth:`LandmarkTrainer.run` reports in one line
_ONE_LINE_STOPS = (KeyboardInterrupt, CheckpointError)


def _handle_exception(engine: Engine, e: BaseException) -> None:
    """ignite's exception handling, except that Ctrl-C and checkpoint failures skip the
    ``EXCEPTION_RAISED`` handlers (MONAI's ``StatsHandler`` would log them with a full stack trace):
    :meth:`LandmarkTrainer.run` reports them in one line."""
    if isinstance(e, _ONE_LINE_STOPS):
        raise e
    Engine._handle_exception(engine, e)


class _QuietOneLineStops(logging.Filter):
    """Drops ignite's ``... is terminating due to exception: ...`` line for the stops that
    :meth:`LandmarkTrainer.run` reports itself (ignite logs it while handling the exception, so the
    exception is the one being handled)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "terminating due to exception" not in str(record.msg):
            return True
        return not isinstance(sys.exc_info()[1], _ONE_LINE_STOPS)


_QUIET = _QuietOneLineStops()


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
        self.logger.addFilter(_QUIET)  # one filter object: added once per logger

    def run(self) -> None:  # type: ignore[override]
        """Run training; like MONAI's, but the gradient scaler exists only for fp16 on CUDA (MONAI
        builds a CUDA scaler whenever ``amp`` is on, which bf16 and CPU runs do not want).

        Ctrl-C (``KeyboardInterrupt``) stops training with a message naming the last complete
        checkpoint (when a :class:`TrainingCheckpoint` is attached) and how to continue, and exits
        with status 130 (``SystemExit(130)``, the shell's convention for SIGINT).

        A :class:`~heatmark.training.checkpoint.CheckpointError` (a checkpoint that cannot be saved,
        no checkpoint that loads on resume) is logged as one error line and exits with status 1
        (``SystemExit(1)``), without a traceback."""
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
            self._validate_before_stopping()
            logger.error("training interrupted at epoch %s iteration %s; %s", self.state.epoch, self.state.iteration,
                         self._where_to_resume())
            raise SystemExit(130) from None
        except CheckpointError as e:
            logger.error("%s%s", e, f"; {self._where_to_resume()}" if e.resume_hint else "")
            raise SystemExit(1) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _validate_before_stopping(self) -> None:
        """After Ctrl-C: run the final validation a :class:`~heatmark.training.handlers.FinalValidation`
        handler registered (``state.final_validation``), so the latest weights are evaluated and can
        become the best model; a second Ctrl-C skips it."""
        final = getattr(self.state, "final_validation", None)
        if final is None:
            return
        logger.warning("Ctrl-C: validating the latest weights before stopping (Ctrl-C again to skip)")
        self._sigint = False
        try:
            final(self)
        except KeyboardInterrupt:
            logger.warning("final validation skipped")

    def _where_to_resume(self) -> str:
        ckpt_dir = getattr(self.state, "checkpoint_dir", None)
        last = latest_checkpoint(ckpt_dir, getattr(self.state, "checkpoint_prefix", "checkpoint")) if ckpt_dir else None
        return f"the last complete checkpoint is {last}; {RESUME_HINT}" if last else "no checkpoint was saved yet"

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
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.scaler.unscale_(engine.optimizer)
            if not _grads_finite(self._params()):
                self.scaler.update()  # lowers the scale; the step is skipped
                self._nonfinite("gradient")
            else:
                self.scaler.step(engine.optimizer)
                self.scaler.update()
                self.state.nonfinite_in_a_row = 0
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if not _grads_finite(self._params()):
                self._nonfinite("gradient")
            else:
                engine.optimizer.step()
                self.state.nonfinite_in_a_row = 0
        # fired for a skipped step too: MONAI decollates the output and runs postprocessing on this
        # event, and the handlers after it (StatsHandler, MLflow) expect that form every iteration
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class LandmarkEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose ``amp`` autocasts on the engine's device type (bf16 on CPU)."""

    def __init__(self, *args: Any, **kwargs: Any):
        amp_kwargs = dict(kwargs.pop("amp_kwargs", None) or {})
        device = torch.device(kwargs.get("device", args[0] if args else "cpu"))
        if kwargs.get("amp"):
            amp_kwargs["dtype"] = _amp_dtype(amp_kwargs, device)
        super().__init__(*args, amp_kwargs=amp_kwargs, **kwargs)
        self.logger.addFilter(_QUIET)

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
