"""`heatmark predict` on a tiny randomly initialised copy of the ISBI bundle (no real data needed):
outputs and their frames, bad inputs in errors.csv, resuming after an interruption, options,
case names, input discovery (the image reader registry's suffixes), the bundle's inferer, usage errors."""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer, SlidingWindowInferer
from PIL import Image

from conftest import ENV, REPO_ROOT
from heatmark import predict as P
from heatmark.bundle import bundle_config_files
from heatmark.evaluation import DecodeLandmarksd
from heatmark.evaluation.decoding import decode_heatmaps
from heatmark.core.fileio import TMP_PREFIX
from heatmark.core.geometry import output_grid_affine
from heatmark.landmarks import read_landmark_table, read_landmarks
from heatmark.predict import runner
from heatmark.predict.store import CaseStore
from heatmark.transforms.io import DICOM_SUFFIXES
from heatmark.transforms.io import IMAGE_SUFFIXES as REGISTRY_SUFFIXES

BUNDLE = REPO_ROOT / "bundles" / "isbi2015_cephalometric"
NUM_LANDMARKS = 19
TINY_SCN = """
spacing_mm: 3.0
input_size: [64, 80]
network_def:
  _target_: heatmark.networks.SpatialConfigurationNet
  spatial_dims: '@spatial_dims'
  in_channels: 1
  num_landmarks: '@num_landmarks'
  filters: 8
  num_levels: 3
  spatial_downsample: 4
  spatial_kernel_size: 5
"""
TINY_STRIDE2 = """
spacing_mm: 3.0
input_size: [64, 80]
network_def:
  _target_: heatmark.networks.DownsamplingNet
  spatial_dims: '@spatial_dims'
  in_channels: 1
  num_landmarks: '@num_landmarks'
  filters: 4
  num_blocks: 1
"""
GOOD = ["case01", "case02", "case03"]
# bad input -> a word its errors.csv reason must contain
BAD = {"empty": "empty", "text": "nifti", "truncated": "truncated|compressed|gzip|end of file|eof|incomplete",
       "volume": "3d", "nan": "non-finite", "photo": "spacing"}


def make_bundle(root: Path, overlay: str, model_name: str = "model.pt", seed: int = 0) -> Path:
    """A copy of the ISBI bundle with the ``overlay`` as configs/tiny.yaml and random weights for
    the network of its inference configs (as ``heatmark predict --config tiny.yaml`` reads them)."""
    bundle = root
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "configs" / "tiny.yaml").write_text(overlay)
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(bundle, "inference", ["tiny.yaml"])])
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / model_name)
    return bundle


def image(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    blobs = sum(np.exp(-((grid - rng.uniform(-0.6, 0.6, (len(shape),) + (1,) * len(shape))) ** 2).sum(0) / 0.05)
                for _ in range(4))
    return (1000 * blobs + rng.normal(0, 10, shape)).astype(np.float32)


def save_nifti(path: Path, arr: np.ndarray, spacing: float) -> Path:
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:2, 3] = [-20.0, 15.0]
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def run(*argv) -> int:
    return P.main([str(a) for a in argv])


def read_csv(path: Path) -> list[dict]:
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    bundle = make_bundle(root / "bundle", TINY_SCN)
    inputs = root / "inputs"
    inputs.mkdir()
    save_nifti(inputs / "case01.nii.gz", image((80, 100), 1), 2.4)
    save_nifti(inputs / "case02.nii.gz", image((90, 70), 2), 2.0)
    save_nifti(inputs / "case03.nii", image((60, 60), 3), 3.5)
    (inputs / "empty.nii.gz").write_bytes(b"")
    (inputs / "text.nii.gz").write_text("this is not an image\n")
    big = save_nifti(root / "big.nii.gz", np.random.default_rng(0).normal(size=(200, 200)).astype(np.float32), 1.0)
    blob = big.read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    save_nifti(inputs / "volume.nii.gz", image((20, 20, 20), 4), 2.0)
    nan = image((50, 50), 5)
    nan[10, 10] = np.nan
    save_nifti(inputs / "nan.nii.gz", nan, 2.0)
    Image.fromarray(np.clip(image((60, 80), 6) / 5, 0, 255).astype(np.uint8).T).save(inputs / "photo.png")
    (inputs / "notes.txt").write_text("not an input: .txt files inside a folder are ignored\n")
    out = root / "out"
    code = run(bundle, inputs, out, "--config", "tiny.yaml", "--batch-size", 2, "--num-workers", 0, "--quiet")
    return {"root": root, "bundle": bundle, "inputs": inputs, "out": out, "code": code,
            "landmarks": (out / "landmarks.csv").read_bytes()}


