"""Interruptions: training stopped by Ctrl-C (SIGINT) and killed (SIGKILL) at a random moment, then
resumed; `heatmark predict` killed midway and rerun; non-finite steps in training.

Training runs the ISBI bundle's smoke overlay through `python -m monai.bundle run training` in a
subprocess on a copy of the bundle (skipped without ../shared/data/isbi2015); prediction uses a
tiny random-weight bundle on synthetic NIfTI images (no real data needed).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import ENV, REPO_ROOT, bundle_cmd, bundle_parser, require_shared_data, run
from heatmark.core.fileio import TMP_PREFIX
from heatmark.training import TrainingCheckpoint, latest_checkpoint
from heatmark.training.model_file import read_model_file
from test_predict import TINY_SCN, image, make_bundle, save_nifti

BUNDLE = REPO_ROOT / "bundles" / "isbi2015_cephalometric"
EPOCHS = 6
ITERS_PER_EPOCH = 4  # smoke overlay: 8 training cases, batch 2


def _start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, newer_than: int, timeout: float = 120) -> None:
    """Wait until a checkpoint of an iteration > ``newer_than`` exists."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "training ended before it could be interrupted"
        path = latest_checkpoint(ckpt_dir)
        if path is not None and int(re.findall(r"\d+", Path(path).stem)[-1]) > newer_than:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def _check_checkpoints(ckpt_dir: Path) -> int:
    """Every checkpoint file loads; temporary files are never taken for checkpoints. Returns the
    iteration of the newest checkpoint."""
    files = sorted(ckpt_dir.glob("checkpoint*.pt"))
    assert files, "at least one checkpoint"
    for f in files:
        state = torch.load(f, weights_only=True)
        assert set(state) >= {"network", "optimizer", "loss", "trainer"}, f
    # a write cut short leaves at most a temporary file, which latest_checkpoint ignores
    fake = ckpt_dir / f"{TMP_PREFIX}checkpoint_iteration=999999.pt"
    fake.write_bytes(b"half a checkpoint")
    try:
        newest = latest_checkpoint(ckpt_dir)
        assert newest is not None and TMP_PREFIX not in newest
    finally:
        fake.unlink()
    return int(torch.load(newest, weights_only=True)["trainer"]["iteration"])


def test_training_interrupted_then_killed_then_resumed(tmp_path):
    data = require_shared_data("isbi2015")
    bundle = tmp_path / "isbi2015_cephalometric"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    ckpt_dir = bundle / "runs" / "checkpoints"
    base = bundle_cmd(bundle, "training", ["smoke.yaml"], "--dataset_dir", str(data),
                      "--tracking", "mlflow", "--max_epochs", str(EPOCHS))
    rng = random.Random(20261122)

    # 1. Ctrl-C after the first checkpoint: clean stop, status 130, a message naming the checkpoint
    proc = _start(base, tmp_path, tmp_path / "first.log")
    _wait_for_checkpoint(proc, ckpt_dir, 0)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    log = (tmp_path / "first.log").read_text()
    assert code == 130, log[-3000:]
    msg = re.search(r"training interrupted at epoch (\d+) iteration (\d+); the last complete checkpoint is (\S+); "
                    r"rerun with --resume True to continue", log)
    assert msg, log[-3000:]
    assert Path(msg.group(3)) == Path(latest_checkpoint(ckpt_dir))
    first_iter = _check_checkpoints(ckpt_dir)
    assert first_iter > 0 and first_iter % ITERS_PER_EPOCH == 0
    run_info = json.loads((ckpt_dir / "run.json").read_text())
    first_run = run_info["mlflow_run_id"]
    assert first_run and run_info["iteration"] == first_iter

    # 2. resumed, then SIGKILL at a random moment after its next checkpoint
    resume = base + ["--resume", "True"]  # MONAI's command line: True/False (the text 'true' is refused)
    proc = _start(resume, tmp_path, tmp_path / "second.log")
    _wait_for_checkpoint(proc, ckpt_dir, first_iter)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.kill()
    proc.wait(timeout=30)
    log = (tmp_path / "second.log").read_text()
    assert f"iteration {first_iter}" in re.search(r"resumed from .*", log).group(0)
    second_iter = _check_checkpoints(ckpt_dir)
    assert second_iter > first_iter
    resumed_run = json.loads((ckpt_dir / "run.json").read_text())["mlflow_run_id"]

    # 3. resumed to the end
    proc = run(resume, cwd=tmp_path, timeout=300)
    log = proc.stdout + proc.stderr
    resumed = re.search(r"resumed from (\S+) at epoch (\d+), iteration (\d+)", log)
    assert resumed and int(resumed.group(3)) == second_iter > 0
    final = torch.load(latest_checkpoint(ckpt_dir), weights_only=True)["trainer"]
    assert final["iteration"] == EPOCHS * ITERS_PER_EPOCH and final["epoch_length"] == ITERS_PER_EPOCH
    assert not list(ckpt_dir.glob(TMP_PREFIX + "*"))
    state, description = read_model_file(bundle / "models" / "model.pt")
    assert description is not None and description["landmark_names"][0] == "sella"
    net = bundle_parser(bundle, "training", ["smoke.yaml"]).get_parsed_content("network_def")
    net.load_state_dict(state)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, 64, 80))
    assert out.shape == (1, 19, 64, 80) and torch.isfinite(out).all()

    # MLflow: each resumed training continues the run recorded beside the checkpoint or starts a
    # new run linked to it (tags); the loss history goes on after the resume iteration
    client = mlflow.MlflowClient("sqlite:///" + str(bundle / "runs" / "mlruns.db"))
    exp = client.get_experiment_by_name("isbi2015_cephalometric")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    final_run = json.loads((ckpt_dir / "run.json").read_text())["mlflow_run_id"]
    for previous, current, at in ((first_run, resumed_run, first_iter), (resumed_run, final_run, second_iter)):
        tags = runs[current].data.tags
        assert tags.get("heatmark.resumed_from_run") == previous
        assert tags.get("heatmark.resumed_from_checkpoint", "").endswith(".pt")
        steps = [m.step for m in client.get_metric_history(current, "train_loss")]
        assert max(steps) >= at + 1
        if current != previous:  # a new run: its loss history starts after the resume iteration
            assert min(steps) == at + 1 and runs[current].data.params["resumed_at_iteration"] == str(at)
    assert runs[final_run].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(final_run, "train_loss")}
    assert {second_iter + 1, EPOCHS * ITERS_PER_EPOCH} <= steps


