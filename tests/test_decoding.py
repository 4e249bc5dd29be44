"""Known-answer tests of heatmap decoding (DESIGN section 7).

Heatmaps are analytic Gaussians from :func:`heatmark.core.heatmaps.gaussian_heatmaps` at random
sub-voxel positions, so the true position of every peak is known exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heatmark.evaluation.decoding import METHODS, DecodedLandmarks, decode_heatmaps, decode_peaks
from heatmark.core.geometry import voxel_to_world
from heatmark.core.heatmaps import gaussian_heatmaps

SHAPES = {2: (48, 40), 3: (28, 24, 26)}


def random_points(batch: int, num: int, shape: tuple[int, ...], margin: float, seed: int = 0) -> torch.Tensor:
    """``(B, N, D)`` float64 sub-voxel positions at least ``margin`` voxels inside ``shape``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, num, len(shape), generator=g, dtype=torch.float64)
    size = torch.tensor(shape, dtype=torch.float64)
    return margin + u * (size - 1 - 2 * margin)


def rotated_affine(dims: int, spacing: tuple[float, ...], origin: tuple[float, ...], angle: float) -> torch.Tensor:
    """``(D+1, D+1)`` affine with a rotation in the first two axes, anisotropic spacing and an origin."""
    rot = torch.eye(dims, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    rot[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    a = torch.eye(dims + 1, dtype=torch.float64)
    a[:dims, :dims] = rot @ torch.diag(torch.tensor(spacing, dtype=torch.float64))
    a[:dims, dims] = torch.tensor(origin, dtype=torch.float64)
    return a


# ----------------------------------------------------------------------------------------------
# one landmark per channel


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("method, tol", [("quadratic", 0.05), ("gaussian", 1e-4), ("weighted_mean", 0.05)])
def test_subvoxel_refinement_recovers_gaussian_centres(dims, sigma, method, tol):
    shape = SHAPES[dims]
    points = random_points(2, 4, shape, margin=4 * sigma, seed=dims)
    heatmaps = gaussian_heatmaps(points, shape, sigma=sigma)
    window = math.ceil(4 * sigma)  # holds the whole peak (weighted_mean only)
    decoded = decode_heatmaps(heatmaps, method=method, window=window)
    assert isinstance(decoded, DecodedLandmarks)
    assert decoded.voxel.shape == (2, 4, dims) and decoded.voxel.dtype == torch.float64
    assert decoded.world is None
    assert (decoded.voxel - points).abs().max() < tol
    # confidence is the sample at the integer argmax: the heatmap value at the rounded position
    nearest = torch.exp(-((points.round() - points) ** 2).sum(-1) / (2 * sigma**2))
    torch.testing.assert_close(decoded.confidence, nearest, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_argmax_is_the_nearest_voxel(dims):
    shape = SHAPES[dims]
    points = random_points(1, 5, shape, margin=5, seed=7)
    decoded = decode_heatmaps(gaussian_heatmaps(points, shape, sigma=2.0), method="argmax")
    assert (decoded.voxel - points).abs().max() <= 0.5
    torch.testing.assert_close(decoded.voxel, points.round())


def test_quadratic_on_a_parabola_is_exact_and_clamped_at_the_border():
    # f(x) = 1 - (x - 10.3)^2 / 100 along axis 0: the parabola fit is exact
    x = torch.arange(32, dtype=torch.float64)
    f = (1 - (x - 10.3) ** 2 / 100)[:, None].expand(32, 5).clone()
    f[:, 2] += 1e-3  # a strict maximum in axis 1 at column 2, symmetric -> offset 0
    decoded = decode_heatmaps(f[None, None], method="quadratic")
    torch.testing.assert_close(decoded.voxel[0, 0], torch.tensor([10.3, 2.0], dtype=torch.float64))
    # a peak on the border: no neighbour on one side -> that axis stays integer
    edge = gaussian_heatmaps(torch.tensor([[[0.3, 7.6]]], dtype=torch.float64), (20, 20), sigma=2.0)
    for method in ("quadratic", "gaussian"):
        v = decode_heatmaps(edge, method=method).voxel[0, 0]
        assert v[0] == 0.0 and abs(v[1] - 7.6) < 0.05


def test_weighted_mean_clips_negative_values_and_handles_border():
    points = torch.tensor([[[12.4, 9.7], [1.2, 15.5]]], dtype=torch.float64)
    h = gaussian_heatmaps(points, (24, 24), sigma=2.0)
    h = h - 0.05 * torch.rand(h.shape, generator=torch.Generator().manual_seed(1))  # negative noise only
    v = decode_heatmaps(h, method="weighted_mean", window=6).voxel[0]
    assert (v[0] - points[0, 0]).abs().max() < 0.05
    assert torch.isfinite(v[1]).all() and v[1, 0] > points[0, 1, 0]  # box cut at the border pulls inwards


@pytest.mark.parametrize("stride", [2, 4, (2, 4)])
@pytest.mark.parametrize("method", ["gaussian", "weighted_mean"])
def test_output_stride_maps_avg_pooled_grid_to_input_grid(stride, method):
    """Average-pooling a fine Gaussian by s puts its centre at u*s + (s-1)/2 of the fine grid."""
    shape = (64, 64)
    points = random_points(1, 6, shape, margin=14, seed=3)
    fine = gaussian_heatmaps(points, shape, sigma=3.0)
    coarse = F.avg_pool2d(fine, kernel_size=stride, stride=stride)
    decoded = decode_heatmaps(coarse, method=method, window=4, output_stride=stride)
    assert (decoded.voxel - points).abs().max() < 0.1
    # without the (s-1)/2 term the answer is off by that much
    s = torch.tensor([stride, stride] if isinstance(stride, int) else stride, dtype=torch.float64)
    naive = decode_heatmaps(coarse, method=method, window=4).voxel * s
    torch.testing.assert_close(decoded.voxel - naive, ((s - 1) / 2).expand_as(naive))


def test_plain_quadratic_on_coarse_grid_is_within_stated_bias():
    # the plain parabola is biased on narrow (coarse) peaks; stride 2, sigma 3 -> < 0.1 input voxel
    points = random_points(1, 6, (64, 64), margin=14, seed=4)
    coarse = F.avg_pool2d(gaussian_heatmaps(points, (64, 64), sigma=3.0), 2)
    decoded = decode_heatmaps(coarse, method="quadratic", output_stride=2)
    assert (decoded.voxel - points).abs().max() < 0.1


@pytest.mark.parametrize("dims", [2, 3])
def test_world_coordinates_through_affine(dims):
    shape = SHAPES[dims]
    points = random_points(2, 3, shape, margin=8, seed=11)
    heatmaps = gaussian_heatmaps(points, shape, sigma=2.0)
    affines = torch.stack([
        rotated_affine(dims, (0.7, 1.3, 2.0)[:dims], (-10.0, 25.0, 3.0)[:dims], 0.3),
        rotated_affine(dims, (1.1, 0.4, 0.9)[:dims], (5.0, -7.0, 40.0)[:dims], -1.1),
    ])
    decoded = decode_heatmaps(heatmaps, method="gaussian", affine=affines)
    torch.testing.assert_close(decoded.world, voxel_to_world(decoded.voxel, affines))
    torch.testing.assert_close(decoded.world, voxel_to_world(points, affines), atol=1e-3, rtol=0)
    # one affine for the whole batch, given as numpy
    single = decode_heatmaps(heatmaps, method="gaussian", affine=affines[0].numpy())
    torch.testing.assert_close(single.world, voxel_to_world(points, affines[0]), atol=1e-3, rtol=0)


def test_monai_4x4_affine_of_a_2d_image():
    points = torch.tensor([[[10.2, 14.8]]], dtype=torch.float64)
    a = torch.diag(torch.tensor([0.5, 0.25, 1.0, 1.0], dtype=torch.float64))
    a[:2, 3] = torch.tensor([3.0, -4.0])
    decoded = decode_heatmaps(gaussian_heatmaps(points, (32, 32), sigma=2.0), method="gaussian", affine=a)
    torch.testing.assert_close(decoded.world[0, 0], torch.tensor([3 + 0.5 * 10.2, -4 + 0.25 * 14.8], dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_channels_without_a_peak_decode_to_nan_with_zero_confidence():
    points = torch.tensor([[[10.3, 12.6]] * 5], dtype=torch.float64)
    h = gaussian_heatmaps(points, (24, 24), sigma=2.0)
    h[0, 1] = 0.0  # all zero
    h[0, 2, 5, 5] = float("nan")  # one NaN
    h[0, 3, 7, 1] = float("inf")
    h[0, 4] = 0.25  # constant
    for method in METHODS:
        d = decode_heatmaps(h, method=method, window=3, affine=torch.eye(3, dtype=torch.float64))
        assert torch.isfinite(d.voxel[0, 0]).all()
        assert torch.isnan(d.voxel[0, 1:]).all() and torch.isnan(d.world[0, 1:]).all()
        assert d.confidence[0, 1:].eq(0).all() and d.confidence[0, 0] > 0.9
        assert d.found.tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.05)])
def test_half_precision_heatmaps(dtype, tol):
    points = random_points(1, 4, (40, 40), margin=8, seed=5)
    h = gaussian_heatmaps(points, (40, 40), sigma=2.5).to(dtype)
    for method in ("quadratic", "gaussian", "weighted_mean"):
        d = decode_heatmaps(h, method=method, window=10)
        assert d.voxel.dtype == torch.float64 and d.confidence.dtype == torch.float64
        assert (d.voxel - points).abs().max() < tol, method


def test_bad_arguments():
    h = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown decoding method"):
        decode_heatmaps(h, method="centroid")
    with pytest.raises(ValueError, match="output_stride"):
        decode_heatmaps(h, output_stride=(2, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        decode_heatmaps(torch.zeros(8, 8))


# ----------------------------------------------------------------------------------------------
# several peaks in one channel


def blobs(points: torch.Tensor, amplitudes: list[float], shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    """One channel ``(*shape)``: the maximum of Gaussian blobs with the given peak heights."""
    h = gaussian_heatmaps(points[None], shape, sigma=sigma)[0]
    return (h * torch.tensor(amplitudes, dtype=h.dtype).reshape(-1, *[1] * len(shape))).amax(dim=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_multi_peak_finds_blobs_at_world_positions(dims):
    shape = {2: (48, 48), 3: (32, 32, 32)}[dims]
    base = [[8.3, 9.6, 10.2], [30.7, 11.4, 21.8], [12.2, 34.5, 20.4], [33.6, 36.1, 9.7]]
    points = torch.tensor([p[:dims] for p in base], dtype=torch.float64)
    points = points * (min(shape) - 1) / 40.0
    amplitudes = [1.0, 0.9, 0.8, 0.7]
    affine = rotated_affine(dims, (0.8, 1.2, 1.5)[:dims], (-20.0, 10.0, 5.0)[:dims], 0.4)
    heat = blobs(points, amplitudes, shape, sigma=2.0)
    peaks = decode_peaks(heat, threshold=0.5, min_distance_mm=5.0, affine=affine, method="gaussian")
    assert peaks.world.shape == (4, dims) and peaks.confidence.shape == (4,)
    torch.testing.assert_close(peaks.world, voxel_to_world(points, affine), atol=1e-3, rtol=0)  # sorted by confidence
    assert torch.all(peaks.confidence[:-1] >= peaks.confidence[1:])
    # a channel axis of size 1 is accepted
    again = decode_peaks(heat[None], threshold=0.5, min_distance_mm=5.0, affine=affine, method="gaussian")
    torch.testing.assert_close(again.world, peaks.world)


def test_multi_peak_suppression_threshold_and_max_peaks():
    spacing = (0.5, 0.5)
    affine = rotated_affine(2, spacing, (0.0, 0.0), 0.0)
    points = torch.tensor([[10.0, 10.0], [30.0, 30.0], [10.0, 17.0], [30.0, 10.0]], dtype=torch.float64)
    # blob 2 is 7 voxels = 3.5 mm from blob 0 (its own local maximum); blob 3 is below threshold
    heat = blobs(points, [1.0, 0.9, 0.7, 0.3], (40, 40), sigma=1.5)
    world = voxel_to_world(points, affine)

    near_kept = decode_peaks(heat, threshold=0.5, min_distance_mm=3.0, affine=affine)
    torch.testing.assert_close(near_kept.world, world[:3], atol=0.05, rtol=0)

    suppressed = decode_peaks(heat, threshold=0.5, min_distance_mm=4.0, affine=affine)
    torch.testing.assert_close(suppressed.world, world[:2], atol=0.05, rtol=0)

    low_threshold = decode_peaks(heat, threshold=0.2, min_distance_mm=4.0, affine=affine)
    torch.testing.assert_close(low_threshold.world, world[[0, 1, 3]], atol=0.05, rtol=0)
    torch.testing.assert_close(low_threshold.confidence, torch.tensor([1.0, 0.9, 0.3], dtype=torch.float64),
                               atol=1e-6, rtol=0)

    top1 = decode_peaks(heat, threshold=0.2, min_distance_mm=4.0, affine=affine, max_peaks=1)
    assert top1.world.shape == (1, 2)

    nothing = decode_peaks(heat, threshold=2.0, min_distance_mm=4.0, affine=affine)
    assert nothing.world.shape == (0, 2) and nothing.confidence.shape == (0,)

    # without an affine, distances and positions are in voxels
    voxels = decode_peaks(heat, threshold=0.5, min_distance_mm=8.0)
    torch.testing.assert_close(voxels.world, points[:2], atol=0.05, rtol=0)


def test_multi_peak_ignores_non_finite_values_and_checks_channels():
    heat = blobs(torch.tensor([[10.0, 10.0]], dtype=torch.float64), [1.0], (24, 24), sigma=2.0)
    heat[20, 20] = float("nan")
    heat[3, 20] = float("inf")
    peaks = decode_peaks(heat.to(torch.bfloat16), threshold=0.5, min_distance_mm=2.0)
    torch.testing.assert_close(peaks.world, torch.tensor([[10.0, 10.0]], dtype=torch.float64), atol=0.15, rtol=0)
    with pytest.raises(ValueError, match="one channel"):
        decode_peaks(torch.zeros(2, 8, 8), threshold=0.5, min_distance_mm=1.0, spatial_dims=2)
    # a 3-axis tensor with a 3x3 affine is a one-channel 2D heatmap
    two_d = decode_peaks(heat[None], threshold=0.5, min_distance_mm=2.0, affine=np.eye(3))
    assert two_d.world.shape == (1, 2)


def test_mask_restricts_the_maximum_but_refines_on_the_unmasked_values():
    grid = torch.stack(torch.meshgrid(torch.arange(40.0), torch.arange(36.0), indexing="ij"), -1)
    near, far = torch.tensor([10.3, 12.6]), torch.tensor([30.0, 25.0])
    heat = torch.exp(-((grid - near) ** 2).sum(-1) / 8) + 2 * torch.exp(-((grid - far) ** 2).sum(-1) / 8)
    heat = heat[None, None]
    whole = decode_heatmaps(heat, method="gaussian")
    assert torch.allclose(whole.voxel[0, 0].float(), far, atol=0.05)
    mask = ((grid - torch.tensor([11.0, 11.0])) ** 2).sum(-1) <= 16  # a 4-voxel disc about (11, 11)
    dec = decode_heatmaps(heat, method="gaussian", mask=mask)
    assert torch.allclose(dec.voxel[0, 0].float(), near, atol=0.05)  # unbiased: neighbours outside the disc are read
    assert abs(float(dec.confidence[0, 0]) - float(heat[0, 0, 10, 13])) < 1e-6
    none = decode_heatmaps(heat, mask=torch.zeros(40, 36, dtype=torch.bool))
    assert torch.isnan(none.voxel).all() and float(none.confidence[0, 0]) == 0.0
