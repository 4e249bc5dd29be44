"""The best model logged as an MLflow model, and the run's name, tags and metrics: a tiny tracked
training of tests/bundles/synthetic_dots (through ``python -m monai.bundle run ... --tracking
mlflow``, with an overlay), then ``mlflow models predict`` against its SQLite store, compared with
:func:`heatmark.load_model` on the same images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import test_bundle_synthetic as synthetic
import torch
from conftest import ENV, bundle_cmd, run

import heatmark
from heatmark.predict import mlflow_model

TINY = "max_epochs: 2\nval_interval: 1\nbatch_size: 4\n"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_model")
    saved = dict(synthetic.SPLITS)
    synthetic.SPLITS.update({"train": 8, "val": 2, "eval": 2})
    try:
        data = synthetic.write_dots_dataset(root / "data")
    finally:
        synthetic.SPLITS.clear()
        synthetic.SPLITS.update(saved)
    bundle = root / "synthetic_dots"
    shutil.copytree(synthetic.BUNDLE, bundle)
    (bundle / "configs" / "tiny.yaml").write_text(TINY)
    work = root / "work"  # the working folder: nothing may appear in it
    work.mkdir()
    run(bundle_cmd(bundle, "training", ["tiny.yaml"], "--tracking", "mlflow", "--dataset_dir", str(data)), cwd=work,
        timeout=900)
    from mlflow import MlflowClient

    uri = f"sqlite:///{bundle / 'runs' / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("synthetic_dots")
    (train_run,) = client.search_runs([experiment.experiment_id])
    images = sorted((data / "images").glob("eval*.nii.gz"))
    return {"bundle": bundle, "data": data, "work": work, "uri": uri, "client": client, "run": train_run,
            "images": images}


def test_run_is_named_and_tagged(tracked):
    r, bundle = tracked["run"], tracked["bundle"]
    assert r.info.run_name == "synthetic_dots+tiny" and r.info.status == "FINISHED"
    tags = r.data.tags
    assert tags["heatmark.bundle.name"] == "synthetic dots" and tags["heatmark.bundle.version"] == "0.1.0"
    assert tags["heatmark.dataset_dir"] == str(tracked["data"])
    assert tags["heatmark.overlays"] == str(bundle / "configs" / "tiny.yaml")
    assert tags["heatmark.bundle.root"] == str(bundle)
    commit = tags.get("mlflow.source.git.commit")  # this checkout is a git repository
    assert commit is not None and len(commit) == 40 and commit == tags["heatmark.code.git.commit"]
    assert tags["heatmark.mlflow_model"] == f"runs:/{r.info.run_id}/model"


def test_outliers_logged_as_percentage_beside_the_count(tracked):
    client, run_id = tracked["client"], tracked["run"].info.run_id
    pct = {m.step: m.value for m in client.get_metric_history(run_id, "val_outliers_pct_10mm")}
    count = {m.step: m.value for m in client.get_metric_history(run_id, "val_outliers_10mm")}
    assert sorted(pct) == sorted(count) == [1, 2]
    n = 2 * 2  # 2 validation cases x 2 landmarks, all present in the truth
    for step in pct:
        assert pct[step] == pytest.approx(100.0 * count[step] / n)
        assert 0.0 <= pct[step] <= 100.0


def test_no_stray_store_in_the_working_folder(tracked):
    client, bundle = tracked["client"], tracked["bundle"]
    assert client.get_experiment("0").artifact_location == (bundle / "runs" / "mlruns" / "0").as_uri()
    assert list(tracked["work"].iterdir()) == []
    assert client.search_runs(["0"]) == []


def test_mlflow_models_predict_equals_load_model(tracked, tmp_path):
    run_id, images = tracked["run"].info.run_id, tracked["images"]
    pd.DataFrame({"image": [str(p) for p in images]}).to_csv(tmp_path / "input.csv", index=False)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m", f"runs:/{run_id}/model",
           "-i", "input.csv", "-t", "csv", "--env-manager", "local", "-o", "out.json"]
    env = {**ENV, "MLFLOW_TRACKING_URI": tracked["uri"]}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = pd.DataFrame(json.loads((tmp_path / "out.json").read_text())["predictions"])
    assert list(rows.columns) == ["case", "landmark", "name", "frame", "x_mm", "y_mm", "confidence"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.csv", "out.json"]  # no mlruns/ or mlflow.db

    model = heatmark.load_model(tracked["bundle"], device="cpu")
    expected = model.predict_many([str(p) for p in images])
    assert rows["case"].tolist() == ["eval00", "eval00", "eval01", "eval01"]
    assert rows["name"].tolist() == ["bright", "dim"] * 2 and rows["landmark"].tolist() == [1, 2] * 2
    assert set(rows["frame"]) == {"RAS"}
    coords = rows[["x_mm", "y_mm"]].to_numpy().reshape(2, 2, 2)
    np.testing.assert_allclose(coords, np.stack([e.coords for e in expected]), atol=1e-6)
    np.testing.assert_allclose(rows["confidence"].to_numpy().reshape(2, 2),
                               np.stack([e.confidence for e in expected]), rtol=1e-5)


def test_signature_and_input_errors(tracked, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    loaded = mlflow.pyfunc.load_model(f"runs:/{tracked['run'].info.run_id}/model", model_config={"device": "cpu"})
    sig = loaded.metadata.signature
    assert sig.inputs.input_names() == ["image"]
    assert sig.outputs.input_names() == ["case", "landmark", "name", "frame", "x_mm", "y_mm", "confidence"]
    assert loaded.metadata.metadata["heatmark_model"]["frame"] == "RAS"
    with pytest.raises(Exception, match="image"):
        loaded.predict(pd.DataFrame({"path": [str(tracked["images"][0])]}))
    with pytest.raises(Exception, match="missing.nii.gz"):
        loaded.predict(pd.DataFrame({"image": [str(tracked["data"] / "missing.nii.gz")]}))


def test_save_refuses_a_bare_state_dict(tracked, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    with pytest.raises(ValueError, match="bare.pt"):
        mlflow_model.save_mlflow_model(tmp_path / "m", tracked["bundle"], bare)
    with pytest.raises(ValueError, match="not found"):
        mlflow_model.save_mlflow_model(tmp_path / "m", tracked["bundle"], tmp_path / "absent.pt")
