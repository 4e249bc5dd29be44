"""``heatmark export BUNDLE --format torchscript|onnx``: the bundle's network as a TorchScript
(``models/model.ts``) or ONNX (``models/model.onnx``) file, beside the model file it comes from,
checked against the eager network before it is put in place.

The network is rebuilt from the self-describing model file (:func:`heatmark.predict.load_bundle`,
as ``heatmark predict`` does) and exported for the input it gets at prediction time: the spatial
size of the bundle's inference preprocessing (or of its inferer's windows) is fixed, the batch
dimension is dynamic. How:

- TorchScript: ``torch.jit.trace`` (``torch.jit.script`` cannot compile heatmark's networks; both are
  deprecated in torch 2.13, whose deprecation and tracer warnings are silenced here, the check
  below being what proves the trace right). The spatial branches a trace records are those of the
  bundle's fixed input size.
- ONNX: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter (it needs
  ``onnxscript``; the older TorchScript-based exporter is deprecated with ``torch.jit``).

The check (:func:`check_export`): ``export_check_cases`` images (the bundle's ``val_datalist``, or
``--images``) go through the bundle's inference preprocessing, inferer and decoding twice, once
with the eager network and once with the exported file (read back from disk), in one batch, and
the first image once more in a batch of three (the dynamic batch). The largest heatmap difference
(as a fraction of the largest eager heatmap value) and the largest landmark difference in world mm
are printed; beyond ``export_heatmap_tolerance`` / ``export_landmark_tolerance_mm`` the export is
refused: the file is written to a temporary name first (:func:`heatmark.core.fileio.atomic_path`)
and only renamed into place after the check passes.

The exported file describes itself: the model file's description (landmark names, grid,
network, ...), the SHA-256 of the model file, and the input and output tensors, as JSON under
:data:`heatmark.predict.backends.METADATA_KEY` (ONNX ``metadata_props``; a TorchScript extra file).
``heatmark predict --backend onnxruntime`` refuses an ONNX file whose SHA-256 is not that of the
model file (:func:`heatmark.predict.backends.load_onnx_network`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from heatmark.bundle import bundle_config_files
from heatmark.core.fileio import atomic_path, sha256_file
from heatmark.predict.backends import (
    EXPORT_SUFFIXES,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    OnnxRuntimeNetwork,
    exported_path,
)
from heatmark.predict.dataset import CaseDataset, collate
from heatmark.predict.errors import PredictUsageError, describe
from heatmark.predict.inputs import assign_case_names, check_input, find_inputs
from heatmark.predict.model import LoadedBundle, load_bundle
from heatmark.predict.options import PredictOptions
from heatmark.predict.runner import infer
from heatmark.training.model_file import plain, read_model_file
from monai.bundle import ConfigParser
from torch import nn

__all__ = [
    "FORMATS",
    "ExportCheck",
    "ExportCheckError",
    "ExportError",
    "ExportSettings",
    "add_export_parser",
    "check_export",
    "cmd_export",
    "export_model",
    "load_torchscript",
]

FORMATS = tuple(EXPORT_SUFFIXES)
EXPORT_FORMAT, EXPORT_FORMAT_VERSION = "heatmark-export", 1
#: the batch size of the extra dynamic-batch check (copies of the first check image)
DYNAMIC_BATCH = 3


class ExportError(Exception):
    """The export could not be made (no model, no check images, the exporter failed): one line.
    ``status``: the exit status, 2 for a usage mistake, 1 for a failure of the export itself."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


class ExportCheckError(ExportError):
    """The exported model differs from the eager one beyond the tolerance; nothing was written."""

    def __init__(self, message: str):
        super().__init__(message, status=1)


@dataclasses.dataclass
class ExportSettings:
    """The bundle's ``export_*`` keys (``pipeline/configs/base.yaml``), each overridable on the command line.

    Attributes:
        check_cases: how many images the check runs.
        heatmap_tolerance: largest accepted heatmap difference, as a fraction of the largest
            absolute eager heatmap value.
        landmark_tolerance_mm: largest accepted landmark difference, world mm.
        onnx_opset: the ONNX opset version.
    """

    check_cases: int = 3
    heatmap_tolerance: float = 1e-4
    landmark_tolerance_mm: float = 0.05
    onnx_opset: int = 18


