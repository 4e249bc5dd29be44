"""Engine pieces on synthetic data: bf16 autocast on CPU, non-finite step handling, decoding
postprocessing, error metrics, atomic checkpoints and resume."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

import heatmark
from heatmark.evaluation import DecodeLandmarksd, LandmarkErrorMetric
from heatmark.training import (
    AtomicCheckpointSaver,
    LandmarkEvaluator,
    LandmarkPrepareBatch,
    LandmarkTrainer,
    NonFiniteError,
    TrainingCheckpoint,
    autocast_context,
    latest_checkpoint,
)
from heatmark.core.fileio import TMP_PREFIX
from heatmark.training import checkpoint as checkpoint_module
from heatmark.training.checkpoint import CheckpointError
from heatmark.core.geometry import voxel_to_world
from heatmark.core.heatmaps import gaussian_heatmaps
from heatmark.training.losses import HeatmapLoss
from heatmark.networks import HeatmapUNet

SHAPE = (24, 20)
AFFINE = torch.tensor([[0.5, 0, 3.0], [0, 0.5, -2.0], [0, 0, 1]], dtype=torch.float64)


def batches(n: int = 4, b: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        vox = torch.rand(b, 2, 2, generator=g, dtype=torch.float64) * torch.tensor([16.0, 12.0]) + 4
        img = gaussian_heatmaps(vox, SHAPE, sigma=2.0).sum(1, keepdim=True)
        image = MetaTensor(img, affine=AFFINE.expand(b, 3, 3).clone())
        out.append({"image": image, "landmarks_voxel": vox,
                    "landmarks": voxel_to_world(vox, AFFINE.expand(b, 3, 3))})
    return out


def make_trainer(loss=None, max_epochs: int = 1, decollate: bool = False, **kwargs) -> tuple[LandmarkTrainer, torch.nn.Module]:
    torch.manual_seed(0)
    net = HeatmapUNet(spatial_dims=2, in_channels=1, num_landmarks=2, filters=4, num_levels=2)
    loss = loss or HeatmapLoss(2, sigma=2.0, gamma=10.0)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss.parameters()), lr=1e-3)
    trainer = LandmarkTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=batches(), network=net,
                              optimizer=opt, loss_function=loss, prepare_batch=LandmarkPrepareBatch(),
                              decollate=decollate, **kwargs)
    return trainer, net


def test_bf16_autocast_on_cpu_trains_with_float32_loss():
    trainer, _ = make_trainer(amp=True, amp_kwargs={"dtype": "bfloat16"})
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen.append((e.state.output["pred"].dtype, e.state.output["loss"].dtype)))
    trainer.run()
    assert seen and all(p == torch.bfloat16 and lo == torch.float32 for p, lo in seen)
    assert trainer.state.nonfinite_steps == 0
    with pytest.raises(ValueError, match="bfloat16"):
        autocast_context("cpu", True, {"dtype": "float16"})


class Payload:
    """Stands for an arbitrary pickled object (it could run code when unpickled)."""


class NaNAt(torch.nn.Module):
    """Wraps a loss and returns NaN at the given (1-based) calls."""

    def __init__(self, loss: torch.nn.Module, bad: set[int]):
        super().__init__()
        self.loss, self.bad, self.calls = loss, bad, 0

    def forward(self, pred, target):
        self.calls += 1
        out = self.loss(pred, target)
        return out * float("nan") if self.calls in self.bad else out


def test_nonfinite_loss_skips_the_step_and_counts_it():
    trainer, net = make_trainer(loss=NaNAt(HeatmapLoss(2, sigma=2.0, gamma=10.0), {2}))
    snapshots = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: snapshots.append([p.detach().clone() for p in net.parameters()]))
    trainer.run()
    assert trainer.state.nonfinite_steps == 1 and trainer.state.metrics["nonfinite_steps"] == 1
    # iteration 2 changed nothing; iterations 3 and 4 trained again
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_nonfinite_gradient_is_skipped():
    trainer, net = make_trainer()
    first = next(net.parameters())
    first.register_hook(lambda g: g * float("nan") if trainer.state.iteration == 1 else g)
    trainer.run()
    assert trainer.state.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_skipped_step_keeps_the_decollated_output_the_bundles_handlers_read():
    """The bundles decollate (MONAI does it on MODEL_COMPLETED): a skipped step, non-finite loss or
    gradient, must leave the same per-case list that the StatsHandler's output_transform reads."""
    from monai.bundle import ConfigParser
    from monai.handlers import StatsHandler

    parser = ConfigParser()
    parser.read_config(str(Path(heatmark.__file__).parent / "configs" / "base.yaml"))
    stats = next(h for h in parser.get("train")["handlers"] if h.get("_target_") == "StatsHandler")
    read = eval(stats["output_transform"][1:])  # the bundle's own expression
    trainer, net = make_trainer(loss=NaNAt(HeatmapLoss(2, sigma=2.0, gamma=10.0), {2}), decollate=True)
    first = next(net.parameters())
    first.register_hook(lambda g: g * float("nan") if trainer.state.iteration == 3 else g)
    StatsHandler(iteration_log=True, output_transform=read).attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(read(e.state.output)))
    trainer.run()
    assert trainer.state.nonfinite_steps == 2 and len(seen) == 4
    assert np.isnan(seen[1]["loss"]) and all(np.isfinite(seen[i]["loss"]) for i in (0, 2, 3))


