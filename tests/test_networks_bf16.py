"""bf16 autocast on the CPU gives the gradients of float32 in 3D, also where a convolution's kernel
is larger than its input (the SCN's spatial-configuration grid). With torch 2.13 on CPUs with native
bf16, a plain ``nn.Conv3d`` gets a wrong weight gradient there (NaN or unrelated values): these
tests fail with it on such a CPU; on a CPU without native bf16 they check the same equality on
torch's other kernels."""

from __future__ import annotations

import pytest
import torch

from heatmark.networks import SpatialConfigurationNet
from heatmark.networks.blocks import AutocastSafeConv3d, conv


def _grads(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = module(x)
    (y.float() * g).sum().backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("size, kernel", [((4, 4, 4), 5), ((6, 7, 6), 7), ((2, 4, 4), 3), ((9, 9, 9), 3)])
def test_conv3d_weight_gradient_under_bf16_matches_float32(size, kernel):
    torch.manual_seed(0)
    layer = conv(3, 16, 32, kernel)
    assert isinstance(layer, AutocastSafeConv3d) and isinstance(conv(2, 4, 4, 3), torch.nn.Conv2d)
    x = torch.randn(2, 16, *size)
    g = torch.randn(2, 32, *size)
    ref = _grads(layer, x, g, bf16=False)
    for _ in range(4):  # the wrong kernel is NaN only in some calls
        got = _grads(layer, x, g, bf16=True)
        for name in ref:
            assert torch.isfinite(got[name]).all(), name
            assert _relative(got[name], ref[name]) < 0.03, (name, _relative(got[name], ref[name]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    torch.testing.assert_close(y.float(), torch.nn.functional.conv3d(x, layer.weight, layer.bias, padding=kernel // 2),
                               rtol=0.05, atol=0.05)


def test_scn3d_spatial_configuration_gradients_under_bf16():
    """The SCN 2019 in 3D on 16^3: its spatial-configuration grid is 2^3 under a 7^3 kernel. At
    random initialisation bf16 and float32 gradients differ a lot through the additive U-Net (its
    tiny outputs cancel), so this checks that every 3D conv is the safe one and that the spatial
    gradients are finite and the same on every call (the wrong kernel's are neither)."""
    torch.manual_seed(0)
    net = SpatialConfigurationNet(3, 1, 4, filters=8).eval()  # no dropout: the same gradients every call
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(isinstance(m, AutocastSafeConv3d) for m in convs)
    x = torch.randn(1, 1, 16, 16, 16)
    g = torch.randn(1, 4, 16, 16, 16)
    first = _grads(net, x, g, bf16=True)
    for _ in range(4):
        got = _grads(net, x, g, bf16=True)
        for name in ("spatial_heatmaps.weight", "spatial.0.weight", "local.contracting.3.0.0.weight"):
            assert torch.isfinite(got[name]).all(), name
            torch.testing.assert_close(got[name], first[name], rtol=0, atol=0)