@dataclasses.dataclass
class ExportCheck:
    """The exported model against the eager one on the same preprocessed images.

    Attributes:
        cases: the images' case names.
        batch_sizes: the batch sizes the exported model ran with.
        max_heatmap_diff: largest absolute heatmap difference (network output units).
        heatmap_scale: largest absolute eager heatmap value.
        max_landmark_mm: largest distance between eager and exported landmarks, world mm
            (inf when a landmark is found by one and missing in the other).
    """

    cases: list[str]
    batch_sizes: list[int]
    max_heatmap_diff: float
    heatmap_scale: float
    max_landmark_mm: float

    @property
    def relative_heatmap_diff(self) -> float:
        """:attr:`max_heatmap_diff` as a fraction of :attr:`heatmap_scale`."""
        return self.max_heatmap_diff / self.heatmap_scale if self.heatmap_scale > 0 else self.max_heatmap_diff

    def line(self) -> str:
        return (f"checked against the eager model on {len(self.cases)} image(s) (batch sizes "
                f"{', '.join(map(str, self.batch_sizes))}): max heatmap difference {self.max_heatmap_diff:.3g} "
                f"({self.relative_heatmap_diff:.3g} of the largest heatmap value {self.heatmap_scale:.3g}), "
                f"max landmark difference {self.max_landmark_mm:.3g} mm")


# ---- what the check runs on -----------------------------------------------------------------------

def _parser(bundle: Path, configs: Sequence[str]) -> ConfigParser:
    try:
        files = bundle_config_files(bundle, "inference", list(configs))
    except Exception as e:  # noqa: BLE001 - BundleError and file errors, one line either way
        raise ExportError(str(e)) from None
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(bundle)
    return parser


def _setting(parser: ConfigParser, key: str, default: Any, kind: Callable) -> Any:
    try:
        return kind(parser.get_parsed_content(key)) if key in parser else default
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"bundle config `{key}`: {describe(e)}") from None


def settings_from_config(parser: ConfigParser) -> ExportSettings:
    """:class:`ExportSettings` from the bundle's configs (defaults where a key is absent)."""
    d = ExportSettings()
    return ExportSettings(check_cases=_setting(parser, "export_check_cases", d.check_cases, int),
                          heatmap_tolerance=_setting(parser, "export_heatmap_tolerance", d.heatmap_tolerance, float),
                          landmark_tolerance_mm=_setting(parser, "export_landmark_tolerance_mm",
                                                         d.landmark_tolerance_mm, float),
                          onnx_opset=_setting(parser, "export_onnx_opset", d.onnx_opset, int))


def _validation_images(parser: ConfigParser, bundle: Path, count: int) -> list[Path]:
    """The first ``count`` distinct image files of the bundle's ``val_datalist``."""
    hint = "pass --images FILE_OR_FOLDER (a few images like the ones the model will see)"
    try:
        datalist = parser.get_parsed_content("val_datalist")
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot read the validation images of {bundle} (val_datalist: "
                          f"{describe(e).splitlines()[0][:200]}); {hint}") from None
    paths: list[Path] = []
    for item in datalist or ():
        image = item.get("image") if isinstance(item, dict) else None
        if isinstance(image, (str, os.PathLike)) and Path(image).exists() and Path(image) not in paths:
            paths.append(Path(image))
        if len(paths) >= count:
            break
    if not paths:
        raise ExportError(f"the val_datalist of {bundle} names no image file that exists; {hint}")
    return paths


def _check_images(loaded: LoadedBundle, paths: Sequence[Path]) -> list[dict]:
    """The preprocessed check images, grouped by shape (:func:`heatmark.predict.dataset.collate`)."""
    names = assign_case_names(list(paths))
    dataset = CaseDataset([(n, str(p)) for n, p in zip(names, paths)], loaded.preprocessing, loaded.spatial_dims,
                          loaded.image_key)
    batch = collate([dataset[i] for i in range(len(dataset))])
    if batch["errors"]:
        rec = batch["errors"][0]
        raise ExportError(f"check image {rec['path']}: {rec['error']}")
    return batch["groups"]


class _InputRecorder(nn.Module):
    """The network, remembering the first input it is called with (what the inferer hands it)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.example: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.example is None:
            self.example = x[:1].detach().clone()
        return self.network(x)


def _run(loaded: LoadedBundle, network: Callable, groups: Sequence[dict]) -> list[dict]:
    """Per case of ``groups``: the heatmaps and world landmarks of the bundle's pipeline with ``network``."""
    bundle = dataclasses.replace(loaded, network=network)
    out: list[dict] = []
    for group in groups:
        for case, result in zip(group["cases"], infer(bundle, group["images"], group["affines"], keep_heatmaps=True)):
            if isinstance(result, str):
                raise ExportError(f"check image {case}: {result}")
            out.append(result)
    return out


