"""The AFIDs 3D bundle (bundles/afids_brain_mr): the smoke train -> evaluate cycle through
`python -m monai.bundle run`, fixed validation deformations, landmarks that stay on the anatomy
through the training deformations, and the bundle's own consistency (names, pairs, measurements).

Also unit tests of heatmark.transforms.augment (SeededRandomd, MemoizeTransformd), which need no data.
Tests using ../shared/data/afids skip with a clear reason when it is absent.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, bundle_cmd, bundle_parser, require_shared_data, run
from heatmark.training import latest_checkpoint
from heatmark.transforms.augment import MemoizeTransformd, SeededRandomd
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, RandAffined, RandGaussianNoised

BUNDLE = REPO_ROOT / "bundles" / "afids_brain_mr"
CONFIGS = BUNDLE / "configs"


def parser_for(*overlays: str, data: Path | None = None, **overrides) -> ConfigParser:
    if data is not None:
        overrides["dataset_dir"] = str(data)
    return bundle_parser(BUNDLE, "training", overlays, **overrides)


# ------------------------------------------------------------------------------------------------
# end to end through `python -m monai.bundle run`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = require_shared_data("afids")
    work = tmp_path_factory.mktemp("afids_bundle")
    bundle = work / "afids_brain_mr"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    train = run(bundle_cmd(bundle, "training", ["smoke.yaml"], "--dataset_dir", str(data),
                           "--tracking", "mlflow"), cwd=work)
    evaluate = run(bundle_cmd(bundle, "evaluating", ["smoke.yaml"],
                              "--dataset_dir", str(data)), cwd=work)
    return {"data": data, "work": work, "bundle": bundle, "train_log": train.stdout + train.stderr,
            "eval_log": evaluate.stdout + evaluate.stderr}


def test_training_writes_model_checkpoint_and_validation_report(trained):
    bundle = trained["bundle"]
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state["format"] == "heatmark-model", "models/model.pt is a self-describing model file"
    state = state["state_dict"]
    assert any(k.endswith(".weight") for k in state), "models/model.pt holds the network's state_dict"
    ckpts = list((bundle / "runs" / "checkpoints").glob("checkpoint*.pt"))
    assert len(ckpts) == 2  # the newest two: resume falls back to the older if the newest is damaged
    ckpt = torch.load(latest_checkpoint(bundle / "runs" / "checkpoints"), weights_only=True)
    assert set(ckpt) >= {"network", "optimizer", "lr_scheduler", "loss", "trainer"}
    # smoke: 4 training deformations, batch 2, 2 epochs
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["epoch_length"] == 2
    assert ckpt["loss"]["sigma"].shape == (32,), "one learned sigma per AFID"
    metrics = json.loads((bundle / "runs" / "validation" / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["n_valid"] == 2 * 32
    assert "peak:" in trained["train_log"] and "val_mre" in trained["train_log"]


def test_evaluation_files(trained):
    ev = trained["bundle"] / "runs" / "eval"
    names = {p.name for p in ev.iterdir()}
    assert {"metrics.json", "per_landmark.csv", "point_errors.csv", "predictions.csv"} <= names
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["n_landmarks"] == 32 and metrics["n_valid"] == 2 * 32
    assert 0.0 < metrics["mean"] < 250.0
    from heatmark.landmarks import read_landmark_table

    preds = read_landmark_table(ev / "predictions.csv")
    # evaluation deformations come from their own seed range, disjoint from validation's
    assert sorted(preds) == ["deform200000", "deform200001"]
    assert all(lm.coords.shape == (32, 3) for lm in preds.values())
    val = read_landmark_table(trained["bundle"] / "runs" / "validation" / "predictions.csv")
    assert sorted(val) == ["deform100000", "deform100001"]


def test_mlflow_run_holds_the_deformation_settings(trained):
    import mlflow

    client = mlflow.MlflowClient("sqlite:///" + str(trained["bundle"] / "runs" / "mlruns.db"))
    exp = client.get_experiment_by_name("afids_brain_mr")
    (run_,) = client.search_runs([exp.experiment_id])
    params = run_.data.params
    assert params["network"] == "SpatialConfigurationNet" and params["spacing_mm"] == "6.0"
    assert params["num_train_cases"] == "4" and params["deformation.rotate_deg"] == "10.0"
    assert int(params["network_parameters"]) > 0
    assert {"train_loss", "val_mre", "val_sdr_2mm"} <= set(run_.data.metrics)


# ------------------------------------------------------------------------------------------------
# fixed validation deformations; landmarks follow the anatomy


@pytest.fixture(scope="module")
def val_pipeline():
    data = require_shared_data("afids")
    parser = parser_for("smoke.yaml", data=data, num_val_cases=3)
    return {"parser": parser, "transform": parser.get_parsed_content("validate#preprocessing"),
            "datalist": parser.get_parsed_content("val_datalist")}


def test_validation_deformation_is_fixed_per_case_and_differs_between_cases(val_pipeline):
    t, cases = val_pipeline["transform"], val_pipeline["datalist"]
    assert [c["seed"] for c in cases] == [100000, 100001, 100002]
    a1, a2, b = t(dict(cases[0])), t(dict(cases[0])), t(dict(cases[1]))
    assert torch.equal(a1["image"], a2["image"]), "the same case gives the same deformed volume"
    assert torch.equal(a1["landmarks_voxel"], a2["landmarks_voxel"])
    assert not torch.allclose(a1["image"], b["image"]), "another case is another deformation"
    assert (a1["landmarks_voxel"] - b["landmarks_voxel"]).abs().max() > 0.3
    # independent of anything drawn in between (global seeds, training augmentation)
    train = val_pipeline["parser"].get_parsed_content("train#preprocessing")
    t1, t2 = train(dict(cases[0])), train(dict(cases[0]))
    assert not torch.equal(t1["image"], t2["image"]), "training draws a new deformation every time"
    torch.manual_seed(123)
    np.random.seed(123)
    a3 = t(dict(cases[0]))
    assert torch.equal(a1["image"], a3["image"])
    assert a1["case"] == "deform100000" and a1["seed"] == 100000


def _trilinear(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Sample a (X, Y, Z) volume at (M, 3) voxel positions (align_corners: voxel i at index i)."""
    size = torch.tensor(volume.shape, dtype=torch.float64)
    norm = (2.0 * points / (size - 1) - 1.0).flip(-1)  # grid_sample wants (z, y, x) -> (W, H, D) order
    grid = norm.reshape(1, -1, 1, 1, 3).float()
    out = torch.nn.functional.grid_sample(volume[None, None].float(), grid, mode="bilinear", align_corners=True)
    return out.reshape(-1).double()


