"""SpatialConfiguration-Net (Payer et al. 2016 and 2019).

References:
- C. Payer, D. Stern, H. Bischof, M. Urschler, "Regressing Heatmaps for Multiple Landmark
  Localization Using CNNs", MICCAI 2016 (``variant="2016"``).
- C. Payer, D. Stern, H. Bischof, M. Urschler, "Integrating spatial configuration into heatmap
  regression based CNNs for landmark localization", Medical Image Analysis 54, 2019
  (``variant="2019"``, the default).

Both compute ``heatmaps = local_appearance * spatial_configuration`` (element-wise): the local
component proposes candidates from appearance, the spatial component, computed at a coarse
resolution from all local heatmaps, suppresses candidates that are implausible given where the
other landmarks are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from heatmark.core.axes import per_axis

from .blocks import (
    ActType,
    HeatmapNetwork,
    act_layer,
    avg_pool,
    conv,
    conv_stack,
    crop_to,
    init_heatmap_conv_,
    init_hidden_conv_,
    lcm,
    pad_to_multiple,
    resize,
    resolve_upsample_mode,
)

__all__ = ["SpatialConfigurationNet"]

_LEAKY = ("leakyrelu", {"negative_slope": 0.1})


class _LocalAppearance2019(nn.Module):
    """Local appearance U-Net of the 2019 SCN, ``(B, C, *S) -> (B, F, *S)``.

    ``conv0`` (in -> F), then ``num_levels`` levels of constant width ``F``: down path
    conv - dropout - conv per level with average pooling by 2 between levels; every level's output
    goes through one extra "parallel" conv; up path: linear upsampling of the deeper level, ADDED
    to the parallel conv output of the current level (no convs after the addition). ``S`` must be
    divisible by ``2 ** (num_levels - 1)``.
    """

    def __init__(
        self, d: int, in_channels: int, filters: int, num_levels: int, kernel_size: int,
        dropout: float, act: ActType, padding_mode: str,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels

        def c(cin: int) -> nn.Sequential:
            layer = conv(d, cin, filters, kernel_size, padding_mode)
            init_hidden_conv_(layer, act)
            return nn.Sequential(layer, act_layer(act))

        self.conv0 = c(in_channels)
        self.contracting = nn.ModuleList(
            [nn.Sequential(c(filters), nn.Dropout(dropout), c(filters)) for _ in range(num_levels)]
        )
        self.parallel = nn.ModuleList([c(filters) for _ in range(num_levels)])
        self.pool = avg_pool(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        levels: list[torch.Tensor] = []
        for i, (block, par) in enumerate(zip(self.contracting, self.parallel)):
            x = block(x)
            levels.append(par(x))
            if i < self.num_levels - 1:
                x = self.pool(x)
        node = levels[-1]
        for skip in reversed(levels[:-1]):
            node = skip + resize(node, skip.shape[2:], "linear")
        return node


class _MaskedConv(nn.Module):
    """``N -> N`` conv in which output ``i`` sees every input channel except ``i``.

    This is the 2016 spatial configuration: per landmark ``i``, one large-kernel conv over the
    other landmarks' (downsampled) local heatmaps, all ``N`` of them evaluated as one conv whose
    weight is multiplied by a fixed mask with zeros on the channel diagonal.
    """

    def __init__(self, d: int, channels: int, kernel_size: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = conv(d, channels, channels, kernel_size, padding_mode)
        mask = 1.0 - torch.eye(channels)
        self.register_buffer("mask", mask.reshape(channels, channels, *([1] * d)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, *S) -> (B, N, *S)``."""
        c = self.conv
        # nn.ConvNd._conv_forward applies the module's padding / padding_mode with another weight
        return c._conv_forward(x, c.weight * self.mask.to(c.weight.dtype), c.bias)


