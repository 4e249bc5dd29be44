"""Training checkpoints, written atomically: the whole training state for resuming
(:class:`TrainingCheckpoint`), MONAI's ``CheckpointSaver`` made atomic for the best model
(:class:`AtomicCheckpointSaver`), and :func:`latest_checkpoint`.

A checkpoint that cannot be written (disk full, read-only folder) or no checkpoint that loads on
resume raises :class:`CheckpointError`, whose message is one complete line;
:meth:`heatmark.training.LandmarkTrainer.run` logs it as that one line and exits with status 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from heatmark.core.fileio import TMP_PREFIX, atomic_path, atomic_write_text
from heatmark.training.model_file import model_file_payload

__all__ = ["latest_checkpoint", "AtomicDiskSaver", "AtomicCheckpointSaver", "TrainingCheckpoint", "CheckpointError",
           "remove_temporary_files"]

logger = logging.getLogger(__name__)

#: how a resumable run is continued, in the messages (MONAI's command line; ``heatmark train --resume``)
RESUME_HINT = "rerun with --resume True to continue"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none could be loaded to resume from. The message is one
    complete line (what, where, why, what to do). :class:`heatmark.training.LandmarkTrainer` reports
    it in that one line and exits with status 1 (no traceback); ``resume_hint`` asks it to append
    where the last complete training checkpoint is and how to continue."""

    def __init__(self, message: str, resume_hint: bool = False):
        super().__init__(message)
        self.resume_hint = resume_hint


def _os_reason(e: OSError) -> str:
    """``No space left on device [Errno 28 ENOSPC]`` (or the exception's text without an errno)."""
    if e.errno is None:
        return str(e) or type(e).__name__
    return f"{e.strerror or os.strerror(e.errno)} [Errno {e.errno} {errno.errorcode.get(e.errno, '?')}]"


