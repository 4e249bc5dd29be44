"""The two baseline networks of Payer et al. (MICCAI 2016): Downsampling-Net and ConvOnly-Net.

Reference: C. Payer, D. Stern, H. Bischof, M. Urschler, "Regressing Heatmaps for Multiple Landmark
Localization Using CNNs", MICCAI 2016.
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
    conv_stack,
    init_heatmap_conv_,
    init_hidden_conv_,
)

__all__ = ["ConvOnlyNet", "DownsamplingNet"]


def _default_std(spatial_dims: int) -> float:
    return 1e-4 if spatial_dims == 2 else 1e-3


class DownsamplingNet(HeatmapNetwork):
    """Downsampling-Net: ``num_blocks`` x (convs + average pooling by 2), convs, 1x1 heatmap conv.

    Input ``(B, in_channels, *S)`` -> heatmaps ``(B, num_landmarks, *floor(S / output_stride))``
    with ``output_stride = 2 ** num_blocks`` per axis. Output voxel ``j`` is centred on input voxel
    ``j * output_stride + (output_stride - 1) / 2``
    (:func:`heatmark.core.geometry.output_to_input_voxels`). Trailing input voxels beyond a multiple of the stride are
    dropped by the pooling.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_landmarks: output heatmaps ``N``.
        filters: conv width (default 128 in 2D, 64 in 3D).
        kernel_size: conv kernel (default 5 in 2D, 3 in 3D).
        num_blocks: pooling blocks (default 2 in 2D, 1 in 3D).
        convs_per_block: convs before each pooling (2).
        num_final_convs: convs after the last pooling (2).
        act: activation (ReLU).
        heatmap_init_std: std of the heatmap conv init (1e-4 2D / 1e-3 3D).
        padding_mode: conv padding mode (``"zeros"``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_landmarks: int,
        filters: int | None = None,
        kernel_size: int | None = None,
        num_blocks: int | None = None,
        convs_per_block: int = 2,
        num_final_convs: int = 2,
        act: ActType = "relu",
        heatmap_init_std: float | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_landmarks)
        d = self.spatial_dims
        filters = filters or (128 if d == 2 else 64)
        kernel_size = kernel_size or (5 if d == 2 else 3)
        num_blocks = (2 if d == 2 else 1) if num_blocks is None else num_blocks
        std = heatmap_init_std or _default_std(d)
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(num_blocks):
            for _ in range(convs_per_block):
                layers += [conv(d, ch, filters, kernel_size, padding_mode), act_layer(act)]
                ch = filters
            layers.append(avg_pool(d, 2))
        for _ in range(num_final_convs):
            layers += [conv(d, ch, filters, kernel_size, padding_mode), act_layer(act)]
            ch = filters
        self.features = nn.Sequential(*layers)
        self.heatmaps = conv(d, ch, num_landmarks, 1)
        for m in self.features.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                init_hidden_conv_(m, act)
        init_heatmap_conv_(self.heatmaps, std)
        stride = 2**num_blocks
        self.output_stride = (stride,) * d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, N, *floor(S / output_stride))``."""
        self._check_input(x)
        return self.heatmaps(self.features(x))


class ConvOnlyNet(HeatmapNetwork):
    """ConvOnly-Net: ``num_convs`` large-kernel convs at full resolution, 1x1 heatmap conv.

    Input ``(B, in_channels, *S)`` -> heatmaps ``(B, num_landmarks, *S)``; any input size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_landmarks: output heatmaps ``N``.
        filters: conv width (default 128 in 2D, 32 in 3D).
        kernel_size: conv kernel (default 11 in 2D, 5 in 3D).
        num_convs: hidden convs (6).
        act: activation (ReLU).
        heatmap_init_std: std of the heatmap conv init (1e-4 2D / 1e-3 3D).
        padding_mode: conv padding mode (``"zeros"``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_landmarks: int,
        filters: int | None = None,
        kernel_size: int | None = None,
        num_convs: int = 6,
        act: ActType = "relu",
        heatmap_init_std: float | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_landmarks)
        d = self.spatial_dims
        filters = filters or (128 if d == 2 else 32)
        kernel_size = kernel_size or (11 if d == 2 else 5)
        std = heatmap_init_std or _default_std(d)
        self.features = conv_stack(d, in_channels, filters, num_convs, kernel_size, act, padding_mode)
        self.heatmaps = conv(d, filters if num_convs else in_channels, num_landmarks, 1)
        init_heatmap_conv_(self.heatmaps, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, N, *S)``."""
        self._check_input(x)
        return self.heatmaps(self.features(x))
