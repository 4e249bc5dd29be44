"""End to end on the ISBI 2015 bundle with its smoke overlay: MONAI bundle training with MLflow
tracking, evaluation, the MLflow store's contents, resuming, and 2-process DDP on CPU (gloo).

Runs the real command lines in subprocesses on a copy of the bundle (so models/ and runs/ land in
a temporary folder). Skipped when ../shared/data/isbi2015 is absent.
"""

from __future__ import annotations

import json
import shutil
import sys

import mlflow
import pytest
import torch
from conftest import REPO_ROOT, bundle_cmd, require_shared_data, run
from heatmark.training import latest_checkpoint

BUNDLE = REPO_ROOT / "bundles" / "isbi2015_cephalometric"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = require_shared_data("isbi2015")
    work = tmp_path_factory.mktemp("isbi_bundle")
    bundle = work / "isbi2015_cephalometric"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    train = run(bundle_cmd(bundle, "training", ["smoke.yaml"], "--dataset_dir", str(data),
                           "--tracking", "mlflow"), cwd=work)
    evaluate = run(bundle_cmd(bundle, "evaluating", ["smoke.yaml"],
                              "--dataset_dir", str(data), "--tracking", "mlflow"), cwd=work)
    return {"data": data, "work": work, "bundle": bundle, "train_log": train.stdout + train.stderr,
            "eval_log": evaluate.stdout + evaluate.stderr}


def test_training_writes_model_checkpoint_and_validation_report(trained):
    bundle = trained["bundle"]
    model = bundle / "models" / "model.pt"
    assert model.is_file()
    state = torch.load(model, weights_only=True)
    assert state["format"] == "heatmark-model" and state["description"]["spacing_mm"] == 3.0, "self-describing"
    state = state["state_dict"]
    assert any(k.endswith(".weight") for k in state), "models/model.pt holds the network's state_dict"
    ckpts = list((bundle / "runs" / "checkpoints").glob("checkpoint*.pt"))
    assert len(ckpts) == 2  # the newest two: resume falls back to the older if the newest is damaged
    ckpt = torch.load(latest_checkpoint(bundle / "runs" / "checkpoints"), weights_only=True)
    assert set(ckpt) >= {"network", "optimizer", "lr_scheduler", "loss", "trainer"}
    # ignite keeps the iteration count and the epoch length (epoch = iteration // epoch_length)
    assert ckpt["trainer"]["iteration"] == 8 and ckpt["trainer"]["epoch_length"] == 4
    assert "sigma" in ckpt["loss"], "the learned sigma is part of the checkpoint"
    assert not list((bundle / "runs" / "checkpoints").glob(".heatmark-tmp-*")), "no temporary files left"
    metrics = json.loads((bundle / "runs" / "validation" / "metrics.json").read_text())
    assert metrics["n_valid"] == 2 * 19
    assert "peak:" in trained["train_log"], "the mean predicted peak is logged every iteration"


def test_evaluation_files(trained):
    ev = trained["bundle"] / "runs" / "eval"
    names = {p.name for p in ev.iterdir()}
    assert {"metrics.json", "per_landmark.csv", "point_errors.csv", "predictions.csv", "error_per_landmark.png",
            "cumulative_error.png"} <= names
    assert sum(n.startswith("overlay_") for n in names) == 3
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_cases"] == 4 and metrics["n_valid"] == 4 * 19
    assert 0.0 < metrics["mean"] < 300.0
    from heatmark.landmarks import read_landmark_table

    preds = read_landmark_table(ev / "predictions.csv")
    assert sorted(preds) == ["151", "152", "153", "154"]
    assert all(lm.coords.shape == (19, 2) for lm in preds.values())


def test_mlflow_store_holds_runs_metrics_params_and_artifacts(trained):
    uri = "sqlite:///" + str(trained["bundle"] / "runs" / "mlruns.db")
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("isbi2015_cephalometric")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2, "one training run and one evaluation run"
    train_run, eval_run = runs
    assert {"train_loss", "val_mre", "val_sdr_2mm", "val_outliers_10mm"} <= set(train_run.data.metrics)
    assert len(client.get_metric_history(train_run.info.run_id, "train_loss")) == 8, "per-iteration loss"
    assert len(client.get_metric_history(train_run.info.run_id, "val_mre")) == 2, "per-epoch validation"
    params = train_run.data.params
    assert params["network"] == "SpatialConfigurationNet" and params["spacing_mm"] == "3.0"
    assert "RandAffined" in params["augmentation"]
    top = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert "model.pt" in top and "validation" in top
    assert any(p.endswith(".json") for p in top), "the resolved config"
    assert {"val_mre"} <= set(eval_run.data.metrics)
    ev = {a.path for a in client.list_artifacts(eval_run.info.run_id, "eval")}
    assert "eval/metrics.json" in ev and "eval/predictions.csv" in ev


