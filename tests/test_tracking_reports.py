"""Evaluation reports (plots, evaluation folder) and MLflow tracking extras."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from heatmark import reports, tracking
from heatmark.core.fileio import TMP_PREFIX
from heatmark.landmarks import Landmarks, read_landmark_table
from heatmark.evaluation.metrics import point_errors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert len(data) > 100 and data[:8] == PNG_MAGIC, path


def assert_no_temp_files(folder: Path) -> None:
    debris = [p.name for p in Path(folder).rglob(f"{TMP_PREFIX}*")]
    assert not debris, debris


# ----------------------------------------------------------------------------------------------
# reports


def test_plot_error_per_landmark_and_cumulative(tmp_path):
    errors = np.array([[1.0, np.nan, np.inf], [2.0, 3.0, 0.5], [np.nan, 4.0, np.inf]])
    names = ["Sella", "Nasion", "Orbitale"]
    paths = [
        reports.plot_error_per_landmark(errors, names, tmp_path / "box.png", title="t", radii=(2, 4)),
        # a landmark without any finite error (all missing / not detected) still plots
        reports.plot_error_per_landmark(np.array([[np.nan, np.inf]]), ["a", "b"], tmp_path / "empty.png"),
        reports.plot_cumulative_error(errors, tmp_path / "cdf.png", label="ours",
                                      others={"baseline": errors * 2, "tensor": torch.tensor([[1.0, 9.0]])}),
        reports.plot_cumulative_error(np.full((2, 2), np.nan), tmp_path / "cdf_empty.png"),
    ]
    for p in paths:
        assert_png(p)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.png", "cdf.png", "cdf_empty.png", "empty.png"]
    with pytest.raises(ValueError, match="names"):
        reports.plot_error_per_landmark(errors, ["a"], tmp_path / "bad.png")
    assert_no_temp_files(tmp_path)


def test_plot_overlay_2d(tmp_path):
    image = np.random.default_rng(0).random((1, 40, 30))  # (C, x, y)
    affine = np.diag([0.5, 0.25, 1.0])
    affine[:2, 2] = [10.0, -5.0]
    pred = np.array([[12.0, -3.0], [20.0, 0.0], [np.nan, np.nan]])
    truth = np.array([[12.5, -3.5], [np.nan, np.nan], [15.0, 0.0]])
    out = reports.plot_overlay(image, affine, pred, tmp_path / "overlay.png", truth_world=truth,
                               names=["a", "b", "c"], title="case 1")
    assert_png(out)
    # MONAI's 4x4 affine of a 2D image, no channel, no truth, points outside the image
    affine4 = np.eye(4)
    assert_png(reports.plot_overlay(torch.rand(40, 30), affine4, np.array([[-50.0, 500.0]]), tmp_path / "o.png"))
    with pytest.raises(ValueError, match="spatial dims"):
        reports.plot_overlay(np.zeros((2, 3, 4, 5)), affine, pred, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "overlay.png"]


def test_plot_overlay_3d(tmp_path):
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([1.0, -1.0, 2.5, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.rand(1, 20, 24, 12), affine=affine)
    pred = np.array([[3.0, -4.0, 5.0], [10.0, -12.0, 20.0], [np.nan] * 3])
    truth = pred + 1.5
    assert_png(reports.plot_overlay(image, image.affine, pred, tmp_path / "o3.png", truth_world=truth))
    # no landmark predicted: slices through the centre
    assert_png(reports.plot_overlay(image[0], affine, np.full((2, 3), np.nan), tmp_path / "none.png"))
    assert_no_temp_files(tmp_path)


def _tiny_case(dims: int = 2):
    """2 cases, 3 landmarks: errors [[1, NaN (truth missing), inf (not detected)], [2, 5, 0.5]]."""
    truth = np.zeros((2, 3, dims))
    pred = np.zeros((2, 3, dims))
    pred[0, 0, 0] = 1.0  # error 1
    truth[0, 1] = np.nan  # truth missing
    pred[0, 2] = np.nan  # not detected
    pred[1, 0, 1] = 2.0  # error 2
    pred[1, 1, :2] = [3.0, 4.0]  # error 5
    pred[1, 2, 0] = -0.5  # error 0.5
    truth += 10.0
    pred += 10.0
    return pred, truth


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_write_evaluation_values(tmp_path):
    pred, truth = _tiny_case(2)
    names, cases = ["A", "B", "C"], ["c1", "c2"]
    errors = point_errors(pred, truth)
    np.testing.assert_array_equal(errors, [[1.0, np.nan, np.inf], [2.0, 5.0, 0.5]])

    out = reports.write_evaluation(tmp_path / "eval", errors, cases, names, pred, truth)
    assert set(out) == set(reports.EVALUATION_FILES)
    for key, path in out.items():
        assert path == tmp_path / "eval" / reports.EVALUATION_FILES[key] and path.is_file()
    assert_png(out["plot_error_per_landmark"])
    assert_png(out["plot_cumulative_error"])
    assert_no_temp_files(tmp_path)

    m = json.loads(out["metrics"].read_text())
    finite = np.array([1.0, 2.0, 5.0, 0.5])
    assert (m["n_cases"], m["n_landmarks"], m["n_valid"], m["n_missing_truth"], m["n_not_detected"]) == (2, 3, 5, 1, 1)
    assert m["mean"] == pytest.approx(2.125)
    assert m["sd"] == pytest.approx(math.sqrt(((finite - 2.125) ** 2).mean()))
    assert m["median"] == pytest.approx(1.5) and m["max"] == 5.0
    # SDR denominator: the 5 landmarks present in the truth (not detected = miss)
    assert m["sdr_2mm"] == pytest.approx(60.0) and m["sdr_4mm"] == pytest.approx(60.0)
    assert m["outliers_4mm"] == 2 and m["outliers_10mm"] == 1 and m["outliers_pct_10mm"] == pytest.approx(20.0)
    assert "per_landmark" not in m
    assert m["conventions"]["sdr"].startswith(
        "share of landmarks with error <= r mm, denominator: landmarks present in the truth")
    assert m["radii"] == [2.0, 2.5, 3.0, 4.0]

    rows = _csv_rows(out["per_landmark"])
    assert [r["landmark"] for r in rows] == ["1", "2", "3"] and [r["name"] for r in rows] == names
    a, b, c = rows
    assert (a["n"], float(a["mean"]), float(a["sd"]), float(a["sdr_2mm"])) == ("2", 1.5, 0.5, 100.0)
    assert (b["n"], b["n_missing_truth"], float(b["mean"]), float(b["sdr_4mm"])) == ("1", "1", 5.0, 0.0)
    assert (c["n"], c["n_not_detected"], float(c["mean"]), float(c["sdr_2mm"])) == ("2", "1", 0.5, 50.0)
    assert c["outliers_10mm"] == "1"

    rows = _csv_rows(out["point_errors"])
    assert list(rows[0]) == ["case", "landmark", "name", "error_mm"]
    assert [(r["case"], r["landmark"], r["name"], r["error_mm"]) for r in rows] == [
        ("c1", "1", "A", "1.0"), ("c1", "2", "B", ""), ("c1", "3", "C", "inf"),
        ("c2", "1", "A", "2.0"), ("c2", "2", "B", "5.0"), ("c2", "3", "C", "0.5"),
    ]

    table = read_landmark_table(out["predictions"])
    assert list(table) == cases
    for i, case in enumerate(cases):
        assert table[case] == Landmarks(pred[i], names)
    assert out["predictions"].read_text().splitlines()[0] == "case,landmark,name,frame,x_mm,y_mm"


def test_write_evaluation_3d_confidence_and_computed_errors(tmp_path):
    pred, truth = _tiny_case(3)
    conf = np.array([[0.9, 0.8, 0.0], [0.7, 0.6, 0.5]])
    out = reports.write_evaluation(tmp_path, None, ["c1", "c2"], ["A", "B", "C"], torch.as_tensor(pred), truth,
                                   radii=(1.0,), outlier_radii=(), confidence=conf, plots=False)
    assert set(out) == {"metrics", "per_landmark", "point_errors", "predictions"}
    m = json.loads(out["metrics"].read_text())
    assert m["sdr_1mm"] == pytest.approx(40.0) and not any(k.startswith("outliers") for k in m)
    rows = _csv_rows(out["predictions"])
    assert list(rows[0]) == ["case", "landmark", "name", "frame", "x_mm", "y_mm", "z_mm", "confidence"]
    assert float(rows[4]["confidence"]) == 0.6
    table = read_landmark_table(out["predictions"])
    assert table["c2"] == Landmarks(pred[1], ["A", "B", "C"])
    with pytest.raises(ValueError, match="errors must have shape"):
        reports.write_evaluation(tmp_path, np.zeros((2, 2)), ["c1", "c2"], ["A", "B", "C"], pred, plots=False)


# ----------------------------------------------------------------------------------------------
# tracking URIs and the UI command


def test_tracking_uris(tmp_path):
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.absolute().as_posix()}/mlruns.db"
    assert tracking.default_tracking_uri(tmp_path / "x.db") == f"sqlite:///{tmp_path.as_posix()}/x.db"
    assert tracking.sqlite_path(tracking.default_tracking_uri(tmp_path / "a b")) == tmp_path / "a b" / "mlruns.db"
    assert tracking.default_tracking_uri("http://localhost:5000") == "http://localhost:5000"
    with pytest.raises(ValueError, match="file store"):
        tracking.default_tracking_uri(tmp_path.as_uri())
    old = tmp_path / "old"
    (old / "mlruns" / "0").mkdir(parents=True)
    (old / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    with pytest.raises(ValueError, match="file store"):
        tracking.default_tracking_uri(old)
    for bad in (str(tmp_path), tmp_path.as_uri()):
        with pytest.raises(ValueError, match="file store"):
            tracking.check_tracking_uri(bad)
    assert tracking.check_tracking_uri("sqlite:////x/mlruns.db") == "sqlite:////x/mlruns.db"


def test_ui_command_and_missing_store(tmp_path):
    import sys

    cmd = tracking.ui_command(tmp_path, host="0.0.0.0", port=5123)
    uri = tracking.default_tracking_uri(tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert cmd[cmd.index("--default-artifact-root") + 1] == (tmp_path / "mlruns").as_uri()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "5123"
    assert tracking.ui_command(uri) == tracking.ui_command(tmp_path)
    with pytest.raises(FileNotFoundError, match="no MLflow runs found at .*heatmark train"):
        tracking.run_ui(tmp_path)  # nothing started: the store does not exist


def test_flatten_params():
    flat = tracking.flatten_params({
        "network": torch.nn.Conv2d(1, 1, 1), "sigma": 2.0, "spacing": (0.1, 0.1), "lr": 1e-3,
        "augmentation": [{"_target_": "RandFlipd", "prob": 0.5}], "optimizer": {"cls": torch.optim.Adam},
        "dtype": torch.float32, "weird key#1": None, "path": Path("/a/b"),
    })
    assert flat == {
        "network": "Conv2d", "sigma": "2.0", "spacing": "[0.1, 0.1]", "lr": "0.001",
        "augmentation.0._target_": "RandFlipd", "augmentation.0.prob": "0.5",
        "optimizer.cls": "torch.optim.adam.Adam", "dtype": "torch.float32", "weird key_1": "None", "path": "/a/b",
    }


# ----------------------------------------------------------------------------------------------
# the ignite handler with MONAI's MLFlowHandler


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); tests use own experiments."""
    return tracking.default_tracking_uri(tmp_path_factory.mktemp("tracking"))


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _training(tmp_path, store, experiment, order, evaluator_handler):
    from ignite.engine import Engine, Events
    from monai.handlers import MLFlowHandler

    (tmp_path / "best.pt").write_bytes(b"weights")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "cdf.png").write_bytes(PNG_MAGIC)

    trainer = Engine(lambda e, b: {"loss": 0.5})
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metrics(engine):
        epoch = trainer.state.epoch
        engine.state.metrics = {"val_mre": 2.0 / epoch, "per_landmark": {"mre_A": 1.0 * epoch}}
        if not evaluator_handler:  # an array MONAI's handler could not log
            engine.state.metrics["mre_per_landmark"] = torch.tensor([1.0, 3.0]) * epoch

    extras = tracking.MLflowExtrasHandler(
        params={"network": "UNet", "sigma": 2.0, "optimizer": {"lr": 1e-3}, "spacing": [0.1, 0.1]},
        artifacts=[tmp_path / "best.pt", tmp_path / "plots", tmp_path / "absent.csv"],
        evaluator=evaluator, names=["A", "B"])
    mlflow_handler = MLFlowHandler(tracking_uri=store, experiment_name=experiment, output_transform=lambda o: o["loss"],
                                   close_on_complete=True)
    if order == "before":
        extras.attach(trainer)
        mlflow_handler.attach(trainer)
    else:
        mlflow_handler.attach(trainer)
        extras.attach(trainer)
    if evaluator_handler:
        MLFlowHandler(tracking_uri=store, experiment_name=experiment, iteration_log=False,
                      global_epoch_transform=lambda e: trainer.state.epoch).attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0, 1]))
    assert tracking.find_mlflow_handler(trainer) is mlflow_handler
    trainer.run([0, 1, 2], max_epochs=2)
    return mlflow_handler


