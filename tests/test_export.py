"""Issue 13, item 4: `heatmark export BUNDLE --format torchscript|onnx` (dynamic batch, 2D and 3D,
checked against the eager model, self-describing) and `heatmark predict --backend onnxruntime`.

Two tiny randomly initialised bundles with self-describing model files: a 2D SCN (the ISBI bundle's
configs, as tests/test_predict.py) and a 3D SCN (the AFIDs bundle's configs)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from heatmark import cli, exporting
from heatmark.core.fileio import TMP_PREFIX, sha256_file
from heatmark.predict.backends import read_onnx_metadata
from test_model_artifact import write_described_model
from test_predict import REPO_ROOT, TINY_SCN, image, make_bundle, save_nifti

TINY_3D = """
spacing_mm: 8.0
input_size: [16, 16, 16]
network_def#filters: 4
network_def#num_levels: 3
network_def#spatial_downsample: 4
network_def#spatial_kernel_size: 3
"""


def _bundle_3d(root, overlay: str):
    """A copy of the AFIDs bundle's configs with ``overlay`` as configs/tiny.yaml and a described model."""
    shutil.copytree(REPO_ROOT / "bundles" / "afids_brain_mr" / "configs", root / "configs")
    (root / "configs" / "tiny.yaml").write_text(overlay)
    (root / "models").mkdir()
    return root


def _csv(path):
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


@pytest.fixture(scope="module")
def two_d(tmp_path_factory):
    root = tmp_path_factory.mktemp("export2d")
    bundle = make_bundle(root / "bundle", TINY_SCN)
    model = write_described_model(bundle)
    images = root / "images"
    images.mkdir()
    save_nifti(images / "case01.nii.gz", image((80, 100), 1), 2.4)
    save_nifti(images / "case02.nii.gz", image((90, 70), 2), 2.0)
    return {"root": root, "bundle": bundle, "model": model, "images": images}


@pytest.fixture(scope="module")
def three_d(tmp_path_factory):
    root = tmp_path_factory.mktemp("export3d")
    bundle = _bundle_3d(root / "bundle", TINY_3D)
    model = write_described_model(bundle)
    images = root / "images"
    images.mkdir()
    save_nifti(images / "vol01.nii.gz", image((20, 24, 18), 3), 6.0)
    save_nifti(images / "vol02.nii.gz", image((18, 18, 22), 4), 7.0)
    return {"root": root, "bundle": bundle, "model": model, "images": images}


_EXPORTS: dict[tuple, tuple] = {}


def exported(setup: dict, fmt: str) -> tuple[int, str, str]:
    """``heatmark export`` of ``setup``'s bundle as ``fmt``, run once per module: (status, stdout, stderr)."""
    key = (str(setup["bundle"]), fmt)
    if key not in _EXPORTS:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["export", str(setup["bundle"]), "--format", fmt, "--config", "tiny.yaml",
                           "--images", str(setup["images"])])
        _EXPORTS[key] = (rc, out.getvalue(), err.getvalue())
    return _EXPORTS[key]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("which", ["two_d", "three_d"])
