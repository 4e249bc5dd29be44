"""Transforms composed as a user would, on the real data beside the project (skipped when absent)
and on synthetic images: load image + landmarks, resample, normalise, build heatmaps, and find the
landmarks again at the heatmap peaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, HistogramNormalized, Orientationd, RandAffined, Resized, Spacingd

from heatmark.core.geometry import voxel_to_world, world_to_voxel
from heatmark.landmarks import read_landmarks
from heatmark.transforms import (
    GaussianHeatmapd,
    LoadLandmarkImaged,
    LoadLandmarksd,
    RandLandmarkElasticd,
    RobustNormalize,
    RobustNormalized,
    WorldToVoxeld,
)


def heatmap_peaks_world(hm: MetaTensor) -> np.ndarray:
    """Integer argmax of each channel, mapped to world mm through the heatmap's affine."""
    flat = hm.reshape(hm.shape[0], -1).argmax(dim=1)
    vox = np.stack(np.unravel_index(flat.numpy(), hm.shape[1:]), axis=-1).astype(np.float64)
    return voxel_to_world(vox, hm.affine)


def test_isbi_radiograph_pipeline(isbi_dir):
    case = "151"
    names = read_landmarks(isbi_dir / "landmarks.csv", case=case).names
    pipeline = Compose([
        LoadLandmarkImaged("image", spatial_dims=2),
        LoadLandmarksd("landmarks", names=names, spatial_dims=2),
        Resized("image", spatial_size=(240, 300), mode="area"),
        HistogramNormalized("image", min=0.0, max=1.0),
        GaussianHeatmapd("landmarks", ref_key="image", sigma=2.0, sigma_units="mm"),
        WorldToVoxeld("landmarks", ref_key="image"),
    ])
    d = pipeline({"image": str(isbi_dir / "images" / f"{case}.nii.gz"), "landmarks": str(isbi_dir / "landmarks.csv"),
                  "case": case})
    img = d["image"]
    assert img.shape == (1, 240, 300)
    # 483 x 600 pixels at 0.4 mm resized to 240 x 300: ~0.805 mm / 0.8 mm pixels, same physical extent
    spacing = np.linalg.norm(np.asarray(img.affine)[:2, :2], axis=0)
    np.testing.assert_allclose(spacing, [483 * 0.4 / 240, 600 * 0.4 / 300], rtol=1e-6)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    world = d["landmarks"].numpy()
    assert world.shape == (19, 2) and np.isfinite(world).all()
    vox = d["landmarks_voxel"].numpy()
    assert (vox > -0.5).all() and (vox < np.array([240, 300]) - 0.5).all()
    # heatmap peaks decode back to the annotated world points within half a pixel's diagonal
    peaks = heatmap_peaks_world(d["heatmap"])
    assert np.abs(peaks - world).max() <= 0.5 * spacing.max() + 1e-6


def test_afids_template_pipeline(afids_dir):
    fcsv = next(afids_dir.glob("*.fcsv"))
    nii = next(afids_dir.glob("*T1w.nii.gz"))
    pipeline = Compose([
        LoadLandmarkImaged("image", spatial_dims=3),
        LoadLandmarksd("landmarks", spatial_dims=3),
        Orientationd("image", axcodes="LPS"),
        Spacingd("image", pixdim=(3.0, 3.0, 3.0)),
        RobustNormalized("image", lower=1, upper=99, nonzero=True),
        GaussianHeatmapd("landmarks", ref_key="image", sigma=4.0, sigma_units="mm"),
    ])
    d = pipeline({"image": str(nii), "landmarks": str(fcsv)})
    img, world = d["image"], d["landmarks"].numpy()
    assert world.shape == (32, 3)
    spacing = np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, 3.0, rtol=1e-6)
    vox = world_to_voxel(world, img.affine)
    assert (vox > 0).all() and (vox < np.array(img.shape[1:]) - 1).all(), "AFIDs must lie inside the brain volume"
    # the landmarks sit in tissue, not in the zero background
    idx = np.round(vox).astype(int)
    assert (img[0][tuple(idx.T)] > 0.05).float().mean() > 0.9
    peaks = heatmap_peaks_world(d["heatmap"])
    assert np.linalg.norm(peaks - world, axis=1).max() <= 0.5 * np.sqrt(3) * 3.0 + 1e-6


