"""Coordinate regression (CNN encoder + fully connected head) and its fusion with heatmaps.

Reference: the coordinate-regression head of Huang et al. as summarised in the project design
(DESIGN.md section 5): a CNN with a fully connected head regresses every landmark directly; being a
global estimate, the regressed point is used to suppress far-away false maxima of a heatmap network
(a Gaussian around it is multiplied into the heatmap before decoding).

Coordinate convention: normalised coordinates are ``0..1`` along each ARRAY axis of the input,
``voxel = normalised * (size - 1)`` (voxel centres; 0 is the first voxel, 1 the last).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Pool
from torch import nn

from heatmark.core.heatmaps import gaussian_heatmaps

from .blocks import ActType, HeatmapNetwork, act_layer, avg_pool, conv, init_hidden_conv_

__all__ = [
    "CoordinateRegressionNet",
    "fuse_heatmaps_with_coordinates",
    "normalized_to_voxel",
    "voxel_to_normalized",
]


def _size_tensor(spatial_size: Sequence[int] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    size = torch.as_tensor(spatial_size, dtype=like.dtype, device=like.device)
    return size - 1


def normalized_to_voxel(coords: torch.Tensor, spatial_size: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``(..., D)`` coordinates in ``0..1`` per array axis -> voxel coordinates ``norm * (size - 1)``."""
    return coords * _size_tensor(spatial_size, coords)


def voxel_to_normalized(coords: torch.Tensor, spatial_size: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``(..., D)`` voxel coordinates -> ``voxel / (size - 1)`` (inverse of :func:`normalized_to_voxel`)."""
    return coords / _size_tensor(spatial_size, coords).clamp_min(1)


class CoordinateRegressionNet(HeatmapNetwork):
    """CNN encoder + fully connected head: ``(B, C, *S) -> (B, N, D)`` normalised coordinates.

    Encoder: per level two convs (``kernel_size``, activation) then average pooling by 2; widths
    ``filters * 2 ** level``. Then adaptive average pooling to ``pooled_size`` per axis (so any
    input size works), flatten, ``Linear -> act -> Dropout -> Linear(N * D)`` and, by default, a
    sigmoid so that outputs lie in ``0..1`` (see the module docstring for the convention; convert
    with :func:`normalized_to_voxel`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_landmarks: landmarks ``N``.
        filters: width of the first level (32 in 2D, 16 in 3D), doubled per level.
        num_levels: encoder levels (4 in 2D, 3 in 3D).
        kernel_size: conv kernel (3).
        pooled_size: adaptive pooling output size per axis (4 in 2D, 2 in 3D).
        hidden_features: width of the hidden fully connected layer (256).
        dropout: dropout before the output layer (0.5).
        act: activation (ReLU).
        output_activation: ``"sigmoid"`` (default) or ``None`` (raw linear output).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_landmarks: int,
        filters: int | None = None,
        num_levels: int | None = None,
        kernel_size: int = 3,
        pooled_size: int | None = None,
        hidden_features: int = 256,
        dropout: float = 0.5,
        act: ActType = "relu",
        output_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_landmarks)
        d = self.spatial_dims
        filters = filters or (32 if d == 2 else 16)
        num_levels = num_levels or (4 if d == 2 else 3)
        pooled_size = pooled_size or (4 if d == 2 else 2)
        if output_activation not in ("sigmoid", None):
            raise ValueError(f"output_activation must be 'sigmoid' or None, got {output_activation!r}")
        layers: list[nn.Module] = []
        ch = in_channels
        for level in range(num_levels):
            width = filters * 2**level
            for _ in range(2):
                c = conv(d, ch, width, kernel_size)
                init_hidden_conv_(c, act)
                layers += [c, act_layer(act)]
                ch = width
            if level < num_levels - 1:
                layers.append(avg_pool(d, 2))
        layers.append(Pool[Pool.ADAPTIVEAVG, d](pooled_size))
        self.encoder = nn.Sequential(*layers)
        fc1 = nn.Linear(ch * pooled_size**d, hidden_features)
        init_hidden_conv_(fc1, act)
        out = nn.Linear(hidden_features, num_landmarks * d)
        nn.init.normal_(out.weight, std=1e-3)
        nn.init.zeros_(out.bias)  # sigmoid(0) = 0.5: every landmark starts at the image centre
        self.head = nn.Sequential(nn.Flatten(1), fc1, act_layer(act), nn.Dropout(dropout), out)
        self.output_activation = nn.Sigmoid() if output_activation == "sigmoid" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, N, D)`` coordinates normalised to ``0..1`` per array axis."""
        self._check_input(x)
        out = self.head(self.encoder(x))
        return self.output_activation(out).reshape(x.shape[0], self.num_landmarks, self.spatial_dims)


def fuse_heatmaps_with_coordinates(
    heatmaps: torch.Tensor,
    coords_voxel: torch.Tensor,
    sigma_voxels: float | Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Multiply each heatmap by a Gaussian (peak 1) around the regressed point of its landmark.

    ``heatmaps * prod_d exp(-(x_d - c_d)^2 / (2 sigma_d^2))``, rendered by
    :func:`heatmark.core.heatmaps.gaussian_heatmaps` (separable, exact at sub-voxel positions, O(N * voxels)). A maximum far from the
    regressed point is damped, one close to it is kept; the result is then decoded as usual.

    Args:
        heatmaps: ``(B, N, *S)``.
        coords_voxel: ``(B, N, D)`` regressed points in voxel coordinates of the heatmap grid
            (convert normalised outputs with :func:`normalized_to_voxel`). A landmark with any NaN
            coordinate is left unchanged (weight 1).
        sigma_voxels: Gaussian width in voxels; a float, or a tensor broadcastable to
            ``(B, N, D)`` (per landmark and/or per axis). Must be > 0.

    Returns:
        ``(B, N, *S)`` fused heatmaps, dtype of ``heatmaps``.
    """
    if heatmaps.dim() < 3:
        raise ValueError(f"heatmaps must be (B, N, *S), got shape {tuple(heatmaps.shape)}")
    b, n = heatmaps.shape[:2]
    spatial = heatmaps.shape[2:]
    d = len(spatial)
    if coords_voxel.shape != (b, n, d):
        raise ValueError(
            f"coords_voxel must be (B, N, D) = {(b, n, d)} for heatmaps {tuple(heatmaps.shape)}, "
            f"got {tuple(coords_voxel.shape)}"
        )
    dtype = torch.promote_types(heatmaps.dtype, torch.float32)
    coords = coords_voxel.to(device=heatmaps.device, dtype=dtype)
    sigma = torch.as_tensor(sigma_voxels, device=heatmaps.device, dtype=dtype)
    if bool((sigma <= 0).any()):
        raise ValueError("sigma_voxels must be > 0")
    # peak-1 Gaussians from the one heatmap function; a missing landmark (zero channel there) keeps weight 1
    weight = gaussian_heatmaps(coords, spatial, torch.broadcast_to(sigma, (b, n, d)), dtype=dtype)
    missing = torch.isnan(coords).any(dim=-1).reshape([b, n] + [1] * d)
    weight = torch.where(missing, torch.ones_like(weight), weight)
    return (heatmaps.to(dtype) * weight).to(heatmaps.dtype)
