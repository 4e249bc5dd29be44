"""Where the network of a prediction runs: ``torch`` (the model file's network, eager) or
``onnxruntime`` (the ``models/model.onnx`` that ``heatmark export`` wrote beside it, on CPU).

Only the network call differs between backends: the preprocessing, the inferer, the decoding and
the outputs are the bundle's, unchanged. :class:`OnnxRuntimeNetwork` is a callable that takes the
place of :attr:`heatmark.predict.LoadedBundle.network`: ``(B, C, *S)`` float tensor in, ``(B, N,
*S')`` heatmaps out, as the eager network.

An exported file is self-describing: the model file's description (landmark names, grid, network,
...), the SHA-256 of the model file it was exported from, and its tensor names, as JSON under
:data:`METADATA_KEY` (ONNX ``metadata_props``; a TorchScript extra file of that name).
:func:`load_onnx_network` refuses a file exported from another model file (stale).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from heatmark.predict.errors import PredictUsageError

__all__ = [
    "BACKENDS",
    "EXPORT_SUFFIXES",
    "INPUT_NAME",
    "METADATA_KEY",
    "OUTPUT_NAME",
    "OnnxRuntimeNetwork",
    "exported_path",
    "load_onnx_network",
    "read_onnx_metadata",
]

#: ``heatmark predict --backend`` choices
BACKENDS = ("torch", "onnxruntime")
#: export format -> file suffix, written beside the model file (``models/model.pt`` -> ``models/model.onnx``)
EXPORT_SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx"}
#: the key (ONNX metadata) or extra file name (TorchScript) of the JSON metadata of an exported file
METADATA_KEY = "heatmark.json"
INPUT_NAME, OUTPUT_NAME = "image", "heatmaps"
_INSTALL_HINT = "pip install 'heatmark[export]' (or: pip install onnxruntime)"


def exported_path(model: str | os.PathLike, fmt: str) -> Path:
    """The exported file of ``fmt`` (``torchscript`` or ``onnx``) beside the model file ``model``."""
    if fmt not in EXPORT_SUFFIXES:
        raise ValueError(f"unknown export format {fmt!r}; choose among {', '.join(EXPORT_SUFFIXES)}")
    return Path(model).with_suffix(EXPORT_SUFFIXES[fmt])


def _onnxruntime() -> Any:
    try:
        import onnxruntime  # lazy: optional dependency (the `export` extra), only for --backend onnxruntime
    except ImportError:
        raise PredictUsageError(f"--backend onnxruntime needs ONNX Runtime, which is not installed: "
                                f"{_INSTALL_HINT}") from None
    return onnxruntime


def read_onnx_metadata(session_or_path: Any) -> dict:
    """The heatmark metadata (:data:`METADATA_KEY`) of an ONNX Runtime session or ``.onnx`` file;
    ``{}`` when the file has none."""
    session = session_or_path
    if isinstance(session_or_path, (str, os.PathLike)):
        ort = _onnxruntime()
        session = ort.InferenceSession(os.fspath(session_or_path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map or {}
    try:
        value = json.loads(props.get(METADATA_KEY, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class OnnxRuntimeNetwork:
    """An ONNX model run by ONNX Runtime on CPU, called like the torch network it was exported from.

    Args:
        session: an ``onnxruntime.InferenceSession`` of a file with one input (``(B, C, *S)``
            float32, dynamic ``B``) and one output (``(B, N, *S')`` heatmaps).
        metadata: the file's heatmark metadata (:func:`read_onnx_metadata`).
    """

    def __init__(self, session: Any, metadata: Mapping[str, Any] | None = None):
        self.session = session
        self.metadata = dict(metadata or {})
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, *S)`` (any float dtype and device) -> heatmaps ``(B, N, *S')`` float32 on ``x``'s device."""
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)

    def eval(self) -> OnnxRuntimeNetwork:
        """No-op (an exported model is already in inference mode); for code that calls ``network.eval()``."""
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxRuntimeNetwork:
        """No-op: ONNX Runtime runs on CPU; outputs follow the input's device."""
        return self


def load_onnx_network(model: str | os.PathLike, model_sha256: str, threads: int | None = None) -> OnnxRuntimeNetwork:
    """The ``.onnx`` file exported from the model file ``model`` (``heatmark export BUNDLE --format
    onnx``), ready to run on CPU.

    Args:
        model: the model file (``models/model.pt``); the ONNX file is beside it (:func:`exported_path`).
        model_sha256: SHA-256 of ``model``; the ONNX file must have been exported from these bytes.
        threads: ONNX Runtime intra-op threads (None: its default).

    Raises:
        PredictUsageError: ONNX Runtime not installed; the file missing, unreadable, or exported
            from another model file (stale), each saying what to run.
    """
    path = exported_path(model, "onnx")
    redo = f"run `heatmark export BUNDLE --format onnx` (BUNDLE: the bundle of {model})"
    if not path.is_file():
        raise PredictUsageError(f"--backend onnxruntime: {path} not found; {redo}")
    ort = _onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise PredictUsageError(f"--backend onnxruntime: cannot load {path}: {str(e).splitlines()[0][:300]}; "
                                f"{redo}") from None
    metadata = read_onnx_metadata(session)
    exported_from = metadata.get("model_sha256")
    if exported_from != model_sha256:
        why = ("has no heatmark metadata saying which model file it was exported from" if exported_from is None
               else f"was exported from another {Path(model).name} (SHA-256 {str(exported_from)[:12]}..., "
                    f"{model} is {model_sha256[:12]}...)")
        raise PredictUsageError(f"--backend onnxruntime: {path} is stale: it {why}; {redo}")
    return OnnxRuntimeNetwork(session, metadata)
