"""The ``heatmark`` command line: a thin layer over the library and MONAI bundles.

Exit status: 0 success, 1 failure of the work itself (e.g. some inputs failed), 2 usage errors.

Start-up: torch and MONAI take seconds to import, so this module imports them (through the rest of
heatmark) only for the command that runs: ``heatmark --help``, ``--version`` and ``configs`` answer
at once. Commands defined beside their code (:data:`COMMANDS`) are loaded by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from heatmark import __version__
from heatmark.bundle import CONFIG_DIR, WORKFLOWS, BundleError, bundle_config_files, config_file_arg, run_bundle

__all__ = ["build_parser", "main", "parse_overrides"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: commands defined beside their code: name -> (module, function adding its parser, one-line help for
#: ``heatmark --help``; tests/test_cli_data.py checks it against the command's own)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "predict": ("heatmark.predict.cli", "add_predict_parser",
                "run a trained bundle over images: landmarks in world mm (CSV, Slicer)"),
    "demo": ("heatmark.demo", "add_demo_parser", "train, evaluate and predict on real MR data in one go"),
    "data": ("heatmark.data.fetch", "add_data_parser", "download public example data (AFIDs brain MR landmarks)"),
    "export": ("heatmark.exporting", "add_export_parser",
               "write the bundle's model as TorchScript or ONNX, checked against the eager model"),
    "metadata": ("heatmark.bundle", "add_metadata_parser",
                 "record the trained model in large_files.yml and the last evaluation in metadata.json"),
}


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b#c=[2, 3]", "name=text"]`` -> ``{"a": 1, "b#c": [2, 3], "name": "text"}``.

    Values are read as YAML (numbers, booleans, lists, null); anything else stays a string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    overlays = list(args.config or []) + (["smoke.yaml"] if args.smoke else [])
    overrides = parse_overrides(args.set or [])
    if args.resume:
        overrides["resume"] = True
    run_bundle(args.bundle, "training", overlays, tracking=None if args.no_tracking else "mlflow", **overrides)
    return EXIT_OK


def cmd_configs(args: argparse.Namespace) -> int:
    if args.bundle is None:
        print(CONFIG_DIR)
    else:
        print(config_file_arg(bundle_config_files(args.bundle, args.workflow, args.overlays)))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from heatmark.evaluation.evaluate import evaluate_tables, summary_lines  # lazy: CLI start-up (torch)

    normalize = [n.strip() for n in args.normalize.split(",", 1)] if args.normalize else None
    result = evaluate_tables(args.pred, args.truth, args.output, normalize, args.length)
    print("\n".join(summary_lines(result)))
    return EXIT_OK


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_ui(args: argparse.Namespace) -> int:
    from heatmark.training.tracking import run_ui  # lazy: CLI start-up (torch, MONAI, mlflow)

    return run_ui(args.store, host=args.host, port=args.port, workers=args.workers)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``heatmark`` parser. Of the :data:`COMMANDS`, only ``command``'s module is imported and
    its full parser added; the others appear in the command list with their one-line help."""
    parser = argparse.ArgumentParser(
        prog="heatmark",
        description="Anatomical landmark localization by heatmap regression (2D radiographs, 3D CT/MR), built on MONAI.",
    )
    parser.add_argument("--version", action="version", version=f"heatmark {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a bundle (MLflow tracking on by default)",
                       description="Short form of `python -m monai.bundle run training` with heatmark's base config "
                                   "and BUNDLE/configs/train.yaml (see `heatmark configs`).")
    p.add_argument("bundle", help="bundle folder, e.g. bundles/isbi2015_cephalometric")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable), "
                   "e.g. --set dataset_dir=../shared/data/isbi2015 --set max_epochs=10")
    p.add_argument("--config", action="append", metavar="YAML", help="extra overlay config (in configs/ or a path)")
    p.add_argument("--smoke", action="store_true", help="add the bundle's smoke.yaml overlay (tiny, fast)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("configs", help="the config files of a bundle workflow, for `python -m monai.bundle run`",
                       description="Without BUNDLE: the folder of the configs shipped with heatmark (base.yaml, "
                                   "evaluate.yaml, inference.yaml, multi_gpu_train.yaml, logging.conf). With BUNDLE: "
                                   "the --config_file value of WORKFLOW, e.g. python -m monai.bundle run training "
                                   "--bundle_root B --meta_file B/configs/metadata.json --config_file \"$(heatmark "
                                   "configs B training)\".")
    p.add_argument("bundle", nargs="?", help="bundle folder")
    p.add_argument("workflow", nargs="?", default="training", choices=list(WORKFLOWS),
                   help="training (default), evaluating, inference or multi_gpu")
    p.add_argument("overlays", nargs="*", help="overlays to add last (in BUNDLE/configs or paths), e.g. cpu.yaml")
    p.set_defaults(func=cmd_configs)

    for name, (module, add, text) in COMMANDS.items():
        if name == command:
            getattr(importlib.import_module(module), add)(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)

    p = sub.add_parser("evaluate", help="point errors in mm between two landmark tables",
                       description="Compare predicted with true landmarks (CSV/JSON tables in world mm): MRE, SDR, "
                                   "outliers, per-landmark table and plots.")
    p.add_argument("pred", help="predicted landmarks, e.g. landmarks.csv from heatmark predict")
    p.add_argument("truth", help="true landmarks, same format")
    p.add_argument("--output", default="evaluation", help="output folder (default: ./evaluation)")
    p.add_argument("--normalize", metavar="A,B", help="rescale errors so that the true distance A-B equals --length")
    p.add_argument("--length", type=float, default=50.0, help="reference length in mm for --normalize (default 50)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ui", help="open the MLflow UI on a run store",
                       description="Start `mlflow ui` on the SQLite store of a bundle's runs. Ctrl+C, SIGTERM "
                                   "and SIGHUP stop the server and every process it started.")
    p.add_argument("store", nargs="?", default="bundles/isbi2015_cephalometric/runs",
                   help="folder holding mlruns.db, or a sqlite:/// URI (default: the ISBI bundle's runs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="MLflow server worker processes (default 1; one is plenty for one person's runs)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return int(args.func(args) or EXIT_OK)
    except (UsageError, BundleError) as e:
        print(f"heatmark {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as e:
        print(f"heatmark {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # disk full, read-only folder, permissions: one line, no traceback
        if getattr(args, "debug", False):
            raise
        print(f"heatmark {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"heatmark {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
