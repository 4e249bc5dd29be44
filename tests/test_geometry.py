"""Known-answer geometry tests (DESIGN section 3).

A synthetic image gets one channel per landmark, each holding a small round Gaussian blob
(round in mm) centred on a known world point. The image has anisotropic spacing, a non-zero origin
and, in 3D, a rotated direction matrix. After every spatial transform, alone and chained, the
landmark's voxel position derived by the geometry rule (world point + the image's final affine)
must match the blob's refined peak within 0.3 voxel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, set_track_meta
from monai.data.utils import to_affine_nd
from monai.transforms import (
    ApplyTransformToPoints,
    ApplyTransformToPointsd,
    Compose,
    Orientationd,
    RandAffined,
    RandSpatialCropd,
    Resized,
    Spacingd,
    SpatialPadd,
)

from heatmark.core.geometry import sigma_mm_to_voxels, spacing_from_affine, voxel_to_world, world_to_voxel
from heatmark.core.heatmaps import gaussian_heatmaps
from heatmark.transforms.points import WorldToVoxeld
from heatmark.transforms.spatial import RandLandmarkElastic, RandLandmarkElasticd, RandLandmarkFlipd, SwapLandmarkPairs

TOL_VOXEL = 0.3
BLOB_SIGMA_MM = 2.5


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def make_case(dims: int):
    """An image with one blob channel per landmark, and the landmarks' world coordinates."""
    if dims == 2:
        shape, spacing, origin, direction = (56, 44), np.array([0.8, 1.1]), np.array([10.0, -5.0]), np.eye(2)
        frac = np.array([[0.35, 0.4], [0.65, 0.45], [0.5, 0.68]])
    else:
        shape, spacing, origin = (40, 36, 30), np.array([1.2, 1.0, 1.5]), np.array([-50.0, 30.0, 12.0])
        direction = _rotation(0.2, 0.35)
        frac = np.array([[0.35, 0.4, 0.45], [0.65, 0.42, 0.5], [0.5, 0.62, 0.4]])
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = direction @ np.diag(spacing)
    affine[:dims, dims] = origin
    # landmarks at known (sub-voxel) positions, kept away from the border
    voxel = frac * (np.array(shape) - 1) + 0.37
    world = voxel_to_world(voxel, affine)
    sigma = sigma_mm_to_voxels(BLOB_SIGMA_MM, affine, dims)
    blobs = gaussian_heatmaps(torch.as_tensor(voxel), shape, sigma=sigma)
    image = MetaTensor(blobs, affine=torch.as_tensor(affine))
    return {"image": image, "landmarks": torch.as_tensor(world)}


def refined_peak(channel: torch.Tensor) -> np.ndarray:
    """Sub-voxel peak of one blob: least-squares fit of a full quadratic (with cross terms) to the
    log intensity on the 3^D neighbourhood of the maximum, then its stationary point. Exact for a
    Gaussian of any orientation; for a deformed blob it is the local peak, which the deformation
    maps exactly onto the moved landmark."""
    c = channel.detach().double().numpy()
    dims = c.ndim
    peak = np.array(np.unravel_index(np.argmax(c), c.shape))
    offsets = np.array(np.meshgrid(*[[-1, 0, 1]] * dims, indexing="ij")).reshape(dims, -1).T
    idx = np.clip(peak + offsets, 0, np.array(c.shape) - 1)
    y = np.log(np.maximum(c[tuple(idx.T)], 1e-12))
    pairs = [(i, j) for i in range(dims) for j in range(i, dims)]
    design = np.column_stack([np.ones(len(offsets))] + [offsets[:, i] for i in range(dims)]
                             + [offsets[:, i] * offsets[:, j] for i, j in pairs])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    g = coef[1 : 1 + dims]
    h = np.zeros((dims, dims))
    for (i, j), v in zip(pairs, coef[1 + dims :]):
        h[i, j] += v if i != j else 2 * v
        if i != j:
            h[j, i] += v
    return peak + np.linalg.solve(h, -g)


def assert_landmarks_on_blobs(d: dict, channel_of: list[int] | None = None) -> float:
    d = WorldToVoxeld("landmarks", ref_key="image")(d)
    vox = d["landmarks_voxel"].numpy()
    image = d["image"]
    worst = 0.0
    for k in range(vox.shape[0]):
        c = k if channel_of is None else channel_of[k]
        err = np.abs(refined_peak(image[c]) - vox[k]).max()
        worst = max(worst, err)
        assert err < TOL_VOXEL, f"landmark {k}: geometry rule {vox[k]} vs blob peak {refined_peak(image[c])} (err {err:.3f} voxel)"
    return worst


