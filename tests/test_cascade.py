"""The coarse-to-fine cascade (DESIGN section 7b): the patch resampler keeps world points exact
under oblique and flipped affines; a blob at a known world point in a volume larger than the patch
decodes back within a quarter of a fine voxel; the cascade beats its coarse stage on a small task
where a patch affine off by its half-size would fail; coarse estimates that are missing, weak or
outside the image become missing landmarks with a reason; and a tiny cascade bundle trains both
stages from one `run` and predicts through `heatmark predict` and `heatmark.load_model` (the MLflow
link between the two stages' runs is checked by tests/test_demo.py, which tracks its training)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

import heatmark
from conftest import REPO_ROOT
from heatmark.bundle import bundle_config_files, run_bundle
from heatmark.core.geometry import voxel_to_world, world_to_voxel
from heatmark.evaluation.decoding import decode_heatmaps
from heatmark.landmarks import read_landmark_table
from heatmark.predict import main as predict_main
from heatmark.predict import cascade as C
from heatmark.transforms import RandFinePatchd, ResamplePatch, WorldToVoxeld, patch_affine
from heatmark.transforms.cascade import inside_patch, patch_datalist


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(spacing=(0.8, 0.9, 1.1), flip=(1, -1, 1), origin=(-40.0, 35.0, -30.0)) -> torch.Tensor:
    a = np.eye(4)
    a[:3, :3] = rotation(0.3, -0.2, 0.5) @ np.diag(np.asarray(spacing) * np.asarray(flip))
    a[:3, 3] = origin
    return torch.as_tensor(a)


def world_grid(shape, affine) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    return np.asarray(voxel_to_world(index.astype(np.float64), np.asarray(affine))).reshape(*shape, len(shape))


def blob_volume(center_mm: np.ndarray, shape=(96, 100, 80), sigma_mm: float = 2.5, affine=None) -> MetaTensor:
    """A Gaussian blob (peak 1, ``sigma_mm``) at a world point in a volume with an oblique, flipped affine."""
    affine = oblique_affine() if affine is None else affine
    grid = world_grid(shape, affine)
    data = np.exp(-0.5 * ((grid - center_mm) ** 2).sum(-1) / sigma_mm**2).astype(np.float32)
    return MetaTensor(torch.as_tensor(data)[None], affine=affine)


class Identity(torch.nn.Module):
    """Analytic stand-in network: the image itself as the heatmap of every landmark."""

    def __init__(self, num_landmarks: int):
        super().__init__()
        self.n = num_landmarks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.n, *x.shape[2:])


def fine_stage(spacing=1.0, size=24, min_confidence=0.0, n=1, method="gaussian", radius=0.0, fallback=0.0,
               stride=1) -> C.FineStage:
    return C.FineStage(network=Identity(n) if stride == 1 else torch.nn.Sequential(Identity(n), torch.nn.AvgPool3d(stride)),
                       preprocessing=lambda d: d, after_loader=lambda d: d,
                       spacing_mm=(spacing,) * 3, patch_size=(size,) * 3, output_stride=(stride,) * 3,
                       decode_method=method, min_confidence=min_confidence, batch_size=4,
                       device=torch.device("cpu"), model=Path("model_fine.pt"), sha256="", search_radius_mm=radius,
                       fallback_confidence=fallback)


# ---------------------------------------------------------------------------------------------------
# the patch resampler


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, -1)])
def test_patch_keeps_world_points_exact_under_oblique_and_flipped_affines(flip):
    affine = oblique_affine(flip=flip)
    shape = (60, 64, 50)
    grid = world_grid(shape, affine)
    coef = np.array([0.7, -0.4, 0.25])
    image = MetaTensor(torch.as_tensor((grid @ coef + 5.0).astype(np.float64))[None], affine=affine)
    center = grid[30, 30, 25] + np.array([0.37, -0.61, 0.2])
    patch = ResamplePatch(spacing_mm=(0.6, 0.75, 0.5), size=(11, 12, 9))(image, center)
    assert tuple(patch.shape) == (1, 11, 12, 9)
    a = np.asarray(patch.affine)
    np.testing.assert_allclose(a, patch_affine(center, (0.6, 0.75, 0.5), (11, 12, 9), affine).numpy(), atol=1e-9)
    # its centre voxel sits on the requested world point, its axes are the image's directions
    np.testing.assert_allclose(voxel_to_world(np.array([[5.0, 5.5, 4.0]]), a)[0], center, atol=1e-9)
    dirs = np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    np.testing.assert_allclose(a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0), dirs, atol=1e-12)
    # a linear intensity is reproduced exactly by (multi)linear interpolation: every patch voxel holds
    # the value of its world position through the patch affine
    expected = world_grid((11, 12, 9), a) @ coef + 5.0
    np.testing.assert_allclose(patch[0].numpy(), expected, atol=1e-3)
    # and a world landmark maps to the same voxel through WorldToVoxeld
    point = center + np.array([1.3, -0.9, 0.4])
    vox = WorldToVoxeld("landmarks")({"image": patch, "landmarks": torch.as_tensor(point[None])})["landmarks_voxel"]
    np.testing.assert_allclose(np.asarray(world_to_voxel(point[None], a)), vox.numpy(), atol=1e-9)


def test_patch_2d_and_padding_outside_the_image():
    affine = torch.tensor([[0.0, -0.5, 10.0], [0.7, 0.0, -3.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    image = MetaTensor(torch.ones(1, 20, 30), affine=affine)
    corner = voxel_to_world(np.zeros((1, 2)), affine.numpy())[0]
    patch = ResamplePatch(1.0, 8)(image, corner)  # centred on the first voxel: three quarters outside
    assert tuple(patch.shape) == (1, 8, 8) and tuple(patch.affine.shape) == (3, 3)
    assert 0.0 < float(patch.mean()) < 0.5  # zero padding outside
    assert inside_patch(corner[None], patch.affine, (8, 8)).tolist() == [True]


def test_training_patches_jitter_and_validation_entries():
    affine = oblique_affine()
    truth = np.array([[0.0, 5.0, -3.0], [20.0, -12.0, 8.0], [np.nan] * 3])
    image = blob_volume(truth[0], shape=(80, 80, 70))
    t = RandFinePatchd("image", spacing_mm=1.0, size=16, jitter_mm=(2.0, 3.0, 4.0))
    t.set_random_state(0)
    offsets = []
    for _ in range(300):
        t.randomize((truth, 0))
        offsets.append(t._offset)
    sd = np.std(offsets, axis=0)
    np.testing.assert_allclose(sd, [2.0, 3.0, 4.0], rtol=0.15)
    out = t({"image": image, "landmarks": torch.as_tensor(truth), "patch_landmark": 1})
    assert out["patch_landmark"] == 1 and tuple(out["image"].shape) == (1, 16, 16, 16)
    np.testing.assert_allclose(voxel_to_world(np.array([[7.5] * 3]), np.asarray(out["image"].affine))[0],
                               out["patch_center"].numpy(), atol=1e-9)
    np.testing.assert_array_equal(out["landmarks"].numpy(), truth)  # world landmarks untouched
    # validation: only the centred landmark is scored; a missing one gives nothing to score
    v = RandFinePatchd("image", spacing_mm=1.0, size=16, only_center=True)
    got = v({"image": image, "landmarks": torch.as_tensor(truth), "patch_landmark": 1})["landmarks"].numpy()
    assert np.isnan(got[[0, 2]]).all() and np.allclose(got[1], truth[1])
    got = v({"image": image, "landmarks": torch.as_tensor(truth), "patch_landmark": 2})["landmarks"].numpy()
    assert np.isnan(got).all()
    entries = patch_datalist([{"image": "a"}, {"image": "b"}], 3, seed=10)
    assert [(e["image"], e["patch_landmark"], e["patch_seed"]) for e in entries][:4] == [
        ("a", 0, 10), ("a", 1, 11), ("a", 2, 12), ("b", 0, 13)]


# ---------------------------------------------------------------------------------------------------
# the fine stage on analytic heatmaps


def coarse_estimate(image: MetaTensor, spacing_mm: float) -> np.ndarray:
    """The coarse stage stand-in: the image resampled to ``spacing_mm`` and decoded at the integer
    argmax (errors up to half a coarse voxel per axis)."""
    coarse = Spacing(pixdim=(spacing_mm,) * 3)(image)
    dec = decode_heatmaps(coarse[None].as_tensor(), method="argmax", affine=coarse.affine)
    return dec.world[0].numpy()


def test_blob_in_a_large_oblique_volume_decodes_within_a_quarter_fine_voxel():
    point = np.array([3.3, -4.1, 2.6])
    image = blob_volume(point)  # 96 x 100 x 80 voxels, far larger than the 24^3 patch
    start = point + np.array([4.0, -3.0, 2.5])  # a coarse estimate 5.6 mm off
    world, conf, warnings = C.refine(fine_stage(spacing=1.0), image, start[None], np.ones(1), ["blob"])
    assert warnings == []
    assert np.linalg.norm(world[0] - point) < 0.25 * 1.0
    assert conf[0] > 0.9


def test_cascade_beats_its_coarse_stage_and_a_broken_patch_affine_fails(monkeypatch):
    rng = np.random.default_rng(1)
    points = rng.uniform(-12, 12, size=(4, 3))
    coarse_err, fine_err = [], []
    for p in points:
        image = blob_volume(p, shape=(80, 80, 70), sigma_mm=3.0)
        est = coarse_estimate(image, 4.0)
        world, _, _ = C.refine(fine_stage(spacing=0.8, size=20), image, est, np.ones(1), ["blob"])
        coarse_err.append(np.linalg.norm(est[0] - p))
        fine_err.append(np.linalg.norm(world[0] - p))
    assert np.mean(fine_err) < 0.2 and np.mean(coarse_err) > 3 * np.mean(fine_err)

    resample = ResamplePatch.__call__

    def corner_recorded(self, image, center_mm):  # data centred on the point, affine recorded from the corner
        out = resample(self, image, center_mm)
        a = out.affine.clone()
        a[:3, 3] = torch.as_tensor(np.asarray(center_mm, dtype=np.float64))
        return MetaTensor(out.as_tensor(), affine=a)

    monkeypatch.setattr(ResamplePatch, "__call__", corner_recorded)
    image = blob_volume(points[0], shape=(80, 80, 70), sigma_mm=3.0)
    world, _, _ = C.refine(fine_stage(spacing=0.8, size=20), image, coarse_estimate(image, 4.0), np.ones(1), ["b"])
    assert not np.linalg.norm(world[0] - points[0]) < 1.0  # the broken crop misses (or finds nothing)


def test_coarse_estimates_missing_weak_or_outside_become_missing_with_a_reason():
    point = np.array([0.0, 2.0, -1.0])
    image = blob_volume(point, shape=(60, 60, 50))
    outside = np.asarray(voxel_to_world(np.array([[-20.0, 30.0, 25.0]]), np.asarray(image.affine)))[0]
    coarse = np.stack([point, [np.nan] * 3, point + 1.0, outside])
    conf = np.array([0.9, 0.0, 0.01, 0.9])
    names = ["good", "lost", "weak", "away"]
    world, fconf, warnings = C.refine(fine_stage(min_confidence=0.05, n=4), image, coarse, conf, names)
    assert np.linalg.norm(world[0] - point) < 0.25
    assert np.isnan(world[1:]).all() and (fconf[1:] == 0).all()
    assert len(warnings) == 3
    assert "landmark 2 (lost)" in warnings[0] and "no estimate" in warnings[0]
    assert "landmark 3 (weak)" in warnings[1] and "below fine_min_confidence" in warnings[1]
    assert "landmark 4 (away)" in warnings[2] and "outside the image" in warnings[2]


def two_blobs(point: np.ndarray, decoy: np.ndarray) -> MetaTensor:
    """The landmark's blob (peak 1) at ``point`` and a brighter look-alike (peak 2) at ``decoy``."""
    image = blob_volume(point, shape=(70, 70, 60))
    decoy_image = blob_volume(decoy, shape=(70, 70, 60))
    return MetaTensor(image.as_tensor() + 2.0 * decoy_image.as_tensor(), affine=image.affine)