def _landmark_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance (mm) between two ``(N, D)`` landmark arrays; inf when only one is NaN."""
    missing_a, missing_b = np.isnan(a).any(axis=1), np.isnan(b).any(axis=1)
    if (missing_a != missing_b).any():
        return math.inf
    keep = ~missing_a
    return float(np.linalg.norm(a[keep] - b[keep], axis=1).max()) if keep.any() else 0.0


def check_export(loaded: LoadedBundle, exported: Callable, groups: Sequence[dict], example: torch.Tensor,
                 eager: Sequence[dict] | None = None) -> ExportCheck:
    """Run the check images through the bundle's pipeline with the eager and the exported
    network, plus ``example`` (``(1, C, *S)``) repeated :data:`DYNAMIC_BATCH` times through both
    networks directly; see the module documentation. ``eager``: the eager results of ``groups``
    when already computed (:func:`_run`)."""
    eager = _run(loaded, loaded.network, groups) if eager is None else eager
    other = _run(loaded, exported, groups)
    diff = scale = landmark = 0.0
    for e, o in zip(eager, other):
        diff = max(diff, float((e["heatmap"] - o["heatmap"]).abs().max()))
        scale = max(scale, float(e["heatmap"].abs().max()))
        landmark = max(landmark, _landmark_distance(np.asarray(e["world"]), np.asarray(o["world"])))
    x = example.repeat(DYNAMIC_BATCH, *([1] * (example.ndim - 1)))
    with torch.inference_mode():
        e, o = loaded.network(x).float(), exported(x).float()
    if o.shape != e.shape:
        raise ExportCheckError(f"with a batch of {DYNAMIC_BATCH} the exported model gives shape {tuple(o.shape)}, "
                               f"the eager one {tuple(e.shape)}")
    diff = max(diff, float((e - o).abs().max()))
    if not math.isfinite(diff):
        diff = math.inf
    sizes = sorted({len(g["cases"]) for g in groups} | {DYNAMIC_BATCH})
    return ExportCheck(cases=[c for g in groups for c in g["cases"]], batch_sizes=sizes, max_heatmap_diff=diff,
                       heatmap_scale=scale, max_landmark_mm=landmark)


# ---- the exporters --------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters: torch.jit's deprecation and tracer warnings, the ONNX exporter's progress
    lines (kept, and shown if it fails)."""
    text = io.StringIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # torch.export internals
        with contextlib.redirect_stdout(text):
            try:
                yield text
            except Exception as e:
                e.add_note(text.getvalue()[-2000:])
                raise


def _metadata(fmt: str, model: Path, loaded: LoadedBundle, description: dict | None, example: torch.Tensor,
              output_shape: Sequence[int]) -> dict:
    described = dict(description or {})
    described.setdefault("landmark_names", list(loaded.names))
    described.setdefault("spatial_dims", loaded.spatial_dims)
    described.setdefault("output_stride", list(loaded.output_stride))
    return plain({
        "format": EXPORT_FORMAT, "version": EXPORT_FORMAT_VERSION, "export_format": fmt,
        "model_file": model.name, "model_sha256": sha256_file(model), "description": described,
        "input": {"name": INPUT_NAME, "shape": ["batch", *example.shape[1:]], "dtype": "float32",
                  "meaning": "the bundle's preprocessed image, channel first (voxels of the network input grid)"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", *output_shape[1:]], "dtype": "float32",
                   "meaning": "one heatmap per landmark on the output grid (output_stride input voxels per voxel)"},
        "torch": torch.__version__,
    }, "export metadata")


def _write_torchscript(network: nn.Module, example: torch.Tensor, metadata: dict, tmp: Path) -> Callable:
    with _quiet():
        with torch.no_grad():
            traced = torch.jit.trace(network, example, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={METADATA_KEY: json.dumps(metadata)})
        return torch.jit.load(str(tmp), map_location="cpu")


