"""MONAI-native use of a heatmark bundle (issue 13, item 3): ``python -m monai.bundle run inference``
writes the same files as ``heatmark predict`` (it runs the same library), and ``heatmark metadata``
records the trained model in ``large_files.yml`` (read by ``monai.bundle``) and the last
evaluation in ``metadata.json``'s ``eval_metrics``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser, download_large_files

from conftest import REPO_ROOT, run
from heatmark import predict as P
from heatmark.bundle import (
    CONFIG_DIR,
    LARGE_FILES,
    bundle_command,
    bundle_config_files,
    eval_metrics,
    run_bundle,
    update_metadata,
)
from heatmark.cli import main as heatmark_main
from heatmark.core.fileio import sha256_file
from test_bundle_synthetic import BUNDLE as DOTS_BUNDLE
from test_bundle_synthetic import write_dots_dataset
from test_model_artifact import write_described_model
from test_predict import TINY_SCN, image, make_bundle, save_nifti

OPTS = ["--num-workers", "0", "--quiet"]


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    bundle = make_bundle(root / "bundle", TINY_SCN)
    write_described_model(bundle)
    inputs = root / "inputs"
    inputs.mkdir()
    for i in range(3):
        save_nifti(inputs / f"case{i:02d}.nii.gz", image((60 + 5 * i, 72), i), 2.5)
    ref = root / "reference"
    assert P.main([str(bundle), str(inputs), str(ref), *OPTS]) == P.EXIT_OK  # heatmark predict still works
    return {"root": root, "bundle": bundle, "inputs": inputs, "reference": _outputs(ref)}


def test_inference_workflow_reads_the_shipped_inference_config(setup):
    files = bundle_config_files(setup["bundle"], "inference")
    assert files[0] == CONFIG_DIR / "base.yaml" and files[-1] == CONFIG_DIR / "inference.yaml"
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    assert parser["run"] == "@inference#run"  # not base.yaml's training
    assert parser["inference#run#_target_"] == "heatmark.predict.run_inference"


def test_monai_bundle_run_inference_writes_what_heatmark_predict_writes(setup):
    """The command line as the README gives it: python -m monai.bundle run inference ... --input_dir
    --output_dir; the same landmarks.csv, .mrk.json, errors.csv byte for byte."""
    out = setup["root"] / "monai"
    cmd = bundle_command(setup["bundle"], "inference", input_dir=setup["inputs"], output_dir=out,
                         **{"predict_options#progress": "False"})
    proc = run(cmd, cwd=REPO_ROOT, timeout=300)
    assert "heatmark inference: 3 processed" in proc.stdout, proc.stdout[-2000:]
    out_files = _outputs(out)
    assert out_files == setup["reference"]
    assert {"case00.mrk.json", "case01.mrk.json", "case02.mrk.json", "errors.csv", "landmarks.csv"} <= set(out_files)


def test_default_run_id_and_options_from_the_config(setup, tmp_path):
    """``run`` without an id predicts too; predict_options set the formats; a rerun resumes."""
    from monai.bundle import run as monai_run

    files = [str(f) for f in bundle_config_files(setup["bundle"], "inference")]
    out = tmp_path / "out"
    kwargs = dict(bundle_root=str(setup["bundle"]), meta_file=str(setup["bundle"] / "configs" / "metadata.json"),
                  config_file=files, input_dir=str(setup["inputs"]), output_dir=str(out),
                  **{"predict_options#formats": ["csv", "json"], "predict_options#progress": False})
    monai_run(**kwargs)
    assert (out / "landmarks.csv").read_bytes() == setup["reference"]["landmarks.csv"]
    assert sorted(p.name for p in out.glob("case*")) == ["case00.json", "case01.json", "case02.json"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("case*")}
    monai_run(**kwargs)  # resumes: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("case*")} == before


def test_inference_usage_errors_are_one_line(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_bundle(setup["bundle"], "inference", output_dir=str(tmp_path / "o"))
    assert e.value.code == P.EXIT_USAGE
    assert "--input_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_bundle(setup["bundle"], "inference", input_dir=str(setup["inputs"]), output_dir=str(tmp_path / "o"),
                   **{"predict_options#batchsize": 2})
    assert e.value.code == P.EXIT_USAGE
    assert "unknown predict_options 'batchsize'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_bundle(setup["bundle"], "inference", input_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "o"))
    assert e.value.code == P.EXIT_USAGE
    assert "nowhere" in capsys.readouterr().err


# ---- heatmark metadata --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The synthetic dots bundle with a (random) self-describing model and its `run evaluating`."""
    root = tmp_path_factory.mktemp("metadata")
    data = write_dots_dataset(root / "data")
    bundle = root / "dots"
    shutil.copytree(DOTS_BUNDLE, bundle)
    (bundle / "configs" / "none.yaml").write_text("{}\n")
    model = write_described_model(bundle, "none.yaml")
    time.sleep(0.01)  # the evaluation is newer than the model
    run_bundle(bundle, "evaluating", dataset_dir=str(data))
    metrics = json.loads((bundle / "runs" / "eval" / "metrics.json").read_text())
    return {"bundle": bundle, "model": model, "metrics": metrics}


