"""Tests of heatmark.networks: shapes, gradients, export, bf16 autocast, init, training, registry.

Export path: ``torch.export.export`` (strict=False default of torch 2.x) of every network in eval
mode with a fixed example input; the exported program's module must reproduce the eager output.

All networks are built with tiny widths and tiny inputs; the two training checks (2019 SCN,
U-Net) run a few hundred Adam steps on a synthetic task with fixed seeds.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F

from heatmark.networks import (
    NETWORKS,
    ConvOnlyNet,
    CoordinateRegressionNet,
    DownsamplingNet,
    HeatmapUNet,
    SpatialConfigurationNet,
    fuse_heatmaps_with_coordinates,
    get_network,
    network_names,
    normalized_to_voxel,
    voxel_to_normalized,
)
from heatmark.core.geometry import output_to_input_voxels
from heatmark.networks.blocks import resize



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads that wait on busy cores make
    these tiny workloads many times slower. Restored afterwards for other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


NAMES = ["scn2019", "scn2016", "unet", "downsampling", "convonly", "coordreg"]
SIZES = {2: (32, 32), 3: (16, 16, 16)}
ODD_SIZES = {2: (37, 29), 3: (13, 11, 9)}
NUM_LANDMARKS = 3


def tiny(name: str, spatial_dims: int, in_channels: int = 1, **kwargs) -> torch.nn.Module:
    kwargs.setdefault("filters", 8)
    return get_network(name, spatial_dims=spatial_dims, in_channels=in_channels, num_landmarks=NUM_LANDMARKS, **kwargs)


def expected_shape(net: torch.nn.Module, batch: int, size: tuple[int, ...]) -> tuple[int, ...]:
    d = len(size)
    if isinstance(net, CoordinateRegressionNet):
        return (batch, NUM_LANDMARKS, d)
    return (batch, NUM_LANDMARKS, *net.output_spatial_size(size))


CASES = [(name, d) for name in NAMES for d in (2, 3)]


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("name,spatial_dims", CASES)
def test_forward_backward(name: str, spatial_dims: int) -> None:
    torch.manual_seed(0)
    net = tiny(name, spatial_dims, in_channels=2)
    size = SIZES[spatial_dims]
    x = torch.randn(2, 2, *size)
    y = net(x)
    assert y.shape == expected_shape(net, 2, size)
    assert y.dtype == torch.float32
    if name == "downsampling":
        stride = 4 if spatial_dims == 2 else 2
        assert net.output_stride == (stride,) * spatial_dims
        assert y.shape[2:] == tuple(s // stride for s in size)
    else:
        assert net.output_stride == (1,) * spatial_dims
    (y * torch.randn_like(y)).sum().backward()  # a random linear functional of the output
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(float(p.grad.abs().max()) > 0 for p in net.parameters())


@pytest.mark.parametrize("name,spatial_dims", CASES)
def test_odd_input_sizes(name: str, spatial_dims: int) -> None:
    """Sizes that are not multiples of the total stride work (padded inside, cropped back)."""
    torch.manual_seed(0)
    net = tiny(name, spatial_dims).eval()
    size = ODD_SIZES[spatial_dims]
    y = net(torch.randn(1, 1, *size))
    assert y.shape == expected_shape(net, 1, size)
    assert torch.isfinite(y).all()


def test_padding_keeps_voxel_positions() -> None:
    """Padding happens at the end of each axis: a cropped sub-image gives the same output away
    from the border it lost."""
    torch.manual_seed(0)
    net = tiny("unet", 2, num_levels=2, heatmap_init_std=0.1).eval()  # receptive field < 20 voxels
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        full = net(x)
        part = net(x[:, :, :45, :43])
    assert part.shape[2:] == (45, 43)
    torch.testing.assert_close(full[:, :, :16, :16], part[:, :, :16, :16])


def test_downsampling_output_mapping() -> None:
    net = DownsamplingNet(2, 1, NUM_LANDMARKS, filters=4)
    assert net.output_stride == (4, 4)
    coords = torch.tensor([[0.0, 0.0], [2.0, 3.0]])
    assert torch.equal(output_to_input_voxels(coords, net.output_stride), torch.tensor([[1.5, 1.5], [9.5, 13.5]]))
    assert net.output_spatial_size((37, 29)) == (9, 7)
    net3 = DownsamplingNet(3, 1, NUM_LANDMARKS, filters=4)
    assert net3.output_stride == (2, 2, 2)
    assert torch.equal(output_to_input_voxels(torch.zeros(1, 3), net3.output_stride), torch.full((1, 3), 0.5))


def test_wrong_input_raises() -> None:
    net = tiny("unet", 2)
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims=2"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims"):
        HeatmapUNet(4, 1, 2)
    with pytest.raises(ValueError, match="odd"):
        ConvOnlyNet(2, 1, 2, filters=4, kernel_size=4)
    with pytest.raises(ValueError, match="variant"):
        SpatialConfigurationNet(2, 1, 2, variant="2017")
    reflect = SpatialConfigurationNet(2, 1, 2, filters=4, padding_mode="reflect")
    with pytest.raises(ValueError, match="reflect"):
        reflect(torch.randn(1, 1, 64, 64))  # coarse grid 4x4, 11x11 kernel
    assert reflect(torch.randn(1, 1, 96, 100)).shape == (1, 2, 96, 100)


# ----------------------------------------------------------------------------- export and bf16


@pytest.mark.parametrize("name,spatial_dims", CASES)
def test_torch_export(name: str, spatial_dims: int) -> None:
    """The inference path (eval mode) exports with torch.export and reproduces eager outputs."""
    torch.manual_seed(0)
    net = tiny(name, spatial_dims).eval()
    size = ODD_SIZES[spatial_dims] if name in ("scn2019", "unet") else SIZES[spatial_dims]
    x = torch.randn(1, 1, *size)
    exported = torch.export.export(net, (x,))
    with torch.no_grad():
        eager = net(x)
        out = exported.module()(x)
    assert out.shape == eager.shape
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,spatial_dims", CASES)
def test_bf16_autocast(name: str, spatial_dims: int) -> None:
    torch.manual_seed(0)
    net = tiny(name, spatial_dims, heatmap_init_std=0.1) if name != "coordreg" else tiny(name, spatial_dims)
    x = torch.randn(2, 1, *SIZES[spatial_dims])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        loss = y.float().square().mean()
    loss.backward()
    assert y.shape == expected_shape(net, 2, SIZES[spatial_dims])
    assert torch.isfinite(y.detach().float()).all()
    assert float(y.detach().float().abs().max()) > 0


# ----------------------------------------------------------------------------- SCN specifics


@pytest.mark.parametrize("spatial_dims,std", [(2, 1e-4), (3, 1e-3)])
def test_scn2019_init_near_zero(spatial_dims: int, std: float) -> None:
    torch.manual_seed(0)
    net = SpatialConfigurationNet(spatial_dims, 1, NUM_LANDMARKS, filters=16).eval()
    assert net.local_heatmaps.weight.detach().std().item() == pytest.approx(std * 0.88, rel=0.35)  # 2-std trunc.
    assert float(net.local_heatmaps.bias.detach().abs().max()) == 0.0
    assert float(net.spatial_heatmaps.bias.detach().abs().max()) == 0.0
    x = torch.randn(2, 1, *SIZES[spatial_dims])
    with torch.no_grad():
        heat, local, spatial = net.forward_components(x)
    assert float(heat.abs().max()) < 1e-3
    assert float(local.abs().max()) < 1e-1
    assert float(spatial.abs().max()) < 1.0  # tanh output, up to cubic overshoot
    assert torch.allclose(heat, local * spatial)


def test_scn2019_structure_defaults() -> None:
    net2 = SpatialConfigurationNet(2, 1, 5, filters=8)
    net3 = SpatialConfigurationNet(3, 1, 5, filters=8)
    assert net2.spatial_downsample == (16, 16) and net3.spatial_downsample == (8, 8, 8)
    assert net2.size_multiple == (16, 16) and net3.size_multiple == (8, 8, 8)
    assert net2.spatial_upsample_mode == "cubic" and net3.spatial_upsample_mode == "linear"
    assert net2.spatial_heatmaps.kernel_size == (11, 11) and net3.spatial_heatmaps.kernel_size == (7, 7, 7)
    assert net2.local_heatmaps.kernel_size == (3, 3)
    assert isinstance(net2.spatial_activation, torch.nn.Tanh)
    assert any(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.1 for m in net2.modules())
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in net2.modules()) == 4
    # default widths from the paper
    assert SpatialConfigurationNet(2, 1, 2).local_heatmaps.in_channels == 128
    assert SpatialConfigurationNet(3, 1, 2).local_heatmaps.in_channels == 64
    # cubic in 3D is selectable
    y = SpatialConfigurationNet(3, 1, 2, filters=4, spatial_upsample_mode="cubic")(torch.randn(1, 1, 16, 16, 16))
    assert y.shape == (1, 2, 16, 16, 16)


def test_scn2016_spatial_conv_ignores_own_landmark() -> None:
    """2016 spatial configuration: landmark i's spatial map depends only on the OTHER local maps."""
    torch.manual_seed(0)
    net = SpatialConfigurationNet(2, 1, NUM_LANDMARKS, variant="2016", filters=4, heatmap_init_std=0.1)
    masked = net.spatial_heatmaps
    x = torch.zeros(1, NUM_LANDMARKS, 8, 8)
    x[0, 0, 4, 4] = 1.0  # only landmark 0 has a response
    with torch.no_grad():
        y = masked(x)
    assert float(y[0, 0].abs().max()) == 0.0
    assert float(y[0, 1].abs().max()) > 0.0
    assert get_network("scn2016", spatial_dims=2, in_channels=1, num_landmarks=2, filters=4).variant == "2016"


