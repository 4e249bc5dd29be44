"""Command line and datalist checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from heatmark import __version__
from heatmark.cli import main, parse_overrides, UsageError
from heatmark.data import DataCheckError, check_datalist, datalist_from_table, load_datalist, split_datalist
from heatmark.landmarks import read_landmark_table


def test_console_script_version_and_help():
    out = subprocess.run([sys.executable, "-m", "heatmark", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"heatmark {__version__}"
    out = subprocess.run([sys.executable, "-m", "heatmark", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "predict", "evaluate", "ui"):
        assert cmd in out.stdout


def test_parse_overrides():
    assert parse_overrides(["a=1", "b#c=[2, 3]", "name=text", "flag=true", "x="]) == {
        "a": 1, "b#c": [2, 3], "name": "text", "flag": True, "x": ""}
    with pytest.raises(UsageError):
        parse_overrides(["novalue"])


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    assert "not a bundle folder" in capsys.readouterr().err


def test_evaluate_inter_observer_on_isbi(isbi_dir, tmp_path, capsys):
    """The senior vs junior doctor difference on test1 through `heatmark evaluate`, checked against
    a direct computation from the two CSV files."""
    senior, junior = isbi_dir / "landmarks_senior.csv", isbi_dir / "landmarks_junior.csv"
    assert main(["evaluate", str(junior), str(senior), "--output", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    a, b = read_landmark_table(senior), read_landmark_table(junior)
    err = np.concatenate([np.linalg.norm(a[c].coords - b[c].coords, axis=1) for c in a])
    assert metrics["mean"] == pytest.approx(err.mean(), rel=1e-9)
    assert metrics["sdr_2mm"] == pytest.approx(100 * (err <= 2).mean(), rel=1e-9)
    assert metrics["n_valid"] == 300 * 19
    assert "MRE" in capsys.readouterr().out


def test_datalist_from_table_and_split(isbi_dir):
    dl = datalist_from_table(isbi_dir / "images", isbi_dir / "landmarks.csv", isbi_dir / "splits" / "train.txt")
    assert len(dl) == 150 and dl[0]["case"] == "001"
    assert np.asarray(dl[0]["landmarks"]).shape == (19, 2)
    train, val = split_datalist(dl, 0.1, seed=0)
    assert len(val) == 15 and len(train) == 135
    assert not {d["case"] for d in train} & {d["case"] for d in val}
    assert split_datalist(dl, 0.1, seed=0)[1] == val  # deterministic
    check_datalist(dl, num_landmarks=19, spatial_dims=2)


def test_check_datalist_reports_every_problem_at_once(tmp_path):
    good = tmp_path / "a.nii.gz"
    good.write_bytes(b"x" * 10)
    empty = tmp_path / "b.nii.gz"
    empty.write_bytes(b"")
    items = [
        {"case": "a", "image": str(good), "landmarks": [[1.0, 2.0], [3.0, 4.0]]},
        {"case": "b", "image": str(empty), "landmarks": [[1.0, 2.0], [3.0, 4.0]]},
        {"case": "c", "image": str(tmp_path / "missing.nii.gz"), "landmarks": [[1.0, 2.0]]},
        {"case": "d", "image": str(good), "landmarks": [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]},
        {"case": "e", "image": str(good), "landmarks": [[np.nan, np.nan], [np.nan, np.nan]]},
        {"case": "f", "image": str(good), "landmarks": str(tmp_path / "nolandmarks.csv")},
    ]
    with pytest.raises(DataCheckError) as e:
        check_datalist(items, num_landmarks=2, spatial_dims=2, source="training data")
    msg = str(e.value)
    assert len(e.value.problems) == 6
    for fragment in ("'b': image file is empty", "'c': image not found", "'c': 1 landmarks, expected 2",
                     "'d': 3D landmarks, expected 2D", "'e': all landmarks are missing", "'f': landmark file not found"):
        assert fragment in msg
    with pytest.raises(DataCheckError, match="no cases"):
        check_datalist([])


def test_load_decathlon_style_datalist(tmp_path):
    (tmp_path / "img").mkdir()
    doc = {"training": [{"image": "img/x.nii.gz", "landmarks": [[1, 2], None]}]}
    (tmp_path / "dl.json").write_text(json.dumps(doc))
    items = load_datalist(tmp_path / "dl.json")
    assert items[0]["image"] == str(tmp_path / "img" / "x.nii.gz") and items[0]["case"] == "x"
    assert np.isnan(items[0]["landmarks"][1]).all()
    with pytest.raises(DataCheckError, match="no 'validation' list"):
        load_datalist(tmp_path / "dl.json", key="validation")