def _transforms(dims: int) -> dict[str, object]:
    k = "image"
    return {
        "spacing": Spacingd(k, pixdim=(0.9,) * dims, mode="bilinear"),
        "orientation": Orientationd(k, axcodes="LA" if dims == 2 else "PLI"),
        "rand_affine": RandAffined(k, prob=1.0, rotate_range=(0.4,) if dims == 2 else (0.3, 0.2, 0.4),
                                   scale_range=(0.15,) * dims, translate_range=(3,) * dims, shear_range=(0.1,) * dims,
                                   padding_mode="zeros"),
        "elastic": RandLandmarkElasticd(k, "landmarks", prob=1.0, control_spacing_mm=15.0, magnitude_mm=3.0),
        "flip": RandLandmarkFlipd(k, "landmarks", prob=1.0, spatial_axis=0),
        "resize": Resized(k, spatial_size=(48, 52) if dims == 2 else (34, 30, 38), mode="bilinear"),
        "crop": RandSpatialCropd(k, roi_size=(44, 34) if dims == 2 else (34, 30, 24), random_size=False),
        "pad": SpatialPadd(k, spatial_size=(64, 60) if dims == 2 else (46, 44, 40)),
    }


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["spacing", "orientation", "rand_affine", "elastic", "flip", "resize", "crop", "pad"])
def test_single_transform_keeps_landmarks_on_blobs(dims, name):
    t = _transforms(dims)[name]
    if hasattr(t, "set_random_state"):
        t.set_random_state(seed=7 + dims)
    d = make_case(dims)
    before = world_to_voxel(d["landmarks"], d["image"].affine)
    out = t(d)
    assert_landmarks_on_blobs(out)
    after = world_to_voxel(out["landmarks"], out["image"].affine)
    # the transform really moved the anatomy on the grid (else the test proves nothing)
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0.5, f"{name} did not move the landmarks"


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_chain_keeps_landmarks_on_blobs(dims, seed):
    t = _transforms(dims)
    chain = Compose([t["spacing"], t["orientation"], t["rand_affine"], t["elastic"], t["flip"], t["resize"], t["crop"]])
    chain.set_random_state(seed=seed)
    out = chain(make_case(dims))
    assert np.isfinite(out["landmarks"].numpy()).all()
    assert_landmarks_on_blobs(out)


@pytest.mark.parametrize("dims", [2, 3])
def test_flip_swaps_pairs(dims):
    d = make_case(dims)
    flip = RandLandmarkFlipd("image", "landmarks", prob=1.0, spatial_axis=0, pairs=[(0, 1)])
    out = flip(d)
    # landmark 0 now names the structure of original landmark 1 (blob channel 1), and vice versa
    assert_landmarks_on_blobs(out, channel_of=[1, 0, 2])
    np.testing.assert_array_equal(out["landmarks"][0].numpy(), d["landmarks"][1].numpy())


def test_swap_pairs_validation():
    with pytest.raises(ValueError):
        SwapLandmarkPairs([(0, 1), (1, 2)])
    with pytest.raises(IndexError):
        SwapLandmarkPairs([(0, 5)])(torch.zeros(3, 2))


@pytest.mark.parametrize("dims", [2, 3])
def test_world_to_voxel_matches_monai_apply_transform_to_points(dims):
    d = make_case(dims)
    d = Compose([Spacingd("image", pixdim=(0.7,) * dims), Orientationd("image", axcodes="LA" if dims == 2 else "PLI")])(d)
    ours = WorldToVoxeld("landmarks", ref_key="image")(d)["landmarks_voxel"].numpy()
    points = d["landmarks"].unsqueeze(0)
    if dims == 3:
        monai_in = {"image": d["image"], "points": points}
        theirs = ApplyTransformToPointsd("points", refer_keys="image", dtype=torch.float64)(monai_in)["points"][0]
    else:
        # MONAI 1.6.1 fails for 2D points whenever a 4x4 affine is involved (the 2D image's, or the
        # identity it gives the points when meta tracking is on): "mat1 and mat2 shapes cannot be
        # multiplied"; without meta tracking its array form takes the 3x3 affine
        set_track_meta(False)
        try:
            theirs = ApplyTransformToPoints(dtype=torch.float64)(points, affine=to_affine_nd(2, d["image"].affine))[0]
        finally:
            set_track_meta(True)
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-4)
    back = voxel_to_world(ours, d["image"].affine)
    np.testing.assert_allclose(back, d["landmarks"].numpy(), atol=1e-9)