def test_consecutive_nonfinite_steps_stop_with_a_clear_error():
    trainer, _ = make_trainer(loss=NaNAt(HeatmapLoss(2, sigma=2.0), {1, 2, 3, 4}), max_nonfinite=3)
    with pytest.raises(NonFiniteError, match="3 in a row"):
        trainer.run()
    trainer2, _ = make_trainer(loss=NaNAt(HeatmapLoss(2, sigma=2.0), {2}), nonfinite_policy="raise")
    with pytest.raises(NonFiniteError):
        trainer2.run()


def test_decode_postprocessing_and_error_metric():
    data = batches(1)[0]
    pred = gaussian_heatmaps(data["landmarks_voxel"], SHAPE, sigma=2.0)
    d = DecodeLandmarksd()({"pred": pred, "image": data["image"], "landmarks": data["landmarks"]})
    assert d["pred_world"].shape == (2, 2, 2)
    np.testing.assert_allclose(d["pred_world"].numpy(), data["landmarks"].numpy(), atol=0.5 * 0.05)
    assert np.nanmax(d["errors_mm"]) < 0.05 * 0.5 + 1e-9

    engine = Engine(lambda e, b: b)
    LandmarkErrorMetric("mean").attach(engine, "mre")
    LandmarkErrorMetric("sdr", radius=2.0).attach(engine, "sdr2")
    LandmarkErrorMetric("outliers", radius=10.0).attach(engine, "out10")
    rows = [{"errors_mm": np.array([[1.0, 2.0, 3.0]])}, {"errors_mm": np.array([[4.0, np.nan, 11.0]])}]
    engine.run(rows, max_epochs=1)
    assert engine.state.metrics["mre"] == pytest.approx(4.2)
    assert engine.state.metrics["sdr2"] == pytest.approx(40.0)
    assert engine.state.metrics["out10"] == 1


def test_evaluator_runs_under_bf16():
    net = HeatmapUNet(spatial_dims=2, in_channels=1, num_landmarks=2, filters=4, num_levels=2)
    ev = LandmarkEvaluator(device=torch.device("cpu"), val_data_loader=batches(2), network=net,
                           prepare_batch=LandmarkPrepareBatch(), postprocessing=DecodeLandmarksd(),
                           key_val_metric={"val_mre": LandmarkErrorMetric("mean")}, amp=True, decollate=False)
    ev.run()
    assert np.isfinite(ev.state.metrics["val_mre"])