def test_outputs_of_a_folder(data):
    out = data["out"]
    assert data["code"] == 1, "some inputs failed -> exit status 1"
    text = (out / "landmarks.csv").read_text()
    assert not text.startswith("#")  # a plain CSV: the frame is a column
    rows = read_csv(out / "landmarks.csv")
    assert list(rows[0]) == ["case", "landmark", "name", "frame", "x_mm", "y_mm", "confidence"]
    assert {r["frame"] for r in rows} == {"RAS"}
    table = read_landmark_table(out / "landmarks.csv")
    assert sorted(table) == GOOD
    for case in GOOD:
        assert len(table[case]) == NUM_LANDMARKS and np.isfinite(table[case].coords).all()
        slicer = read_landmarks(out / f"{case}.mrk.json", spatial_dims=2)
        assert slicer.names == table[case].names
        np.testing.assert_allclose(slicer.coords, table[case].coords, atol=1e-6, rtol=0)
        assert '"coordinateSystem": "LPS"' in (out / f"{case}.mrk.json").read_text()
        assert (out / P.STATE_DIR / "cases" / f"{case}.json").is_file()
    assert all(r["confidence"] != "" for r in rows)
    # measurements.csv: the bundle's measurement columns, one row per case done
    m = read_csv(out / "measurements.csv")
    assert list(m[0]) == ["case", "sella_nasion_mm", "SNA_deg", "SNB_deg"]
    assert [r["case"] for r in m] == GOOD
    dist = np.linalg.norm(table["case01"].coords[0] - table["case01"].coords[1])
    assert float(m[0]["sella_nasion_mm"]) == pytest.approx(dist, abs=1e-9)
    assert no_temporary_files(out)


def test_bad_inputs_are_listed_with_reasons(data):
    errors = {r["case"]: r for r in read_csv(data["out"] / "errors.csv")}
    assert sorted(errors) == sorted(BAD)
    for case, keyword in BAD.items():
        reason = errors[case]["error"]
        assert re.search(keyword, reason, re.IGNORECASE), f"{case}: unclear reason {reason!r}"
        assert Path(errors[case]["path"]).name.startswith(case)
        assert not (data["out"] / f"{case}.mrk.json").exists()