def test_export_matches_the_eager_model(request, which, fmt):
    setup = request.getfixturevalue(which)
    rc, stdout, stderr = exported(setup, fmt)
    assert rc == 0, stderr
    out = argparse.Namespace(out=stdout)
    path = setup["model"].with_suffix(".ts" if fmt == "torchscript" else ".onnx")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert "max heatmap difference" in out.out and "max landmark difference" in out.out
    assert "batch sizes 2, 3" in out.out  # both check images in one batch, then the dynamic batch of 3

    # the file describes itself: the model file's description and its SHA-256
    if fmt == "onnx":
        meta = read_onnx_metadata(path)
        proto = onnx.load(str(path))
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch axis
    else:
        module, meta = exporting.load_torchscript(path)
    described = torch.load(setup["model"], weights_only=True)["description"]
    assert meta["model_sha256"] == sha256_file(setup["model"])
    assert meta["description"]["landmark_names"] == described["landmark_names"]
    assert meta["description"]["input_size"] == described["input_size"]
    assert meta["input"]["shape"][0] == "batch" and meta["input"]["shape"][2:] == described["input_size"]

    # a batch of 4 (never seen at export) through the file as read back, against the eager network
    net = exporting.load_bundle(exporting.PredictOptions(bundle=setup["bundle"], input="", output="",
                                                         configs=("tiny.yaml",), device="cpu")).network
    x = torch.randn(4, 1, *described["input_size"])
    with torch.inference_mode():
        expected = net(x)
    if fmt == "onnx":
        import onnxruntime as ort

        got = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                               .run(None, {"image": x.numpy()})[0])
    else:
        with torch.inference_mode():
            got = module(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_wrong_export_is_refused_and_not_written(two_d, monkeypatch, tmp_path):
    """An exported model whose heatmaps are shifted by 2 output voxels (3 mm each) along the first axis
    moves the landmarks by about 6 mm: refused, nothing left behind, the old file untouched."""
    model = shutil.copy(two_d["model"], tmp_path / "model.pt")
    target = tmp_path / "model.ts"
    target.write_bytes(b"previous export")
    real = exporting._write_torchscript

    def shifted(*args, **kwargs):
        module = real(*args, **kwargs)
        return lambda x: torch.roll(module(x), shifts=2, dims=2)

    monkeypatch.setattr(exporting, "_write_torchscript", shifted)
    with pytest.raises(exporting.ExportCheckError, match="landmark difference") as info:
        exporting.export_model(two_d["bundle"], "torchscript", model=model, configs=["tiny.yaml"],
                               images=two_d["images"], log=None)
    moved = float(str(info.value).split("max landmark difference ")[1].split(" mm")[0])
    assert 5.0 < moved < 7.5, info.value
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.ts"]


def test_predict_with_onnxruntime_equals_torch(two_d, tmp_path):
    assert exported(two_d, "onnx")[0] == 0
    common = [str(two_d["bundle"]), str(two_d["images"]), "--config", "tiny.yaml", "--num-workers", "0", "--quiet",
              "--batch-size", "2"]
    assert cli.main(["predict", *common[:2], str(tmp_path / "torch"), *common[2:]]) == 0
    assert cli.main(["predict", *common[:2], str(tmp_path / "ort"), *common[2:], "--backend", "onnxruntime"]) == 0
    a, b = _csv(tmp_path / "torch" / "landmarks.csv"), _csv(tmp_path / "ort" / "landmarks.csv")
    assert [(r["case"], r["name"]) for r in a] == [(r["case"], r["name"]) for r in b] and len(a) == 2 * 19
    for key in ("x_mm", "y_mm", "confidence"):
        diff = np.abs(np.array([float(r[key]) for r in a]) - np.array([float(r[key]) for r in b]))
        assert diff.max() < 1e-3, (key, diff.max())
    # a resumed run may not mix backends: the run fingerprint names the backend
    run = json.loads((tmp_path / "ort" / ".heatmark" / "run.json").read_text())
    assert run["fingerprint"]["backend"] == "onnxruntime"


def test_onnx_backend_refuses_missing_and_stale_files(two_d, tmp_path, capsys):
    model = shutil.copy(two_d["model"], tmp_path / "model.pt")
    args = ["predict", str(two_d["bundle"]), str(two_d["images"]), str(tmp_path / "out"), "--config", "tiny.yaml",
            "--model", str(model), "--backend", "onnxruntime", "--quiet"]
    assert cli.main(args) == 2
    assert "model.onnx not found" in capsys.readouterr().err

    # exported from the module's model.pt, not from this copy with other weights
    state = torch.load(model, weights_only=True)
    state["state_dict"] = {k: v + 1 for k, v in state["state_dict"].items()}
    torch.save(state, model)
    assert exported(two_d, "onnx")[0] == 0
    shutil.copy(two_d["model"].with_suffix(".onnx"), tmp_path / "model.onnx")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "is stale" in err and "heatmark export" in err
    assert cli.main([*args, "--device", "cuda"]) == 2
    assert "runs on CPU" in capsys.readouterr().err


def test_missing_onnxruntime_is_named(two_d, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    shutil.copy(two_d["model"], tmp_path / "model.pt")
    (tmp_path / "model.onnx").write_bytes(b"not read")
    assert cli.main(["predict", str(two_d["bundle"]), str(two_d["images"]), str(tmp_path / "out"), "--config",
                     "tiny.yaml", "--model", str(tmp_path / "model.pt"), "--backend", "onnxruntime", "--quiet"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_check_images_default_to_the_validation_data(two_d, tmp_path, capsys):
    """Without --images the check runs on val_datalist; with none there, the error says to pass --images."""
    (two_d["bundle"] / "configs" / "val.yaml").write_text(
        f"val_datalist: [{{image: {two_d['images'] / 'case02.nii.gz'}}}, {{image: /nonexistent/x.nii.gz}}]\n")
    model = shutil.copy(two_d["model"], tmp_path / "model.pt")
    path, check = exporting.export_model(two_d["bundle"], "torchscript", model=model,
                                         configs=["tiny.yaml", "val.yaml"], log=None)
    assert path == tmp_path / "model.ts" and check.cases == ["case02"]

    (two_d["bundle"] / "configs" / "nodata.yaml").write_text("dataset_dir: /nonexistent/isbi2015\n")
    rc = cli.main(["export", str(two_d["bundle"]), "--format", "torchscript", "--config", "tiny.yaml",
                   "--config", "nodata.yaml", "--model", str(model)])
    err = capsys.readouterr().err
    assert rc == 2 and "--images" in err and "val_datalist" in err, err