class SpatialConfigurationNet(HeatmapNetwork):
    """SpatialConfiguration-Net, ``(B, in_channels, *S) -> (B, num_landmarks, *S)``.

    ``heatmaps = local * spatial`` where

    ``variant="2019"`` (Payer et al., MedIA 2019; default):
        - local appearance: 3x3 conv (in -> F), then a ``num_levels`` (4) level U-Net-like net of
          constant width ``F`` (128 in 2D, 64 in 3D): conv - dropout(0.5) - conv per level in the
          down path, average pooling by 2, each level's output through one extra conv, ADDED to
          the linearly upsampled deeper level; LeakyReLU(0.1); then the linear local heatmap conv
          ``F -> N`` with kernel ``local_heatmap_kernel_size`` = 3 (the choice of the authors'
          reference implementation; the 2019 text only says "N outputs").
        - spatial configuration: average pooling of the local heatmaps by
          ``spatial_downsample`` (16 in 2D, 8 in 3D), ``num_spatial_convs`` (3) convs of kernel
          ``spatial_kernel_size`` (11 in 2D, 7 in 3D) with LeakyReLU(0.1), a conv ``F -> N``
          with the same kernel and tanh, then upsampling back (``spatial_upsample_mode``,
          ``"auto"`` = bicubic in 2D, trilinear in 3D; ``"cubic"`` is also available in 3D).
        - init: He for hidden convs; truncated normal with ``heatmap_init_std`` (1e-4 in 2D,
          1e-3 in 3D) for the two heatmap convs (local, spatial); zero biases.

    ``variant="2016"`` (Payer et al., MICCAI 2016):
        - local appearance: ``num_local_convs`` (3) convs of ``local_kernel_size`` (5 in 2D,
          3 in 3D) with ReLU, then a linear ``F -> N`` conv of the same kernel (as in the
          authors' code).
        - spatial configuration: average pooling by ``spatial_downsample`` (8), one large-kernel
          (15 in 2D, 7 in 3D) conv per landmark over the OTHER landmarks' maps (a masked
          ``N -> N`` conv), no activation, linear upsampling back.
        - init: He for hidden convs, ``heatmap_init_std`` for both heatmap convs.

    Input sizes that are not multiples of the total stride (``size_multiple``: lcm of
    ``2 ** (num_levels - 1)`` and ``spatial_downsample``; 16 in 2D and 8 in 3D for the 2019
    defaults) are padded at the end of each axis with ``input_pad_mode`` and the output is cropped
    back; voxel ``i`` of the output stays voxel ``i`` of the input.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_landmarks: output heatmaps ``N``.
        variant: ``"2019"`` (default) or ``"2016"``.
        filters: width ``F`` of the local and spatial components (128 2D / 64 3D).
        num_levels: (2019) U-Net levels (4).
        local_kernel_size: kernel of the hidden local convs (2019: 3; 2016: 5 2D / 3 3D).
        local_heatmap_kernel_size: kernel of the local heatmap conv (2019: 3; 2016: = local).
        num_local_convs: (2016) hidden local convs (3).
        dropout: (2019) dropout rate in the down path (0.5).
        spatial_downsample: pooling factor of the spatial component (2019: 16 2D / 8 3D; 2016: 8).
        spatial_kernel_size: spatial conv kernel (2019: 11 2D / 7 3D; 2016: 15 2D / 7 3D).
        num_spatial_convs: (2019) hidden spatial convs (3).
        spatial_upsample_mode: ``"auto"``, ``"linear"``, ``"cubic"`` or ``"nearest"``
            (auto: 2019 cubic in 2D / linear in 3D; 2016 linear).
        act: activation (2019: LeakyReLU 0.1; 2016: ReLU).
        heatmap_init_std: std of the two heatmap conv inits (1e-4 2D / 1e-3 3D).
        padding_mode: conv padding mode (``"zeros"``; the 3D reference code uses ``"reflect"``,
            which needs every axis of the coarse spatial grid larger than half its kernel).
        input_pad_mode: ``F.pad`` mode for inputs not divisible by ``size_multiple``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_landmarks: int,
        variant: str = "2019",
        filters: int | None = None,
        num_levels: int = 4,
        local_kernel_size: int | None = None,
        local_heatmap_kernel_size: int | None = None,
        num_local_convs: int = 3,
        dropout: float = 0.5,
        spatial_downsample: int | Sequence[int] | None = None,
        spatial_kernel_size: int | None = None,
        num_spatial_convs: int = 3,
        spatial_upsample_mode: str = "auto",
        act: ActType | None = None,
        heatmap_init_std: float | None = None,
        padding_mode: str = "zeros",
        input_pad_mode: str = "replicate",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_landmarks)
        variant = str(variant)
        if variant not in ("2016", "2019"):
            raise ValueError(f"variant must be '2019' or '2016', got {variant!r}")
        d = self.spatial_dims
        self.variant = variant
        is2019 = variant == "2019"
        filters = filters or (128 if d == 2 else 64)
        if act is None:
            act = _LEAKY if is2019 else "relu"
        std = heatmap_init_std or (1e-4 if d == 2 else 1e-3)
        if local_kernel_size is None:
            local_kernel_size = 3 if is2019 else (5 if d == 2 else 3)
        if local_heatmap_kernel_size is None:
            local_heatmap_kernel_size = 3 if is2019 else local_kernel_size
        if spatial_downsample is None:
            spatial_downsample = (16 if d == 2 else 8) if is2019 else 8
        if spatial_kernel_size is None:
            spatial_kernel_size = (11 if d == 2 else 7) if is2019 else (15 if d == 2 else 7)
        self.spatial_downsample = per_axis(spatial_downsample, d, "spatial_downsample")
        self.spatial_upsample_mode = resolve_upsample_mode(spatial_upsample_mode, d, default_cubic=is2019)
        self.input_pad_mode = input_pad_mode
        self.padding_mode = padding_mode
        self._spatial_half_kernel = max(per_axis(spatial_kernel_size, d, "spatial_kernel_size")) // 2

        # local appearance
        if is2019:
            if num_levels < 1:
                raise ValueError(f"num_levels must be >= 1, got {num_levels}")
            self.local = _LocalAppearance2019(
                d, in_channels, filters, num_levels, local_kernel_size, dropout, act, padding_mode
            )
            local_multiple = 2 ** (num_levels - 1)
        else:
            self.local = conv_stack(d, in_channels, filters, num_local_convs, local_kernel_size, act, padding_mode)
            local_multiple = 1
        self.local_heatmaps = conv(d, filters, num_landmarks, local_heatmap_kernel_size, padding_mode)
        init_heatmap_conv_(self.local_heatmaps, std)

        # spatial configuration
        self.spatial_pool = avg_pool(d, self.spatial_downsample)
        if is2019:
            self.spatial = conv_stack(d, num_landmarks, filters, num_spatial_convs, spatial_kernel_size, act,
                                      padding_mode)
            ch = filters if num_spatial_convs else num_landmarks
            self.spatial_heatmaps: nn.Module = conv(d, ch, num_landmarks, spatial_kernel_size, padding_mode)
            init_heatmap_conv_(self.spatial_heatmaps, std)
            self.spatial_activation: nn.Module = nn.Tanh()
        else:
            self.spatial = nn.Identity()
            masked = _MaskedConv(d, num_landmarks, spatial_kernel_size, padding_mode)
            init_heatmap_conv_(masked.conv, std)
            self.spatial_heatmaps = masked
            self.spatial_activation = nn.Identity()

        self.size_multiple: tuple[int, ...] = tuple(lcm((local_multiple, f)) for f in self.spatial_downsample)

    def forward_components(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, C, *S)`` -> ``(heatmaps, local, spatial)``, each ``(B, N, *S)``."""
        self._check_input(x)
        size = x.shape[2:]
        x = pad_to_multiple(x, self.size_multiple, self.input_pad_mode)
        local = self.local_heatmaps(self.local(x))
        if self.padding_mode == "reflect":
            coarse_size = [s // f for s, f in zip(x.shape[2:], self.spatial_downsample)]
            if min(coarse_size) <= self._spatial_half_kernel:
                raise ValueError(
                    f"padding_mode='reflect' needs the spatial-configuration grid (input size / "
                    f"{self.spatial_downsample} = {coarse_size}) larger than half the spatial kernel "
                    f"({self._spatial_half_kernel}); use a larger input or padding_mode='zeros'"
                )
        coarse = self.spatial_activation(self.spatial_heatmaps(self.spatial(self.spatial_pool(local))))
        spatial = resize(coarse, local.shape[2:], self.spatial_upsample_mode)
        heatmaps = local * spatial
        return crop_to(heatmaps, size), crop_to(local, size), crop_to(spatial, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, N, *S)``: ``local * spatial``."""
        return self.forward_components(x)[0]