def test_rerun_skips_done_cases_and_retries_failed(data, capsys):
    out = data["out"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.mrk.json")}
    code = run(data["bundle"], data["inputs"], out, "--config", "tiny.yaml", "--num-workers", 0, "--quiet")
    assert code == 1, "the bad inputs are retried and fail again"
    line = capsys.readouterr().out
    assert "0 processed, 3 skipped" in line and f"{len(BAD)} failed" in line
    assert (out / "landmarks.csv").read_bytes() == data["landmarks"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.mrk.json")} == before, "done cases are not rewritten"
    assert no_temporary_files(out)


def test_interrupted_run_resumes_to_identical_results(data, monkeypatch, capsys):
    out = data["root"] / "interrupted"
    real = runner.write_case
    calls = []

    def interrupt_on_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "write_case", interrupt_on_second_case)
    code = run(data["bundle"], data["inputs"], out, "--config", "tiny.yaml", "--batch-size", 2, "--num-workers", 0,
               "--quiet")
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    # consistent partial outputs: complete tables for what was done
    partial = read_landmark_table(out / "landmarks.csv")
    assert len(partial) == 1 and all(len(lm) == NUM_LANDMARKS for lm in partial.values())
    done = next(iter(partial))
    assert [r["case"] for r in read_csv(out / "measurements.csv")] == [done]
    assert set(r["case"] for r in read_csv(out / "errors.csv")) <= set(BAD)
    assert no_temporary_files(out)

    monkeypatch.setattr(runner, "write_case", real)
    code = run(data["bundle"], data["inputs"], out, "--config", "tiny.yaml", "--batch-size", 2, "--num-workers", 0,
               "--quiet")
    assert code == 1
    assert "1 skipped" in capsys.readouterr().out
    assert (out / "landmarks.csv").read_bytes() == data["landmarks"], "resumed == uninterrupted, byte for byte"
    for name in ("measurements.csv", "errors.csv"):
        assert (out / name).read_bytes() == (data["out"] / name).read_bytes()
    for case in GOOD:
        assert (out / f"{case}.mrk.json").read_bytes() == (data["out"] / f"{case}.mrk.json").read_bytes()


def test_workers_and_batching_agree(data):
    out = data["root"] / "workers"
    code = run(data["bundle"], data["inputs"], out, "--config", "tiny.yaml", "--batch-size", 3, "--num-workers", 2,
               "--quiet")
    assert code == 1
    ref, got = read_landmark_table(data["out"] / "landmarks.csv"), read_landmark_table(out / "landmarks.csv")
    assert sorted(got) == GOOD
    for case in GOOD:
        np.testing.assert_allclose(got[case].coords, ref[case].coords, atol=1e-4)
    assert (out / "errors.csv").read_bytes() == (data["out"] / "errors.csv").read_bytes()


def test_spacing_option_makes_a_png_work(data, capsys):
    out = data["root"] / "png"
    code = run(data["bundle"], data["inputs"] / "photo.png", out, "--config", "tiny.yaml", "--spacing", "0.5",
               "--num-workers", 0, "--quiet")
    assert code == 0
    assert sorted(read_landmark_table(out / "landmarks.csv")) == ["photo"]
    assert read_csv(out / "errors.csv") == [] and (out / "errors.csv").read_text() == "case,path,error\n"
    first = (out / "landmarks.csv").read_bytes()
    capsys.readouterr()
    code = run(data["bundle"], data["inputs"] / "photo.png", out, "--config", "tiny.yaml", "--spacing", "0.5,0.5",
               "--num-workers", 0, "--quiet", "--overwrite")
    assert code == 0 and "1 processed, 0 skipped" in capsys.readouterr().out
    assert (out / "landmarks.csv").read_bytes() == first
    # results of another spacing are not mixed into the folder
    code = run(data["bundle"], data["inputs"] / "photo.png", out, "--config", "tiny.yaml", "--spacing", "0.6",
               "--num-workers", 0, "--quiet")
    assert code == 2 and "image_spacing" in capsys.readouterr().err


def test_pixel_units_and_amp(data):
    out = data["root"] / "pixels"
    code = run(data["bundle"], data["inputs"] / "photo.png", out, "--config", "tiny.yaml", "--pixel-units", "--amp",
               "--num-workers", 0, "--quiet")
    assert code == 0
    lm = read_landmark_table(out / "landmarks.csv")["photo"]
    assert np.isfinite(lm.coords).all()


def test_heatmaps_formats_overlays(data):
    out = data["root"] / "heatmaps"
    code = run(data["bundle"], data["inputs"] / "case01.nii.gz", out, "--config", "tiny.yaml", "--save-heatmaps",
               "--overlays", "--format", "fcsv,json", "--num-workers", 0, "--batch-size", 2, "--quiet")
    assert code == 0
    assert not (out / "landmarks.csv").exists() and not (out / "case01.mrk.json").exists()
    assert (out / "case01_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ref = read_landmark_table(data["out"] / "landmarks.csv")["case01"]
    fcsv = read_landmarks(out / "case01.fcsv", spatial_dims=2)
    assert "CoordinateSystem = RAS" in (out / "case01.fcsv").read_text()
    np.testing.assert_allclose(fcsv.coords, ref.coords, atol=1e-6, rtol=0)
    np.testing.assert_allclose(read_landmarks(out / "case01.json").coords, ref.coords, atol=1e-6, rtol=0)
    check_heatmaps(out / "case01_heatmaps.nii.gz", fcsv.coords, (64, 80))


def check_heatmaps(path: Path, expected_world: np.ndarray, shape):
    """Decoding the saved heatmaps through the saved affine gives the predicted world points."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    assert data.shape == (*shape, 1, NUM_LANDMARKS)
    a4 = img.affine
    a3 = a4[np.ix_([0, 1, 3], [0, 1, 3])]
    heat = torch.as_tensor(np.moveaxis(data[:, :, 0, :], -1, 0))[None]
    world = decode_heatmaps(heat, method="quadratic", affine=torch.as_tensor(a3)).world[0].numpy()
    np.testing.assert_allclose(world, expected_world, atol=1e-6, rtol=0)


def test_heatmap_affine_accounts_for_output_stride(data):
    bundle = make_bundle(data["root"] / "bundle_stride", TINY_STRIDE2, model_name="other.pt", seed=1)
    out = data["root"] / "stride"
    code = run(bundle, data["inputs"] / "case02.nii.gz", out, "--config", "tiny.yaml", "--model",
               bundle / "models" / "other.pt", "--save-heatmaps", "--num-workers", 0, "--quiet")
    assert code == 0
    world = read_landmark_table(out / "landmarks.csv")["case02"].coords
    check_heatmaps(out / "case02_heatmaps.nii.gz", world, (32, 40))
    a_in = np.array([[2.0, 0, 5.0], [0, 3.0, -1.0], [0, 0, 1]])
    a_out = output_grid_affine(a_in, (2, 4))
    u = np.array([3.0, 7.0, 1.0])
    np.testing.assert_allclose(a_out @ u, a_in @ np.array([3 * 2 + 0.5, 7 * 4 + 1.5, 1.0]))


def test_odd_names_are_sanitised_and_stay_inside_output(data):
    root = data["root"] / "odd"
    src = data["inputs"] / "case01.nii.gz"
    for rel in ["a b #1.nii.gz", "d1/img.nii.gz", "d2/img.nii.gz", "x..y;$(z).nii.gz", "sub dir/keep.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".nii.gz"):
            shutil.copy(src, root / rel)
        else:
            (root / rel).write_text("x")
    outside = data["root"] / "outside.nii.gz"
    shutil.copy(src, outside)
    listing = root / "cases.lst"
    listing.write_text("# inputs\nsub dir/../a b #1.nii.gz\n\nd1/img.nii.gz\nd2/img.nii.gz\nx..y;$(z).nii.gz\n"
                       "../outside.nii.gz\na b #1.nii.gz\nmissing.nii.gz\n")
    before = {p for p in data["root"].rglob("*")}
    out = root / "out"
    code = run(data["bundle"], listing, out, "--config", "tiny.yaml", "--num-workers", 0, "--quiet")
    assert code == 1  # missing.nii.gz
    created = {p for p in data["root"].rglob("*")} - before
    assert all(out == p or out in p.parents for p in created), "every output lies inside OUTPUT"
    cases = sorted(read_landmark_table(out / "landmarks.csv"))
    assert cases == ["a_b_1", "d1_img", "d2_img", "outside", "x_y_z"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", c) for c in cases)
    errors = read_csv(out / "errors.csv")
    assert [r["case"] for r in errors] == ["missing"] and "does not exist" in errors[0]["error"]
    # another input of the same name, in a later run into the same OUTPUT, does not replace the first
    mixed = root / "mixed"
    for sub in ("d1", "d2", "d1"):
        assert run(data["bundle"], root / sub / "img.nii.gz", mixed, "--config", "tiny.yaml", "--num-workers", 0,
                   "--quiet") == 0
    assert sorted(read_landmark_table(mixed / "landmarks.csv")) == ["d2_img", "img"]


def test_case_names_and_input_discovery(tmp_path):
    names = P.assign_case_names([Path("/x/a/img.nii.gz"), Path("/x/b/img.nii.gz"), Path("/x/a/IMG.nii"),
                                 Path("/y/a/img.png"), Path("/x/c/..odd name.mha"), Path("/x/c/scan")])
    assert len({n.casefold() for n in names}) == len(names)
    assert names[-2:] == ["odd_name", "scan"]
    assert names[1] == "b_img"
    assert P.assign_case_names([Path("/x/a/img.nii.gz")], reserved=["img"]) == ["a_img"]
    assert P.assign_case_names([Path("/img.nii.gz")], reserved=["IMG"]) == ["img-2"]
    for rel in ["a.nii.gz", "b.png", "c.txt", ".hidden.nii.gz", "sub/d.nii", "sub/e_t1.nii.gz"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    rel = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]  # noqa: E731
    assert rel(P.find_inputs(tmp_path)) == ["a.nii.gz", "b.png"]
    assert rel(P.find_inputs(tmp_path, recursive=True)) == ["a.nii.gz", "b.png", "sub/d.nii", "sub/e_t1.nii.gz"]
    assert rel(P.find_inputs(tmp_path, recursive=True, pattern="*_t1.nii.gz")) == ["sub/e_t1.nii.gz"]
    assert rel(P.find_inputs(tmp_path, recursive=True, exclude=[tmp_path / "sub"])) == ["a.nii.gz", "b.png"]
    # 3D bundles: a folder of DICOM slices is one input (a 2D bundle takes each file)
    for i in range(3):
        (tmp_path / "ct" / "series1").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ct" / "series1" / f"slice{i}.dcm").write_bytes(b"")
    (tmp_path / "ct" / "single.dcm").write_bytes(b"")
    assert rel(P.find_inputs(tmp_path / "ct", spatial_dims=3)) == ["ct/series1", "ct/single.dcm"]
    assert rel(P.find_inputs(tmp_path / "ct" / "series1", spatial_dims=3)) == ["ct/series1"]
    assert len(P.find_inputs(tmp_path / "ct", spatial_dims=2, recursive=True)) == 4
    with pytest.raises(P.PredictUsageError, match="no inputs found"):
        P.find_inputs(tmp_path / "sub", pattern="*.png")


def test_discovery_follows_the_image_reader_registry(tmp_path):
    """Every ending the readers of heatmark.transforms.io register (DICOM included) is an input,
    in any letter case; the .img of an Analyze/NIfTI pair is read through its .hdr, so a folder
    holding a.hdr + a.img is one input."""
    assert P.IMAGE_SUFFIXES == REGISTRY_SUFFIXES
    assert set(DICOM_SUFFIXES) <= set(REGISTRY_SUFFIXES) and ".nii.gz" in REGISTRY_SUFFIXES
    folder = tmp_path / "all"
    folder.mkdir()
    files = []
    for i, suffix in enumerate(REGISTRY_SUFFIXES):
        for name in (f"im{i}{suffix}", f"UP{i}{suffix.upper()}"):
            (folder / name).write_bytes(b"")
            files.append(folder / name)
            assert P.find_inputs(folder / name) == [folder / name], name
    (folder / "notes.txt").write_text("not an image\n")
    found = P.find_inputs(folder)
    assert sorted(found) == sorted(files)
    names = dict(zip(found, P.assign_case_names(found)))
    for i, suffix in enumerate(REGISTRY_SUFFIXES):
        assert names[folder / f"im{i}{suffix}"] == f"im{i}", suffix
        assert names[folder / f"UP{i}{suffix.upper()}"] == f"UP{i}", suffix

    pair = tmp_path / "pair"
    pair.mkdir()
    for name in ("a.hdr", "a.img", "b.hdr.gz", "b.img.gz", "lone.img"):
        (pair / name).write_bytes(b"")
    rel = lambda ps: [p.relative_to(pair).as_posix() for p in ps]  # noqa: E731
    assert rel(P.find_inputs(pair)) == ["a.hdr", "b.hdr.gz", "lone.img"]
    assert P.assign_case_names(P.find_inputs(pair)) == ["a", "b", "lone"]
    (pair / "b.hdr.gz").unlink()
    (pair / "lone.img").unlink()
    assert rel(P.find_inputs(pair)) == ["a.hdr", "b.img.gz"], "an .img without its .hdr is an input"


# the bundle's `inference#inferer` replaced by a sliding window as large as the network input
# (64 x 80): one window per image, so the landmarks must be those of the default SimpleInferer
WINDOW = """
inference#inferer:
  _target_: SlidingWindowInferer
  roi_size: '@input_size'
  sw_batch_size: 1
  overlap: 0.25
  mode: constant
"""


def test_prediction_runs_the_bundles_inferer(data, monkeypatch):
    bundle = data["bundle"]
    (bundle / "configs" / "window.yaml").write_text(WINDOW)
    default = P.load_bundle(P.PredictOptions(bundle, data["inputs"], data["root"] / "unused", configs=["tiny.yaml"]))
    assert isinstance(default.inferer, SimpleInferer), "base.yaml: inference#inferer is @validate#inferer"
    calls = []
    real = SlidingWindowInferer.__call__

    def spy(self, inputs, network, *args, **kwargs):
        calls.append((type(self), tuple(inputs.shape)))
        return real(self, inputs, network, *args, **kwargs)

    monkeypatch.setattr(SlidingWindowInferer, "__call__", spy)
    listing = data["root"] / "good.lst"
    listing.write_text("".join(f"inputs/{p.name}\n" for p in sorted(data["inputs"].glob("case*"))))
    out = data["root"] / "window"
    code = run(bundle, listing, out, "--config", "tiny.yaml", "--config", "window.yaml", "--batch-size", 2,
               "--num-workers", 0, "--quiet")
    assert code == 0
    assert calls == [(SlidingWindowInferer, (2, 1, 64, 80))] * 2, "one inferer call per forward pass (3 cases, batch 2)"
    ref, got = read_landmark_table(data["out"] / "landmarks.csv"), read_landmark_table(out / "landmarks.csv")
    assert sorted(got) == GOOD
    voxel_mm = 3.0  # TINY_SCN spacing_mm
    for case in GOOD:
        np.testing.assert_allclose(got[case].coords, ref[case].coords, atol=0.5 * voxel_mm, rtol=0)


def test_decoding_failure_is_reported_per_case(data, monkeypatch):
    def broken(self, d):
        raise RuntimeError("peak search exploded")

    monkeypatch.setattr(DecodeLandmarksd, "__call__", broken)
    out = data["root"] / "decode"
    code = run(data["bundle"], data["inputs"] / "case01.nii.gz", out, "--config", "tiny.yaml", "--num-workers", 0,
               "--quiet")
    assert code == 1
    (err,) = read_csv(out / "errors.csv")
    assert err["case"] == "case01" and "decoding failed" in err["error"] and "exploded" in err["error"]
    assert read_landmark_table is not None and len(read_csv(out / "landmarks.csv")) == 0


def test_usage_errors(data, tmp_path, capsys):
    bundle, inputs = data["bundle"], data["inputs"]
    no_model = tmp_path / "no_model"
    shutil.copytree(bundle / "configs", no_model / "configs")
    (tmp_path / "empty").mkdir()
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    other, broken = tmp_path / "other.pt", tmp_path / "broken.pt"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    torch.save({"weight": torch.zeros(3)}, broken)
    cases = {
        "bundle folder not found": (tmp_path / "nope", inputs, tmp_path / "o1"),
        "model not found": (no_model, inputs, tmp_path / "o2", "--config", "tiny.yaml"),
        "no inputs found": (bundle, tmp_path / "empty", tmp_path / "o3", "--config", "tiny.yaml"),
        "input not found": (bundle, tmp_path / "nothing.nii.gz", tmp_path / "o4", "--config", "tiny.yaml"),
        "--format": (bundle, inputs, tmp_path / "o5", "--config", "tiny.yaml", "--format", "xml"),
        "config not found": (bundle, inputs, tmp_path / "o6", "--config", "missing.yaml"),
        "another model": (bundle, inputs, data["out"], "--config", "tiny.yaml", "--model", other),
        "cannot load the model": (bundle, inputs, tmp_path / "o9", "--config", "tiny.yaml", "--model", broken),
    }
    for expected, argv in cases.items():
        capsys.readouterr()
        assert run(*argv, "--quiet") == 2, expected
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o2").exists(), "usage errors leave no output folder behind"
    with pytest.raises(SystemExit) as e:
        run(bundle, inputs, tmp_path / "o7", "--batch-size", "0")
    assert e.value.code == 2
    # cmd_predict on a Namespace from add_predict_parser (how cli.py wires it)
    parser = argparse.ArgumentParser()
    P.add_predict_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predict", str(tmp_path / "nope"), str(inputs), str(tmp_path / "o8")])
    assert args.func is P.cmd_predict and args.func(args) == 2


class Payload:
    """Stands for an arbitrary pickled object inside a model file (it could run code when unpickled)."""


def test_model_file_with_pickled_objects_is_refused(data, tmp_path, capsys):
    state = torch.load(data["bundle"] / "models" / "model.pt", weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "payload": Payload()}, evil)
    code = run(data["bundle"], data["inputs"], tmp_path / "out", "--config", "tiny.yaml", "--model", evil, "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the model" in err and "evil.pt" in err
    assert "Payload" in err or "weights_only" in err.lower() or "unsupported global" in err.lower()


# ------------------------------------------------------------------------------------------------
# reliability, round 2 (issue 15): output names, symlinks, write errors, earlier outputs, workers

ALL_FORMATS = ("csv", "mrk.json", "fcsv", "json")


def test_output_file_names_cannot_collide():
    """Every case file name comes from one function; case names hold no dot, so the text after the
    first dot tells the kind and the text before it the case: no two (case, kind) share a file."""
    tricky = ["a.nii.gz", "a.mrk.nii.gz", "a.fcsv.nii.gz", "a.json.nii", "a_heatmaps.nii.gz", "a_overlay.png",
              "a_heatmaps.mrk.nii.gz", "A.MRK.nii.gz", "x.y.z.mha", "landmarks.nii.gz", "errors.png", "..b.png"]
    cases = P.assign_case_names([Path("/d") / n for n in tricky])
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", c) for c in cases), cases
    opts = P.PredictOptions("b", "i", "o", formats=ALL_FORMATS, save_heatmaps=True, overlays=True)
    owner: dict[str, tuple[str, str]] = {}
    for case in cases:
        names = P.case_file_names(case, opts)
        assert len(names) == len(ALL_FORMATS) - 1 + 2
        for kind, name in zip(P.CASE_FILE_KINDS, [P.case_file_name(case, k) for k in P.CASE_FILE_KINDS]):
            assert name.casefold() not in owner, f"{name}: {owner.get(name.casefold())} and {(case, kind)}"
            owner[name.casefold()] = (case, kind)
            assert P.parse_case_file_name(name) == (case, kind)
    assert not {"landmarks.csv", "measurements.csv", "errors.csv", "warnings.csv"} & set(owner)
    with pytest.raises(ValueError):
        P.case_file_name("a.mrk", "json")  # not a case name: it could collide


def test_cases_a_and_a_mrk_keep_all_their_files(data, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(data["inputs"] / "case01.nii.gz", inputs / "a.nii.gz")
    shutil.copy(data["inputs"] / "case02.nii.gz", inputs / "a.mrk.nii.gz")
    out = tmp_path / "out"
    argv = (data["bundle"], inputs, out, "--config", "tiny.yaml", "--format", "csv,mrk.json,json", "--num-workers", 0,
            "--quiet")
    assert run(*argv) == 0
    table = read_landmark_table(out / "landmarks.csv")
    assert len(table) == 2
    states = {p.stem: json.loads(p.read_text()) for p in (out / P.STATE_DIR / "cases").glob("*.json")}
    assert sorted(states) == sorted(table)
    files = [f for s in states.values() for f in s["files"]]
    assert len(files) == len(set(files)) == 4, files
    for case, s in states.items():
        for f in s["files"]:
            np.testing.assert_allclose(read_landmarks(out / f, spatial_dims=2).coords, table[case].coords, atol=1e-6)
    assert not np.allclose(table["a"].coords, table[next(c for c in table if c != "a")].coords)
    capsys.readouterr()
    assert run(*argv) == 0
    assert "0 processed, 2 skipped" in capsys.readouterr().out


def test_case_files_are_removed_by_exact_name_never_by_prefix(tmp_path):
    store = CaseStore(tmp_path, ["A"], 2)
    for name in ("a.mrk.json", "ab.mrk.json", "a_b.json"):
        (tmp_path / name).write_text(name)
    payload = {"coords": [[1.0, 2.0]], "confidence": [1.0], "measurements": {},
               "files": ["a.mrk.json", "ab.mrk.json", "a_b.json"]}  # a state listing files of other cases
    store.put_done("a", str(tmp_path / "a.nii.gz"), payload)
    store.put_failed("a", str(tmp_path / "a.nii.gz"), "failed now")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a_b.json", "ab.mrk.json"]
    store.put_done("ab", str(tmp_path / "ab.nii.gz"), {**payload, "files": ["ab.mrk.json"]})
    store.drop("a")
    assert (tmp_path / "ab.mrk.json").read_text() == "ab.mrk.json"


@pytest.mark.parametrize("link", [".heatmark", ".heatmark/cases", "case01.mrk.json", "landmarks.csv"])
def test_symbolic_links_in_output_are_refused(data, tmp_path, capsys, link):
    """OUTPUT/.heatmark, its cases/ folder or an output file that is a symbolic link (here to a
    folder outside OUTPUT): refused before anything is written or deleted, there or here."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cases").mkdir(parents=True)
    (elsewhere / f"{TMP_PREFIX}keep.json").write_text("not debris of this run")
    (elsewhere / "cases" / f"{TMP_PREFIX}keep.json").write_text("not debris either")
    (elsewhere / "target.txt").write_text("someone else's file")
    out = tmp_path / "out"
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere if "." not in Path(link).name or link == ".heatmark" else elsewhere / "target.txt",
               out / link)
    before = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = run(data["bundle"], data["inputs"] / "case01.nii.gz", out, "--config", "tiny.yaml", "--num-workers", 0,
               "--quiet")
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and str(out / link) in err and "symbolic link" in err, err
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == before
    assert (out / link).is_symlink()