def test_resume_continues_epoch_and_iteration_counts(trained):
    bundle, data = trained["bundle"], trained["data"]
    proc = run(bundle_cmd(bundle, "training", ["smoke.yaml"], "--dataset_dir", str(data),
                          "--resume", "True", "--max_epochs", "3"), cwd=trained["work"])
    log = proc.stdout + proc.stderr
    assert "resumed from" in log and "epoch 2, iteration 8" in log
    ckpts = list((bundle / "runs" / "checkpoints").glob("checkpoint*.pt"))
    assert len(ckpts) == 2  # the newest two are kept
    state = torch.load(latest_checkpoint(bundle / "runs" / "checkpoints"), weights_only=True)["trainer"]
    assert state["iteration"] == 12 and state["max_epochs"] == 3


def test_two_process_ddp_with_gloo(tmp_path):
    data = require_shared_data("isbi2015")
    bundle = tmp_path / "isbi2015_cephalometric"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    cmd = bundle_cmd(bundle, "multi_gpu", ["smoke.yaml"], "--dataset_dir", str(data))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run(torchrun + cmd[1:], cwd=tmp_path, timeout=300)
    log = proc.stdout + proc.stderr
    ckpts = list((bundle / "runs" / "checkpoints").glob("checkpoint*.pt"))
    assert len(ckpts) == 2, "the newest two checkpoints, written by rank 0"
    trainer = torch.load(latest_checkpoint(bundle / "runs" / "checkpoints"), weights_only=True)["trainer"]
    # 8 training cases over 2 ranks with batch 2: 2 iterations per epoch and rank
    assert trainer["iteration"] == 4 and trainer["epoch_length"] == 2
    # validation errors gathered from both ranks: 2 cases x 19 landmarks
    assert "val_outliers_10mm: " in log
    assert (bundle / "models" / "model.pt").is_file()


@pytest.mark.parametrize("name", ["unet", "downsampling", "convonly", "scn2016"])
def test_every_heatmap_network_trains_in_the_bundle(name, tmp_path):
    """`network_def` overridden by registry name: one smoke epoch trains, validates and saves."""
    data = require_shared_data("isbi2015")
    bundle = tmp_path / "isbi2015_cephalometric"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    net = repr({"_target_": "heatmark.networks.get_network", "name": name, "spatial_dims": "@spatial_dims",
                "in_channels": 1, "num_landmarks": "@num_landmarks", "filters": 4})
    proc = run(bundle_cmd(bundle, "training", ["smoke.yaml"], "--dataset_dir", str(data),
                          "--max_epochs", "1", "--network_def", net), cwd=tmp_path)
    assert "val_mre" in proc.stdout + proc.stderr
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state, "best model saved"


def test_cpu_overlay_anneals_the_rate_over_the_time_budget(tmp_path):
    """cpu.yaml (bench/isbi2015.py's settings): TimeCosineLR in place of the
    epoch scheduler; the rate in the checkpoint has started down the cosine from its initial value."""
    data = require_shared_data("isbi2015")
    bundle = tmp_path / "isbi2015_cephalometric"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    proc = run(bundle_cmd(bundle, "training", ["cpu.yaml", "smoke.yaml"], "--dataset_dir", str(data),
                          "--time_limit_minutes", "3"), cwd=tmp_path)
    assert "val_mre" in proc.stdout + proc.stderr
    ckpt = torch.load(latest_checkpoint(bundle / "runs" / "checkpoints"), weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(1e-3)  # smoke.yaml's rate, the last overlay
    assert 0.5e-3 < group["lr"] < group["initial_lr"]
    # smoke's 2 epochs of 4 iterations end long before the 3-minute limit
    assert ckpt["trainer"]["iteration"] == 8 and ckpt["trainer"]["epoch_length"] == 4
