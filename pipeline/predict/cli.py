"""The ``heatmark predict`` command line: :func:`add_predict_parser` (for ``heatmark``'s
subcommands), :func:`cmd_predict` and :func:`main` (``python -m heatmark.predict``); and
:func:`run_inference`, what ``python -m monai.bundle run inference`` calls (``inference#run`` in the
shipped ``inference.yaml``): the same run, its options taken from the bundle config.

Exit status: 0 all inputs done (or skipped as done before), 1 some failed (see errors.csv) or
OUTPUT could not be written (one line; ``--debug`` adds the traceback), 2 usage errors (missing
bundle or model, no inputs, bad option, symbolic links in OUTPUT), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from heatmark.predict.errors import PredictOutputError, PredictUsageError, describe
from heatmark.predict.options import (
    DEFAULT_FORMATS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    FORMATS,
    PredictOptions,
)
from heatmark.predict.runner import run_predict

__all__ = ["add_predict_parser", "cmd_predict", "main", "predict_and_report", "run_inference"]

def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _spacing(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected mm per axis like 0.1 or 0.1,0.1, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"spacing must be positive numbers (mm), got {text!r}")
    return values


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder with configs/ and models/model.pt")
    p.add_argument("input", help="an image, a folder of images, or a .txt/.lst file listing paths "
                                 "(one per line, relative to the list's folder)")
    p.add_argument("output", help="output folder (created; a rerun into it resumes)")
    p.add_argument("--model", metavar="PATH", help="network weights (default: the bundle's ckpt_path, "
                                                   "models/model.pt)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="extra overlay config after base.yaml + the bundle's train.yaml + inference.yaml "
                        "(in the bundle's configs/ or a path; repeatable)")
    p.add_argument("--recursive", action="store_true", help="look for images in subfolders too")
    p.add_argument("--pattern", metavar="GLOB", help="take the files whose name (or path below INPUT) matches, "
                                                     "e.g. '*_t1.nii.gz'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1, help="cases per forward pass (default 1)")
    p.add_argument("--num-workers", type=_int_at_least(0), default=None,
                   help="data loading processes (default min(4, CPUs); 0 loads in the main process)")
    p.add_argument("--spacing", type=_spacing, metavar="MM[,MM]",
                   help="pixel spacing in mm for images without one (PNG/JPEG...); "
                        "overrides the bundle's image_spacing")
    p.add_argument("--pixel-units", action="store_true",
                   help="accept images without any spacing as 1 mm per pixel (results are then in pixel units)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (fp16 on CUDA, bf16 on CPU; default: the bundle's amp, on CUDA only)")
    p.add_argument("--format", action="append", metavar="FMT", dest="formats",
                   help=f"outputs among {', '.join(FORMATS)}; repeatable or comma-separated "
                        f"(default: {','.join(DEFAULT_FORMATS)}); csv is the table landmarks.csv")
    p.add_argument("--save-heatmaps", action="store_true", help="write <case>_heatmaps.nii.gz (network output grid)")
    p.add_argument("--overlays", action="store_true", help="write <case>_overlay.png")
    p.add_argument("--overwrite", action="store_true", help="redo cases already done in OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="where the network runs: torch (default; the model file, --device) or onnxruntime "
                        "(models/model.onnx from `heatmark export BUNDLE --format onnx`, on CPU)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error that stops the run")


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``predict`` command to ``subparsers`` (of ``argparse``); returns its parser."""
    p = subparsers.add_parser(
        "predict", help="run a trained bundle over images: landmarks in world mm (CSV, Slicer)",
        description="Run the model of BUNDLE over INPUT and write landmarks in world mm (RAS) to OUTPUT: "
                    "landmarks.csv, one Slicer .mrk.json per case, measurements.csv, errors.csv. Bad inputs are "
                    "listed in errors.csv and do not stop the run; a rerun into the same OUTPUT resumes.",
        epilog="Exit status: 0 all done, 1 some inputs failed or OUTPUT could not be written, 2 usage error, "
               "130 interrupted.")
    _add_arguments(p)
    p.set_defaults(func=cmd_predict)
    return p


def _options_from_args(args: argparse.Namespace) -> PredictOptions:
    return PredictOptions(
        bundle=args.bundle, input=args.input, output=args.output, model=args.model,
        configs=tuple(args.config or ()), device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, spacing=args.spacing, pixel_units=args.pixel_units, amp=args.amp,
        save_heatmaps=args.save_heatmaps, overlays=args.overlays,
        formats=tuple(args.formats) if args.formats else DEFAULT_FORMATS, overwrite=args.overwrite,
        recursive=args.recursive, pattern=args.pattern, progress=not args.quiet,
        backend=getattr(args, "backend", "torch"))


def cmd_predict(args: argparse.Namespace) -> int:
    """``heatmark predict``: returns the exit status (0, 1, 2 or 130); see :func:`predict_and_report`."""
    return predict_and_report(_options_from_args(args), debug=bool(getattr(args, "debug", False)))


def predict_and_report(opts: PredictOptions, debug: bool = False, prog: str = "heatmark predict") -> int:
    """Run :func:`run_predict` and report as the command line does; returns the exit status.

    An error that stops the run is one line on stderr (with ``debug``, after its traceback):
    a usage error exits 2; a failure to write OUTPUT (:class:`PredictOutputError`) or any other
    ``OSError`` (reading the bundle, say) exits 1. Under torchrun only rank 0 prints the summary
    (the counts of all processes).
    """
    try:
        summary = run_predict(opts)
    except PredictUsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (PredictOutputError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e if isinstance(e, PredictOutputError) else describe(e)}", file=sys.stderr)
        return EXIT_FAILED
    if summary.rank == 0:
        print(f"{prog}: {summary.line()}")
    if summary.interrupted:
        print(f"{prog}: interrupted; the files in {summary.output} are consistent for the cases done. "
              "Run the same command again to resume.", file=sys.stderr)
    return summary.exit_code


def run_inference(bundle_root: str | os.PathLike, input_dir: str | os.PathLike | None,
                  output_dir: str | os.PathLike, options: Mapping[str, Any] | None = None) -> int:
    """``python -m monai.bundle run inference``: ``heatmark predict bundle_root input_dir output_dir``
    with ``options`` (the config's ``predict_options``: :class:`PredictOptions` fields such as
    ``configs``, ``device``, ``batch_size``, ``formats``). Same outputs, resume and torchrun sharding.

    Returns 0 when every input is done; otherwise stops the process with the exit status of
    ``heatmark predict`` (1 some inputs failed, 2 usage error, 130 interrupted) after one line.
    """
    prog = "heatmark inference"
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(PredictOptions)} - {"bundle", "input", "output"}
    unknown = sorted(set(options) - fields)
    if unknown:
        print(f"{prog}: error: unknown predict_options {', '.join(map(repr, unknown))}; known: "
              f"{', '.join(sorted(fields))}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    if input_dir is None or not str(input_dir).strip():
        print(f"{prog}: error: no input: pass --input_dir IMAGES (an image, a folder or a .txt/.lst list)",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    if "configs" in options:
        options["configs"] = tuple(options["configs"] or ())
    opts = PredictOptions(bundle=bundle_root, input=input_dir, output=output_dir, **options)
    code = predict_and_report(opts, prog=prog)
    if code != EXIT_OK:
        raise SystemExit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m heatmark.predict BUNDLE INPUT OUTPUT [options]``."""
    parser = argparse.ArgumentParser(prog="heatmark")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