def test_augmented_3d_case_keeps_heatmap_on_landmarks():
    """RandAffined + elastic on a synthetic 3D volume: the heatmap built after augmentation peaks
    where the geometry rule puts the landmarks."""
    affine = torch.diag(torch.tensor([1.5, 1.0, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-20.0, 5.0, 3.0])
    img = MetaTensor(torch.rand(1, 32, 40, 24), affine=affine)
    world = voxel_to_world(np.array([[10.3, 20.6, 12.1], [20.0, 15.5, 8.2]]), affine)
    aug = Compose([
        RandAffined("image", prob=1.0, rotate_range=(0.3, 0.3, 0.3), scale_range=(0.1,) * 3, padding_mode="zeros"),
        RandLandmarkElasticd("image", "landmarks", prob=1.0, control_spacing_mm=20.0, magnitude_mm=2.0),
        GaussianHeatmapd("landmarks", ref_key="image", sigma=2.5, sigma_units="mm"),
        WorldToVoxeld("landmarks", ref_key="image"),
    ])
    aug.set_random_state(seed=5)
    d = aug({"image": img, "landmarks": torch.as_tensor(world)})
    vox = d["landmarks_voxel"].numpy()
    flat = d["heatmap"].reshape(2, -1).argmax(dim=1).numpy()
    peaks = np.stack(np.unravel_index(flat, d["heatmap"].shape[1:]), axis=-1)
    np.testing.assert_array_equal(peaks, np.round(vox))


def test_robust_normalize():
    x = torch.zeros(2, 10, 10)
    x[0, 2:8, 2:8] = torch.linspace(100, 200, 36).reshape(6, 6)
    x[1] = 7.0  # constant channel
    out = RobustNormalize(lower=0, upper=100, nonzero=True)(x)
    inside = out[0, 2:8, 2:8]
    assert float(inside.min()) == pytest.approx(0.0) and float(inside.max()) == pytest.approx(1.0)
    assert float(out[0, 0, 0]) == 0.0  # background clipped to the low end
    assert torch.all(out[1] == 0.0)
    # without nonzero, the background is the low percentile and anatomy is compressed upward
    out_all = RobustNormalize(lower=0, upper=100, nonzero=False)(x)
    assert float(out_all[0, 2, 2]) == pytest.approx(0.5, abs=1e-6)
    meta = MetaTensor(x, affine=torch.eye(4) * 2)
    res = RobustNormalized("img")({"img": meta})["img"]
    assert isinstance(res, MetaTensor) and torch.equal(res.affine, meta.affine)
    with pytest.raises(ValueError):
        RobustNormalize(lower=50, upper=10)


def test_load_landmarksd_is_safe_from_threads(tmp_path):
    """Many cases of one multi-case file loaded from 8 threads at once (as a CacheDataset fills its
    cache): every case gets its own landmarks. The transform keeps no per-call state."""
    from concurrent.futures import ThreadPoolExecutor

    from heatmark.landmarks import Landmarks, write_landmark_table

    table = {f"c{i:02d}": Landmarks(np.array([[float(i), 2.0 * i], [np.nan, np.nan]]), ["a", "b"]) for i in range(64)}
    path = tmp_path / "lm.csv"
    write_landmark_table(path, table)
    load = LoadLandmarksd("landmarks", spatial_dims=2)
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda c: (c, load({"case": c, "landmarks": str(path)})["landmarks"]), sorted(table)))
    for case, lm in out:
        i = int(case[1:])
        torch.testing.assert_close(lm[0], torch.tensor([float(i), 2.0 * i], dtype=torch.float64))
        assert torch.isnan(lm[1]).all()
