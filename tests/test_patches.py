"""Random training patches (heatmark.transforms.patches): the crop is recorded in the affine, so a dot
rendered at a known world point lands on the patch voxel that WorldToVoxeld computes; landmarks
outside a patch are masked in the loss; small images are padded; patch sizes in mm work on
anisotropic grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from heatmark.core.geometry import voxel_to_world, world_to_voxel
from heatmark.evaluation import decode_heatmaps
from heatmark.training import HeatmapLoss
from heatmark.transforms import (
    RandLandmarkPatch,
    RandLandmarkPatchd,
    WorldToVoxeld,
    patch_voxels,
)
from monai.data import MetaTensor

SIGMA_MM = 3.0


def oblique_affine(spacing=(1.2, 0.9, 1.5), angle=0.4, origin=(-20.0, 13.0, 7.0)) -> torch.Tensor:
    """A rotated (about z then x), anisotropic voxel -> world affine, float64 (4, 4)."""
    c, s = np.cos(angle), np.sin(angle)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    a = np.eye(4)
    a[:3, :3] = rz @ rx @ np.diag(spacing)
    a[:3, 3] = origin
    return torch.as_tensor(a)


def dot_image(shape, affine: torch.Tensor, point_mm: np.ndarray) -> MetaTensor:
    """``(1, *shape)`` image of a Gaussian dot (sigma SIGMA_MM, in world mm) at ``point_mm``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = voxel_to_world(index.astype(np.float64), affine.numpy())
    values = np.exp(-0.5 * ((world - point_mm) ** 2).sum(-1) / SIGMA_MM**2)
    return MetaTensor(torch.as_tensor(values.reshape(1, *shape), dtype=torch.float32), affine=affine)


def analytic(patch: MetaTensor, point_mm: np.ndarray) -> np.ndarray:
    """The dot rendered directly on the patch's grid, through the patch's own affine."""
    shape = patch.shape[1:]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = voxel_to_world(index.astype(np.float64), patch.affine.numpy())
    return np.exp(-0.5 * ((world - point_mm) ** 2).sum(-1) / SIGMA_MM**2).reshape(shape)


@pytest.fixture(scope="module")
def volume():
    affine = oblique_affine()
    point = voxel_to_world(np.array([[30.3, 21.6, 17.2]]), affine.numpy())[0]
    far = voxel_to_world(np.array([[3.0, 3.0, 3.0]]), affine.numpy())[0]
    return dot_image((48, 40, 30), affine, point), point, far


def test_patch_voxels_from_voxels_and_mm():
    assert patch_voxels(None, None, 1.0, 3) is None
    assert patch_voxels(16, None, None, 3) == (16, 16, 16)
    assert patch_voxels([32, 32, 8], None, None, 3) == (32, 32, 8)
    assert patch_voxels(None, [16.0, 16.0, 40.0], [0.5, 0.5, 5.0], 3) == (32, 32, 8)
    with pytest.raises(ValueError, match="not both"):
        patch_voxels(16, 16.0, 1.0, 3)
    with pytest.raises(ValueError, match="spacing_mm"):
        patch_voxels(None, 16.0, None, 3)
    with pytest.raises(ValueError, match="whole numbers"):
        patch_voxels(2.5, None, None, 2)


def test_crop_keeps_world_landmarks_exact(volume):
    image, point, _ = volume
    t = RandLandmarkPatch(patch_size=(20, 16, 12), landmark_share=1.0)
    t.set_random_state(3)
    patch = t(image, torch.as_tensor(point[None]))
    assert tuple(patch.shape) == (1, 20, 16, 12)
    # every patch voxel holds the dot's value at the world position its affine names
    np.testing.assert_allclose(patch[0].numpy(), analytic(patch, point), atol=1e-6)
    # and the voxel WorldToVoxeld derives is where the dot's peak decodes
    d = WorldToVoxeld(keys="landmarks")({"image": patch, "landmarks": torch.as_tensor(point[None])})
    voxel = d["landmarks_voxel"][0].numpy()
    assert ((voxel >= 0) & (voxel <= np.array(patch.shape[1:]) - 1)).all()
    peak = decode_heatmaps(patch.as_tensor()[None], method="gaussian").voxel[0, 0].numpy()
    np.testing.assert_allclose(peak, voxel, atol=1e-3)


def test_landmark_share_and_jitter(volume):
    image, point, _ = volume
    centre_voxel = world_to_voxel(point[None], image.affine.numpy())[0]
    size = np.array([16, 16, 12])
    t = RandLandmarkPatch(patch_size=size.tolist(), landmark_share=1.0, jitter_mm=0.0)
    t.set_random_state(0)
    t(image, torch.as_tensor(point[None]))
    # no jitter: the landmark sits in the patch centre (to the rounding of the start)
    offset = centre_voxel - np.array(t.start)
    assert np.all(np.abs(offset - (size - 1) / 2) <= 0.5 + 1e-9)
    # uniform patches (share 0) land anywhere: their starts vary over the free range
    u = RandLandmarkPatch(patch_size=size.tolist(), landmark_share=0.0)
    u.set_random_state(0)
    starts = np.array([(u(image, torch.as_tensor(point[None])), u.start)[1] for _ in range(40)])
    free = np.array(image.shape[1:]) - size
    assert starts.min() >= 0 and (starts <= free).all()
    assert (starts.max(0) - starts.min(0) > free / 3).all()


