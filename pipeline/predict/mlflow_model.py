"""A trained bundle as an MLflow model: a ``pyfunc`` that takes image paths and gives landmarks in
world mm (RAS), so ``mlflow models predict`` and ``mlflow.pyfunc.load_model`` use it.

What the MLflow model folder holds (:func:`save_mlflow_model`)::

    MLmodel                  flavor python_function, the signature, model_config, metadata
    heatmark_pyfunc.py       three lines naming :class:`LandmarkPyfunc` (MLflow's "models from
                             code": nothing pickled; heatmark must be installed where it loads)
    artifacts/model.pt       the self-describing model file (heatmark.training.model_file)
    artifacts/configs/       the bundle's configs folder (train.yaml, metadata.json ...): the
                             intensity preprocessing and the prediction settings

Loading rebuilds the network from the model file exactly as ``heatmark predict`` and
:func:`heatmark.load_model` do (the same code), so the three give the same landmarks.

Signature. Input: a DataFrame with a string column ``image``, one image path per row (any format
``heatmark predict`` reads; relative paths are relative to the predicting process's folder).
Output: one row per (image, landmark), the columns of ``landmarks.csv``
(:func:`heatmark.landmarks.landmark_table_text`, long layout): ``case`` (the image's case name, as
``heatmark predict`` names it), ``landmark`` (1..N), ``name``, ``frame`` (``RAS``), ``x_mm``,
``y_mm`` [``z_mm``] (world mm), ``confidence`` (heatmap peak); a landmark not found has empty
coordinates. An image that cannot be read or is refused fails the whole call with a message naming
it (``heatmark predict`` is the tool that skips bad files and lists them).

``model_config`` (change it at load time with ``mlflow.pyfunc.load_model(uri, model_config=...)``):
``device`` (``auto``: CUDA when available) and ``batch_size`` (images per forward pass).

In training, :class:`MLflowModelLogger` is the ``model_logger`` of
:class:`heatmark.training.MLflowExtrasHandler` (``base.yaml``): when training completes, the best
model (``models/model.pt``) is logged as ``<run>/model``, ready for
``mlflow models predict -m runs:/<run id>/model -i input.csv -t csv --env-manager local``.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import monai
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from heatmark import __version__
from heatmark.bundle import check_bundle
from heatmark.landmarks import landmark_table_text
from heatmark.predict.api import LandmarkModel, load_model
from heatmark.predict.inputs import assign_case_names
from heatmark.training.model_file import read_model_file

__all__ = ["INPUT_COLUMN", "ARTIFACT_MODEL", "ARTIFACT_CONFIGS", "output_columns", "model_signature",
           "predictions_frame", "LandmarkPyfunc", "save_mlflow_model", "log_mlflow_model", "MLflowModelLogger"]

logger = logging.getLogger(__name__)

#: the input column: one image path per row
INPUT_COLUMN = "image"
#: artifact names of the MLflow model: the model file and the bundle's configs folder
ARTIFACT_MODEL = "model_file"
ARTIFACT_CONFIGS = "configs"
#: MLflow types of the output columns that are not coordinates / confidence (those are "double")
_COLUMN_TYPES = {"case": "string", "landmark": "long", "name": "string", "frame": "string"}
#: the model code file of the MLflow model (MLflow's "models from code")
_CODE_FILE = "heatmark_pyfunc.py"
_CODE = '''"""The MLflow pyfunc of a heatmark model: heatmark.predict.mlflow_model.LandmarkPyfunc."""
from mlflow.models import set_model

from heatmark.predict.mlflow_model import LandmarkPyfunc

set_model(LandmarkPyfunc())
'''


def output_columns(spatial_dims: int, names: Sequence[str]) -> list[str]:
    """The output columns, the header ``landmarks.csv`` has for these landmarks (confidence included)."""
    text = landmark_table_text({}, confidence={}, names=list(names), spatial_dims=spatial_dims)
    return list(pd.read_csv(io.StringIO(text)).columns)


def model_signature(spatial_dims: int, names: Sequence[str]) -> ModelSignature:
    """Input: string column ``image``; output: the :func:`output_columns` (strings, ``landmark``
    long, coordinates in mm and confidence double)."""
    outputs = [ColSpec(_COLUMN_TYPES[c], c) if c in _COLUMN_TYPES else ColSpec("double", c, required=False)
               for c in output_columns(spatial_dims, names)]  # a landmark not found: empty coordinates
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=Schema(outputs))


def _image_paths(model_input: Any) -> list[str]:
    """The image paths of a pyfunc input: a DataFrame (column ``image``), a Series, a list, or a dict."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {INPUT_COLUMN!r} of image paths, it has "
                             f"{list(map(str, model_input.columns))}")
        values = model_input[INPUT_COLUMN]
    elif isinstance(model_input, dict):
        values = model_input.get(INPUT_COLUMN, [])
        values = [values] if isinstance(values, (str, os.PathLike)) else values
    elif isinstance(model_input, (str, os.PathLike)):
        values = [model_input]
    else:
        values = model_input
    paths = []
    for i, v in enumerate(list(values)):
        if not isinstance(v, (str, os.PathLike)) or not os.fspath(v).strip():
            raise ValueError(f"input row {i}: expected an image path, got {v!r}")
        paths.append(os.fspath(v))
    return paths


