"""The ``heatmark`` command line: a thin layer over the library and MONAI bundles.

Exit status: 0 success, 1 failure of the work itself (e.g. some inputs failed), 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heatmark import __version__

__all__ = ["build_parser", "main", "parse_overrides"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b#c=[2, 3]", "name=text"]`` -> ``{"a": 1, "b#c": [2, 3], "name": "text"}``.

    Values are read as YAML (numbers, booleans, lists, null); anything else stays a string.
    """
    import yaml

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


def _check_bundle(path: str) -> Path:
    bundle = Path(path)
    if not (bundle / "configs").is_dir():
        raise UsageError(f"{bundle} is not a bundle folder (no configs/ inside)")
    return bundle


def cmd_train(args: argparse.Namespace) -> int:
    from monai.bundle import run

    bundle = _check_bundle(args.bundle)
    extra = list(args.config or []) + (["smoke.yaml"] if args.smoke else [])
    overrides = parse_overrides(args.set or [])
    if args.resume:
        overrides["resume"] = True
    kwargs: dict[str, Any] = {}
    if not args.no_tracking:
        kwargs["tracking"] = "mlflow"
    from heatmark.predict import bundle_config_files

    try:
        files = bundle_config_files(bundle, ("train.yaml",), extra)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    logging_file = bundle / "configs" / "logging.conf"
    run(
        run_id="training",
        bundle_root=str(bundle),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=[str(f) for f in files],
        logging_file=str(logging_file) if logging_file.exists() else None,
        **kwargs,
        **overrides,
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from heatmark.landmarks import read_landmark_table
    from heatmark.metrics import normalize_by_reference, point_errors, summarize
    from heatmark.reports import write_evaluation

    pred_table = read_landmark_table(args.pred)
    truth_table = read_landmark_table(args.truth)
    cases = [c for c in truth_table if c in pred_table]
    if not cases:
        raise UsageError(f"no case of {args.truth} appears in {args.pred}")
    missing = [c for c in truth_table if c not in pred_table]
    names = list(next(iter(truth_table.values())).names)
    pred_dims, truth_dims = pred_table[cases[0]].coords.shape[1], truth_table[cases[0]].coords.shape[1]
    if pred_dims != truth_dims:
        raise ValueError(f"{args.pred} holds {pred_dims}D landmarks but {args.truth} holds {truth_dims}D landmarks")
    pred_names = set(pred_table[cases[0]].names)
    if not pred_names & set(names):
        raise ValueError(f"{args.pred} shares no landmark name with {args.truth} "
                         f"(e.g. {sorted(pred_names)[0]!r} vs {names[0]!r})")
    pred = np.stack([pred_table[c].select(names).coords for c in cases])
    truth = np.stack([truth_table[c].coords for c in cases])
    errors = point_errors(pred, truth)
    if args.normalize:
        a, _, b = args.normalize.partition(",")
        errors = normalize_by_reference(pred, truth, (a.strip(), b.strip()), names, args.length)
    out = Path(args.output)
    files = write_evaluation(out, errors, cases, names, pred, truth)
    s = summarize(errors)
    print(f"{len(cases)} cases x {len(names)} landmarks" + (f" ({len(missing)} cases without prediction)" if missing else ""))
    print(f"MRE {s['mean']:.2f} +- {s['sd']:.2f} mm, median {s['median']:.2f} mm, max {s['max']:.2f} mm")
    print("SDR " + ", ".join(f"{k[4:-2]} mm {v:.1f}%" for k, v in s.items() if k.startswith("sdr_")))
    print(f"outliers > 10 mm: {s['outliers_10mm']} ({s['outliers_pct_10mm']:.2f}%); not detected: {s['n_not_detected']}")
    print(f"written: {', '.join(str(p) for p in files.values())}")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from heatmark.tracking import run_ui

    return run_ui(args.store, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heatmark",
        description="Anatomical landmark localization by heatmap regression (2D radiographs, 3D CT/MR), built on MONAI.",
    )
    parser.add_argument("--version", action="version", version=f"heatmark {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a bundle (MLflow tracking on by default)",
                       description="Short form of `python -m monai.bundle run training` on BUNDLE/configs/train.yaml.")
    p.add_argument("bundle", help="bundle folder, e.g. bundles/isbi2015_cephalometric")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable), "
                   "e.g. --set dataset_dir=../shared/data/isbi2015 --set max_epochs=10")
    p.add_argument("--config", action="append", metavar="YAML", help="extra overlay config (in configs/ or a path)")
    p.add_argument("--smoke", action="store_true", help="add the bundle's smoke.yaml overlay (tiny, fast)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)

    from heatmark.datasets import add_data_parser
    from heatmark.demo import add_demo_parser
    from heatmark.predict import add_predict_parser

    add_predict_parser(sub)
    add_demo_parser(sub)
    add_data_parser(sub)

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
                       description="Start `mlflow ui` on the SQLite store of a bundle's runs.")
    p.add_argument("store", nargs="?", default="bundles/isbi2015_cephalometric/runs",
                   help="folder holding mlruns.db, or a sqlite:/// URI (default: the ISBI bundle's runs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return int(args.func(args) or EXIT_OK)
    except UsageError as e:
        print(f"heatmark {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as e:
        print(f"heatmark {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"heatmark {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
