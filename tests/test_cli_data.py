"""Command line and datalist checks."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

from heatmark import __version__
from heatmark.bundle import CONFIG_DIR, bundle_config_files
from heatmark.cli import main, parse_overrides, UsageError
from heatmark.data import DataCheckError, check_datalist, datalist_from_table, load_datalist, split_datalist
from heatmark.landmarks import read_landmark_table


def test_console_script_version_and_help():
    out = subprocess.run([sys.executable, "-m", "heatmark", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"heatmark {__version__}"
    out = subprocess.run([sys.executable, "-m", "heatmark", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "predict", "evaluate", "ui", "configs"):
        assert cmd in out.stdout


def test_help_lines_match_the_commands_own():
    """`heatmark --help` lists the commands defined beside their code without importing them; the
    one-line help it shows is the one each command registers itself."""
    import argparse

    from heatmark.cli import COMMANDS, build_parser

    for name, (_, _, text) in COMMANDS.items():
        sub = next(a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
        own = {c.dest: c.help for c in sub._choices_actions}
        assert own[name] == text, name
    code = "import sys, heatmark.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_parse_overrides():
    assert parse_overrides(["a=1", "b#c=[2, 3]", "name=text", "flag=true", "x="]) == {
        "a": 1, "b#c": [2, 3], "name": "text", "flag": True, "x": ""}
    with pytest.raises(UsageError):
        parse_overrides(["novalue"])


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    assert "not a heatmark bundle folder" in capsys.readouterr().err


def test_configs_prints_what_monai_reads(tmp_path, capsys):
    """`heatmark configs` is the documented way to get --config_file: the shipped base first, then
    the bundle's train.yaml, the workflow's shipped overlay and the user's overlays, in that order."""
    bundle = REPO_ROOT / "bundles" / "afids_brain_mr"
    assert main(["configs"]) == 0
    assert Path(capsys.readouterr().out.strip()) == CONFIG_DIR
    assert main(["configs", str(bundle), "evaluating", "cpu.yaml"]) == 0
    files = ast.literal_eval(capsys.readouterr().out.strip())
    assert [Path(f) for f in files] == [CONFIG_DIR / "base.yaml", bundle / "configs" / "train.yaml",
                                        CONFIG_DIR / "evaluate.yaml", bundle / "configs" / "cpu.yaml"]
    assert main(["configs", str(bundle), "training", "nothere.yaml"]) == 2
    assert "config not found" in capsys.readouterr().err
    assert main(["configs", str(tmp_path), "training"]) == 2
    assert "not a heatmark bundle folder" in capsys.readouterr().err


def test_a_bundle_may_add_to_a_shipped_overlay(tmp_path):
    """A bundle's own configs/evaluate.yaml follows the shipped one (it states only what differs)."""
    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train.yaml").write_text("spatial_dims: 2\n")
    (bundle / "configs" / "evaluate.yaml").write_text("eval_overlays: 0\n")
    files = bundle_config_files(bundle, "evaluating")
    assert files[-2:] == [CONFIG_DIR / "evaluate.yaml", bundle / "configs" / "evaluate.yaml"]
    assert bundle_config_files(bundle, "training") == [CONFIG_DIR / "base.yaml", bundle / "configs" / "train.yaml"]


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