def test_world_voxel_round_trip_and_nan():
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.3, -0.7) @ np.diag([0.5, 1.5, 2.0])
    affine[:3, 3] = [3, -4, 5]
    pts = rng.normal(size=(7, 3)) * 40
    pts[2] = np.nan
    vox = world_to_voxel(pts, affine)
    assert np.isnan(vox[2]).all()
    np.testing.assert_allclose(voxel_to_world(vox, affine), pts, atol=1e-10)
    # batched points with a batch of affines, on torch tensors
    tp = torch.as_tensor(pts).expand(2, -1, -1)
    ta = torch.stack([torch.as_tensor(affine), torch.as_tensor(affine) * 1.0])
    np.testing.assert_allclose(world_to_voxel(tp, ta)[1].numpy(), vox, atol=1e-10)
    np.testing.assert_allclose(spacing_from_affine(affine, 3).numpy(), [0.5, 1.5, 2.0])
    # MONAI's 4x4 affine of a 2D image reduces to 3x3
    a2 = np.diag([0.4, 0.4, 1.0, 1.0])
    a2[:2, 3] = [0.15, 0.15]
    np.testing.assert_allclose(voxel_to_world(np.array([[10.0, 20.0]]), a2), [[4.15, 8.15]])


def test_elastic_drops_points_leaving_the_field_of_view():
    shape = (30, 30)
    img = MetaTensor(torch.zeros(1, *shape), affine=torch.eye(3))
    el = RandLandmarkElastic(prob=1.0, control_spacing_mm=10.0, magnitude_mm=6.0, max_gradient=0.9)
    el.set_random_state(seed=3)
    el.randomize(img)
    assert el.field is not None
    # a point outside the grid stays outside; a NaN stays NaN; an interior point maps and inverts
    pts = torch.tensor([[-5.0, 10.0], [float("nan"), 3.0], [15.2, 14.7]], dtype=torch.float64)
    q = el.map_points(pts)
    assert torch.isnan(q[0]).all() and torch.isnan(q[1]).all()
    assert torch.isfinite(q[2]).all()
    from heatmark.transforms.spatial import _sample

    np.testing.assert_allclose((q[2:] + _sample(el.field, q[2:])).numpy(), pts[2:].numpy(), atol=1e-4)
    # a point at the very edge pushed outward by the field disappears
    edge = torch.tensor([[0.0, float(i)] for i in range(30)] + [[29.0, float(i)] for i in range(30)], dtype=torch.float64)
    moved = el.map_points(edge)
    inward = moved[:, 0]
    assert torch.isnan(inward).any(), "some edge points should leave the field of view"


def test_elastic_field_is_invertible_and_smooth():
    img = MetaTensor(torch.zeros(1, 24, 20, 16), affine=torch.diag(torch.tensor([2.0, 1.0, 1.5, 1.0], dtype=torch.float64)))
    el = RandLandmarkElastic(prob=1.0, control_spacing_mm=8.0, magnitude_mm=20.0, max_gradient=0.5)
    el.set_random_state(seed=1)
    el.randomize(img)
    grad = max(float(torch.gradient(el.field[i], dim=j)[0].abs().max()) for i in range(3) for j in range(3))
    assert grad <= 0.5 + 1e-6
    with pytest.raises(ValueError):
        RandLandmarkElastic(max_gradient=1.0)


def test_output_stride_conventions_are_one_map():
    from heatmark.core.geometry import input_to_output_voxels, output_grid_affine, output_to_input_voxels

    u = torch.tensor([[0.0, 0.0, 0.0], [1.5, 2.0, 3.25]], dtype=torch.float64)
    v = output_to_input_voxels(u, (1, 2, 4))
    np.testing.assert_allclose(v.numpy(), [[0.0, 0.5, 1.5], [1.5, 4.5, 14.5]])
    np.testing.assert_allclose(input_to_output_voxels(v, (1, 2, 4)).numpy(), u.numpy(), atol=1e-12)
    assert output_to_input_voxels(u, None) is u
    a = np.diag([0.5, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(voxel_to_world(u.numpy(), output_grid_affine(a, (1, 2, 4))), voxel_to_world(v.numpy(), a))
    with pytest.raises(ValueError):
        output_to_input_voxels(u, (2, 2))
