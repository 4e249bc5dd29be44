"""The demo's pieces end to end with the smoke overlay: data folder, bounded training with MLflow,
evaluation, held-out NIfTI volumes, heatmark predict, comparison table."""

from __future__ import annotations

import json

import numpy as np

from heatmark.demo import run_demo
from heatmark.landmarks import read_landmark_table, read_landmarks


def test_demo_smoke(afids_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_demo(minutes=2, output=out, data=str(afids_dir), num_cases=2, overlay="smoke.yaml",
                    cascade=("cascade.yaml", "smoke_cascade.yaml")) == 0
    printed = capsys.readouterr().out
    for text in ("1/5 data", "2/5 train", "3/5 evaluate", "4/5 predict", "5/5 compare", "MRE", "SDR",
                 "heatmark ui", ".mrk.json"):
        assert text in printed
    assert (out / "bundle" / "models" / "model.pt").is_file()
    assert (out / "bundle" / "models" / "model_fine.pt").is_file()  # the cascade's fine stage, used by predict
    assert "fine stage" in printed
    # both stages are tracked in MLflow: the fine stage's run is linked to the coarse one
    import mlflow  # lazy: only this test reads the MLflow store

    client = mlflow.MlflowClient(f"sqlite:///{out / 'bundle' / 'runs' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    fine_runs = [r for r in runs if r.data.params.get("cascade_stage") == "fine"]
    assert len(fine_runs) == 1 and "fine_val_mre" in fine_runs[0].data.metrics
    assert fine_runs[0].data.params["coarse_run_id"] in {r.info.run_id for r in runs if r is not fine_runs[0]}
    assert (out / "bundle" / "runs" / "mlruns.db").is_file()
    # the held-out volumes are real NIfTI files whose truth sits inside the volume
    truth = read_landmark_table(out / "heldout_volumes" / "truth.csv")
    assert sorted(truth) == ["heldout01", "heldout02"]
    pred = read_landmark_table(out / "predictions" / "landmarks.csv")
    assert sorted(pred) == sorted(truth)
    markup = read_landmarks(out / "predictions" / "heldout01.mrk.json")
    np.testing.assert_allclose(markup.coords, pred["heldout01"].coords, atol=1e-6)
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["n_valid"] == 2 * 32
    # the deformation really moved the anatomy: truth differs from the template's landmarks
    template = read_landmarks(next(afids_dir.glob("*.fcsv")))
    moved = np.linalg.norm(truth["heldout01"].coords - template.select(truth["heldout01"].names).coords, axis=1)
    assert moved.mean() > 1.0


def test_demo_2d_midsagittal_smoke(afids_dir, tmp_path, capsys):
    out = tmp_path / "demo2d"
    assert run_demo(minutes=1, output=out, data=str(afids_dir), num_cases=1, overlay="smoke.yaml", dims=2) == 0
    printed = capsys.readouterr().out
    assert "10 midline landmarks" in printed and "5/5 compare" in printed
    pred = read_landmark_table(out / "predictions" / "landmarks.csv")
    assert pred["heldout01"].coords.shape == (10, 2)
    # the 2D slice keeps the template's physical frame: AC sits at (y, z) of the 3D AC
    mid = read_landmark_table(out / "midsagittal_data" / "midline_afids.csv")["template"]
    ac3d = read_landmarks(next(afids_dir.glob("*.fcsv"))).select(["AC"]).coords[0]
    np.testing.assert_allclose(mid.select(["AC"]).coords[0], ac3d[1:], atol=1e-9)
