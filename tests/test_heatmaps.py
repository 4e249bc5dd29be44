"""The one heatmap function and its MONAI transforms, against a float64 reference formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from heatmark.core.geometry import world_to_voxel
from heatmark.core.heatmaps import broadcast_sigma, gaussian_heatmaps
from heatmark.transforms.heatmap import GaussianHeatmap, GaussianHeatmapd


def reference(points: np.ndarray, shape, sigma: np.ndarray, gamma=None) -> np.ndarray:
    """Direct float64 evaluation: (N, D) points, (N, D) sigma -> (N, *shape)."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    out = []
    for p, s in zip(points, sigma):
        if not np.isfinite(p).all():
            out.append(np.zeros(shape))
            continue
        e = sum((g - pi) ** 2 / (2 * si**2) for g, pi, si in zip(grids, p, s))
        c = 1.0 if gamma is None else gamma / ((2 * math.pi) ** (len(shape) / 2) * np.prod(s))
        out.append(c * np.exp(-e))
    return np.stack(out)


@pytest.mark.parametrize("shape", [(37, 29), (17, 21, 13)])
@pytest.mark.parametrize("gamma", [None, 100.0])
def test_matches_float64_reference_at_subvoxel_positions(shape, gamma):
    rng = np.random.default_rng(len(shape))
    n, d = 5, len(shape)
    pts = rng.uniform(-2, np.array(shape) + 1, size=(2, n, d))  # some slightly outside the grid
    pts[1, 3] = np.nan
    sigma = rng.uniform(0.8, 3.0, size=(n, d))  # per landmark and axis
    out = gaussian_heatmaps(torch.as_tensor(pts), shape, sigma=torch.as_tensor(sigma), gamma=gamma)
    assert out.shape == (2, n, *shape) and out.dtype == torch.float32
    for b in range(2):
        ref = reference(pts[b], shape, sigma, gamma)
        scale = 1.0 if gamma is None else ref.max()
        assert np.abs(out[b].numpy() - ref).max() <= 1e-5 * max(scale, 1.0)
    assert out[1, 3].abs().max() == 0  # NaN landmark -> zero channel


def test_peak_value_and_position():
    pts = torch.tensor([[[10.0, 12.0], [5.0, 7.0]]], dtype=torch.float64)
    out = gaussian_heatmaps(pts, (20, 24), sigma=2.0)
    assert out[0, 0, 10, 12] == pytest.approx(1.0)
    assert out[0, 1].argmax().item() == 5 * 24 + 7
    g = gaussian_heatmaps(pts, (20, 24), sigma=2.0, gamma=100.0)
    assert g[0, 0, 10, 12].item() == pytest.approx(100.0 / (2 * math.pi * 4.0), rel=1e-6)
    # the integral of a gamma-scaled Gaussian well inside the grid is gamma
    assert g[0, 0].sum().item() == pytest.approx(100.0, rel=1e-4)


def test_unbatched_and_sigma_shapes():
    pts = torch.tensor([[3.2, 4.7, 1.1], [6.0, 2.0, 5.5]])
    a = gaussian_heatmaps(pts, (9, 8, 7), sigma=1.5)
    b = gaussian_heatmaps(pts.unsqueeze(0), (9, 8, 7), sigma=torch.full((2,), 1.5))[0]
    c = gaussian_heatmaps(pts, (9, 8, 7), sigma=[1.5, 1.5, 1.5])  # (D,) when N != D
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert broadcast_sigma(torch.ones(2, 3), 4, 2, 3).shape == (4, 2, 3)
    with pytest.raises(ValueError):
        gaussian_heatmaps(pts, (9, 8), sigma=1.0)
    with pytest.raises(ValueError):
        gaussian_heatmaps(pts, (9, 8, 7), sigma=torch.ones(5))


def test_differentiable_in_sigma_and_points():
    pts = torch.tensor([[[3.3, 4.6], [1.2, 5.9]]], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([1.3, 2.1], dtype=torch.float64, requires_grad=True)

    def f(p, s):
        return gaussian_heatmaps(p, (7, 9), sigma=s, gamma=10.0, dtype=torch.float64)

    assert torch.autograd.gradcheck(f, (pts, sigma))
    # learned sigma: shrinking towards a narrower target lowers an L2 loss
    target = gaussian_heatmaps(pts.detach(), (7, 9), sigma=1.0, dtype=torch.float64)
    loss = ((gaussian_heatmaps(pts.detach(), (7, 9), sigma=sigma, dtype=torch.float64) - target) ** 2).sum()
    loss.backward()
    assert (sigma.grad > 0).all()


def test_far_tails_are_exact_zeros_not_denormals():
    out = gaussian_heatmaps(torch.tensor([[0.0, 0.0]]), (200, 3), sigma=1.0)
    tiny = out[(out > 0) & (out < 1e-30)]
    assert tiny.numel() == 0
    assert out[0, 150, 0] == 0.0


def test_transform_sigma_in_mm_is_round_on_anisotropic_grid():
    affine = torch.diag(torch.tensor([0.5, 2.0, 1.0, 1.0], dtype=torch.float64))
    t = GaussianHeatmap(sigma=4.0, sigma_units="mm")
    hm = t(torch.tensor([[20.0, 10.0]]), (41, 21), affine=affine)[0]
    # 4 mm from the centre along either axis gives the same value: exp(-1/2)
    assert hm[20 + 8, 10].item() == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert hm[20, 10 + 2].item() == pytest.approx(math.exp(-0.5), rel=1e-5)
    with pytest.raises(ValueError):
        t(torch.tensor([[1.0, 1.0]]), (5, 5))
    with pytest.raises(ValueError):
        GaussianHeatmap(sigma_units="inch")


def test_dict_transform_places_heatmap_at_world_point():
    affine = torch.tensor([[0.0, -1.5, 0.0, 30.0], [0.8, 0.0, 0.0, -10.0], [0.0, 0.0, 2.0, 5.0], [0, 0, 0, 1.0]],
                          dtype=torch.float64)
    image = MetaTensor(torch.zeros(1, 30, 25, 12), affine=affine)
    world = torch.tensor([[12.0, 2.0, 15.0], [float("nan")] * 3], dtype=torch.float64)
    d = GaussianHeatmapd("landmarks", ref_key="image", sigma=3.0)({"image": image, "landmarks": world})
    hm = d["heatmap"]
    assert isinstance(hm, MetaTensor) and hm.shape == (2, 30, 25, 12)
    torch.testing.assert_close(hm.affine, affine)
    vox = world_to_voxel(world[:1], affine)[0]
    peak = np.unravel_index(int(hm[0].argmax()), hm.shape[1:])
    np.testing.assert_allclose(peak, np.round(vox.numpy()), atol=0)
    assert hm[1].abs().max() == 0


@pytest.mark.parametrize("shape", [(31, 26), (13, 17, 11)])
def test_scalar_sigma_fast_path_matches_reference_and_zeroes_nan(shape):
    rng = np.random.default_rng(7)
    pts = rng.uniform(0, np.array(shape) - 1, size=(1, 4, len(shape)))
    pts[0, 2] = np.nan
    out = gaussian_heatmaps(torch.as_tensor(pts), shape, sigma=1.7)
    ref = reference(pts[0], shape, np.full((4, len(shape)), 1.7))
    assert np.abs(out[0].numpy() - ref).max() <= 1e-5
    assert out[0, 2].abs().max() == 0
