"""Engine pieces on synthetic data: bf16 autocast on CPU, non-finite step handling, decoding
postprocessing, error metrics, atomic checkpoints and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from heatmark.evaluation import DecodeLandmarksd, LandmarkErrorMetric
from heatmark.training import (
    LandmarkEvaluator,
    LandmarkPrepareBatch,
    LandmarkTrainer,
    NonFiniteError,
    TrainingCheckpoint,
    autocast_context,
    latest_checkpoint,
)
from heatmark.core.fileio import TMP_PREFIX
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


def make_trainer(loss=None, max_epochs: int = 1, **kwargs) -> tuple[LandmarkTrainer, torch.nn.Module]:
    torch.manual_seed(0)
    net = HeatmapUNet(spatial_dims=2, in_channels=1, num_landmarks=2, filters=4, num_levels=2)
    loss = loss or HeatmapLoss(2, sigma=2.0, gamma=10.0)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss.parameters()), lr=1e-3)
    trainer = LandmarkTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=batches(), network=net,
                              optimizer=opt, loss_function=loss, prepare_batch=LandmarkPrepareBatch(),
                              decollate=False, **kwargs)
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
    with pytest.raises(OSError, match="disk full"):
        trainer2.run()
    monkeypatch.undo()
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

    # a checkpoint carrying an arbitrary pickled object is refused
    evil = tmp_path / "checkpoint_evil_99.pt"
    torch.save({"network": net.state_dict(), "payload": Payload()}, evil)
    trainer4, net4 = make_trainer(max_epochs=3)
    h4 = TrainingCheckpoint(tmp_path, {"network": net4}, resume=True)
    h4.attach(trainer4)
    with pytest.raises(RuntimeError, match="cannot resume"):
        trainer4.run()


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