def _short(text: str, limit: int = 200) -> str:
    """One line: whitespace and terminal escapes collapsed, the first sentence of a long text."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    if len(text) > limit and ". " in text:
        text = text.split(". ", 1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_problem(e: BaseException) -> str:
    """Why a checkpoint file did not load, in a few words."""
    text = str(e)
    if isinstance(e, OSError):  # torch reports some truncations as EINVAL
        unreadable = e.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.EISDIR, errno.ENOENT)
        return f"{'unreadable' if unreadable else 'truncated or corrupt'} ({_os_reason(e)})"
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"refused: it holds a pickled object ({refused.group(1)}), not only tensors"
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    detail = _short(detail) if detail.strip() else type(e).__name__
    if type(e).__name__ not in ("RuntimeError", "UnpicklingError") and detail != type(e).__name__:
        detail = f"{type(e).__name__}: {detail}"
    return f"truncated or corrupt ({detail})"


def remove_temporary_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (:data:`~heatmark.core.fileio.TMP_PREFIX`) that saves killed midway
    left in ``directory``: regular files directly in it only (never a symlink, a folder, or anything
    in a subfolder). Returns what was removed; a file that cannot be removed is logged and left."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    except OSError as e:
        logger.warning("cannot look for leftover temporary files in %s: %s", directory, _os_reason(e))
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)  # a symlink swapped in meanwhile is unlinked itself, never its target
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.warning("cannot remove the leftover temporary file %s: %s", entry.path, _os_reason(e))
            continue
        removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d leftover temporary file(s) of interrupted saves in %s: %s", len(removed), directory,
                    ", ".join(p.name for p in removed))
    return removed


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
    only, which is why MONAI turns it off); a fixed ``filename`` replaces ignite's names.

    A write that fails (``OSError``: disk full, read-only folder) raises :class:`CheckpointError`
    and leaves the destination as it was. With a fixed ``filename`` ignite's ``remove`` (called
    *before* the new file is written) does nothing: the new file replaces the old one atomically, so
    the previous file stays until then, and stays if the write fails."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None,
                 description: Mapping[str, Any] | None = None):
        self.dirname = Path(dirname)
        self.filename = filename
        self.description = description

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self.dirname / (self.filename or filename)
        if self.description is not None:  # a self-describing model file (heatmark.training.model_file)
            checkpoint = model_file_payload(checkpoint, self.description)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as e:
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise CheckpointError(f"training stopped: cannot save {path}: {_os_reason(e)}; {kept}",
                                  resume_hint=True) from e

    def remove(self, filename: str) -> None:
        if self.filename is not None:
            return  # the next write replaces the file atomically; removing it first could lose it
        path = self.dirname / filename
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written atomically, so a run
    killed at any moment leaves either the previous checkpoint or the new one, never half of one.
    Attaching it (when the bundle builds the evaluator, before training starts) removes the temporary
    files that saves killed midway left in ``save_dir`` (see :func:`remove_temporary_files`). A
    save that fails raises :class:`CheckpointError` and keeps the previous file.

    With ``description`` (:func:`heatmark.training.model_file.model_description`) and a
    ``save_dict`` of one network, the final and key-metric files are self-describing model files
    (:func:`~heatmark.training.model_file.model_file_payload`): the weights under ``state_dict``
    beside the description."""

    def __init__(self, *args: Any, description: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        save_dict = kwargs.get("save_dict", args[1] if len(args) > 1 else {})
        if description is not None and len(save_dict) != 1:
            raise ValueError("a model description needs a save_dict of exactly one network")
        for attr, fixed, describe in (("_final_checkpoint", self._final_filename, description),
                                      ("_key_metric_checkpoint", kwargs.get("key_metric_filename"), description),
                                      ("_interval_checkpoint", None, None)):
            ckpt = getattr(self, attr)
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(self.save_dir, fixed, describe)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        remove_temporary_files(self.save_dir)


class TrainingCheckpoint:
    """Save the whole training state every ``save_interval`` epochs, atomically, and resume from it.

    The saved objects are ``save_dict`` (network, optimizer, scheduler, loss with its learned sigma,
    ...) plus the trainer itself (epoch and iteration counters), which is added when the handler is
    attached, so a bundle config needs no circular reference to the trainer. With ``resume=True``
    the newest complete checkpoint in ``save_dir`` is loaded at the start of the run
    (``torch.load(weights_only=True)``: a checkpoint holding arbitrary pickled objects is refused)
    and training continues from its epoch and iteration; without a checkpoint it starts afresh.
    When the newest does not load (truncated, corrupt, refused, not a training checkpoint) one
    warning names it and why, and the previous one is used; when none loads, or the checkpoint is
    beyond ``max_epochs``, :class:`CheckpointError` (one line) stops the run.

    Files: ``<save_dir>/<file_prefix>_<name>_<iteration>.pt``; the newest ``n_saved`` (default 2,
    None: all) are kept, older ones are removed only after a new one is complete. In distributed
    runs every rank loads and only rank 0 saves (``save=False`` elsewhere). At the start of a run
    the saving rank removes the temporary files that saves killed midway left in ``save_dir``.

    A save that fails with ``OSError`` (disk full, read-only folder) raises :class:`CheckpointError`
    naming the folder, the reason, the previous checkpoint (intact) and how to resume.

    A state holding a non-finite floating value (network, loss, optimizer...) is never saved: the
    previous checkpoint is kept and an error is logged. Beside the checkpoints, ``run.json``
    (:attr:`RUN_FILE`) records the MLflow run id of the training (``engine.state.mlflow_run_id``,
    set by :class:`heatmark.tracking.MLflowExtrasHandler`) and the checkpoint. On resume the engine
    state gets ``resumed_from`` (checkpoint path), ``resumed_at_iteration`` and
    ``resumed_from_run`` (the recorded MLflow run id or None), which the MLflow handler logs.
    """

    RUN_FILE = "run.json"

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], resume: bool = False,
                 save_interval: int = 1, n_saved: int | None = 2, file_prefix: str = "checkpoint",
                 map_location: str | torch.device | None = None, save: bool = True):
        self.save = bool(save)
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.resume = bool(resume)
        self.save_interval = int(save_interval)
        if n_saved is not None and (isinstance(n_saved, bool) or int(n_saved) != n_saved or n_saved < 1):
            raise ValueError(f"n_saved must be a positive integer or None (keep all), got {n_saved!r}")
        self.n_saved = None if n_saved is None else int(n_saved)
        self.file_prefix = file_prefix
        self.map_location = map_location
        self.to_save: dict[str, Any] = {}
        self.loaded_from: str | None = None

    def attach(self, engine: Engine) -> None:
        self.to_save = {**self.save_dict, "trainer": engine}
        engine.state.checkpoint_dir = str(self.save_dir)
        engine.state.checkpoint_prefix = self.file_prefix
        # ignite removes the oldest file *before* writing the new one; it keeps all here and _save
        # removes old ones once the new checkpoint is complete
        self.saver = Checkpoint(self.to_save, AtomicDiskSaver(self.save_dir), filename_prefix=self.file_prefix,
                                n_saved=None, global_step_transform=lambda e, _: e.state.iteration)
        if self.save:
            engine.add_event_handler(Events.STARTED, lambda _: remove_temporary_files(self.save_dir))
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
        previous = latest_checkpoint(self.save_dir, self.file_prefix)
        try:
            self.saver(engine)
        except (CheckpointError, OSError) as e:
            cause = e.__cause__ if isinstance(e, CheckpointError) and isinstance(e.__cause__, OSError) else e
            reason = _os_reason(cause) if isinstance(cause, OSError) else str(cause)
            code = getattr(cause, "errno", None)
            fix = ("free space there" if code in (errno.ENOSPC, errno.EDQUOT) else
                   "make the folder writable" if code in (errno.EROFS, errno.EACCES, errno.EPERM) else "fix that")
            kept = (f"the previous checkpoint {previous} is intact; {fix}, then {RESUME_HINT}" if previous
                    else f"no checkpoint was saved before; {fix} and rerun")
            raise CheckpointError(f"training stopped at epoch {engine.state.epoch}, iteration "
                                  f"{engine.state.iteration}: cannot save a checkpoint in {self.save_dir}: "
                                  f"{reason}; {kept}") from cause
        if self.n_saved is not None:  # also the checkpoints of earlier runs, which the saver does not track
            for old in _checkpoints_by_step(self.save_dir, self.file_prefix)[: -self.n_saved]:
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

    def _load_one(self, path: Path) -> str | None:
        """Load ``path`` into the saved objects; None, or why it does not load."""
        try:
            checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported in one line
            return _load_problem(e)
        if not isinstance(checkpoint, Mapping):
            return f"not a training checkpoint (it holds a {type(checkpoint).__name__})"
        missing = [k for k in self.to_save if k not in checkpoint]
        if missing:  # checked first: load_objects would load the others before failing
            return f"not a training checkpoint of this run (no {', '.join(repr(k) for k in missing)})"
        try:
            Checkpoint.load_objects(to_load=self.to_save, checkpoint=checkpoint)
        except Exception as e:  # noqa: BLE001
            return f"does not fit this training ({_short(str(e)) or type(e).__name__})"
        return None

    def load(self, engine: Engine) -> None:
        candidates = _checkpoints_by_step(self.save_dir, self.file_prefix)[::-1]
        if not candidates:
            logger.info("resume requested but no checkpoint in %s: starting from scratch", self.save_dir)
            return
        prior_max_epochs = engine.state.max_epochs
        failed: list[tuple[Path, str]] = []
        for candidate in candidates:
            problem = self._load_one(candidate)
            if problem is None:
                break
            failed.append((candidate, problem))
        else:
            engine.state.max_epochs = prior_max_epochs
            raise CheckpointError(f"cannot resume: no checkpoint in {self.save_dir} loads ("
                                  + "; ".join(f"{p.name}: {why}" for p, why in failed)
                                  + "); to start afresh, move them away or run without --resume")
        path = str(candidate)
        for bad, why in failed:
            logger.warning("skipping checkpoint %s: %s; resuming from the previous one, %s", bad, why, path)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise CheckpointError(f"cannot resume: checkpoint {path} is at epoch {engine.state.epoch}, beyond "
                                  f"max_epochs={prior_max_epochs}; raise max_epochs to train further")
        engine.state.max_epochs = prior_max_epochs
        self.loaded_from = path
        engine.state.resumed_from = path
        engine.state.resumed_at_iteration = int(engine.state.iteration)
        engine.state.resumed_from_run = self._read_run_file().get("mlflow_run_id")
        logger.info("resumed from %s at epoch %d, iteration %d", path, engine.state.epoch, engine.state.iteration)
