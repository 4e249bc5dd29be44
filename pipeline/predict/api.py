"""The Python API of prediction: :func:`load_model` -> :class:`LandmarkModel`, whose
:meth:`~LandmarkModel.predict` gives a :class:`Prediction` (landmarks in world mm, RAS).

It loads a bundle with the same code as ``heatmark predict`` (:func:`heatmark.predict.load_bundle`:
the model file's description decides the network and its input grid) and runs the same steps per
case: the bundle's preprocessing with the plausibility checks, the inferer, the decoding, the fine
stage of a cascade when the bundle has one (:mod:`heatmark.predict.cascade`), and landmarks
predicted outside the image set missing (listed in :attr:`Prediction.warnings`)::

    import heatmark
    model = heatmark.load_model("bundles/isbi2015_cephalometric")
    result = model.predict("case.nii.gz")
    print(result.frame, dict(zip(result.names, result.coords.tolist())))
    results = model.predict_many(["a.nii.gz", "b.nii.gz"], batch_size=2)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from heatmark.landmarks import Landmarks
from heatmark.predict.cascade import refine_result
from heatmark.predict.checks import refuse_outside
from heatmark.predict.dataset import CaseDataset, collate
from heatmark.predict.model import LoadedBundle, load_bundle
from heatmark.predict.options import PredictOptions
from heatmark.predict.runner import infer_group
from heatmark.transforms import LoadLandmarkImaged

__all__ = ["Prediction", "LandmarkModel", "load_model"]


@dataclass
class Prediction:
    """The landmarks of one image.

    Attributes:
        coords: ``(N, D)`` world coordinates in mm, in :attr:`frame` (RAS); a NaN row is a landmark
            not found (or predicted outside the image).
        names: the ``N`` landmark names.
        confidence: ``(N,)`` heatmap peak values.
        frame: ``"RAS"``.
        warnings: one line per landmark set missing because it was predicted outside the image.
    """

    coords: np.ndarray
    names: list[str]
    confidence: np.ndarray
    frame: str = "RAS"
    warnings: list[str] = field(default_factory=list)

    def to_landmarks(self) -> Landmarks:
        """The coordinates as :class:`heatmark.landmarks.Landmarks` (RAS mm)."""
        return Landmarks(self.coords, list(self.names))


class LandmarkModel:
    """A trained bundle ready to predict (see :func:`load_model`); ``bundle`` is the
    :class:`~heatmark.predict.LoadedBundle` that ``heatmark predict`` uses."""

    def __init__(self, bundle: LoadedBundle):
        self.bundle = bundle

    @property
    def names(self) -> list[str]:
        return list(self.bundle.names)

    @property
    def spatial_dims(self) -> int:
        return self.bundle.spatial_dims

    def _after_loader(self) -> Compose:
        pre = self.bundle.preprocessing
        transforms = list(getattr(pre, "transforms", ()))
        at = next((i for i, t in enumerate(transforms) if isinstance(t, LoadLandmarkImaged)), None)
        if at is None:
            raise ValueError("this bundle's preprocessing has no image loader to skip; pass a file path")
        return Compose(transforms[at + 1:])

    def _as_image(self, image: Any, affine: Any) -> MetaTensor:
        """An in-memory image as the loader would give it: channel-first float32 with a world affine."""
        if affine is None:
            affine = getattr(image, "affine", None)
        if affine is None:
            raise ValueError("an in-memory image needs an affine (voxel -> RAS mm): a MetaTensor, or affine=")
        data = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else np.asarray(image),
                               dtype=torch.float32)
        d = self.spatial_dims
        if data.ndim == d:
            data = data[None]
        if data.ndim != d + 1:
            raise ValueError(f"expected an image of {d} spatial axes (optionally channel first), got shape "
                             f"{tuple(data.shape)}")
        affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        if affine.shape == (4, 4) and d == 2:  # the in-plane part of a 3D affine
            keep = [0, 1, 3]
            affine = affine[keep][:, keep]
        if affine.shape != (d + 1, d + 1):
            raise ValueError(f"expected a ({d + 1}, {d + 1}) affine, got {tuple(affine.shape)}")
        return MetaTensor(data, affine=affine)

    def predict(self, image: str | os.PathLike | Any, affine: Any = None) -> Prediction:
        """The landmarks of one image: a file path (any format ``heatmark predict`` reads), a
        MONAI ``MetaTensor`` (its affine), or an array with ``affine`` (voxel -> RAS mm).

        Raises:
            ValueError: the image could not be read or was refused, or no landmark was located.
        """
        return self.predict_many([image], affines=None if affine is None else [affine])[0]

    def predict_many(self, images: Sequence[Any], batch_size: int = 1,
                     affines: Sequence[Any] | None = None) -> list[Prediction]:
        """:meth:`predict` on each of ``images``, ``batch_size`` per forward pass."""
        images = list(images)
        affines = list(affines) if affines is not None else [None] * len(images)
        records = []
        for i, (image, affine) in enumerate(zip(images, affines)):
            if isinstance(image, (str, os.PathLike)):
                source = str(Path(os.path.expanduser(os.fspath(image))))
                records.append(CaseDataset([(str(i), source)], self.bundle.preprocessing, self.spatial_dims,
                                           self.bundle.image_key)[0])
            else:
                records.append(CaseDataset([(str(i), self._as_image(image, affine))], self._after_loader(),
                                           self.spatial_dims, self.bundle.image_key)[0])
        results: list[Prediction | None] = [None] * len(images)
        for start in range(0, len(records), batch_size):
            batch = collate(records[start:start + batch_size])
            for rec in batch["errors"]:
                raise ValueError(f"cannot predict {_name(images[int(rec['case'])])}: {rec['error']}")
            for group in batch["groups"]:
                out = infer_group(self.bundle, group, batch_size)
                for case, source, result, geometry in zip(group["cases"], group["paths"], out, group["geometries"]):
                    if isinstance(result, str):
                        raise ValueError(f"cannot predict {_name(images[int(case)])}: {result}")
                    problem = refine_result(self.bundle, source, result)  # a cascade's fine stage (else nothing)
                    if problem is not None:
                        raise ValueError(f"cannot predict {_name(images[int(case)])}: {problem}")
                    world, outside = refuse_outside(result["world"], geometry, self.bundle.names,
                                                    self.bundle.checks.max_outside_mm)
                    warnings = [*result["warnings"], *outside]
                    results[int(case)] = Prediction(coords=np.asarray(world, dtype=np.float64),
                                                    names=list(self.bundle.names),
                                                    confidence=np.asarray(result["confidence"], dtype=np.float64),
                                                    warnings=list(warnings))
        return results  # type: ignore[return-value]


def _name(image: Any) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"the {type(image).__name__} image"


def load_model(path: str | os.PathLike, bundle: str | os.PathLike | None = None, configs: Sequence[str] = (),
               device: str = "auto", amp: bool | None = None) -> LandmarkModel:
    """A trained model ready to predict.

    Args:
        path: a bundle folder (its ``models/model.pt``), or a model file; with a model file the
            bundle is ``bundle``, else the folder above the file's ``models/`` folder.
        bundle: the bundle folder for a model file elsewhere.
        configs: overlays, as ``heatmark predict --config`` (a self-describing model file needs none).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda:1`` ...
        amp: mixed precision (None: the bundle's ``amp`` on CUDA, float32 on CPU).

    Raises:
        heatmark.predict.PredictUsageError: as ``heatmark predict`` (no bundle, no model, ...).
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    model = None
    if bundle is None and p.is_file():
        bundle, model = p.parent.parent, p
    elif bundle is None:
        bundle = p
    else:
        model = p
    opts = PredictOptions(bundle=bundle, input="", output="", model=model, configs=tuple(configs), device=device,
                          amp=amp)
    return LandmarkModel(load_bundle(opts))
