"""Loading a bundle for prediction: its configs, network and weights, device and precision.

The config files are those of the bundle's ``inference`` workflow
(:func:`heatmark.bundle.bundle_config_files`: heatmark's shipped ``base.yaml``, the bundle's
``configs/train.yaml``, the shipped ``inference.yaml``, then ``--config`` overlays), read with
MONAI's ``ConfigParser`` with ``bundle_root`` set to the bundle. Only the keys prediction needs are
built (no dataset is touched): ``inference#preprocessing``, ``inference#inferer``,
``inference#postprocessing``, ``network_def``, ``landmark_names``, ``spatial_dims``,
``output_stride``, ``ckpt_path``, ``measurements``, ``amp`` / ``amp_dtype``, ``image_spacing``
(overridden by ``--spacing`` before anything is built; ``--pixel-units`` sets
``inference#loader#allow_pixel_units``), and the plausibility limits ``predict_min_voxels``,
``predict_min_extent_mm`` (or ``predict_min_extent_fraction`` of ``input_size x spacing_mm``),
``predict_min_distinct_values`` and ``predict_max_outside_mm`` (:mod:`heatmark.predict.checks`,
whose :class:`~heatmark.predict.checks.CheckImaged` goes into the preprocessing right after
``inference#loader``). Every problem is a :class:`PredictUsageError`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from heatmark.bundle import BundleError, bundle_config_files, check_bundle
from heatmark.core.axes import per_axis
from heatmark.core.fileio import sha256_file
from heatmark.evaluation.metrics import measure
from heatmark.predict.backends import load_onnx_network
from heatmark.predict.cascade import FineStage, load_fine_stage
from heatmark.predict.checks import CheckImaged, ImageChecks
from heatmark.predict.errors import PredictUsageError, config_value, describe
from heatmark.predict.options import PredictOptions
from heatmark.training.model_file import check_definition, network_definition, plain, read_model_file
from heatmark.training.precision import choose_precision
from monai.bundle import ConfigParser
from monai.transforms import Compose

__all__ = ["LoadedBundle", "load_bundle", "resolve_device"]


@dataclass
class LoadedBundle:
    """A bundle ready to predict: its network (weights loaded, on ``device``, in eval mode) and
    the objects around it.

    Attributes:
        root: the bundle folder.
        network: the bundle's ``network_def``.
        preprocessing: ``inference#preprocessing``: ``{image_key: path}`` -> preprocessed image.
        inferer: ``inference#inferer``: ``inferer(images, network)`` -> heatmaps.
        postprocessing: ``inference#postprocessing``: heatmaps -> ``pred_world``, ``confidence``.
        names: ``landmark_names`` (the members of an unordered shared channel group as
            ``<group>#<k>``, :meth:`heatmark.core.heatmaps.ChannelGroups.output_names`).
        spatial_dims: 2 or 3.
        output_stride: input voxels per heatmap voxel, per axis.
        measurements: the bundle's ``measurements`` definitions; ``measurement_names`` their columns.
        device: where the network runs.
        amp: mixed precision on; ``amp_kwargs`` for :func:`heatmark.training.autocast_context`.
        fingerprint: what makes results comparable (model and config hashes, spacing, landmarks).
        checks: the plausibility limits (:mod:`heatmark.predict.checks`); ``preprocessing``
            applies the image checks right after the loader.
        fine: the fine stage of a coarse-to-fine cascade (:mod:`heatmark.predict.cascade`) when
            the bundle has a fine model beside the coarse one, else None.
        num_channels: the network's output channels (``num_channels`` of the configs, fewer than
            the names when landmarks share channels); None: one per name.
    """

    root: Path
    network: Any
    preprocessing: Callable
    inferer: Callable
    postprocessing: Callable
    names: list[str]
    spatial_dims: int
    output_stride: tuple[int, ...]
    measurements: list[dict]
    measurement_names: list[str]
    device: Any
    amp: bool
    amp_kwargs: dict
    fingerprint: dict
    image_key: str = "image"
    pred_key: str = "pred"
    checks: ImageChecks = field(default_factory=ImageChecks)
    num_channels: int | None = None
    fine: FineStage | None = None


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise PredictUsageError(f"--device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PredictUsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PredictUsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        with contextlib.suppress(Exception):
            torch.empty(0, device=device)
            return device
        raise PredictUsageError(f"--device {name}: not available")
    return device


def _configs_sha256(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _read_configs(opts: PredictOptions) -> tuple[Path, list[Path], ConfigParser]:
    """The bundle folder, its inference config files and a parser over them with the options applied."""
    try:
        bundle = check_bundle(opts.bundle)
        files = bundle_config_files(bundle, "inference", opts.configs)
    except BundleError as e:
        raise PredictUsageError(str(e)) from None
    parser = ConfigParser()
    try:
        parser.read_config([str(f) for f in files])
    except Exception as e:  # noqa: BLE001 - one clear line
        raise PredictUsageError(f"cannot read the bundle configs {[str(f) for f in files]}: {describe(e)}") from None
    parser["bundle_root"] = str(bundle)
    if opts.spacing is not None:
        parser["image_spacing"] = [float(s) for s in opts.spacing]
    if opts.pixel_units:
        if "inference#loader" not in parser:
            raise PredictUsageError(f"--pixel-units: bundle {bundle} has no `inference#loader` to configure")
        parser["inference#loader#allow_pixel_units"] = True
    return bundle, files, parser


def _checks(get: Callable, bundle: Path, spatial_dims: int) -> ImageChecks:
    """The plausibility limits of the configs (see :mod:`heatmark.predict.checks`)."""

    def number(key: str, default: float, integer: bool = False) -> float:
        value = get(key, None)
        value = default if value is None else value
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = float("nan")
        if not x >= 0 or (integer and x != int(x)):
            raise PredictUsageError(f"bundle {bundle}: bad `{key}`: {value!r}; expected a "
                                    f"{'whole ' if integer else ''}number >= 0")
        return int(x) if integer else x

    fraction = number("predict_min_extent_fraction", 0.125)
    try:  # the network input's field of view, mm per axis
        fov = [float(n) * float(s) for n, s in zip(
            per_axis(get("input_size", None), spatial_dims, name="input_size", cast=float),
            per_axis(get("spacing_mm", None), spatial_dims, name="spacing_mm", cast=float))]
    except (TypeError, ValueError):
        fov = []  # no input grid to derive the limits from
    extent = get("predict_min_extent_mm", None)
    if extent is None:
        extent_mm = tuple(fraction * f for f in fov)
    else:
        try:
            extent_mm = per_axis(extent, spatial_dims, name="predict_min_extent_mm", cast=float)
        except (TypeError, ValueError) as e:
            raise PredictUsageError(f"bundle {bundle}: bad `predict_min_extent_mm`: {e}") from None
        if not all(v >= 0 for v in extent_mm):
            raise PredictUsageError(f"bundle {bundle}: bad `predict_min_extent_mm`: {extent!r}; expected mm >= 0")
    outside_default = fraction * min(fov) if fov else 10.0
    return ImageChecks(min_voxels=number("predict_min_voxels", 8, integer=True), min_extent_mm=extent_mm,
                       min_distinct_values=number("predict_min_distinct_values", 16, integer=True),
                       max_outside_mm=number("predict_max_outside_mm", outside_default))


def _with_checks(preprocessing: Callable, loader: Any, check: CheckImaged) -> Callable:
    """``preprocessing`` with ``check`` right after ``loader`` (the first transform when the loader
    is not among them; after everything when the preprocessing is not a ``Compose``)."""
    if not isinstance(preprocessing, Compose):
        return Compose([preprocessing, check])
    transforms = list(preprocessing.transforms)
    at = next((i for i, t in enumerate(transforms) if t is loader), 0) + 1
    transforms.insert(min(at, len(transforms)), check)
    return Compose(transforms, map_items=preprocessing.map_items, unpack_items=preprocessing.unpack_items,
                   log_stats=preprocessing.log_stats, lazy=preprocessing.lazy, overrides=preprocessing.overrides)


#: config keys a model file's description fixes (the network_def aside)
DESCRIBED_KEYS = ("spatial_dims", "landmark_names", "spacing_mm", "input_size", "decode_method", "channel_groups")


def _overlay_keys(overlays: Sequence[Path]) -> set[str]:
    """The top-level keys the explicitly given overlays set (``network_def#filters`` -> ``network_def``)."""
    keys: set[str] = set()
    for f in overlays:
        try:
            content = ConfigParser.load_config_file(str(f))
        except Exception:  # noqa: BLE001 - read_config reported a broken file already
            continue
        keys.update(str(k).split("#", 1)[0] for k in (content or {}))
    return keys


def _show(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, list) and len(value) <= 3 and all(
        isinstance(v, (int, float)) for v in value) else str(value)


def _apply_description(parser: ConfigParser, description: Mapping[str, Any], overlays: Sequence[Path],
                       model: Path, get: Callable) -> None:
    """Make ``parser`` build what the model file describes: its network and input grid. A key the
    explicitly given overlays set to another value is refused, naming the key."""
    given = _overlay_keys(overlays)
    described = {k: description[k] for k in DESCRIBED_KEYS if description.get(k) is not None}
    for key, value in described.items():
        if key in given:
            configured = plain(get(key), key)
            if configured != value:
                raise PredictUsageError(f"{model.name} was trained with {key} {_show(value)}, the configs say "
                                        f"{_show(configured)} (leave out the --config, or pass the one it was "
                                        "trained with)")
    definition = description.get("network")
    if isinstance(definition, Mapping):
        try:
            definition = check_definition(definition)
        except ValueError as e:
            raise PredictUsageError(f"cannot load the model {model}: {e}") from None
        if "network_def" in given:
            configured = network_definition(get("network_def"))
            if configured is not None and configured != definition:
                key = next(k for k in sorted(set(configured) | set(definition))
                           if configured.get(k, ...) != definition.get(k, ...))
                raise PredictUsageError(
                    f"{model.name} was trained with network_def#{key} {definition.get(key, '(unset)')}, the "
                    f"configs say {configured.get(key, '(unset)')} (leave out the --config, or pass the one "
                    "it was trained with)")
        parser["network_def"] = copy.deepcopy(definition)
    for key, value in described.items():
        parser[key] = copy.deepcopy(value)
    if "sliding_window" in description:
        _apply_sliding_window(parser, description["sliding_window"], given)


#: a model file's ``sliding_window`` entries -> the config keys they set
SLIDING_WINDOW_KEYS = {"patch_size": "patch_size", "overlap": "sw_overlap", "mode": "sw_mode",
                       "sw_batch_size": "sw_batch_size", "stream": "sw_stream"}


def _apply_sliding_window(parser: ConfigParser, settings: Mapping[str, Any] | None, given: set[str]) -> None:
    """Infer as the model was trained: sliding windows of its patch size (``settings``, from
    :func:`heatmark.evaluation.sliding_window_settings`), or the whole input when it recorded None.
    Keys the explicitly given overlays set win (a fully convolutional network may use other windows)."""
    if isinstance(settings, Mapping):
        values = {key: settings[k] for k, key in SLIDING_WINDOW_KEYS.items() if k in settings}
    else:
        values = {"patch_size": None}
    if "patch_size" in given or "patch_size_mm" in given:
        values.pop("patch_size", None)
    elif "patch_size" in values:
        parser["patch_size_mm"] = None
    for key, value in values.items():
        if key not in given:
            parser[key] = copy.deepcopy(value)


def load_bundle(opts: PredictOptions) -> LoadedBundle:
    """Build what prediction needs from the bundle ``opts.bundle``; see the module documentation.

    Raises:
        PredictUsageError: no bundle, a config missing or broken, no model or one that does not
            fit the network, a device that is not there (one line, naming the file or key).
    """
    bundle, files, parser = _read_configs(opts)

    def get(key: str, default: Any = ..., what: str = ""):
        return config_value(parser, bundle, key, default, what)

    model = Path(os.path.expanduser(os.fspath(opts.model))) if opts.model else Path(get("ckpt_path"))
    if not model.is_file():
        raise PredictUsageError(f"model not found: {model} (train the bundle first, or pass --model PATH)")
    try:
        state, description = read_model_file(model)
    except Exception as e:  # noqa: BLE001
        raise PredictUsageError(f"cannot load the model {model}: {describe(e).splitlines()[0][:300]}") from None
    if description is not None:
        _apply_description(parser, description, files[len(files) - len(opts.configs):], model, get)

    names = [str(n) for n in get("landmark_names")]
    # shared output channels (channel_groups): C channels; an unordered group's rows are `<group>#<k>`
    layout = get("channel_layout", None)
    num_channels = None if layout is None else int(layout.num_channels)
    if layout is not None and not layout.is_identity:
        names = list(layout.output_names())
    spatial_dims = int(get("spatial_dims"))
    preprocessing = get("inference#preprocessing", what=" (with --spacing)" if opts.spacing is not None else "")
    inferer = get("inference#inferer")
    postprocessing = get("inference#postprocessing")
    network = get("network_def")
    stride = get("output_stride", None) or getattr(network, "output_stride", None)
    try:
        output_stride = per_axis(stride, spatial_dims, name="output_stride", default=1)
    except (ValueError, TypeError) as e:
        raise PredictUsageError(f"bundle {bundle}: bad `output_stride`: {e}") from None
    measurements = list(get("measurements", []) or [])
    try:
        measurement_names = list(measure(np.full((len(names), spatial_dims), np.nan), names, measurements))
    except (ValueError, KeyError, TypeError) as e:
        raise PredictUsageError(f"bundle {bundle}: bad `measurements`: {e}") from None

    try:
        network.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise PredictUsageError(f"cannot load the model {model} into the bundle's network_def: "
                                f"{describe(e).splitlines()[0][:300]}") from None

    checks = _checks(get, bundle, spatial_dims)
    image_key = str(getattr(postprocessing, "image_key", "image"))
    preprocessing = _with_checks(preprocessing, get("inference#loader", None), CheckImaged(checks, image_key))

    onnx = getattr(opts, "backend", "torch") == "onnxruntime"
    if onnx and str(opts.device or "auto") not in ("auto", "cpu"):
        raise PredictUsageError(f"--backend onnxruntime runs on CPU; leave out --device {opts.device} or pass --device cpu")
    device = resolve_device("cpu" if onnx else opts.device)
    # --amp / --no-amp decide; else the bundle's `amp` (true/false/auto) on CUDA; CPU prediction is float32
    setting = bool(opts.amp) if opts.amp is not None else (get("amp", "auto") if device.type == "cuda" else False)
    try:
        chosen = choose_precision(setting, get("amp_dtype", "auto"), device, log=False)
    except ValueError as e:
        raise PredictUsageError(f"bundle {bundle}: {e}") from None
    amp, amp_dtype = chosen.enabled, chosen.dtype
    network = network.to(device).eval()
    model_sha256 = sha256_file(model)
    if onnx:  # the same pipeline; only the network call goes to ONNX Runtime (heatmark.predict.backends)
        network = load_onnx_network(model, model_sha256)
    fine = load_fine_stage(parser, bundle, model, list(opts.configs), device, image_key)

    fingerprint = {
        "model_sha256": model_sha256,
        "configs_sha256": _configs_sha256(files),
        "image_spacing": None if opts.spacing is None else [float(s) for s in opts.spacing],
        "pixel_units": bool(opts.pixel_units),
        "landmark_names": names,
        "spatial_dims": spatial_dims,
    }
    if onnx:  # another runtime computes in other last bits: a resumed run must not mix the two
        fingerprint["backend"] = "onnxruntime"
    if fine is not None:  # a cascade: the fine model decides the results too
        fingerprint["fine_model_sha256"] = fine.sha256
    return LoadedBundle(root=bundle, network=network, preprocessing=preprocessing, inferer=inferer,
                        postprocessing=postprocessing, names=names, spatial_dims=spatial_dims,
                        output_stride=output_stride, measurements=measurements,
                        measurement_names=measurement_names, device=device, amp=amp,
                        amp_kwargs={"dtype": amp_dtype}, fingerprint=fingerprint, image_key=image_key,
                        pred_key=str(getattr(postprocessing, "pred_key", "pred")), checks=checks, fine=fine,
                        num_channels=num_channels)