def test_deformed_landmarks_stay_on_the_template_anatomy():
    """Sample the deformed volume at the moved landmarks and the undeformed template at the original
    ones: the intensities agree (same anatomy under the point), while ignoring the deformation does not."""
    data = require_shared_data("afids")
    parser = parser_for(data=data, num_val_cases=2, num_train_cases=1)  # the real 2 mm grid
    template = parser.get_parsed_content("cached_preprocessing")
    deform = parser.get_parsed_content("val_deformation")
    to_voxels = Compose(parser.get_parsed_content("to_voxels"))
    case = parser.get_parsed_content("val_datalist")[0]
    undeformed = to_voxels(template(dict(case)))
    deformed = to_voxels(deform(template(dict(case))))
    assert deformed["image"].shape == undeformed["image"].shape == (1, 96, 112, 96)
    p0, p1 = undeformed["landmarks_voxel"], deformed["landmarks_voxel"]
    assert torch.isfinite(p1).all(), "no AFID leaves the field of view"
    moved_mm = ((p1 - p0).norm(dim=-1) * 2.0).mean()
    assert moved_mm > 2.0, f"the deformation should move landmarks by millimetres, moved {moved_mm:.2f} mm"
    ref = _trilinear(undeformed["image"][0], p0)
    followed = (_trilinear(deformed["image"][0], p1) - ref).abs().mean()
    ignored = (_trilinear(deformed["image"][0], p0) - ref).abs().mean()
    span = float(undeformed["image"].max() - undeformed["image"].min())
    assert followed < 0.08 * span, f"mean |difference| {followed:.3f} at the moved landmarks (range {span:.2f})"
    assert followed < 0.5 * ignored, f"following the deformation ({followed:.3f}) must beat ignoring it ({ignored:.3f})"


# ------------------------------------------------------------------------------------------------
# the bundle's own consistency


