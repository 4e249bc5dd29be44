"""The fine stage of a coarse-to-fine cascade at prediction (DESIGN section 7b).

A bundle trained with the cascade overlay (``configs/cascade.yaml``) has a fine model beside its
coarse one: ``models/model_fine.pt`` next to ``models/model.pt`` (``<stem>_fine<suffix>`` of the
model used; the config key ``fine_ckpt_path`` when the configs set it). :func:`load_fine_stage`
loads it (its self-described network and patch grid); :func:`refine` takes the coarse stage's
world estimates of one case and, for each landmark, resamples a patch of the *original* image
(loaded again with ``fine#inference#preprocessing``: the loader, then ``fine_image_preprocessing``)
centred on the estimate (:class:`heatmark.transforms.ResamplePatch`), runs the fine network and
decodes that landmark's channel in world mm through the patch's affine.

A coarse estimate that is missing, whose confidence is below ``fine_min_confidence``, or that lies
outside the image gives a missing (NaN) landmark and a warning with the reason (``warnings.csv``,
:attr:`heatmark.predict.Prediction.warnings`); it is never clamped into the image.

The fine stage only sees its patch, so a structure that looks like the landmark elsewhere in the
patch can win. Its maximum is therefore searched within ``fine_search_radius_mm`` of the coarse
estimate (0: the whole patch); the sub-voxel refinement still reads the unmasked heatmap. Where
the fine peak inside that ball is below ``fine_fallback_confidence`` the coarse estimate is kept,
with a warning saying so (the fine stage did not recognise the landmark there).

Where the configs given to ``heatmark predict`` lack the cascade keys, the overlays the fine model
was trained with (recorded in its description, ``cascade.overlays``) are read from the bundle's
``configs/`` folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from heatmark.bundle import BundleError, bundle_config_files
from heatmark.core.axes import per_axis
from heatmark.core.fileio import sha256_file
from heatmark.core.geometry import output_grid_affine
from heatmark.evaluation.decoding import decode_heatmaps
from heatmark.predict.checks import outside_mm
from heatmark.predict.errors import PredictUsageError, config_value, describe
from heatmark.training.model_file import build_network, read_model_file
from heatmark.transforms import LoadLandmarkImaged
from heatmark.transforms.cascade import ResamplePatch

__all__ = ["FineStage", "fine_model_path", "load_fine_stage", "refine", "refine_result"]

#: keys a config must hold for the fine stage's image preprocessing
_NEEDED = ("fine_image_preprocessing",)


@dataclass
class FineStage:
    """The fine stage of a cascade, ready to refine coarse estimates.

    Attributes:
        network: the fine network (weights loaded, eval mode, on ``device``).
        preprocessing: ``{image_key: path}`` -> the original image after ``fine_image_preprocessing``.
        after_loader: the same without the loader, for in-memory images.
        spacing_mm: patch voxel size (mm per axis); ``patch_size``: voxels per axis.
        output_stride: input voxels per heatmap voxel, per axis.
        decode_method: heatmap refinement (:func:`heatmark.evaluation.decode_heatmaps`).
        min_confidence: coarse confidence below which a landmark is set missing.
        search_radius_mm: the fine maximum is searched within this distance (mm) of the coarse
            estimate; 0 = the whole patch.
        fallback_confidence: a fine peak below this keeps the coarse estimate (with a warning).
        batch_size: patches per forward pass.
        model: the fine model file; ``sha256`` its hash (the run fingerprint).
    """

    network: torch.nn.Module
    preprocessing: Callable
    after_loader: Callable
    spacing_mm: tuple[float, ...]
    patch_size: tuple[int, ...]
    output_stride: tuple[int, ...]
    decode_method: str
    min_confidence: float
    batch_size: int
    device: torch.device
    model: Path
    sha256: str
    image_key: str = "image"
    search_radius_mm: float = 0.0
    fallback_confidence: float = 0.0


def fine_model_path(model: Path, configured: Any = None) -> Path:
    """Where the fine model of the coarse ``model`` is: ``configured`` (``fine_ckpt_path``) or
    ``<stem>_fine<suffix>`` beside it."""
    if configured:
        return Path(os.path.expanduser(os.fspath(configured)))
    return model.with_name(f"{model.stem}_fine{model.suffix}")


def _parser_with_cascade(parser: ConfigParser, bundle: Path, configs: Sequence[str],
                         recorded: Sequence[str]) -> ConfigParser:
    """``parser`` when it holds the cascade keys, else one over the inference configs plus the
    overlays recorded in the fine model (``recorded``, then the user's ``configs``)."""
    if all(k in parser for k in _NEEDED):
        return parser
    overlays = [o for o in recorded if o != "train.yaml" and (bundle / "configs" / o).is_file()]
    if "cascade.yaml" not in overlays:  # heatmark's cascade wiring (and the bundle's own file, if any) first
        overlays.insert(0, "cascade.yaml")
    try:
        files = bundle_config_files(bundle, "inference", [*overlays, *configs])
    except BundleError as e:
        raise PredictUsageError(str(e)) from None
    other = ConfigParser()
    other.read_config([str(f) for f in files])
    other["bundle_root"] = str(bundle)
    if not all(k in other for k in _NEEDED):
        raise PredictUsageError(f"bundle {bundle} has a fine model but no cascade settings ({', '.join(_NEEDED)}); "
                                "pass the cascade overlay it was trained with (--config cascade.yaml)")
    return other


def load_fine_stage(parser: ConfigParser, bundle: Path, model: Path, configs: Sequence[str], device: torch.device,
                    image_key: str = "image") -> FineStage | None:
    """The fine stage of the bundle, or None when there is no fine model file.

    Raises:
        PredictUsageError: a fine model that cannot be read or built, or missing cascade settings.
    """
    configured = parser.get_parsed_content("fine_ckpt_path") if "fine_ckpt_path" in parser else None
    path = fine_model_path(model, configured)
    if not path.is_file():
        return None
    try:
        state, description = read_model_file(path)
    except Exception as e:  # noqa: BLE001
        raise PredictUsageError(f"cannot load the fine model {path}: {describe(e).splitlines()[0][:300]}") from None
    cascade = (description or {}).get("cascade")
    if not isinstance(cascade, Mapping) or cascade.get("stage") != "fine" or not description.get("network"):
        raise PredictUsageError(f"{path} is not a fine-stage model file (its description has no network and "
                                "cascade settings); train it with the cascade overlay")
    try:  # stage 1's loader: --spacing and --pixel-units apply to both stages
        loader = parser.get_parsed_content("inference#loader") if "inference#loader" in parser else None
    except Exception as e:  # noqa: BLE001
        raise PredictUsageError(f"bundle {bundle}: cannot build 'inference#loader': {describe(e)}") from None
    parser = _parser_with_cascade(parser, bundle, configs, [str(o) for o in cascade.get("overlays", []) or []])

    def get(key: str, default: Any = ...) -> Any:
        return config_value(parser, bundle, key, default)

    try:
        network = build_network(description["network"])
        network.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise PredictUsageError(f"cannot load the fine model {path}: {describe(e).splitlines()[0][:300]}") from None
    dims = int(description["spatial_dims"])
    if loader is None:
        loader = LoadLandmarkImaged(image_key, spatial_dims=dims, spacing=get("image_spacing", None))
    steps = list(get("fine_image_preprocessing", []) or [])
    stride = description.get("output_stride") or getattr(network, "output_stride", None)
    min_conf = get("fine_min_confidence", None)
    radius = get("fine_search_radius_mm", None)
    fallback = get("fine_fallback_confidence", None)
    try:
        spacing = per_axis(description["spacing_mm"], dims, name="spacing_mm", cast=float)
        size = per_axis(description["input_size"], dims, name="input_size", cast=int)
        output_stride = per_axis(stride, dims, name="output_stride", default=1)
        min_confidence = float(cascade.get("min_confidence", 0.0) if min_conf is None else min_conf)
        search_radius_mm = float(cascade.get("search_radius_mm", 0.0) if radius is None else radius)
        fallback_confidence = float(cascade.get("fallback_confidence", 0.0) if fallback is None else fallback)
        batch_size = int(get("fine_batch_size", 8))
    except (TypeError, ValueError) as e:
        raise PredictUsageError(f"fine model {path}: {e}") from None
    if batch_size < 1:
        raise PredictUsageError(f"bundle {bundle}: bad `fine_batch_size` {batch_size}; expected >= 1")
    if not search_radius_mm >= 0:
        raise PredictUsageError(f"bundle {bundle}: bad `fine_search_radius_mm` {search_radius_mm}; expected >= 0")
    return FineStage(network=network.to(device).eval(), preprocessing=Compose([loader, *steps]),
                     after_loader=Compose(steps), spacing_mm=spacing, patch_size=size, output_stride=output_stride,
                     decode_method=str(description.get("decode_method") or "quadratic"),
                     min_confidence=min_confidence, batch_size=batch_size, device=device, model=path,
                     sha256=sha256_file(path), image_key=image_key, search_radius_mm=search_radius_mm,
                     fallback_confidence=fallback_confidence)


def _image(fine: FineStage, source: Any) -> MetaTensor:
    """The original image of a case after ``fine_image_preprocessing``: from a path, or from an
    in-memory ``MetaTensor`` as the loader gives it."""
    if isinstance(source, (str, os.PathLike)):
        image = fine.preprocessing({fine.image_key: str(source)})[fine.image_key]
    else:
        image = fine.after_loader({fine.image_key: source})[fine.image_key]
    if not isinstance(image, MetaTensor):
        raise ValueError("the fine stage's preprocessing lost the image's affine")
    return image


def search_mask(fine: FineStage, patch_affine: Any) -> torch.Tensor | None:
    """``(*S)`` bool on the fine network's output grid: voxels within ``fine.search_radius_mm`` of
    the patch centre (the coarse estimate), through the patch's ``patch_affine`` and the output
    stride; None when the radius is 0 (the whole patch). Every voxel centre is at least as close
    as the nearest one, so a radius below half a voxel still keeps the centre's voxel."""
    if fine.search_radius_mm <= 0:
        return None
    d = len(fine.patch_size)
    a = torch.as_tensor(output_grid_affine(np.asarray(torch.as_tensor(patch_affine, dtype=torch.float64))[
        [*range(d), -1]][:, [*range(d), -1]], fine.output_stride), dtype=torch.float64)
    shape = [n // s for n, s in zip(fine.patch_size, fine.output_stride)]
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    centre = torch.as_tensor(patch_affine, dtype=torch.float64)[[*range(d), -1]][:, [*range(d), -1]] @ torch.tensor(
        [*((n - 1) / 2 for n in fine.patch_size), 1.0], dtype=torch.float64)
    dist = torch.linalg.vector_norm(grid @ a[:d, :d].T + a[:d, d] - centre[:d], dim=-1)
    return dist <= max(fine.search_radius_mm, float(dist.min()))


def refine(fine: FineStage, source: Any, world: np.ndarray, confidence: np.ndarray, names: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Refine one case's coarse estimates with the fine stage.

    Args:
        fine: the loaded fine stage.
        source: the case's image file, or its loaded ``MetaTensor`` (channel first, world affine).
        world: ``(N, D)`` coarse estimates, world mm (RAS); NaN rows are missing.
        confidence: ``(N,)`` coarse heatmap peaks.
        names: the landmark names (for the warnings).

    Returns:
        ``(world (N, D), confidence (N,), warnings)``: fine positions in world mm and fine peaks;
        NaN and 0 for a landmark set missing, with one warning line naming it and why; the coarse
        position and confidence, with a warning, where the fine peak is below
        ``fine.fallback_confidence``.
    """
    world = np.asarray(world, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    n, d = world.shape
    out, conf, warnings = np.full_like(world, np.nan), np.zeros(n), []
    image = _image(fine, source)
    shape = tuple(int(s) for s in image.shape[1:])
    affine = np.asarray(torch.as_tensor(image.affine, dtype=torch.float64))
    if affine.shape[0] != d + 1:
        affine = np.asarray(torch.as_tensor(image.affine)[[*range(d), -1]][:, [*range(d), -1]], dtype=np.float64)
    dist = outside_mm(np.where(np.isfinite(world), world, 0.0), shape, affine)
    todo = []
    for i in range(n):
        what = f"landmark {i + 1} ({names[i]})"
        if not np.isfinite(world[i]).all():
            warnings.append(f"{what}: the coarse stage found no estimate; set missing")
        elif confidence[i] < fine.min_confidence:
            warnings.append(f"{what}: coarse confidence {confidence[i]:.3g} is below fine_min_confidence "
                            f"{fine.min_confidence:g}; set missing")
        elif dist[i] > 0:
            warnings.append(f"{what}: the coarse estimate lies {dist[i]:.1f} mm outside the image; set missing")
        else:
            todo.append(i)
    patcher = ResamplePatch(fine.spacing_mm, fine.patch_size)
    for start in range(0, len(todo), fine.batch_size):
        chunk = todo[start:start + fine.batch_size]
        patches = [patcher(image, world[i]) for i in chunk]
        x = torch.stack([p.as_tensor() for p in patches]).to(fine.device)
        affines = torch.stack([torch.as_tensor(p.affine, dtype=torch.float64) for p in patches])
        with torch.inference_mode():
            pred = fine.network(x).float()
        index = torch.as_tensor(chunk, device=pred.device)
        own = pred[torch.arange(len(chunk), device=pred.device), index].unsqueeze(1)  # each patch: its landmark
        mask = search_mask(fine, affines[0])  # every patch is centred on its estimate: one mask for all
        dec = decode_heatmaps(own, method=fine.decode_method, output_stride=fine.output_stride,
                              affine=affines.to(pred.device), mask=None if mask is None else mask.to(pred.device))
        pos = dec.world[:, 0].cpu().numpy()
        peak = dec.confidence[:, 0].cpu().numpy()
        for k, i in enumerate(chunk):
            if not np.isfinite(pos[k]).all():
                warnings.append(f"landmark {i + 1} ({names[i]}): the fine stage found no peak; set missing")
            elif peak[k] < fine.fallback_confidence:
                out[i], conf[i] = world[i], confidence[i]
                warnings.append(f"landmark {i + 1} ({names[i]}): fine peak {peak[k]:.3g} is below "
                                f"fine_fallback_confidence {fine.fallback_confidence:g}; kept the coarse estimate")
            else:
                out[i], conf[i] = pos[k], peak[k]
    return out, conf, warnings


def refine_result(bundle: Any, source: Any, result: dict) -> str | None:
    """The runner's hook: with a fine stage (``bundle.fine``), replace ``result["world"]`` and
    ``result["confidence"]`` by the fine stage's and put its warnings in ``result["warnings"]``.
    Returns None, or the case's error in one line when the fine stage fails."""
    fine = getattr(bundle, "fine", None)
    result.setdefault("warnings", [])
    if fine is None:
        return None
    try:
        world, conf, warnings = refine(fine, source, result["world"], result["confidence"], bundle.names)
    except Exception as e:  # noqa: BLE001 - one case's failure, the run goes on
        return f"the fine stage of the cascade failed: {describe(e)}"
    result["coarse_world"] = result["world"]
    result["world"], result["confidence"] = world, conf
    result["warnings"] = [*result["warnings"], *warnings]
    return None
