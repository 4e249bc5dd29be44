"""heatmark: anatomical landmark localization by heatmap regression, built on MONAI.

Landmarks live in world coordinates (millimetres, RAS) from the moment they are read until they
are written; voxel coordinates are derived from an image's final affine right before they are
needed (see :mod:`heatmark.core.geometry`).

Layers, each importing only the ones above it (``tests/test_architecture.py`` checks this):

1. :mod:`heatmark.core` — geometry, the Gaussian heatmap function, atomic files;
2. :mod:`heatmark.landmarks` — in-memory landmarks and the landmark-file format registry;
3. :mod:`heatmark.transforms` (MONAI transforms, image-reader registry) and
   :mod:`heatmark.networks` (torch modules; they use only :mod:`heatmark.core`);
4. :mod:`heatmark.data` — datalists and data checks, dataset downloads;
5. :mod:`heatmark.training` — engines, loss, checkpoints, handlers, MLflow;
6. :mod:`heatmark.evaluation` — decoding, metrics, evaluator plug-ins, reports;
7. :mod:`heatmark.bundle` — the shared base bundle configs and running a bundle;
8. :mod:`heatmark.predict` — inputs, model, inference, export, resumable store;
9. :mod:`heatmark.cli`, :mod:`heatmark.demo` — the command line.

ARCHITECTURE.md at the repository root follows one landmark from file to ``landmarks.csv``.
"""

import importlib

from heatmark import _compat

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "LandmarkModel", "Prediction"]

_compat.install()

_API = ("load_model", "LandmarkModel", "Prediction")


def __getattr__(name: str):
    """``heatmark.load_model`` & co. (:mod:`heatmark.predict.api`), imported on first use."""
    if name in _API:
        # importing heatmark.predict.api here, not above: `import heatmark` must not import torch
        return getattr(importlib.import_module("heatmark.predict.api"), name)
    raise AttributeError(f"module 'heatmark' has no attribute {name!r}")