@pytest.mark.parametrize("stride", [1, 2])
def test_search_radius_ignores_a_brighter_look_alike_elsewhere_in_the_patch(stride):
    point = np.array([1.5, -2.0, 0.7])
    decoy = point + np.array([9.0, 0.0, -6.0])  # 10.8 mm away, inside the 32 mm patch
    image = two_blobs(point, decoy)
    start = point + np.array([1.6, -1.2, 0.9])  # a coarse estimate 2.2 mm off
    whole, _, _ = C.refine(fine_stage(size=32, stride=stride), image, start[None], np.ones(1), ["b"])
    assert np.linalg.norm(whole[0] - decoy) < 1.0  # without a radius the look-alike wins
    near, conf, warnings = C.refine(fine_stage(size=32, radius=6.0, stride=stride), image, start[None], np.ones(1),
                                    ["b"])
    assert warnings == []
    assert np.linalg.norm(near[0] - point) < 0.25 * stride
    assert 0.5 < conf[0] < 1.5  # the landmark's own peak, not the look-alike's (2)


def test_search_mask_is_a_ball_in_world_mm_about_the_patch_centre():
    fine = fine_stage(spacing=0.5, size=16, radius=2.0)
    affine = torch.as_tensor(np.diag([-0.5, 0.5, 0.5, 1.0]))
    affine[:3, 3] = torch.tensor([10.0, -3.0, 2.0])
    mask = C.search_mask(fine, affine)
    centre = (16 - 1) / 2
    idx = np.argwhere(mask.numpy())
    dist = np.linalg.norm((idx - centre) * 0.5, axis=1)
    assert dist.max() <= 2.0 and len(idx) == int(((np.indices((16,) * 3).reshape(3, -1).T - centre) ** 2 * 0.25)
                                                 .sum(1).__le__(4.0).sum())
    assert C.search_mask(fine_stage(radius=0.0), affine) is None
    tiny = C.search_mask(fine_stage(spacing=0.5, size=16, radius=0.01), affine)
    assert int(tiny.sum()) == 8  # no voxel centre within 0.01 mm: the nearest ones (the 8 around the centre)