def test_training_checkpoint_is_atomic_resumes_and_refuses_pickles(tmp_path, monkeypatch):
    trainer, net = make_trainer()
    handler = TrainingCheckpoint(tmp_path, {"network": net, "optimizer": trainer.optimizer})
    handler.attach(trainer)
    trainer.run()
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.endswith("_4.pt")
    before = open(path, "rb").read()

    # a crash while writing the next checkpoint leaves the previous one intact and no debris
    def broken_save(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    trainer2, net2 = make_trainer(max_epochs=2)
    h2 = TrainingCheckpoint(tmp_path, {"network": net2, "optimizer": trainer2.optimizer}, resume=True)
    h2.attach(trainer2)
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SystemExit) as stop:  # reported in one line (see the tests below)
        trainer2.run()
    monkeypatch.undo()
    assert stop.value.code == 1
    assert h2.loaded_from == path
    assert open(path, "rb").read() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]

    # resuming restores the counters (and weights): 4 more iterations to reach epoch 2
    trainer3, net3 = make_trainer(max_epochs=2)
    h3 = TrainingCheckpoint(tmp_path, {"network": net3, "optimizer": trainer3.optimizer}, resume=True)
    h3.attach(trainer3)
    iterations = []
    trainer3.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
    trainer3.run()
    assert h3.loaded_from == path and iterations == [5, 6, 7, 8] and trainer3.state.epoch == 2

    # a checkpoint carrying an arbitrary pickled object is refused: the previous one is used, and
    # with no other checkpoint the run stops
    evil = tmp_path / "checkpoint_evil_99.pt"
    torch.save({"network": net.state_dict(), "payload": Payload()}, evil)
    trainer4, net4 = make_trainer(max_epochs=3)
    h4 = TrainingCheckpoint(tmp_path, {"network": net4}, resume=True)
    h4.attach(trainer4)
    trainer4.run()
    assert h4.loaded_from == str(tmp_path / "checkpoint_checkpoint_8.pt") and trainer4.state.iteration == 12
    alone = tmp_path / "alone"
    alone.mkdir()
    evil.rename(alone / evil.name)
    engine = Engine(lambda e, b: None)
    TrainingCheckpoint(alone, {"network": net4}, resume=True).attach(engine)
    with pytest.raises(RuntimeError, match=r"cannot resume.*Payload"):
        engine.run([0], max_epochs=3)


def test_early_stopping_after_patience_validations():
    from heatmark.training import EarlyStopping

    validator = Engine(lambda e, b: None)
    validator.state.best_metric_epoch = 2
    trainer = Engine(lambda e, b: None)
    EarlyStopping(validator, patience=3).attach(trainer)
    trainer.run([0], max_epochs=10)
    assert trainer.state.epoch == 5  # epochs 3, 4, 5 without improvement
    trainer2 = Engine(lambda e, b: None)
    EarlyStopping(validator, patience=0).attach(trainer2)
    trainer2.run([0], max_epochs=6)
    assert trainer2.state.epoch == 6


def test_time_limit_terminates_training(monkeypatch):
    import time as _time

    from heatmark.training import TimeLimit

    clock = iter(range(0, 10_000, 30))  # every call advances 30 s
    monkeypatch.setattr(_time, "monotonic", lambda: float(next(clock)))
    trainer = Engine(lambda e, b: None)
    TimeLimit(minutes=2).attach(trainer)
    trainer.run(range(100), max_epochs=5)
    assert trainer.state.iteration == 4  # 30 s per iteration, 120 s limit


