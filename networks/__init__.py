"""Landmark-localization networks (Payer et al. 2016/2019, Huang et al.), all spatial_dims-generic.

Every heatmap network maps ``(B, in_channels, *S)`` to ``(B, num_landmarks, *S)`` (the
Downsampling-Net to ``*floor(S / output_stride)``); the last conv has ``num_landmarks`` outputs
and no activation (the 2019 SCN's spatial tanh is part of its design). The coordinate regression
net maps ``(B, C, *S)`` to ``(B, N, D)`` coordinates normalised to ``0..1`` per array axis.
This package imports only torch, MONAI and :mod:`heatmark.core` (geometry and the one Gaussian
heatmap function, used by the coordinate-regression fusion).
"""

from .blocks import HeatmapNetwork
from .coordreg import (
    CoordinateRegressionNet,
    fuse_heatmaps_with_coordinates,
    normalized_to_voxel,
    voxel_to_normalized,
)
from .registry import NAME_DEFAULTS, NETWORKS, get_network, network_names
from .scn import SpatialConfigurationNet
from .simple import ConvOnlyNet, DownsamplingNet
from .unet import HeatmapUNet

__all__ = [
    "NAME_DEFAULTS",
    "NETWORKS",
    "ConvOnlyNet",
    "CoordinateRegressionNet",
    "DownsamplingNet",
    "HeatmapNetwork",
    "HeatmapUNet",
    "SpatialConfigurationNet",
    "fuse_heatmaps_with_coordinates",
    "get_network",
    "network_names",
    "normalized_to_voxel",
    "voxel_to_normalized",
]