def test_names_pairs_and_measurements_agree_with_the_data():
    data = require_shared_data("afids")
    parser = parser_for("smoke.yaml", data=data)
    from heatmark.landmarks import read_landmarks

    names = parser.get_parsed_content("landmark_names")
    assert names == read_landmarks(parser.get_parsed_content("landmarks_file")).names
    assert parser.get_parsed_content("num_landmarks") == 32
    pairs = parser.get_parsed_content("flip_pairs")
    assert all(names[i].startswith("R ") and names[j] == "L " + names[i][2:] for i, j in pairs)
    assert {n for n in names if n[:2] in ("R ", "L ")} == {names[k] for p in pairs for k in p}, "every side paired"
    with pytest.raises(Exception, match="not in the file"):
        import heatmark.data

        heatmark.data.deformation_datalist(parser.get_parsed_content("image_file"),
                                           parser.get_parsed_content("landmarks_file"), 1, 0, ["AC", "ACC"])
    inference = bundle_parser(BUNDLE, "inference", ["smoke.yaml"])
    from heatmark.evaluation.metrics import measure

    coords = read_landmarks(parser.get_parsed_content("landmarks_file")).coords
    values = measure(coords, names, inference.get_parsed_content("measurements"))
    assert 24.0 < values["AC_PC_mm"] < 32.0, "AC-PC distance of an adult brain (~27 mm in MNI space)"
    pre = inference.get_parsed_content("inference#preprocessing")
    out = pre({"image": parser.get_parsed_content("image_file")})
    assert tuple(out["image"].shape) == (1, 32, 40, 32)


def test_metadata_mirrors_the_2d_bundle():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    isbi = json.loads((REPO_ROOT / "bundles" / "isbi2015_cephalometric" / "configs" / "metadata.json").read_text())
    assert set(meta) == set(isbi)
    out = meta["network_data_format"]["outputs"]["pred"]
    assert out["num_channels"] == 32 and len(out["channel_def"]) == 32
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [96, 112, 96]
    for f in ("train.yaml", "smoke.yaml", "cpu.yaml"):
        assert (CONFIGS / f).is_file(), f
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "LICENSE").is_file()


# ------------------------------------------------------------------------------------------------
# heatmark.transforms.augment on synthetic data (no files needed)


def _volume() -> MetaTensor:
    g = torch.Generator().manual_seed(0)
    return MetaTensor(torch.rand(1, 12, 14, 10, generator=g), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))


def test_seeded_randomd_is_deterministic_thread_safe_and_leaves_its_transform_alone():
    affine = RandAffined("image", prob=1.0, rotate_range=0.3, padding_mode="zeros")
    noise = RandGaussianNoised("image", prob=1.0)
    seeded = SeededRandomd(Compose([affine, noise]), seed_key="seed")
    vol = _volume()
    ref = {s: seeded({"image": vol.clone(), "seed": s})["image"] for s in (1, 2)}
    assert not torch.allclose(ref[1], ref[2])
    state = affine.R.get_state()[1].copy()
    results: dict[int, list] = {1: [], 2: []}

    def work(s: int) -> None:
        for _ in range(3):
            results[s].append(seeded({"image": vol.clone(), "seed": s})["image"])

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(r, ref[s]) for s in (1, 2) for r in results[s])
    assert np.array_equal(affine.R.get_state()[1], state), "the caller's transform is not reseeded"
    with pytest.raises(KeyError, match="seed"):
        seeded({"image": vol})
    assert SeededRandomd(Compose([noise]), allow_missing_keys=True)({"image": vol})["image"] is vol
    from monai.transforms import Randomizable

    assert not isinstance(seeded, Randomizable), "deterministic: CacheDataset caches its output"


class _Double:
    """A deterministic transform that counts its calls (module level: picklable)."""

    def __init__(self):
        self.calls = []

    def __call__(self, d):
        self.calls.append(1)
        return {"image": d["image"] * 2.0}


def test_memoize_transformd_runs_once_per_input_and_hands_out_copies():
    double = _Double()
    calls = double.calls
    memo = MemoizeTransformd(Compose([double]), keys=["image"], maxsize=1)
    vol = _volume()
    a = memo({"image": vol, "case": "a"})
    b = memo({"image": vol, "case": "b"})
    assert len(calls) == 1 and memo.hits == 1
    assert a["case"] == "a" and b["case"] == "b", "other keys keep each entry's identity"
    a["image"] += 100.0  # a later in-place transform must not reach the memo
    assert torch.allclose(memo({"image": vol})["image"], vol * 2.0)
    memo({"image": vol + 1.0})
    assert len(calls) == 2
    memo({"image": vol})
    assert len(calls) == 3, "maxsize=1 keeps only the most recent input"
    import pickle

    clone = pickle.loads(pickle.dumps(memo))  # spawned DataLoader workers
    clone({"image": vol})
    assert clone.hits == memo.hits + 1
    with pytest.raises(TypeError, match="random"):
        MemoizeTransformd(Compose([RandGaussianNoised("image", prob=1.0)]), keys=["image"])