@pytest.mark.parametrize("order,evaluator_handler", [("before", False), ("after", True)])
def test_extras_handler_logs_into_monai_run(tmp_path, store, order, evaluator_handler):
    import mlflow

    experiment = f"extras_{order}"
    handler = _training(tmp_path, store, experiment, order, evaluator_handler)
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and handler.cur_run is None  # closed on COMPLETED
    params = run.data.params
    assert {k: params[k] for k in ("network", "sigma", "optimizer.lr", "spacing")} == {
        "network": "UNet", "sigma": "2.0", "optimizer.lr": "0.001", "spacing": "[0.1, 0.1]"}
    assert params["max_epochs"] == "2"  # MONAI's own params untouched

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.pt", "plots"} <= top and "absent.csv" not in top
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/cdf.png"]

    assert len(_history(client, run.info.run_id, "Loss")) == 6  # MONAI's per-iteration loss
    # validation metrics once per trainer epoch, by MONAI's handler or by ours, never both
    assert _history(client, run.info.run_id, "val_mre") == [(1, 2.0), (2, 1.0)]
    assert _history(client, run.info.run_id, "mre_A") == [(1, 1.0), (2, 2.0)]
    if evaluator_handler:
        assert "mre_per_landmark_A" not in run.data.metrics
    else:
        assert _history(client, run.info.run_id, "mre_per_landmark_A") == [(1, 1.0), (2, 2.0)]
        assert _history(client, run.info.run_id, "mre_per_landmark_B") == [(1, 3.0), (2, 6.0)]