def _write_onnx(network: nn.Module, example: torch.Tensor, metadata: dict, tmp: Path, opset: int) -> Callable:
    try:
        import onnx  # lazy: optional dependency (the `export` extra), only for --format onnx
        import onnxruntime as ort  # lazy: optional dependency (the `export` extra), only for --format onnx
    except ImportError as e:
        raise ExportError(f"--format onnx needs {e.name}, which is not installed: pip install 'heatmark[export]' "
                          "(onnx, onnxscript, onnxruntime)") from None
    x = example.repeat(2, *([1] * (example.ndim - 1)))  # torch.export treats a size of 1 as a constant
    with _quiet():
        program = torch.onnx.export(network, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset,
                                    verbose=False, optimize=False)  # ONNX Runtime optimises the graph itself
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    proto.doc_string = (f"heatmark landmark heatmaps of {metadata['model_file']} "
                        f"({', '.join(metadata['description'].get('landmark_names', []))})")[:2000]
    tmp.write_bytes(proto.SerializeToString())
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return OnnxRuntimeNetwork(session, metadata)


def load_torchscript(path: str | os.PathLike) -> tuple[Any, dict]:
    """``(module, metadata)`` of a ``models/model.ts`` written by :func:`export_model`."""
    extra = {METADATA_KEY: ""}
    with _quiet():
        module = torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA_KEY] or "{}")