def test_a_weak_fine_peak_keeps_the_coarse_estimate_with_a_warning():
    point = np.array([0.0, 2.0, -1.0])
    image = blob_volume(point, shape=(60, 60, 50))
    far = point + np.array([8.0, 8.0, 0.0])  # coarse estimate away from the blob: its patch sees a faint tail
    coarse = np.stack([point + 0.5, far])
    world, conf, warnings = C.refine(fine_stage(n=2, radius=3.0, fallback=0.5), image, coarse, np.array([0.8, 0.7]),
                                     ["strong", "faint"])
    assert np.linalg.norm(world[0] - point) < 0.25 and conf[0] > 0.9
    np.testing.assert_array_equal(world[1], far)
    assert conf[1] == 0.7
    assert len(warnings) == 1 and "landmark 2 (faint)" in warnings[0] and "kept the coarse estimate" in warnings[0]


# ---------------------------------------------------------------------------------------------------
# a tiny cascade bundle end to end

TINY_CASCADE = """
max_epochs: 2
val_interval: 2
fine_spacing_mm: 0.5
fine_patch_size: [16, 16]
fine_jitter_mm: 1.5
fine_outlier_prob: 0.0
fine_max_epochs: 2
fine_val_interval: 2
fine_num_val_landmarks: 1
fine#network_def#filters: 8
fine#network_def#num_levels: 2
fine#network_def#spatial_downsample: 4
fine#network_def#spatial_kernel_size: 3
fine_image_preprocessing:
  - _target_: ScaleIntensityd
    keys: image
"""


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory):
    from test_bundle_synthetic import BUNDLE, write_dots_dataset

    root = tmp_path_factory.mktemp("cascade")
    data = write_dots_dataset(root / "data")
    bundle = root / "dots"
    shutil.copytree(BUNDLE, bundle)
    (bundle / "configs" / "cascade.yaml").write_text(TINY_CASCADE)
    run_bundle(bundle, "training", ["cascade.yaml"], dataset_dir=str(data), num_workers=0)
    inputs = root / "inputs"
    inputs.mkdir()
    for case in ("eval00", "eval01"):
        shutil.copy(data / "images" / f"{case}.nii.gz", inputs)
    return bundle, data, inputs