def test_cubic_resize_3d_is_separable_tricubic() -> None:
    torch.manual_seed(0)
    a, b, c = torch.randn(3), torch.randn(4), torch.randn(5)
    x = (a[:, None, None] * b[None, :, None] * c[None, None, :])[None, None]

    def up1(v: torch.Tensor, n: int) -> torch.Tensor:
        return F.interpolate(v[None, None, None], size=(1, n), mode="bicubic", align_corners=False)[0, 0, 0]

    expected = up1(a, 6)[:, None, None] * up1(b, 8)[None, :, None] * up1(c, 10)[None, None, :]
    torch.testing.assert_close(resize(x, (6, 8, 10), "cubic")[0, 0], expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training


def _gaussians(points: torch.Tensor, size: int, sigma: float, amplitude: float) -> torch.Tensor:
    """(B, N, 2) points -> (B, N, size, size) Gaussians (axis 0 = first array axis)."""
    grid = torch.arange(size, dtype=torch.float32)
    g0 = torch.exp(-0.5 * ((grid - points[..., 0:1]) / sigma) ** 2)
    g1 = torch.exp(-0.5 * ((grid - points[..., 1:2]) / sigma) ** 2)
    return amplitude * g0[..., :, None] * g1[..., None, :]


def _sample(gen: torch.Generator, batch: int, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One bright blob per landmark (landmark k in input channel k) at random sub-voxel positions."""
    points = 3.0 + (size - 7.0) * torch.rand(batch, n, 2, generator=gen)
    return _gaussians(points, size, 1.5, 1.0), points


def _decode(heatmaps: torch.Tensor) -> torch.Tensor:
    """argmax + 3x3 weighted mean refinement, (B, N, H, W) -> (B, N, 2)."""
    b, n, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, n, -1).argmax(-1)
    peak = torch.stack([flat // w, flat % w], -1)
    padded = F.pad(heatmaps, (1, 1, 1, 1))
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    out = peak.float().clone()
    for i in range(b):
        for j in range(n):
            y, x = int(peak[i, j, 0]), int(peak[i, j, 1])
            win = padded[i, j, y : y + 3, x : x + 3].clamp_min(0)
            s = win.sum()
            if s > 0:
                out[i, j, 0] += (win.sum(1) * offsets).sum() / s
                out[i, j, 1] += (win.sum(0) * offsets).sum() / s
    return out


def _train_and_evaluate(net: torch.nn.Module, size: int, steps: int, lr: float, gamma: float) -> float:
    n = net.num_landmarks
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(steps):
        x, points = _sample(gen, 8, n, size)
        target = _gaussians(points, size, 1.5, gamma)
        loss = F.mse_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        x, points = _sample(torch.Generator().manual_seed(123), 16, n, size)
        pred = _decode(net(x))
    return float((pred - points).norm(dim=-1).mean())


@pytest.mark.timeout(120)
def test_scn2019_trains_on_synthetic_blobs() -> None:
    """Tiny-init SCN (product of local and spatial) learns sub-voxel localisation: Adam 1e-3,
    targets with peak 10 (gamma), mean MSE, 250 steps of batch 8 on 32x32 images."""
    torch.manual_seed(0)
    net = SpatialConfigurationNet(2, 3, 3, filters=16)
    error = _train_and_evaluate(net, size=32, steps=250, lr=1e-3, gamma=10.0)
    assert error < 1.0, error


@pytest.mark.timeout(120)
def test_unet_trains_on_synthetic_blobs() -> None:
    torch.manual_seed(0)
    net = HeatmapUNet(2, 3, 3, filters=16)
    error = _train_and_evaluate(net, size=32, steps=250, lr=1e-3, gamma=10.0)
    assert error < 1.0, error


# ----------------------------------------------------------------------------- parameter counts


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_parameter_count_ordering_2d_defaults() -> None:
    """Payer et al. 2016 (hand radiographs, 37 landmarks): ConvOnly-Net has the most parameters,
    the SCN (2016 form, the one compared in that paper) the fewest of the full-resolution nets.
    The 2019 SCN (128-wide 11x11 spatial convs, as in the authors' code) is larger than the
    2016 U-Net but still smaller than ConvOnly-Net."""
    kw = dict(spatial_dims=2, in_channels=1, num_landmarks=37)
    counts = {name: _count(get_network(name, **kw)) for name in ["scn2016", "scn2019", "unet", "convonly", "downsampling"]}
    assert counts["convonly"] == max(counts.values())
    assert counts["scn2016"] < counts["unet"] < counts["convonly"]
    assert counts["scn2019"] < counts["convonly"]


# ----------------------------------------------------------------------------- coordinate regression


def test_coordreg_range_and_conversion() -> None:
    torch.manual_seed(0)
    net = CoordinateRegressionNet(2, 1, NUM_LANDMARKS, filters=4, hidden_features=16).eval()
    for size in [(32, 32), (45, 23), (9, 70)]:
        with torch.no_grad():
            y = net(torch.randn(2, 1, *size))
        assert y.shape == (2, NUM_LANDMARKS, 2)
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    norm = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    vox = normalized_to_voxel(norm, (11, 21))
    assert torch.equal(vox, torch.tensor([[[0.0, 20.0], [5.0, 5.0]]]))
    torch.testing.assert_close(voxel_to_normalized(vox, (11, 21)), norm)


def test_coordreg_learns_offset_free_center() -> None:
    """Untrained head starts at the image centre (sigmoid(0) = 0.5)."""
    net = CoordinateRegressionNet(3, 1, 2, filters=4, hidden_features=8).eval()
    y = net(torch.randn(1, 1, 12, 10, 8))
    torch.testing.assert_close(y, torch.full_like(y, 0.5), atol=1e-2, rtol=0)


# ----------------------------------------------------------------------------- fusion


def test_fusion_suppresses_far_maxima() -> None:
    h = torch.zeros(1, 2, 40, 30)
    h[0, 0, 5, 5] = 1.0  # false maximum, far away
    h[0, 0, 30, 20] = 0.8  # true one, close to the regressed point
    h[0, 1, 10, 10] = 1.0
    coords = torch.tensor([[[29.0, 21.0], [float("nan"), 0.0]]])
    fused = fuse_heatmaps_with_coordinates(h, coords, sigma_voxels=3.0)
    assert fused.shape == h.shape and fused.dtype == h.dtype
    flat = fused[0, 0].argmax()
    assert (int(flat // 30), int(flat % 30)) == (30, 20)
    torch.testing.assert_close(fused[0, 0, 30, 20], torch.tensor(0.8 * torch.exp(torch.tensor(-2.0 / 18.0)).item()))
    assert torch.equal(fused[0, 1], h[0, 1])  # NaN coordinate: unchanged


def test_fusion_matches_direct_gaussian_3d_per_axis_sigma() -> None:
    torch.manual_seed(0)
    h = torch.rand(2, 3, 6, 7, 8)
    coords = torch.rand(2, 3, 3) * 6
    sigma = torch.tensor([1.0, 2.0, 3.0])
    fused = fuse_heatmaps_with_coordinates(h, coords, sigma)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (6, 7, 8)], indexing="ij"), -1)
    diff = (grid[None, None] - coords[:, :, None, None, None, :]) / sigma
    expected = h * torch.exp(-0.5 * diff.square().sum(-1))
    torch.testing.assert_close(fused, expected)
    with pytest.raises(ValueError, match="coords_voxel"):
        fuse_heatmaps_with_coordinates(h, coords[..., :2], 1.0)
    with pytest.raises(ValueError, match="> 0"):
        fuse_heatmaps_with_coordinates(h, coords, 0.0)


# ----------------------------------------------------------------------------- registry / package


def test_registry() -> None:
    names = network_names()
    for name in ["scn2019", "scn", "scn2016", "unet", "downsampling", "convonly", "coordreg"]:
        assert name in names and name in NETWORKS
    assert NETWORKS["scn"] is SpatialConfigurationNet
    assert isinstance(get_network("SCN-2019", spatial_dims=2, in_channels=1, num_landmarks=2, filters=4), SpatialConfigurationNet)
    with pytest.raises(ValueError, match="valid names: .*scn2019.*coordreg"):
        get_network("resnet", spatial_dims=2, in_channels=1, num_landmarks=2)
    with pytest.raises(ValueError, match="implies variant"):
        get_network("scn2016", spatial_dims=2, in_channels=1, num_landmarks=2, variant="2019")


def test_networks_import_only_torch_monai_and_heatmark_core() -> None:
    import heatmark.networks as pkg

    allowed = {"torch", "monai", "__future__", "collections", "typing", "math", "functools", "inspect", "heatmark.core"}
    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # relative import inside heatmark.networks
                    continue
                names = [node.module or ""]
            else:
                continue
            roots = {".".join(n.split(".")[:2]) if n.startswith("heatmark.") else n.split(".")[0] for n in names}
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_paper_defaults() -> None:
    """Default widths / kernels / depths of the 2016 baselines (Payer et al., MICCAI 2016)."""
    assert HeatmapUNet(2, 1, 2).num_levels == 4 and HeatmapUNet(3, 1, 2).num_levels == 3
    assert HeatmapUNet(2, 1, 2).heatmaps.in_channels == 128 and HeatmapUNet(3, 1, 2).heatmaps.in_channels == 64
    conv2, conv3 = ConvOnlyNet(2, 1, 2), ConvOnlyNet(3, 1, 2)
    assert conv2.features[0].kernel_size == (11, 11) and conv2.features[0].out_channels == 128
    assert conv3.features[0].kernel_size == (5, 5, 5) and conv3.features[0].out_channels == 32
    assert sum(isinstance(m, torch.nn.Conv2d) for m in conv2.modules()) == 7  # 6 + heatmap conv
    down2, down3 = DownsamplingNet(2, 1, 2), DownsamplingNet(3, 1, 2)
    assert down2.features[0].kernel_size == (5, 5) and down3.features[0].kernel_size == (3, 3, 3)
    for net in (conv2, conv3, down2, down3, HeatmapUNet(2, 1, 2)):
        assert net.heatmaps.out_channels == 2 and set(net.heatmaps.kernel_size) == {1}
    scn16 = SpatialConfigurationNet(2, 1, 2, variant="2016")
    assert scn16.local_heatmaps.kernel_size == (5, 5) and scn16.spatial_downsample == (8, 8)
    assert scn16.spatial_heatmaps.conv.kernel_size == (15, 15)
