"""Issue 13: a trained model is one self-describing artifact (models/model.pt holds the weights and
how to rebuild and feed the network), and the Python API (heatmark.load_model)."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

import heatmark
from heatmark.bundle import bundle_config_files
from heatmark.landmarks import Landmarks, read_landmark_table
from heatmark.training import model_description, read_model_file
from heatmark.training.checkpoint import AtomicDiskSaver
from test_predict import TINY_SCN, image, make_bundle, run, save_nifti


def write_described_model(bundle, overlay="tiny.yaml", seed=1):
    """models/model.pt as training writes it (AtomicCheckpointSaver with base.yaml's model_description)."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(bundle, "training", [overlay])])
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    description = parser.get_parsed_content("model_description")
    AtomicDiskSaver(bundle / "models", "model.pt", description)(net.state_dict(), "ignored")
    return bundle / "models" / "model.pt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    bundle = make_bundle(root / "bundle", TINY_SCN)
    old_state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    model = write_described_model(bundle)
    inputs = root / "inputs"
    inputs.mkdir()
    save_nifti(inputs / "case01.nii.gz", image((80, 100), 1), 2.4)
    save_nifti(inputs / "case02.nii.gz", image((90, 70), 2), 2.0)
    return {"root": root, "bundle": bundle, "model": model, "inputs": inputs, "old_state": old_state}


def test_model_file_loads_with_weights_only_and_describes_the_network(setup):
    obj = torch.load(setup["model"], weights_only=True)
    assert obj["format"] == "heatmark-model" and obj["version"] == 1
    d = obj["description"]
    assert d["network"]["_target_"] == "heatmark.networks.SpatialConfigurationNet"
    assert d["network"]["filters"] == 8 and d["network"]["num_levels"] == 3 and d["network"]["num_landmarks"] == 19
    assert d["spacing_mm"] == 3.0 and d["input_size"] == [64, 80] and d["spatial_dims"] == 2
    assert len(d["landmark_names"]) == 19 and d["landmark_names"][0] == "sella"
    assert d["output_stride"] == [1, 1] and d["decode_method"] == "quadratic"
    assert d["bundle"] == {"name": "ISBI 2015 cephalometric landmarks", "version": "0.1.0"}
    assert set(d["versions"]) == {"heatmark", "monai", "torch"}
    state, description = read_model_file(setup["model"])
    assert description == d and any(k.endswith(".weight") for k in state)


def test_predict_without_config_matches_predict_with_the_overlay(setup):
    b, inputs, root = setup["bundle"], setup["inputs"], setup["root"]
    assert run(b, inputs, root / "with", "--config", "tiny.yaml", "--num-workers", 0, "--quiet") == 0
    assert run(b, inputs, root / "without", "--num-workers", 0, "--quiet") == 0
    assert (root / "with" / "landmarks.csv").read_bytes() == (root / "without" / "landmarks.csv").read_bytes()


def test_conflicting_config_is_refused_naming_the_key(setup, capsys):
    b, inputs, root = setup["bundle"], setup["inputs"], setup["root"]
    (b / "configs" / "fine.yaml").write_text("spacing_mm: 1.0\n")
    assert run(b, inputs, root / "o1", "--config", "fine.yaml", "--quiet") == 2
    err = capsys.readouterr().err
    assert "model.pt was trained with spacing_mm 3.0, the configs say 1.0" in err
    (b / "configs" / "wide.yaml").write_text("network_def#filters: 16\n")
    assert run(b, inputs, root / "o2", "--config", "tiny.yaml", "--config", "wide.yaml", "--quiet") == 2
    err = capsys.readouterr().err
    assert "network_def#filters 8, the configs say 16" in err


def test_missing_input_is_named_before_a_broken_model(setup, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    assert run(setup["bundle"], tmp_path / "nothing.nii.gz", tmp_path / "o", "--model", broken, "--quiet") == 2
    err = capsys.readouterr().err
    assert "input not found" in err and "model" not in err


def test_python_api_equals_the_command_line(setup):
    root = setup["root"]
    out = root / "cli"
    assert run(setup["bundle"], setup["inputs"], out, "--num-workers", 0, "--quiet") == 0
    table = read_landmark_table(out / "landmarks.csv")
    model = heatmark.load_model(setup["bundle"], device="cpu")
    result = model.predict(setup["inputs"] / "case01.nii.gz")
    assert result.frame == "RAS" and result.names == table["case01"].names
    np.testing.assert_allclose(result.coords, table["case01"].coords, atol=1e-6, rtol=0)
    assert result.confidence.shape == (19,)
    assert isinstance(result.to_landmarks(), Landmarks)
    many = model.predict_many([setup["inputs"] / "case01.nii.gz", setup["inputs"] / "case02.nii.gz"], batch_size=2)
    for r, case in zip(many, ["case01", "case02"]):  # batch 2 vs 1: kernels differ in the last bits
        np.testing.assert_allclose(r.coords, table[case].coords, atol=1e-3, rtol=0)
    # a model file path: the bundle is the folder above models/
    again = heatmark.load_model(setup["model"], device="cpu").predict(setup["inputs"] / "case01.nii.gz")
    np.testing.assert_allclose(again.coords, result.coords, atol=1e-9, rtol=0)
    # an in-memory image with its affine
    img = nib.load(str(setup["inputs"] / "case01.nii.gz"))
    arr = np.asarray(img.dataobj, dtype=np.float32)[..., 0] if img.ndim == 3 else np.asarray(img.dataobj)
    mt = model.predict(MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(img.affine)))
    np.testing.assert_allclose(mt.coords, result.coords, atol=1e-6, rtol=0)
    arr_pred = model.predict(arr, affine=img.affine)
    np.testing.assert_allclose(arr_pred.coords, result.coords, atol=1e-6, rtol=0)


def test_old_bare_state_dict_still_works(setup, tmp_path):
    bundle = tmp_path / "old"
    shutil.copytree(setup["bundle"] / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.save(setup["old_state"], bundle / "models" / "model.pt")
    assert run(bundle, setup["inputs"], tmp_path / "out", "--config", "tiny.yaml", "--num-workers", 0,
               "--quiet") == 0
    result = heatmark.load_model(bundle, configs=["tiny.yaml"], device="cpu").predict(
        setup["inputs"] / "case01.nii.gz")
    table = read_landmark_table(tmp_path / "out" / "landmarks.csv")
    np.testing.assert_allclose(result.coords, table["case01"].coords, atol=1e-6, rtol=0)


def test_a_foreign_network_target_is_refused(setup, tmp_path, capsys):
    obj = torch.load(setup["model"], weights_only=True)
    obj["description"]["network"]["_target_"] = "os.system"
    evil = tmp_path / "evil.pt"
    torch.save(obj, evil)
    assert run(setup["bundle"], setup["inputs"], tmp_path / "o", "--model", evil, "--quiet") == 2
    assert "not allowed" in capsys.readouterr().err


def test_model_description_is_plain():
    d = model_description(torch.nn.Linear(2, 2), 2, ["a"], spacing_mm=(1.0, 2.0))
    assert d["network"] is None and d["spacing_mm"] == [1.0, 2.0]
