"""bench/isbi2015.py without training: the overlays it writes for its runs, and its table of the
inter-observer row and of finished runs (one fake finished run)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import yaml

from conftest import REPO_ROOT, require_shared_data

sys.path.insert(0, str(REPO_ROOT / "bench"))
import isbi2015  # noqa: E402


def test_overlays_change_only_the_network_or_the_training_cases():
    assert yaml.safe_load(isbi2015._overlay(isbi2015.RUNS["scn"], 32)) == {}
    unet = yaml.safe_load(isbi2015._overlay(isbi2015.RUNS["unet"], 24))
    assert unet["network_def"]["_target_"] == "heatmark.networks.HeatmapUNet" and unet["network_def"]["filters"] == 24
    ten = yaml.safe_load(isbi2015._overlay(isbi2015.RUNS["scn_10"], 32))
    assert ten["datalist"].endswith("[:12]") and "network_def" not in ten
    # 12 cases with val_fraction 2/12 leave exactly 10 for training
    from heatmark.data import split_datalist

    train, val = split_datalist([{"case": i} for i in range(12)], ten["val_fraction"], 0)
    assert (len(train), len(val)) == (10, 2)


def test_table_of_finished_runs_and_inter_observer_row(tmp_path):
    data = require_shared_data("isbi2015")
    run = tmp_path / "scn_15min"
    (run / "runs" / "eval").mkdir(parents=True)
    errors = np.array([[0.5, 1.0, 3.0, 12.0]])
    from heatmark.evaluation.metrics import summarize

    result = {"run": "scn", "label": "heatmark SCN 2019 (cpu.yaml)", "budget_minutes": 15, "train_minutes": 15.1,
              "epochs": 52, "metrics": summarize(errors)}
    (run / "result.json").write_text(json.dumps(result))
    (run / "runs" / "eval" / "point_errors.csv").write_text(
        "case,landmark,name,error_mm\n" + "".join(f"151,{i + 1},l{i},{e}\n" for i, e in enumerate(errors[0])))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "isbi2015.py"), "--runs", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ours = next(line for line in lines if line.startswith("| heatmark SCN 2019 (cpu.yaml), 15 min | 4.12 |"))
    assert "| 50.0 |" in ours and "| 52 |" in ours  # SDR@2mm of 0.5, 1, 3, 12 mm; epochs
    observer = next(line for line in lines if line.startswith("| inter-observer"))
    mre = float(observer.split("|")[2])
    assert 0.5 < mre < 5.0, "junior vs senior doctor on test1: a few mm apart"
    # the failed-landmark table: landmark l3 (12 mm) fails on 100% of this one image
    failed = next(line for line in lines if line.startswith("| heatmark SCN 2019 (cpu.yaml), 15 min | l3 |"))
    assert "| 1.50 |" in failed  # mean of 0.5, 1, 3
    assert data.is_dir()