def _step(path: Path | str) -> int:
    return int(re.findall(r"\d+", Path(path).stem)[-1])


def test_resume_falls_back_from_a_truncated_checkpoint_cleans_debris_and_stops_in_one_line(tmp_path):
    """The newest checkpoint truncated: the resumed run says so in one warning and continues from the
    previous one, removing the temporary files of saves killed midway; no checkpoint loads: one line,
    exit status 1, no traceback."""
    data = require_shared_data("isbi2015")
    bundle = tmp_path / "isbi2015_cephalometric"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    ckpt_dir, models = bundle / "runs" / "checkpoints", bundle / "models"
    base = bundle_cmd(bundle, "training", ["smoke.yaml"], "--dataset_dir", str(data))
    run(base + ["--max_epochs", "2"], cwd=tmp_path)
    older, newest = sorted(ckpt_dir.glob("checkpoint*.pt"), key=_step)
    assert (_step(older), _step(newest)) == (ITERS_PER_EPOCH, 2 * ITERS_PER_EPOCH), "the last two are kept"
    whole = newest.read_bytes()
    newest.write_bytes(whole[: len(whole) // 2])
    # debris of saves killed midway (with a real model a partial multi-MB file per kill), beside
    # look-alikes that must stay: a symlink (never followed) and a file in a subfolder
    debris = [ckpt_dir / f"{TMP_PREFIX}k1lled.pt", ckpt_dir / f"{TMP_PREFIX}r2n.json", models / f"{TMP_PREFIX}b3st.pt"]
    for f in debris:
        f.write_bytes(b"\0" * 2_000_000)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"precious")
    link = models / f"{TMP_PREFIX}link.pt"
    link.symlink_to(outside)
    nested = ckpt_dir / "keep" / f"{TMP_PREFIX}nested.pt"
    nested.parent.mkdir()
    nested.write_bytes(b"x")

    proc = run(base + ["--max_epochs", "3", "--resume", "True"], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert log.count("Traceback") == 0, log[-3000:]
    warned = [line for line in log.splitlines() if newest.name in line and "WARNING" in line]
    assert len(warned) == 1, log[-3000:]
    assert "truncated or corrupt" in warned[0] and str(older) in warned[0]
    resumed = re.search(r"resumed from (\S+) at epoch (\d+), iteration (\d+)", log)
    assert resumed and Path(resumed.group(1)) == older and int(resumed.group(3)) == ITERS_PER_EPOCH, log[-3000:]
    assert not [f for f in debris if f.exists()], "temporary files of killed saves are removed"
    assert link.is_symlink() and outside.read_bytes() == b"precious" and nested.exists()
    assert _check_checkpoints(ckpt_dir) == 3 * ITERS_PER_EPOCH
    assert len(list(ckpt_dir.glob("checkpoint*.pt"))) == 2

    # no checkpoint loads: one clear line, exit status 1, no traceback
    for f in ckpt_dir.glob("checkpoint*.pt"):
        f.write_bytes(f.read_bytes()[:1000])
    proc = subprocess.run(base + ["--max_epochs", "4", "--resume", "True"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert log.count("Traceback") == 0, log[-3000:]
    errors = [line for line in log.splitlines() if "ERROR" in line or "cannot resume" in line]
    assert len(errors) == 1 and "cannot resume" in errors[0] and str(ckpt_dir) in errors[0], log[-3000:]


def _results(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.mrk.json") if not p.name.startswith(TMP_PREFIX))


def test_predict_killed_midway_resumes_to_identical_results(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", TINY_SCN)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(12):
        save_nifti(inputs / f"case{i:02d}.nii.gz", image((80 + 4 * i, 90), i), 2.5)
    cmd = [sys.executable, "-m", "heatmark.cli", "predict", str(bundle), str(inputs)]
    opts = ["--config", "tiny.yaml", "--batch-size", "1", "--num-workers", "0"]
    ref = tmp_path / "reference"
    run(cmd + [str(ref)] + opts, cwd=tmp_path)

    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + [str(out)] + opts, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rng = random.Random(7)
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None and len(_results(out)) < 2:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.kill()
    proc.wait(timeout=30)
    for f in _results(out):
        json.loads(f.read_text())  # complete files only (a write cut short leaves a temporary name)
    # a case counts as done once its state file is written (after its outputs)
    from heatmark.predict import STATE_DIR

    done = [p for p in (out / STATE_DIR / "cases").glob("*.json") if not p.name.startswith(TMP_PREFIX)]
    assert 0 < len(done) < 12, f"killed midway ({len(done)} cases done)"

    rerun = run(cmd + [str(out)] + opts, cwd=tmp_path)
    summary = re.search(r"(\d+) processed, (\d+) skipped", rerun.stdout + rerun.stderr)
    assert summary, rerun.stdout + rerun.stderr
    assert int(summary.group(2)) == len(done) and int(summary.group(1)) == 12 - len(done)
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert len(_results(out)) == 12
    for f in _results(out):
        json.loads(f.read_text())
    assert (out / "landmarks.csv").read_bytes() == (ref / "landmarks.csv").read_bytes()


# ------------------------------------------------------------------------------------------------
# non-finite steps


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):  # (B, 1, H, W) heatmaps
        return self.lin(x)


def _trainer(tmp_path, nan_iterations, tracking=True, epochs=3):
    from heatmark.training import LandmarkPrepareBatch, LandmarkTrainer
    from heatmark.training.tracking import MLflowExtrasHandler
    from monai.handlers import MLFlowHandler

    torch.manual_seed(0)
    net = _Net()
    calls = {"n": 0}

    def loss_fn(pred, target):
        calls["n"] += 1
        loss = ((pred - target.mean()) ** 2).mean()
        return loss * float("nan") if calls["n"] in nan_iterations else loss

    batches = [{"image": torch.randn(2, 1, 6, 6), "landmarks_voxel": torch.rand(2, 1, 2) * 5} for _ in range(4)]
    ckpt = TrainingCheckpoint(tmp_path / "ckpt", {"network": net}, n_saved=1)
    handlers = [ckpt, MLflowExtrasHandler(params={"lr": 0.1})]
    uri = "sqlite:///" + str(tmp_path / "mlruns.db")
    if tracking:
        handlers.append(MLFlowHandler(tracking_uri=uri, experiment_name="nonfinite", tag_name="train_loss",
                                      output_transform=lambda out: out[0]["loss"] if isinstance(out, list)
                                      else out["loss"], close_on_complete=True))
    trainer = LandmarkTrainer(device="cpu", max_epochs=epochs, train_data_loader=batches, network=net,
                              optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss_fn,
                              prepare_batch=LandmarkPrepareBatch(),
                              train_handlers=handlers, max_nonfinite=3)
    return trainer, net, ckpt, uri


def test_nonfinite_steps_are_logged_to_mlflow_and_never_checkpointed(tmp_path):
    trainer, net, ckpt, uri = _trainer(tmp_path, nan_iterations={2, 7})
    trainer.run()
    assert trainer.state.nonfinite_steps == 2
    assert all(torch.isfinite(p).all() for p in net.parameters()), "skipped steps leave the weights finite"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("nonfinite")
    (r,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(r.info.run_id, "nonfinite_steps")
    assert {(m.step, m.value) for m in history} >= {(1, 1.0), (2, 2.0), (3, 2.0)}, "logged per epoch"
    saved = torch.load(latest_checkpoint(tmp_path / "ckpt"), weights_only=True)
    assert saved["trainer"]["iteration"] == 12
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["mlflow_run_id"] == r.info.run_id


def test_nonfinite_weights_are_never_saved(tmp_path, caplog):
    from ignite.engine import Events

    trainer, net, ckpt, _ = _trainer(tmp_path, nan_iterations=set(), tracking=False)

    @trainer.on(Events.ITERATION_COMPLETED(once=3 * 4))
    def poison(engine):  # after the last step of epoch 3, before its checkpoint
        with torch.no_grad():
            net.lin.weight[0, 0, 1, 1] = float("nan")

    with caplog.at_level(logging.ERROR, logger="heatmark.training.engines"):
        trainer.run()
    good = latest_checkpoint(tmp_path / "ckpt")
    state = torch.load(good, weights_only=True)
    assert state["trainer"]["iteration"] == 8, "the epoch-2 checkpoint is kept"
    assert not torch.isfinite(net.lin.weight).all()
    assert all(torch.isfinite(v).all() for v in state["network"].values())
    assert "not saving a checkpoint at epoch 3" in caplog.text and "network.lin.weight" in caplog.text
    assert len(list((tmp_path / "ckpt").glob("checkpoint*.pt"))) == 1