def predictions_frame(model: LandmarkModel, paths: Sequence[str | os.PathLike], batch_size: int = 1) -> pd.DataFrame:
    """The landmarks of ``paths`` as the rows of ``landmarks.csv`` (see the module documentation).

    Raises:
        ValueError: an image could not be read or was refused (naming it).
    """
    paths = [os.fspath(p) for p in paths]
    results = model.predict_many(paths, batch_size=batch_size) if paths else []
    cases = assign_case_names([Path(p) for p in paths])
    table = {case: r.to_landmarks() for case, r in zip(cases, results)}
    confidence = {case: r.confidence for case, r in zip(cases, results)}
    text = landmark_table_text(table, confidence=confidence, names=model.names, spatial_dims=model.spatial_dims)
    strings = {c: str for c, t in _COLUMN_TYPES.items() if t == "string"}
    frame = pd.read_csv(io.StringIO(text), dtype=strings, keep_default_na=False, na_values={
        c: [""] for c in output_columns(model.spatial_dims, model.names) if c not in strings})
    return frame.astype({c: "float64" for c in frame.columns if c not in _COLUMN_TYPES})


class LandmarkPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc of a heatmark model: :meth:`predict` maps image paths to landmark rows (see the
    module documentation). Holds nothing until :meth:`load_context`, which loads the model file
    with the bundle configs through :func:`heatmark.load_model`."""

    def __init__(self) -> None:
        self.model: LandmarkModel | None = None
        self.batch_size = 1

    def load_context(self, context: Any) -> None:
        config = dict(getattr(context, "model_config", None) or {})
        configs = Path(context.artifacts[ARTIFACT_CONFIGS])
        self.batch_size = int(config.get("batch_size", 1))
        self.model = load_model(context.artifacts[ARTIFACT_MODEL], bundle=configs.parent,
                                device=str(config.get("device", "auto")))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """``model_input``: a DataFrame with the column ``image`` (also accepted: a list, Series or
        ``{"image": [...]}``); returns the landmark rows, see the module documentation."""
        if self.model is None:
            self.load_context(context)
        return predictions_frame(self.model, _image_paths(model_input), self.batch_size)


def _description(model_file: Path) -> dict:
    try:
        _, description = read_model_file(model_file)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds; say which file
        raise ValueError(f"cannot read the model file {model_file}: {type(e).__name__}: {e}") from None
    if not description or not description.get("landmark_names") or not description.get("spatial_dims"):
        raise ValueError(f"{model_file} is not a self-describing heatmark model file (no landmark names / "
                         "spatial_dims); train again with this heatmark to log it as an MLflow model")
    return description


def save_mlflow_model(path: str | os.PathLike, bundle: str | os.PathLike, model_file: str | os.PathLike | None = None,
                      device: str = "auto", batch_size: int = 1) -> Path:
    """Write the MLflow model of a bundle's model file into the new folder ``path``.

    Args:
        path: the MLflow model folder (must not exist).
        bundle: the bundle folder (its ``configs/`` go into the model).
        model_file: the self-describing model file (default ``<bundle>/models/model.pt``).
        device, batch_size: the default ``model_config``.

    Raises:
        ValueError: the model file is missing, unreadable or not self-describing.
        heatmark.bundle.BundleError: ``bundle`` is not a bundle folder.
    """
    root = check_bundle(bundle)
    model_file = Path(model_file) if model_file is not None else root / "models" / "model.pt"
    if not model_file.is_file():
        raise ValueError(f"model file not found: {model_file}")
    description = _description(model_file)
    with tempfile.TemporaryDirectory(prefix="heatmark_pyfunc_") as tmp:
        code = Path(tmp) / _CODE_FILE
        code.write_text(_CODE)
        _save(path, code, model_file, root, description, device, batch_size)
    return Path(path)


def _save(path: str | os.PathLike, code: Path, model_file: Path, root: Path, description: dict, device: str,
          batch_size: int) -> None:
    names, dims = description["landmark_names"], int(description["spatial_dims"])
    requirements = [f"heatmark=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"monai=={monai.__version__}", f"mlflow=={mlflow.__version__}"]
    mlflow.pyfunc.save_model(
        os.fspath(path), python_model=str(code),
        artifacts={ARTIFACT_MODEL: str(model_file), ARTIFACT_CONFIGS: str(root / "configs")},
        signature=model_signature(dims, names), pip_requirements=requirements,
        model_config={"device": device, "batch_size": int(batch_size)},
        metadata={"heatmark_model": {"landmark_names": list(names), "spatial_dims": dims, "frame": "RAS",
                                     "units": "mm", "bundle": description.get("bundle"),
                                     "input_column": INPUT_COLUMN}})


def log_mlflow_model(client: Any, run_id: str, bundle: str | os.PathLike, model_file: str | os.PathLike | None = None,
                     artifact_path: str = "model", device: str = "auto", batch_size: int = 1) -> str:
    """Log the MLflow model of a bundle (:func:`save_mlflow_model`) into the run ``run_id`` under
    ``artifact_path`` through ``client`` (an ``MlflowClient``: no global MLflow state is touched);
    returns its URI ``runs:/<run id>/<artifact_path>``."""
    with tempfile.TemporaryDirectory(prefix="heatmark_mlflow_") as tmp:
        folder = save_mlflow_model(Path(tmp) / "model", bundle, model_file, device=device, batch_size=batch_size)
        client.log_artifacts(run_id, str(folder), artifact_path)
    client.set_tag(run_id, "heatmark.mlflow_model", f"runs:/{run_id}/{artifact_path}")
    return f"runs:/{run_id}/{artifact_path}"


class MLflowModelLogger:
    """``model_logger`` of :class:`heatmark.training.MLflowExtrasHandler`: called with the MLflow
    client and run id when training completes, logs the best model file as the run's MLflow model
    (:func:`log_mlflow_model`). A missing model file (no validation ran) is skipped with a warning.

    Args:
        bundle_root: the bundle folder.
        model_file: the best model (``base.yaml``: ``@ckpt_path``, i.e. ``models/model.pt``).
        artifact_path: folder of the MLflow model in the run's artifacts.
    """

    def __init__(self, bundle_root: str | os.PathLike, model_file: str | os.PathLike | None = None,
                 artifact_path: str = "model") -> None:
        self.bundle_root = Path(bundle_root)
        self.model_file = Path(model_file) if model_file is not None else self.bundle_root / "models" / "model.pt"
        self.artifact_path = artifact_path

    def __call__(self, client: Any, run_id: str) -> str | None:
        if not self.model_file.is_file():
            logger.warning("no model file at %s: no MLflow model logged", self.model_file)
            return None
        uri = log_mlflow_model(client, run_id, self.bundle_root, self.model_file, self.artifact_path)
        logger.info("MLflow model logged: %s", uri)
        return uri
