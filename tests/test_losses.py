"""Heatmap losses: on-device targets, masking of missing landmarks, stride, learned sigma."""

from __future__ import annotations

import pytest
import torch

from heatmark.core.heatmaps import gaussian_heatmaps
from heatmark.core.geometry import input_to_output_voxels
from heatmark.training.losses import HeatmapLoss


def test_perfect_prediction_has_zero_loss_and_targets_are_on_device_grid():
    pts = torch.tensor([[[5.3, 7.8], [10.0, 3.2]]], dtype=torch.float64)
    loss = HeatmapLoss(2, sigma=1.5, gamma=100.0)
    target, valid = loss.targets(pts, (16, 12))
    assert target.shape == (1, 2, 16, 12) and valid.all()
    assert loss(target.clone(), pts).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(torch.zeros_like(target), pts).item() > 0


def test_missing_and_off_grid_landmarks_are_masked():
    pts = torch.tensor([[[5.0, 5.0], [float("nan"), float("nan")], [40.0, 3.0]]], dtype=torch.float64)
    loss = HeatmapLoss(3, sigma=2.0)
    pred = torch.rand(1, 3, 12, 12)
    base = loss(pred, pts)
    pred2 = pred.clone()
    pred2[0, 1] += 5.0  # missing landmark's channel
    pred2[0, 2] -= 3.0  # landmark outside the grid
    assert loss(pred2, pts).item() == pytest.approx(base.item(), rel=1e-6)
    pred3 = pred.clone()
    pred3[0, 0] += 1.0
    assert loss(pred3, pts).item() > base.item()


def test_output_stride_maps_input_voxels_to_output_grid():
    # input voxels 0..3 pooled by 4 -> output voxel 0 whose centre is input 1.5
    p = torch.tensor([[[1.5, 5.5]]], dtype=torch.float64)
    q = input_to_output_voxels(p, (4, 4))
    torch.testing.assert_close(q, torch.tensor([[[0.0, 1.0]]], dtype=torch.float64))
    loss = HeatmapLoss(1, sigma=4.0, output_stride=(4, 4))
    target, _ = loss.targets(p, (8, 8))
    assert target[0, 0].argmax().item() == 0 * 8 + 1
    # sigma is given on the input grid: 4 input voxels = 1 output voxel
    assert target[0, 0, 1, 1].item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), rel=1e-5)


def _fit_sigma(loss: HeatmapLoss, pred: torch.Tensor, pts: torch.Tensor, steps: int = 150) -> float:
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss(pred, pts).backward()
        opt.step()
    return float(loss.sigma.mean())


def test_learned_sigma_moves_towards_the_predicted_width():
    pts = torch.tensor([[[10.2, 9.7], [6.0, 14.0]]], dtype=torch.float64)
    pred = gaussian_heatmaps(pts, (24, 24), sigma=3.0, gamma=50.0)
    loss = HeatmapLoss(2, sigma=1.5, learn_sigma=True, gamma=50.0, alpha=0.0, reduction="sum")
    assert _fit_sigma(loss, pred, pts) == pytest.approx(3.0, abs=0.1)
    # a strong regulariser pulls sigma down, below the data optimum
    loss_reg = HeatmapLoss(2, sigma=1.5, learn_sigma=True, gamma=50.0, alpha=5.0, reduction="sum")
    assert _fit_sigma(loss_reg, pred, pts) < 2.9
    assert isinstance(loss_reg.sigma, torch.nn.Parameter) and "sigma" in loss_reg.state_dict()


def test_bce_and_argument_errors():
    pts = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    loss = HeatmapLoss(1, sigma=1.0, kind="bce")
    assert torch.isfinite(loss(torch.zeros(1, 1, 8, 8), pts))
    with pytest.raises(ValueError):
        HeatmapLoss(1, kind="bce", gamma=10.0)
    with pytest.raises(ValueError):
        HeatmapLoss(2, sigma=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        HeatmapLoss(2)(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2))


def test_bf16_prediction_gives_float32_loss():
    pts = torch.tensor([[[3.0, 4.0, 2.0]]], dtype=torch.float64)
    loss = HeatmapLoss(1, sigma=1.0, gamma=10.0)
    out = loss(torch.zeros(1, 1, 8, 8, 6, dtype=torch.bfloat16), pts)
    assert out.dtype == torch.float32