def export_model(bundle: str | os.PathLike, fmt: str, model: str | os.PathLike | None = None,
                 configs: Sequence[str] = (), images: str | os.PathLike | None = None,
                 settings: ExportSettings | None = None, spacing: Sequence[float] | None = None,
                 pixel_units: bool = False, log: Callable[[str], None] | None = print) -> tuple[Path, ExportCheck]:
    """Export the network of ``bundle`` (its model file, or ``model``) as ``fmt`` beside the model
    file, after checking it; see the module documentation.

    Args:
        bundle: the bundle folder.
        fmt: ``torchscript`` or ``onnx``.
        model: the model file (default: the bundle's ``ckpt_path``, ``models/model.pt``).
        configs: overlays, as ``heatmark predict --config``.
        images: an image, a folder or a list file of check images (default: the bundle's ``val_datalist``).
        settings: the check settings (default: the bundle's ``export_*`` keys).
        spacing, pixel_units: as ``heatmark predict`` for images without a spacing.
        log: receives the result line (None: silent).

    Returns:
        ``(path, check)``: the file written and the check's figures.

    Raises:
        ExportError: no bundle or model, no check image, the exporter failed (nothing written).
        ExportCheckError: the exported model differs beyond the tolerance (nothing written).
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose among {', '.join(FORMATS)}")
    bundle = Path(os.path.expanduser(os.fspath(bundle)))
    opts = PredictOptions(bundle=bundle, input="", output="", model=model, configs=tuple(configs), device="cpu",
                          amp=False, spacing=None if spacing is None else list(spacing), pixel_units=pixel_units)
    try:
        loaded = load_bundle(opts)
    except PredictUsageError as e:
        raise ExportError(str(e)) from None
    parser = _parser(bundle, configs)
    settings = settings or settings_from_config(parser)
    model_path = (Path(os.path.expanduser(os.fspath(model))) if model
                  else Path(_setting(parser, "ckpt_path", bundle / "models" / "model.pt", str)))
    _, description = read_model_file(model_path)
    if images is not None:
        try:
            found = find_inputs(check_input(images), spatial_dims=loaded.spatial_dims)
        except PredictUsageError as e:
            raise ExportError(f"--images: {e}") from None
        paths = found[: max(1, settings.check_cases)]
    else:
        paths = _validation_images(parser, bundle, max(1, settings.check_cases))
    groups = _check_images(loaded, paths)

    network = loaded.network.eval()
    recorder = _InputRecorder(network)
    eager = _run(loaded, recorder, groups)  # the eager results, and the network's input as the inferer hands it
    if recorder.example is None:
        raise ExportError("the bundle's inferer never called the network on the check images", status=1)
    example = recorder.example.clone()  # recorded under inference mode; a clone outside it is a normal tensor
    with torch.inference_mode():
        output_shape = tuple(network(example).shape)
    metadata = _metadata(fmt, model_path, loaded, description, example, output_shape)

    target = exported_path(model_path, fmt)
    t0 = time.perf_counter()
    with atomic_path(target) as tmp:
        try:
            if fmt == "torchscript":
                exported = _write_torchscript(network, example, metadata, tmp)
            else:
                exported = _write_onnx(network, example, metadata, tmp, settings.onnx_opset)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"the {fmt} exporter failed for {type(network).__name__}: "
                              f"{describe(e).splitlines()[0][:300]}", status=1) from e
        check = check_export(loaded, exported, groups, example, eager)
        problems = []
        if not check.relative_heatmap_diff <= settings.heatmap_tolerance:
            problems.append(f"heatmap difference {check.relative_heatmap_diff:.3g} of the largest value > "
                            f"export_heatmap_tolerance {settings.heatmap_tolerance:g}")
        if not check.max_landmark_mm <= settings.landmark_tolerance_mm:
            problems.append(f"landmark difference {check.max_landmark_mm:.3g} mm > export_landmark_tolerance_mm "
                            f"{settings.landmark_tolerance_mm:g}")
        if problems:
            raise ExportCheckError(f"{target.name} refused, nothing written: {'; '.join(problems)} ({check.line()})")
    if log is not None:
        log(f"wrote {target} in {time.perf_counter() - t0:.1f} s; {check.line()}")
    return target, check


# ---- command line ---------------------------------------------------------------------------------

def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` command to ``subparsers`` (of ``argparse``); returns its parser."""
    p = subparsers.add_parser(
        "export", help="write the bundle's model as TorchScript or ONNX, checked against the eager model",
        description="Write BUNDLE's network as models/model.ts (TorchScript) and/or models/model.onnx (ONNX), beside "
                    "the model file, with a dynamic batch size and the model file's description as metadata. Each "
                    "file is checked against the eager network on a few images (the bundle's validation images, or "
                    "--images) and refused beyond the bundle's export_heatmap_tolerance / "
                    "export_landmark_tolerance_mm. Run an ONNX file with `heatmark predict --backend onnxruntime`.",
        epilog="Exit status: 0 written, 1 refused by the check or the exporter failed, 2 usage error.")
    p.add_argument("bundle", help="bundle folder with configs/ and models/model.pt")
    p.add_argument("--format", action="append", required=True, choices=FORMATS, dest="formats",
                   help="torchscript (models/model.ts) or onnx (models/model.onnx); repeatable")
    p.add_argument("--model", metavar="PATH", help="model file (default: the bundle's models/model.pt); the export "
                                                   "is written beside it")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="extra overlay config, as for predict")
    p.add_argument("--images", metavar="PATH", help="check images: an image, a folder or a .txt list (default: the "
                                                    "bundle's val_datalist)")
    p.add_argument("--cases", type=int, metavar="N", help="number of check images (default: export_check_cases)")
    p.add_argument("--heatmap-tolerance", type=float, metavar="FRACTION",
                   help="override export_heatmap_tolerance (fraction of the largest heatmap value)")
    p.add_argument("--landmark-tolerance-mm", type=float, metavar="MM", help="override export_landmark_tolerance_mm")
    p.add_argument("--spacing", type=lambda t: [float(v) for v in t.replace(",", " ").split()], metavar="MM[,MM]",
                   help="pixel spacing in mm for check images without one, as for predict")
    p.add_argument("--pixel-units", action="store_true", help="accept check images without any spacing, as for predict")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """``heatmark export``: 0 written, 1 refused or failed, 2 usage error (one line on stderr)."""
    bundle = Path(os.path.expanduser(args.bundle))
    try:
        settings = settings_from_config(_parser(bundle, args.config))
    except ExportError as e:
        print(f"heatmark export: error: {e}", file=sys.stderr)
        return 2
    if args.cases is not None:
        if args.cases < 1:
            print(f"heatmark export: error: --cases must be at least 1, got {args.cases}", file=sys.stderr)
            return 2
        settings.check_cases = args.cases
    if args.heatmap_tolerance is not None:
        settings.heatmap_tolerance = args.heatmap_tolerance
    if args.landmark_tolerance_mm is not None:
        settings.landmark_tolerance_mm = args.landmark_tolerance_mm
    status = 0
    for fmt in dict.fromkeys(args.formats):
        try:
            export_model(bundle, fmt, model=args.model, configs=args.config, images=args.images, settings=settings,
                         spacing=args.spacing, pixel_units=args.pixel_units,
                         log=lambda line: print(f"heatmark export: {line}"))
        except ExportError as e:
            print(f"heatmark export: error: {e}", file=sys.stderr)
            status = max(status, e.status)
    return status
