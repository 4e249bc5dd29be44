"""Training checkpoints, written atomically: the whole training state for resuming
(:class:`TrainingCheckpoint`), MONAI's ``CheckpointSaver`` made atomic for the best model
(:class:`AtomicCheckpointSaver`), and :func:`latest_checkpoint`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from heatmark.core.fileio import TMP_PREFIX, atomic_path, atomic_write_text

__all__ = ["latest_checkpoint", "AtomicDiskSaver", "AtomicCheckpointSaver", "TrainingCheckpoint"]

logger = logging.getLogger(__name__)


def _checkpoints_by_step(directory: str | os.PathLike, prefix: str = "checkpoint") -> list[Path]:
    """Checkpoint files ``<prefix>*<number>.pt`` in ``directory``, oldest (lowest number) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
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
        info = {"mlflow_run_id": getattr(engine.state, "mlflow_run_id", None),
                "checkpoint": latest_checkpoint(self.save_dir, self.file_prefix),
                "epoch": engine.state.epoch, "iteration": engine.state.iteration}
        try:
            atomic_write_text(self.save_dir / self.RUN_FILE, json.dumps(info, indent=1) + "\n")
        except OSError as e:  # bookkeeping only: never stop a training
            logger.warning("could not write %s: %s", self.save_dir / self.RUN_FILE, e)

    def _read_run_file(self) -> dict[str, Any]:
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
