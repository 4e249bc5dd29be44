"""Trainer handlers that decide when training stops and how fast it learns: early stopping on the
validator's key metric, a wall-time limit and cosine learning-rate annealing over that wall time."""

from __future__ import annotations

import logging
import math
import time

import torch
from ignite.engine import Engine, Events

__all__ = ["EarlyStopping", "FinalValidation", "TimeLimit", "TimeCosineLR"]

logger = logging.getLogger(__name__)


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


def _validated_epoch(validator: Engine) -> int:
    """The trainer epoch the validator last ran for (MONAI's evaluators run with the trainer's epoch
    as their own), 0 when it never ran."""
    state = getattr(validator, "state", None)
    return int(getattr(state, "epoch", 0) or 0) if getattr(state, "iteration", 0) else 0


class FinalValidation:
    """Validate once more when training ends (max epochs, time limit, early stop, and Ctrl-C through
    :class:`~heatmark.training.engines.LandmarkTrainer`) and the last epoch was not validated, so the
    final, lowest-learning-rate weights are evaluated and can become the best model (the validator's
    own checkpoint handler keeps the best). Attach to the trainer after the ``ValidationHandler``."""

    def __init__(self, validator: Engine):
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
        engine.state.final_validation = self  # what LandmarkTrainer runs after Ctrl-C

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if epoch < 1 or _validated_epoch(self.validator) >= epoch:
            return
        logger.info("training ended at epoch %d, iteration %d without validating it: final validation",
                    epoch, engine.state.iteration)
        self.validator.run(epoch)


class _WallClock:
    """A handler driven by the wall time since the trainer started: ``minutes <= 0`` disables it;
    otherwise the clock starts at ``STARTED`` and ``__call__`` runs at ``event``."""

    event = Events.ITERATION_COMPLETED

    def __init__(self, minutes: float = 0.0):
        self.minutes = float(minutes)
        self._start: float | None = None

    def attach(self, engine: Engine) -> None:
        if self.minutes > 0:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(self.event, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.monotonic()

    def __call__(self, engine: Engine) -> None:
        raise NotImplementedError


class TimeLimit(_WallClock):
    """Stop training cleanly after ``minutes`` of wall time (checked after every iteration; the
    epoch in progress is cut short, checkpoint handlers still run at the end). ``minutes <= 0``
    disables it. Used by ``heatmark demo`` and the CPU overlays to bound training time.

    With ``validator`` (the one :class:`FinalValidation` runs at the end), validation is part of the
    budget: training stops early enough to leave the duration of the latest validation for the final
    one, so the run as a whole ends within ``minutes``.
    """

    def __init__(self, minutes: float = 0.0, validator: Engine | None = None):
        super().__init__(minutes)
        self.validator = validator
        self.reserve_s = 0.0
        self._val_start: float | None = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.minutes > 0 and self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._validation_started)
            self.validator.add_event_handler(Events.COMPLETED, self._validation_completed)

    def _validation_started(self, validator: Engine) -> None:
        self._val_start = time.monotonic()

    def _validation_completed(self, validator: Engine) -> None:
        if self._val_start is not None:
            self.reserve_s = time.monotonic() - self._val_start

    def __call__(self, engine: Engine) -> None:
        if self._start is not None and time.monotonic() - self._start + self.reserve_s >= 60.0 * self.minutes:
            logger.info("time limit of %.1f min reached at epoch %d, iteration %d%s: stopping",
                        self.minutes, engine.state.epoch, engine.state.iteration,
                        f" (keeping {self.reserve_s:.0f} s for the final validation)" if self.reserve_s else "")
            engine.terminate()


class TimeCosineLR(_WallClock):
    """Cosine learning-rate annealing over a wall-time budget of ``minutes`` (pair it with
    :class:`TimeLimit` of the same length): before every iteration each parameter group's rate is
    ``eta_min + (initial_lr - eta_min) * (1 + cos(pi * t / T)) / 2`` with ``t`` the minutes since
    the trainer started, so a run cut by a time limit still ends at a small rate whatever the
    speed of the machine. ``initial_lr`` is kept in the optimizer's param groups (and so in its
    checkpoint), as torch's schedulers do; after a resume the clock starts again from zero.
    ``minutes <= 0`` disables it."""

    event = Events.ITERATION_STARTED

    def __init__(self, optimizer: torch.optim.Optimizer, minutes: float = 0.0, eta_min: float = 0.0):
        super().__init__(minutes)
        self.optimizer = optimizer
        self.eta_min = float(eta_min)

    def _started(self, engine: Engine) -> None:
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        super()._started(engine)

    def lr_factor(self, elapsed_s: float) -> float:
        """The cosine factor in [0, 1] after ``elapsed_s`` seconds."""
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed_s / (60.0 * self.minutes))))

    def __call__(self, engine: Engine) -> None:
        if self._start is None:
            return
        f = self.lr_factor(time.monotonic() - self._start)
        for group in self.optimizer.param_groups:
            group["lr"] = self.eta_min + (group["initial_lr"] - self.eta_min) * f