def test_time_cosine_lr_anneals_over_the_budget(monkeypatch):
    import math
    import time as _time

    from heatmark.training import TimeCosineLR, TimeLimit

    clock = iter(range(0, 10_000, 15))  # every call advances 15 s
    monkeypatch.setattr(_time, "monotonic", lambda: float(next(clock)))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    seen = []
    trainer = Engine(lambda e, b: seen.append(opt.param_groups[0]["lr"]))
    TimeCosineLR(opt, minutes=1, eta_min=1e-5).attach(trainer)
    trainer.run(range(6), max_epochs=1)
    # clock: 0 at STARTED, then 15, 30, ... s before iterations 1..6; capped at the 60 s budget
    expected = [1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / 60))) for t in (15, 30, 45, 60, 75, 90)]
    assert seen == pytest.approx(expected)
    assert seen[-1] == pytest.approx(1e-5) and opt.param_groups[0]["initial_lr"] == 1e-3
    # disabled: the rate is left alone, and TimeLimit(0) does not stop anything either
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    t2 = Engine(lambda e, b: None)
    TimeCosineLR(opt2, minutes=0).attach(t2)
    TimeLimit(minutes=0).attach(t2)
    t2.run(range(3), max_epochs=2)
    assert opt2.param_groups[0]["lr"] == 1e-3 and t2.state.iteration == 6


# ------------------------------------------------------------------------------------------------
# reliability: full or read-only disks, unloadable checkpoints, debris of killed saves


def _quiet_stop_records(caplog) -> tuple[list, list]:
    """(error records, records carrying a traceback or ignite's 'terminating due to exception')."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    noisy = [r for r in caplog.records if r.exc_info or "terminating due to exception" in r.getMessage()]
    return errors, noisy


@pytest.mark.parametrize("n_saved,err", [(1, errno.ENOSPC), (2, errno.EROFS)])
def test_checkpoint_save_oserror_stops_in_one_line_and_keeps_the_previous(tmp_path, monkeypatch, caplog, n_saved, err):
    trainer, net = make_trainer(max_epochs=3)
    ckpt_dir = tmp_path / "ckpt"
    handler = TrainingCheckpoint(ckpt_dir, {"network": net, "optimizer": trainer.optimizer}, n_saved=n_saved)
    handler.attach(trainer)
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            open(f, "wb").write(b"partial")
            raise OSError(err, os.strerror(err))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        trainer.run()
    monkeypatch.undo()
    assert stop.value.code == 1
    errors, noisy = _quiet_stop_records(caplog)
    assert not noisy, [r.getMessage() for r in noisy]
    (line,) = [r.getMessage() for r in errors]
    first = latest_checkpoint(ckpt_dir)
    assert first is not None and first.endswith("_4.pt")
    for part in ("epoch 2", str(ckpt_dir), os.strerror(err), errno.errorcode[err], "intact", first, "--resume"):
        assert part in line, (part, line)
    assert "\n" not in line
    assert torch.load(first, weights_only=True)["trainer"]["iteration"] == 4  # the first checkpoint still loads
    assert [p.name for p in ckpt_dir.iterdir() if p.name.startswith(TMP_PREFIX)] == []


def test_best_model_save_oserror_keeps_the_previous_model(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def metric(e):
        e.state.metrics["val_mre"] = 10.0 / e.state.epoch  # better every epoch

    saver = AtomicCheckpointSaver(save_dir=str(tmp_path / "models"), save_dict={"model": net}, save_key_metric=True,
                                  key_metric_name="val_mre", key_metric_filename="model.pt",
                                  key_metric_negative_sign=True)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    model = tmp_path / "models" / "model.pt"
    before = model.read_bytes()

    def full(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*ENOSPC.*intact"):
        engine.run([0], max_epochs=2)
    monkeypatch.undo()
    assert model.read_bytes() == before, "the previous best model is never removed before the new one is written"
    assert [p.name for p in model.parent.iterdir()] == ["model.pt"]


def _two_checkpoints(tmp_path):
    trainer, net = make_trainer(max_epochs=2)
    TrainingCheckpoint(tmp_path, {"network": net, "optimizer": trainer.optimizer}).attach(trainer)
    trainer.run()
    files = sorted((p for p in tmp_path.glob("checkpoint*.pt")), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    assert [p.name[-5:] for p in files] == ["_4.pt", "_8.pt"], "the last two checkpoints are kept by default"
    return files


def _spoil(path, how: str, net=None) -> str:
    """Make ``path`` unloadable; returns a word the warning must name."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "truncated or corrupt"
    if how == "empty":
        path.write_bytes(b"")
        return "truncated or corrupt"
    if how == "not a checkpoint":
        torch.save({"weights": torch.zeros(2)}, path)
        return "not a training checkpoint"
    if how == "pickle":
        torch.save({"network": net.state_dict(), "payload": Payload()}, path)
        return "Payload"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "empty", "not a checkpoint", "pickle"])
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, caplog, how):
    older, newest = _two_checkpoints(tmp_path)
    reason = _spoil(newest, how, torch.nn.Linear(1, 1))
    trainer, net = make_trainer(max_epochs=3)
    handler = TrainingCheckpoint(tmp_path, {"network": net, "optimizer": trainer.optimizer}, resume=True)
    handler.attach(trainer)
    iterations = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert handler.loaded_from == str(older)
    assert iterations == list(range(5, 13)) and trainer.state.epoch == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(newest) in warnings[0] and reason in warnings[0] and str(older) in warnings[0]
    assert "\n" not in warnings[0]
    errors, noisy = _quiet_stop_records(caplog)
    assert not errors and not noisy
    assert torch.load(latest_checkpoint(tmp_path), weights_only=True)["trainer"]["iteration"] == 12