def test_landmarks_outside_the_patch_are_masked(volume):
    image, point, far = volume
    landmarks = torch.as_tensor(np.stack([point, far]))
    t = RandLandmarkPatchd(keys="image", patch_size=(16, 16, 12), landmark_share=1.0, jitter_mm=0.0)
    t.set_random_state(1)
    d = t({"image": image, "landmarks": landmarks})
    d = WorldToVoxeld(keys="landmarks")(d)
    torch.testing.assert_close(d["landmarks"], landmarks)  # world landmarks untouched
    voxel = d["landmarks_voxel"][None]
    shape = d["image"].shape[1:]
    assert ((voxel[0, 1] < -0.5) | (voxel[0, 1] > torch.tensor(shape) - 0.5)).any(), "far landmark should be off the patch"
    loss = HeatmapLoss(num_landmarks=2, sigma=2.0, reduction="mean")
    target, valid = loss.targets(voxel, shape)
    assert valid.tolist() == [[True, False]]
    assert float(target[0, 1].abs().max()) == 0.0  # not clamped onto the border
    # whatever the network predicts for the masked landmark does not change the loss
    pred = torch.zeros(1, 2, *shape)
    pred[0, 0] = target[0, 0]
    other = pred.clone()
    other[0, 1] = torch.rand(*shape) * 10
    assert float(loss(pred, voxel)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(other, voxel)) == pytest.approx(0.0, abs=1e-12)


def test_image_smaller_than_the_patch_is_padded(volume):
    affine = oblique_affine(origin=(4.0, -8.0, 2.0))
    point = voxel_to_world(np.array([[5.2, 3.7, 4.1]]), affine.numpy())[0]
    image = dot_image((10, 8, 9), affine, point)
    t = RandLandmarkPatch(patch_size=(16, 12, 9), landmark_share=1.0)
    t.set_random_state(0)
    patch = t(image, torch.as_tensor(point[None]))
    assert tuple(patch.shape) == (1, 16, 12, 9)
    assert t.start == (-3, -2, 0)  # centred padding: 3 + 10 + 3, 2 + 8 + 2, no padding along z
    inside = (slice(3, 13), slice(2, 10), slice(0, 9))
    np.testing.assert_allclose(patch[0][inside].numpy(), image[0].numpy(), atol=0)
    assert float(patch[0, :3].abs().max()) == 0.0 and float(patch[0, 13:].abs().max()) == 0.0
    np.testing.assert_allclose(patch[0][inside].numpy(), analytic(patch, point)[inside], atol=1e-6)
    vox = world_to_voxel(point[None], patch.affine.numpy())[0]
    np.testing.assert_allclose(vox, [8.2, 5.7, 4.1], atol=1e-9)


def test_patch_size_in_mm_on_an_anisotropic_volume():
    affine = torch.as_tensor(np.diag([0.5, 0.5, 5.0, 1.0]))
    point = np.array([14.3, 9.1, 36.0])
    image = dot_image((80, 60, 16), affine, point)
    t = RandLandmarkPatch(patch_size_mm=(16.0, 16.0, 40.0), landmark_share=1.0)
    t.set_random_state(0)
    patch = t(image, torch.as_tensor(point[None]))
    assert tuple(patch.shape) == (1, 32, 32, 8)  # 16 mm / 0.5 mm, 40 mm / 5 mm
    np.testing.assert_allclose(patch[0].numpy(), analytic(patch, point), atol=1e-6)
    vox = world_to_voxel(point[None], patch.affine.numpy())[0]
    assert ((vox >= 0) & (vox <= np.array([31, 31, 7]))).all()


def test_dict_wrapper_crops_all_keys_alike(volume):
    image, point, _ = volume
    second = MetaTensor(image.as_tensor() * 2 + 1, affine=image.affine.clone())
    t = RandLandmarkPatchd(keys=["image", "other"], patch_size=12, landmark_share=0.5)
    t.set_random_state(5)
    d = t({"image": image, "other": second, "landmarks": torch.as_tensor(point[None])})
    torch.testing.assert_close(d["other"].as_tensor(), d["image"].as_tensor() * 2 + 1)
    torch.testing.assert_close(d["other"].affine, d["image"].affine)
    with pytest.raises(TypeError, match="MetaTensor"):
        RandLandmarkPatch(patch_size=4)(torch.zeros(1, 8, 8))
