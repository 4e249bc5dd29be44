"""The trained model file (``models/model.pt``): the weights and what they need, in one artifact.

A model file written by training is ``{"format": "heatmark-model", "version": 1, "state_dict":
{...tensors...}, "description": {...}}``, plain containers only, so ``torch.load(path,
weights_only=True)`` loads it. The description (:func:`model_description`) says how to rebuild the
network and feed it:

- ``network``: the network definition resolved to plain values, ``{"_target_": "heatmark.networks.X",
  <argument>: <value>, ...}`` (None when the network does not record its arguments);
- ``spatial_dims``, ``landmark_names``, ``output_stride``, ``decode_method``;
- ``channel_groups``: the shared output channels with every default resolved
  (:meth:`heatmark.core.heatmaps.ChannelGroups.to_config`), None for one channel per landmark;
- ``spacing_mm``, ``input_size`` and ``orientation`` (the axcodes of an ``Orientationd`` in the
  image preprocessing, else None): the network's input grid;
- ``sliding_window``: None (the network sees the whole input) or the sliding-window inference of a
  patch-trained model, ``{"patch_size": [...voxels], "overlap", "mode", "sw_batch_size", "stream"}``
  (:func:`heatmark.evaluation.sliding_window_settings`), which ``heatmark predict`` sets up again;
- ``bundle`` (``name`` and ``version`` of ``configs/metadata.json``), ``configs`` (the config files
  the training read), ``versions`` (heatmark, MONAI, torch).

:func:`read_model_file` reads both this format and a bare ``state_dict`` (older model files), and
:func:`build_network` rebuilds a described network, refusing targets outside ``heatmark.networks``
and ``monai``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
from ignite.engine import Events

from heatmark import __version__

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "ALLOWED_TARGETS", "model_description", "model_file_payload",
           "read_model_file", "build_network", "network_definition", "plain", "ModelFileLoader"]



MODEL_FORMAT = "heatmark-model"
MODEL_FORMAT_VERSION = 1
#: module prefixes a model file's ``network._target_`` may name
ALLOWED_TARGETS = ("heatmark.networks.", "monai.")


def plain(value: Any, what: str = "value") -> Any:
    """``value`` as plain containers (dict with str keys, list, str, int, float, bool, None);
    tuples become lists, numpy/torch scalars and arrays Python numbers and lists.

    Raises:
        TypeError: anything else (naming ``what``).
    """
    if value is None or isinstance(value, bool):
        return value
    for kind in (str, int, float):  # subclasses (torch's TorchVersion, IntEnum ...) as the plain type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{what}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist") and not isinstance(value, torch.nn.Module):  # numpy / torch
        return plain(value.tolist(), what)
    raise TypeError(f"{what} is a {type(value).__name__}, not a plain value")


def network_definition(network: Any) -> dict | None:
    """``{"_target_": ..., **arguments}`` for a network that records its arguments
    (:attr:`heatmark.networks.HeatmapNetwork.init_arguments`), else None."""
    arguments = getattr(network, "init_arguments", None)
    if not isinstance(arguments, Mapping):
        return None
    cls = type(network)
    target = f"{cls.__module__}.{cls.__qualname__}"
    public = importlib.import_module("heatmark.networks")
    if getattr(public, cls.__name__, None) is cls:
        target = f"heatmark.networks.{cls.__name__}"
    try:
        return {"_target_": target, **plain(dict(arguments), "network_def")}
    except TypeError:
        return None


def _orientation(transforms: Any) -> str | None:
    for t in getattr(transforms, "transforms", transforms) or ():
        codes = getattr(getattr(t, "ornt_transform", None), "axcodes", None)
        if codes is not None:
            return "".join(codes)
    return None


def _bundle_metadata(bundle_root: str | os.PathLike | None) -> dict:
    if bundle_root is None:
        return {"name": None, "version": None}
    try:
        meta = json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        meta = {}
    return {"name": meta.get("name"), "version": meta.get("version")}


def model_description(network: Any, spatial_dims: int, landmark_names: Sequence[str], spacing_mm: Any = None,
                      input_size: Any = None, image_preprocessing: Any = None, output_stride: Any = None,
                      decode_method: str | None = None, bundle_root: str | os.PathLike | None = None,
                      config_files: Sequence[str | os.PathLike] = (),
                      channel_groups: Sequence[Mapping[str, Any]] | None = None,
                      sliding_window: Mapping[str, Any] | None = None) -> dict:
    """What a model file stores beside the weights; see the module documentation."""
    stride = output_stride if output_stride is not None else getattr(network, "output_stride", None)
    return {
        "network": network_definition(network),
        "spatial_dims": int(spatial_dims),
        "landmark_names": [str(n) for n in landmark_names],
        "spacing_mm": plain(spacing_mm, "spacing_mm"),
        "input_size": plain(input_size, "input_size"),
        "orientation": _orientation(image_preprocessing),
        "output_stride": plain(stride, "output_stride"),
        "decode_method": None if decode_method is None else str(decode_method),
        "channel_groups": plain(channel_groups, "channel_groups"),
        "sliding_window": plain(sliding_window, "sliding_window"),
        "bundle": _bundle_metadata(bundle_root),
        "configs": [str(f) for f in config_files or ()],
        "versions": {"heatmark": str(__version__), "monai": str(monai.__version__), "torch": str(torch.__version__)},
    }


def model_file_payload(state_dict: Mapping[str, Any], description: Mapping[str, Any]) -> dict:
    """The content of a self-describing model file."""
    return {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "state_dict": dict(state_dict),
            "description": dict(description)}


def _state_dict(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model", "network", "net"):
            if isinstance(obj.get(key), Mapping):
                return _state_dict(obj[key])
    raise ValueError("it holds no network state_dict (expected a dict of tensors, or one under "
                     "'model'/'network'/'state_dict')")


def read_model_file(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[Mapping[str, Any], dict | None]:
    """``(state_dict, description)`` of a model file; ``description`` is None for a bare
    ``state_dict`` (older model files). Loaded with ``weights_only=True``.

    Raises:
        ValueError: no state dict in the file, or a newer format version; what ``torch.load`` raises.
    """
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(obj, Mapping) and obj.get("format") == MODEL_FORMAT:
        if int(obj.get("version", 0)) > MODEL_FORMAT_VERSION:
            raise ValueError(f"model file version {obj.get('version')} is newer than this heatmark reads "
                             f"({MODEL_FORMAT_VERSION}); update heatmark")
        description = obj.get("description")
        return _state_dict(obj.get("state_dict")), dict(description) if isinstance(description, Mapping) else None
    return _state_dict(obj), None


def check_definition(definition: Mapping[str, Any]) -> dict:
    """A described network definition checked: an allowed ``_target_`` and plain arguments with no
    config syntax (strings starting with ``@``, ``$`` or ``%``).

    Raises:
        ValueError: naming the problem.
    """
    target = definition.get("_target_")
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGETS):
        raise ValueError(f"the network _target_ {target!r} is not allowed (only "
                         f"{', '.join(t.rstrip('.') for t in ALLOWED_TARGETS)} networks are built from a model file)")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and value[:1] in ("@", "$", "%"):
            raise ValueError(f"network argument {where} holds config syntax: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                if str(k).startswith("_") and k != "_target_":
                    raise ValueError(f"network argument {where}#{k} is a config directive")
                walk(v, f"{where}#{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}#{i}")

    walk({k: v for k, v in definition.items() if k != "_target_"}, "network_def")
    return dict(definition)


def build_network(definition: Mapping[str, Any]) -> torch.nn.Module:
    """The network of a described definition (see :func:`check_definition`)."""
    definition = check_definition(definition)
    module_name, _, name = definition["_target_"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return cls(**{k: v for k, v in definition.items() if k != "_target_"})


class ModelFileLoader:
    """Handler loading a model file (self-describing or a bare ``state_dict``,
    :func:`read_model_file`) into ``network`` when the engine starts; what ``evaluate.yaml`` uses
    in place of MONAI's ``CheckpointLoader``, which does not know the model file format."""

    def __init__(self, load_path: str | os.PathLike, network: torch.nn.Module, map_location: Any = "cpu",
                 strict: bool = True):
        self.load_path = load_path
        self.network = network
        self.map_location = map_location
        self.strict = strict

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        state, _ = read_model_file(self.load_path, map_location=self.map_location)
        self.network.load_state_dict(state, strict=self.strict)