def test_metadata_fills_eval_metrics_and_large_files(evaluated, capsys):
    bundle, metrics = evaluated["bundle"], evaluated["metrics"]
    meta_path = bundle / "configs" / "metadata.json"
    before_text = meta_path.read_text()
    assert heatmark_main(["metadata", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert "eval_metrics from" in printed and sha256_file(evaluated["model"]) in printed

    meta = json.loads(meta_path.read_text())
    values = meta["eval_metrics"]
    assert values["mean_radial_error_mm"] == metrics["mean"] and values["median_radial_error_mm"] == metrics["median"]
    assert values["sdr_2mm_percent"] == metrics["sdr_2mm"] and values["outliers_10mm_percent"] == metrics["outliers_pct_10mm"]
    assert values["n_cases"] == 8 and values["n_landmarks"] == 2
    assert {k: v for k, v in meta.items() if k != "eval_metrics"} == json.loads(before_text)
    # the rest of the file keeps its bytes (the test bundle's metadata had no eval_metrics: appended)
    assert meta_path.read_text().startswith(before_text.rstrip()[:-1].rstrip())

    entry = yaml.safe_load((bundle / LARGE_FILES).read_text())["large_files"][0]
    assert entry == {"path": "models/model.pt", "url": "", "hash_val": sha256_file(evaluated["model"]),
                     "hash_type": "sha256"}
    download_large_files(bundle_path=str(bundle))  # MONAI reads it and checks the model's hash

    # a second evaluation replaces the values in place, nothing else moves
    text = meta_path.read_text()
    m2 = bundle / "metrics2.json"
    m2.write_text(json.dumps({**metrics, "mean": 1.5, "sdr_2mm": 50.0}))
    update_metadata(bundle, m2)
    again = meta_path.read_text()
    assert json.loads(again)["eval_metrics"]["mean_radial_error_mm"] == 1.5
    start = text.index('"eval_metrics"')
    assert again[:start] == text[:start] and again.endswith("\n}\n")


def test_large_files_hash_catches_a_changed_model(evaluated, tmp_path):
    bundle = tmp_path / "dots"
    shutil.copytree(evaluated["bundle"], bundle)
    update_metadata(bundle)
    with open(bundle / "models" / "model.pt", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(Exception, match="hash check"):
        download_large_files(bundle_path=str(bundle))


def test_metadata_refuses_an_evaluation_older_than_the_model(evaluated, tmp_path, capsys):
    bundle = tmp_path / "dots"
    shutil.copytree(evaluated["bundle"], bundle)
    metrics = bundle / "runs" / "eval" / "metrics.json"
    os.utime(metrics, (1_000_000, 1_000_000))
    assert heatmark_main(["metadata", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "older than" in err and "run evaluating" in err


def test_eval_metrics_mapping():
    values = eval_metrics({"mean": 1.25, "median": 1.0, "sd": 0.5, "max": 4.0, "sdr_2.5mm": 80.0,
                           "outliers_pct_10mm": 0.0, "outliers_10mm": 0, "n_cases": 3, "n_landmarks": 2,
                           "sdr_4mm": float("nan")})
    assert values == {"mean_radial_error_mm": 1.25, "median_radial_error_mm": 1.0, "sd_radial_error_mm": 0.5,
                      "max_radial_error_mm": 4.0, "sdr_2.5mm_percent": 80.0, "outliers_10mm_percent": 0.0,
                      "n_cases": 3, "n_landmarks": 2}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "bundles").iterdir() if p.is_dir()))
def test_shipped_bundles_list_their_model_for_monai(name):
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "bundles" / name / LARGE_FILES)])
    (entry,) = parser.get()["large_files"]
    assert entry["path"] == "models/model.pt" and entry["hash_type"] == "sha256"
    assert set(entry) == {"path", "url", "hash_val", "hash_type"}