def test_debris_cleanup_does_not_follow_symbolic_links(data, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"{TMP_PREFIX}x.json").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / f"{TMP_PREFIX}dir")  # debris by name, but a link to a folder elsewhere
    os.symlink(elsewhere / f"{TMP_PREFIX}x.json", out / f"{TMP_PREFIX}file.json")
    assert run(data["bundle"], data["inputs"] / "case01.nii.gz", out, "--config", "tiny.yaml", "--num-workers", 0,
               "--quiet") == 0
    assert (elsewhere / f"{TMP_PREFIX}x.json").read_text() == "keep"
    assert not (out / f"{TMP_PREFIX}file.json").is_symlink()  # the link itself is debris: removed


def fail_writes_after(n: int, err: int):
    """os.replace that raises OSError(err) from the (n+1)-th rename of a temporary file on."""
    real = os.replace
    count = [0]

    def replace(src, dst, *args, **kwargs):
        if Path(os.fspath(src)).name.startswith(TMP_PREFIX):
            count[0] += 1
            if count[0] > n:
                raise OSError(err, os.strerror(err))
        return real(src, dst, *args, **kwargs)

    return replace


@pytest.mark.parametrize("n", [0, 3, 8])
def test_disk_full_stops_in_one_line_and_a_rerun_resumes_identically(data, monkeypatch, capsys, n):
    out = data["root"] / f"full{n}"
    argv = (data["bundle"], data["inputs"], out, "--config", "tiny.yaml", "--batch-size", 2, "--num-workers", 0,
            "--quiet")
    monkeypatch.setattr(os, "replace", fail_writes_after(n, errno.ENOSPC))
    capsys.readouterr()
    code = run(*argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("heatmark predict: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and "rerun" in lines[0] and str(out) in lines[0], lines[0]
    assert no_temporary_files(out)
    monkeypatch.undo()
    assert run(*argv) == 1  # the bad inputs
    for name in ("landmarks.csv", "measurements.csv", "errors.csv"):
        assert (out / name).read_bytes() == (data["out"] / name).read_bytes(), name
    for case in GOOD:
        assert (out / f"{case}.mrk.json").read_bytes() == (data["out"] / f"{case}.mrk.json").read_bytes()


def test_write_error_with_debug_shows_the_traceback(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "replace", fail_writes_after(2, errno.ENOSPC))
    code = run(data["bundle"], data["inputs"] / "case01.nii.gz", tmp_path / "out", "--config", "tiny.yaml",
               "--num-workers", 0, "--quiet", "--debug")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "No space left on device" in err


def test_read_only_output_is_one_line_exit_1(data, tmp_path, monkeypatch, capsys):
    """A new OUTPUT in a read-only place (mkdir: EROFS) and an existing one without write
    permission (EACCES on the first file), simulated so that the test also runs as root."""
    new = tmp_path / "ro" / "out"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if tmp_path / "ro" in [self, *self.parents]:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    capsys.readouterr()
    code = run(data["bundle"], data["inputs"] / "case01.nii.gz", new, "--config", "tiny.yaml", "--num-workers", 0,
               "--quiet")
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "Read-only file system" in err and str(new) in err and "rerun" in err, err
    monkeypatch.undo()

    existing = tmp_path / "existing"
    existing.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or ".").resolve().is_relative_to(existing.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(kwargs.get("dir")))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code = run(data["bundle"], data["inputs"] / "case01.nii.gz", existing, "--config", "tiny.yaml", "--num-workers",
               0, "--quiet")
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "Permission denied" in err and str(existing) in err and "rerun" in err, err


def test_recursive_skips_earlier_outputs_and_output(data, tmp_path, capsys):
    study = tmp_path / "study"
    (study / "sub").mkdir(parents=True)
    shutil.copy(data["inputs"] / "case01.nii.gz", study / "a.nii.gz")
    shutil.copy(data["inputs"] / "case02.nii.gz", study / "sub" / "b.nii.gz")
    opts = ("--config", "tiny.yaml", "--recursive", "--save-heatmaps", "--overlays", "--num-workers", 0, "--quiet")
    assert run(data["bundle"], study, study / "results", *opts) == 0
    capsys.readouterr()
    assert run(data["bundle"], study, study / "results", *opts) == 0
    assert "0 processed, 2 skipped" in capsys.readouterr().out
    # an earlier OUTPUT inside INPUT (it holds .heatmark) is not read back as input
    assert run(data["bundle"], study, tmp_path / "elsewhere", *opts) == 0
    assert sorted(read_landmark_table(tmp_path / "elsewhere" / "landmarks.csv")) == ["a", "b"]
    assert P.find_inputs(study, recursive=True) == [study / "a.nii.gz", study / "sub" / "b.nii.gz"]
    # OUTPUT itself, named through a symbolic link to INPUT's folder, before it holds .heatmark
    (study / "fresh").mkdir()
    shutil.copy(data["inputs"] / "case03.nii", study / "fresh" / "c.nii")
    os.symlink(study, tmp_path / "alias")
    assert [p.name for p in P.find_inputs(study, recursive=True, exclude=[tmp_path / "alias" / "fresh"])] == \
        ["a.nii.gz", "b.nii.gz"]


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc/*/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; its new parent may not have reaped it yet


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
def test_data_loading_workers_end_with_their_parent(data, tmp_path):
    inputs = tmp_path / "many"
    inputs.mkdir()
    for i in range(200):
        shutil.copy(data["inputs"] / "case01.nii.gz", inputs / f"c{i:03d}.nii.gz")
    cmd = [sys.executable, "-m", "heatmark.cli", "predict", str(data["bundle"]), str(inputs), str(tmp_path / "out"),
           "--config", "tiny.yaml", "--num-workers", "2", "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.01)
        assert len(workers) >= 2, f"predict did not start its 2 data loading workers ({proc.poll()=})"
        time.sleep(0.5)  # the workers at work (killed at once, they may die of the broken pipe alone)
        assert proc.poll() is None, "predict ended before it could be killed; give it more inputs"
        proc.kill()
        proc.wait(timeout=30)
        # torch's own watchdog ends orphaned workers only at their next 5 s status check (after the
        # item in hand): a 5 s bound would not tell; the parent-death signal ends them at once
        end = time.monotonic() + 2
        while time.monotonic() < end and any(_alive(w) for w in workers):
            time.sleep(0.02)
        assert not [w for w in workers if _alive(w)], "data loading workers outlived their parent by 2 s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for w in workers:
            if _alive(w):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w, signal.SIGKILL)
