"""MONAI transforms for landmark localization: array transforms and dictionary wrappers.

Landmarks travel through the data dictionary as float64 ``(N, D)`` world coordinates (mm, RAS);
MONAI's spatial transforms (Spacingd, Orientationd, RandAffined, Resized, crops, pads, Flipd) act
on the image and record themselves in its affine, and :class:`WorldToVoxeld` derives voxel
positions from the final affine. The transforms here cover what MONAI cannot: loading images with
physical spacing, landmark files, elastic deformation with landmarks, flips that swap left/right
pairs, exact Gaussian heatmaps, and robust intensity normalisation.
"""

from heatmark.transforms.augment import MemoizeTransformd, SeededRandomd
from heatmark.transforms.cascade import RandFinePatchd, ResamplePatch, ResamplePatchd, patch_affine
from heatmark.transforms.heatmap import GaussianHeatmap, GaussianHeatmapd
from heatmark.transforms.intensity import RobustNormalize, RobustNormalized
from heatmark.transforms.io import ImageLoadError, LoadLandmarkImage, LoadLandmarkImaged
from heatmark.transforms.patches import RandLandmarkPatch, RandLandmarkPatchd, patch_voxels, without_fixed_size
from heatmark.transforms.points import (
    LoadLandmarks,
    LoadLandmarksd,
    WorldToVoxel,
    WorldToVoxeld,
    as_landmark_tensor,
)
from heatmark.transforms.spatial import RandLandmarkElastic, RandLandmarkElasticd, RandLandmarkFlipd, SwapLandmarkPairs

__all__ = [
    "RandFinePatchd",
    "ResamplePatch",
    "ResamplePatchd",
    "patch_affine",
    "GaussianHeatmap",
    "GaussianHeatmapd",
    "ImageLoadError",
    "LoadLandmarkImage",
    "LoadLandmarkImaged",
    "LoadLandmarks",
    "LoadLandmarksd",
    "MemoizeTransformd",
    "RandLandmarkElastic",
    "RandLandmarkElasticd",
    "RandLandmarkFlipd",
    "RandLandmarkPatch",
    "RandLandmarkPatchd",
    "RobustNormalize",
    "RobustNormalized",
    "SeededRandomd",
    "SwapLandmarkPairs",
    "WorldToVoxel",
    "WorldToVoxeld",
    "as_landmark_tensor",
    "patch_voxels",
    "without_fixed_size",
]
