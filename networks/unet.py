"""U-Net for heatmap regression, the variant of Payer et al. (MICCAI 2016).

Average pooling down, fixed (parameter-free) linear upsampling up, concatenation skips, two 3x3
convs per level, constant width, 1x1 heatmap conv. Reference: C. Payer et al., "Regressing
Heatmaps for Multiple Landmark Localization Using CNNs", MICCAI 2016; O. Ronneberger et al.,
"U-Net", MICCAI 2015.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import (
    ActType,
    HeatmapNetwork,
    act_layer,
    avg_pool,
    conv,
    crop_to,
    init_heatmap_conv_,
    init_hidden_conv_,
    pad_to_multiple,
    resize,
    resolve_upsample_mode,
)

__all__ = ["HeatmapUNet"]


def _double_conv(d: int, cin: int, cout: int, k: int, act: ActType, padding_mode: str) -> nn.Sequential:
    c0, c1 = conv(d, cin, cout, k, padding_mode), conv(d, cout, cout, k, padding_mode)
    init_hidden_conv_(c0, act)
    init_hidden_conv_(c1, act)
    return nn.Sequential(c0, act_layer(act), c1, act_layer(act))


class HeatmapUNet(HeatmapNetwork):
    """U-Net (paper variant) mapping ``(B, in_channels, *S)`` to heatmaps ``(B, num_landmarks, *S)``.

    ``num_levels`` resolution levels (``num_levels - 1`` average poolings by 2). Inputs whose size
    is not a multiple of ``2 ** (num_levels - 1)`` are padded at the end of each axis
    (``input_pad_mode``) and the output is cropped back, so any input size works and voxel ``i`` of
    the output is voxel ``i`` of the input.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_landmarks: output heatmaps ``N``.
        filters: width of every level (default 128 in 2D, 64 in 3D).
        num_levels: resolution levels (default 4 in 2D, 3 in 3D).
        kernel_size: conv kernel (3).
        act: activation (ReLU).
        upsample_mode: ``"linear"`` (bi/trilinear, default), ``"cubic"`` or ``"nearest"``.
        heatmap_init_std: std of the 1x1 heatmap conv init (1e-4 2D / 1e-3 3D).
        padding_mode: conv padding mode (``"zeros"``).
        input_pad_mode: ``F.pad`` mode for inputs not divisible by the total stride.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_landmarks: int,
        filters: int | None = None,
        num_levels: int | None = None,
        kernel_size: int = 3,
        act: ActType = "relu",
        upsample_mode: str = "linear",
        heatmap_init_std: float | None = None,
        padding_mode: str = "zeros",
        input_pad_mode: str = "replicate",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_landmarks)
        d = self.spatial_dims
        filters = filters or (128 if d == 2 else 64)
        num_levels = num_levels or (4 if d == 2 else 3)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        std = heatmap_init_std or (1e-4 if d == 2 else 1e-3)
        self.num_levels = num_levels
        self.upsample_mode = resolve_upsample_mode(upsample_mode, d)
        self.input_pad_mode = input_pad_mode
        self.size_multiple = 2 ** (num_levels - 1)
        self.down = nn.ModuleList(
            [_double_conv(d, in_channels if i == 0 else filters, filters, kernel_size, act, padding_mode)
             for i in range(num_levels)]
        )
        self.pool = avg_pool(d, 2)
        self.up = nn.ModuleList(
            [_double_conv(d, 2 * filters, filters, kernel_size, act, padding_mode) for _ in range(num_levels - 1)]
        )
        self.heatmaps = conv(d, filters, num_landmarks, 1)
        init_heatmap_conv_(self.heatmaps, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, N, *S)``."""
        self._check_input(x)
        size = x.shape[2:]
        x = pad_to_multiple(x, (self.size_multiple,) * self.spatial_dims, self.input_pad_mode)
        skips: list[torch.Tensor] = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.num_levels - 1:
                skips.append(x)
                x = self.pool(x)
        for block in self.up:
            skip = skips.pop()
            x = resize(x, skip.shape[2:], self.upsample_mode)
            x = block(torch.cat([skip, x], dim=1))
        return crop_to(self.heatmaps(x), size)