def test_shipped_cascade_overlay_comes_before_the_bundles():
    files = bundle_config_files(REPO_ROOT / "bundles" / "afids_brain_mr", "training", ["cpu.yaml", "cascade.yaml"])
    names = [(f.parent.name, f.name) for f in files]
    assert names[-2:] == [("configs", "cascade.yaml"), ("configs", "cascade.yaml")]
    assert files[-2].parent.parent.name == "pipeline" and files[-1].parent.parent.name == "afids_brain_mr"


def test_one_run_trains_both_stages_and_predict_runs_the_cascade(cascade_bundle, tmp_path):
    bundle, data, inputs = cascade_bundle
    fine = torch.load(bundle / "models" / "model_fine.pt", weights_only=True)
    desc = fine["description"]
    assert desc["cascade"]["stage"] == "fine" and desc["spacing_mm"] == 0.5 and desc["input_size"] == [16, 16]
    assert "cascade.yaml" in desc["cascade"]["overlays"]
    assert (bundle / "models" / "model.pt").is_file()

    assert predict_main([str(bundle), str(inputs), str(tmp_path / "out"), "--quiet"]) == 0
    cascade = read_landmark_table(tmp_path / "out" / "landmarks.csv")
    # the same bundle without its fine model: the coarse stage alone gives other positions
    moved = bundle.parent / "model_fine.pt.away"
    shutil.move(bundle / "models" / "model_fine.pt", moved)
    try:
        assert predict_main([str(bundle), str(inputs), str(tmp_path / "coarse"), "--quiet"]) == 0
    finally:
        shutil.move(moved, bundle / "models" / "model_fine.pt")
    coarse = read_landmark_table(tmp_path / "coarse" / "landmarks.csv")
    assert sorted(cascade) == ["eval00", "eval01"]
    for case in cascade:
        assert np.isfinite(cascade[case].coords).all()
        shift = np.linalg.norm(cascade[case].coords - coarse[case].coords, axis=1)
        assert (shift > 1e-6).all() and (shift < 8.0 * math.sqrt(2)).all()  # refined, within the 8 mm patch

    # the Python API runs the same cascade
    model = heatmark.load_model(bundle)
    assert model.bundle.fine is not None
    result = model.predict(inputs / "eval00.nii.gz")
    np.testing.assert_allclose(result.coords, cascade["eval00"].coords, atol=1e-4)
    # ... also on an in-memory image: the fine stage resamples its patches from that array
    import nibabel as nib

    nii = nib.load(str(inputs / "eval00.nii.gz"))
    affine = np.eye(3)
    affine[:2, :2], affine[:2, 2] = nii.affine[:2, :2], nii.affine[:2, 3]
    in_memory = model.predict(np.asarray(nii.dataobj, dtype=np.float32), affine=affine)
    np.testing.assert_allclose(in_memory.coords, cascade["eval00"].coords, atol=1e-3)


def test_weak_coarse_estimates_are_missing_in_the_outputs(cascade_bundle, tmp_path):
    bundle, data, inputs = cascade_bundle
    strict = bundle / "configs" / "strict.yaml"
    strict.write_text("fine_min_confidence: 1.0e+9\n")
    assert predict_main([str(bundle), str(inputs), str(tmp_path / "out"), "--quiet", "--config", "cascade.yaml",
                         "--config", "strict.yaml"]) == 0
    pred = read_landmark_table(tmp_path / "out" / "landmarks.csv")
    assert all(np.isnan(lm.coords).all() for lm in pred.values())
    warnings = (tmp_path / "out" / "warnings.csv").read_text()
    assert warnings.count("below fine_min_confidence") == 2 * 2