def test_resume_with_no_loadable_checkpoint_stops_in_one_line(tmp_path, caplog):
    older, newest = _two_checkpoints(tmp_path)
    _spoil(newest, "truncated")
    _spoil(older, "not a checkpoint")
    trainer, net = make_trainer(max_epochs=3)
    TrainingCheckpoint(tmp_path, {"network": net, "optimizer": trainer.optimizer}, resume=True).attach(trainer)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        trainer.run()
    assert stop.value.code == 1
    errors, noisy = _quiet_stop_records(caplog)
    assert not noisy, [r.getMessage() for r in noisy]
    (line,) = [r.getMessage() for r in errors]
    assert "cannot resume" in line and newest.name in line and older.name in line and "\n" not in line
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert trainer.state.iteration == 0, "nothing was trained"

    # a plain ignite engine gets the same one-line error as an exception (a RuntimeError)
    engine = Engine(lambda e, b: None)
    TrainingCheckpoint(tmp_path, {"network": net}, resume=True).attach(engine)
    with pytest.raises(CheckpointError, match="cannot resume"):
        engine.run([0], max_epochs=3)


def test_checkpoint_beyond_max_epochs_stops_in_one_line(tmp_path, caplog):
    _two_checkpoints(tmp_path)
    trainer, net = make_trainer(max_epochs=1)
    TrainingCheckpoint(tmp_path, {"network": net, "optimizer": trainer.optimizer}, resume=True).attach(trainer)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        trainer.run()
    assert stop.value.code == 1
    errors, noisy = _quiet_stop_records(caplog)
    assert not noisy
    (line,) = [r.getMessage() for r in errors]
    assert "beyond max_epochs=1" in line