def test_extras_handler_without_tracking(tmp_path, monkeypatch):
    from ignite.engine import Engine, Events

    trainer, evaluator = Engine(lambda e, b: {"loss": 0.5}), Engine(lambda e, b: None)
    (tmp_path / "best.pt").write_bytes(b"w")
    extras = tracking.MLflowExtrasHandler(params={"sigma": 2}, artifacts=[tmp_path / "best.pt"], evaluator=evaluator)
    extras.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    assert tracking.find_mlflow_handler(trainer) is None
    trainer.run([0, 1], max_epochs=2)  # no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no store, no run

    # ranks > 0 of a process group do not even attach
    monkeypatch.setattr(tracking, "_is_not_rank0", lambda: True)
    other = Engine(lambda e, b: None)
    tracking.MLflowExtrasHandler(params={"sigma": 2}).attach(other)
    assert not any(other._event_handlers.values())


def test_log_evaluation_artifacts(tmp_path, store):
    import mlflow

    pred, truth = _tiny_case(2)
    files = reports.write_evaluation(tmp_path / "eval", None, ["c1", "c2"], ["A", "B", "C"], pred, truth,
                                     plots=False)
    summary = json.loads(files["metrics"].read_text())
    run_id = tracking.log_evaluation_artifacts(store, None, "evaluation_test", files, metrics=summary)
    client = mlflow.MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("evaluate_")
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} == {
        f"evaluation/{p.name}" for p in files.values()}
    assert run.data.metrics["sdr_2mm"] == pytest.approx(60.0) and run.data.metrics["n_not_detected"] == 1
    assert not any(k.startswith("conventions") for k in run.data.metrics)

    # into an existing run, folders recursively
    again = tracking.log_evaluation_artifacts(store, run_id, "ignored", {"folder": tmp_path / "eval"},
                                              artifact_path=None)
    assert again == run_id
    assert "eval/point_errors.csv" in {a.path for a in client.list_artifacts(run_id, "eval")}
    with pytest.raises(FileNotFoundError, match="absent"):
        tracking.log_evaluation_artifacts(store, run_id, "x", {"absent": tmp_path / "absent.csv"})
