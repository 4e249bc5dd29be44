"""heatmark: anatomical landmark localization by heatmap regression, built on MONAI.

Landmarks live in world coordinates (millimetres, RAS) from the moment they are read until they
are written; voxel coordinates are derived from an image's final affine right before they are
needed (see :mod:`heatmark.geometry`).

Module map (dependencies point one way):

- base modules, importable from :mod:`heatmark.transforms`: :mod:`heatmark.geometry` (world <->
  voxel), :mod:`heatmark.heatmaps` (the one Gaussian heatmap function), :mod:`heatmark.landmarks`
  (in-memory landmarks and landmark files), :mod:`heatmark.fileio` (atomic writes);
- :mod:`heatmark.transforms`: MONAI transforms (array + dictionary);
- :mod:`heatmark.networks`: torch modules, independent of everything else here;
- the rest of :mod:`heatmark` composes them (engines, CLI, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