def _debris(folder: Path, outside: Path) -> dict[str, Path]:
    """Leftovers of killed saves in ``folder`` plus look-alikes that must survive."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {"tmp": folder / f"{TMP_PREFIX}abc123.pt", "tmp_json": folder / f"{TMP_PREFIX}x.json",
            "link": folder / f"{TMP_PREFIX}link.pt", "dir": folder / f"{TMP_PREFIX}dir",
            "nested": folder / "sub" / f"{TMP_PREFIX}deep.pt", "other": folder / "notes-heatmark-tmp-.txt"}
    made["tmp"].write_bytes(b"\0" * 100_000)
    made["tmp_json"].write_text("{")
    outside.write_bytes(b"precious")
    made["link"].symlink_to(outside)
    made["dir"].mkdir()
    (made["dir"] / "inside.pt").write_bytes(b"x")
    made["nested"].parent.mkdir()
    made["nested"].write_bytes(b"x")
    made["other"].write_text("keep")
    return made


def _check_debris_cleaned(made: dict[str, Path], outside: Path) -> None:
    assert not made["tmp"].exists() and not made["tmp_json"].exists(), "leftover temporary files removed"
    assert made["link"].is_symlink() and outside.read_bytes() == b"precious", "symlinks are never followed"
    assert (made["dir"] / "inside.pt").exists() and made["nested"].exists() and made["other"].exists()


@pytest.mark.parametrize("resume", [True, False])
def test_leftover_temporary_files_are_removed_when_training_starts(tmp_path, resume):
    first, net0 = make_trainer(max_epochs=2)
    TrainingCheckpoint(tmp_path / "ckpt", {"network": net0, "optimizer": first.optimizer}).attach(first)
    first.run()
    made = _debris(tmp_path / "ckpt", tmp_path / "outside.pt")
    trainer, net = make_trainer(max_epochs=3)
    seen = {}
    handler = TrainingCheckpoint(tmp_path / "ckpt", {"network": net, "optimizer": trainer.optimizer}, resume=resume)
    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.setdefault("left", made["tmp"].exists()))
    trainer.run()
    assert seen == {"left": False}, "removed at the start, before the first iteration"
    _check_debris_cleaned(made, tmp_path / "outside.pt")
    # a rank that does not save (distributed runs) leaves the folder alone
    made = _debris(tmp_path / "ckpt2", tmp_path / "outside2.pt")
    trainer2, net2 = make_trainer(max_epochs=1)
    TrainingCheckpoint(tmp_path / "ckpt2", {"network": net2}, save=False).attach(trainer2)
    trainer2.run()
    assert made["tmp"].exists()


def test_leftover_temporary_files_of_the_best_model_are_removed(tmp_path):
    made = _debris(tmp_path / "models", tmp_path / "outside.pt")
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(save_dir=str(tmp_path / "models"), save_dict={"model": torch.nn.Linear(1, 1)},
                          save_key_metric=True, key_metric_name="m", key_metric_filename="model.pt").attach(engine)
    _check_debris_cleaned(made, tmp_path / "outside.pt")


def test_best_model_save_oserror_during_training_stops_in_one_line(tmp_path, monkeypatch, caplog):
    from monai.handlers import ValidationHandler

    trainer, net = make_trainer(max_epochs=2)
    models = tmp_path / "models"
    evaluator = LandmarkEvaluator(
        device=torch.device("cpu"), val_data_loader=batches(1), network=net, prepare_batch=LandmarkPrepareBatch(),
        postprocessing=DecodeLandmarksd(), key_val_metric={"val_mre": LandmarkErrorMetric("mean")}, decollate=False,
        val_handlers=[AtomicCheckpointSaver(save_dir=str(models), save_dict={"model": net}, save_key_metric=True,
                                            key_metric_filename="model.pt", key_metric_negative_sign=True)])
    TrainingCheckpoint(tmp_path / "ckpt", {"network": net}).attach(trainer)
    ValidationHandler(interval=1, validator=evaluator, epoch_level=True).attach(trainer)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if Path(f).parent == models:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        trainer.run()
    assert stop.value.code == 1
    errors, noisy = _quiet_stop_records(caplog)
    assert not noisy, [r.getMessage() for r in noisy]
    (line,) = [r.getMessage() for r in errors]
    assert str(models / "model.pt") in line and "No space left on device" in line
    assert "the last complete checkpoint is" in line and line.endswith("_4.pt; rerun with --resume True to continue")
