"""AFIDs brain MR: the CPU coarse-to-fine cascade against the single-stage CPU model, at the same
total training budget, side by side in one run.

- ``single``:  the bundle with ``cpu.yaml`` (4 mm whole head), trained for ``--minutes``.
- ``cascade``: ``cpu.yaml`` + ``cascade.yaml`` + ``cpu_cascade.yaml``: stage 1 the same 4 mm model for
  ``--share`` of the minutes, stage 2 (1 mm patches around each stage-1 estimate) for the rest.

Both are scored by ``heatmark predict`` (the cascade runs both stages) and ``heatmark evaluate`` on
full-resolution (1 mm) volumes: the bundle's ``num_eval_cases`` (16) evaluation deformations,
drawn with its ``eval_seed`` and deformation ranges by :func:`heatmark.demo.write_deformed_cases`
(the same ranges as training, at the template's 1 mm: `run evaluating` deforms the 4 mm network
input instead, which would hide what a 1 mm stage adds), and the demo's three held-out volumes
(seeds 900000..). Printed: MRE, median, SDR 2 / 4 mm, count > 10 mm, and a per-landmark table.
The single-stage model's own ``run evaluating`` MRE (4 mm deformations) is printed for reference.

Target (issue #12): cascade MRE <= 1.5 mm with <= 20 minutes of total CPU training on 2 cores.

Usage: python bench/afids_cascade.py [--minutes 20] [--share 0.5] [--out bench/results/afids_cascade]
       python bench/afids_cascade.py --smoke     (seconds: smoke overlays, 2 volumes; checks that it runs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _timing import REPO, header, table
from monai.bundle import ConfigParser

from heatmark.bundle import bundle_command, bundle_config_files
from heatmark.demo import write_deformed_cases
from heatmark.evaluation.evaluate import evaluate_tables
from heatmark.evaluation.metrics import per_landmark_table
from heatmark.predict import PredictOptions, run_predict

BUNDLE = REPO / "bundles" / "afids_brain_mr"
AFIDS = REPO.parent / "shared" / "data" / "afids"
HELDOUT_SEED = 900_000  # the demo's held-out volumes

SETTINGS = {
    "full": {"single": ["cpu.yaml"], "cascade": ["cpu.yaml", "cascade.yaml", "cpu_cascade.yaml"]},
    "smoke": {"single": ["smoke.yaml"], "cascade": ["smoke.yaml", "cascade.yaml", "smoke_cascade.yaml"]},
}


def train(name: str, overlays: list[str], root: Path, data: Path, budgets: dict) -> float:
    """Train one run with ``bundle_root`` ``root``; returns the wall time in minutes."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "train.log"
    print(f"[{name}] training ({', '.join(overlays)}; {budgets}), log: {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(bundle_command(BUNDLE, "training", overlays, bundle_root=root, dataset_dir=data, **budgets),
                       stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    return (time.perf_counter() - t0) / 60


def bundle_view(root: Path, coarse_only: bool = False) -> Path:
    """A bundle folder for ``heatmark predict``: the repository's configs, the run's models (with
    ``coarse_only``, the coarse model alone: a cascade's stage 1 without its fine stage)."""
    view = root / ("bundle_coarse" if coarse_only else "bundle")
    if not view.exists():
        view.mkdir()
        (view / "configs").symlink_to(BUNDLE / "configs")
        if coarse_only:
            (view / "models").mkdir()
            (view / "models" / "model.pt").symlink_to(root / "models" / "model.pt")
        else:
            (view / "models").symlink_to(root / "models")
    return view


def score(name: str, root: Path, overlays: list[str], volumes: Path, truth: Path, tag: str,
          coarse_only: bool = False) -> dict:
    """``heatmark predict`` over ``volumes`` with the run's models, ``heatmark evaluate`` against ``truth``."""
    tag = f"{tag}_coarse" if coarse_only else tag
    pred = root / f"pred_{tag}"
    summary = run_predict(PredictOptions(bundle=bundle_view(root, coarse_only), input=volumes, output=pred,
                                         configs=tuple(overlays), overwrite=True, progress=False, num_workers=0))
    print(f"[{name}] {tag}: {summary.line()}", flush=True)
    result = evaluate_tables(pred / "landmarks.csv", truth, root / f"eval_{tag}")
    return {"summary": dict(result.summary), "errors": np.asarray(result.errors), "names": list(result.names)}


def _f(x: float, nd: int = 2) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="total training wall time per run (default 20)")
    ap.add_argument("--share", type=float, default=0.5, help="share of --minutes for the cascade's stage 1 (default 0.5)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "afids_cascade")
    ap.add_argument("--data", type=Path, default=AFIDS, help="AFIDs folder (heatmark data afids)")
    ap.add_argument("--smoke", action="store_true", help="smoke overlays and 2 + 1 volumes: seconds, checks it runs")
    ap.add_argument("--rerun", action="store_true", help="train again even where models exist")
    args = ap.parse_args()
    settings = SETTINGS["smoke" if args.smoke else "full"]
    data = args.data.resolve()
    if not data.is_dir():
        sys.exit(f"AFIDs data not found at {data} (heatmark data afids prints the folder)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    hw = header("bench/afids_cascade.py")
    print(hw, flush=True)

    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(BUNDLE, "training", settings["single"])])
    n_eval = 2 if args.smoke else int(parser["num_eval_cases"])
    eval_seed = int(parser["eval_seed"])
    sets = {}
    for tag, count, seed in (("eval", n_eval, eval_seed), ("heldout", 1 if args.smoke else 3, HELDOUT_SEED)):
        folder = out / f"volumes_{tag}"
        truth = folder / "truth.csv"
        if not truth.is_file():
            print(f"writing {count} {tag} volumes at 1 mm (seeds {seed}..)", flush=True)
            write_deformed_cases(BUNDLE, data, folder, count, seed0=seed, overlays=settings["single"])
        sets[tag] = (folder, truth)

    runs = {
        "single": (settings["single"], {"time_limit_minutes": args.minutes}),
        "cascade": (settings["cascade"], {"time_limit_minutes": args.minutes * args.share,
                                          "fine_time_limit_minutes": args.minutes * (1 - args.share)}),
    }
    results = {}
    for name, (overlays, budgets) in runs.items():
        root = out / f"{name}_{args.minutes:g}min"
        done = root / "train_minutes.json"
        if args.rerun or not done.is_file():
            if root.exists():
                shutil.rmtree(root)
            minutes = train(name, overlays, root, data, budgets)
            done.write_text(json.dumps({"train_minutes": minutes}))
        minutes = json.loads(done.read_text())["train_minutes"]
        results[name] = {"train_minutes": minutes,
                         **{tag: score(name, root, overlays, *sets[tag], tag) for tag in sets}}
        if name == "cascade":  # its stage 1 alone: what the fine stage adds
            results["cascade stage 1 alone"] = {
                "train_minutes": minutes, **{tag: score(name, root, overlays, *sets[tag], tag, coarse_only=True)
                                             for tag in sets}}
        if name == "single":
            with open(root / "evaluate.log", "w") as f:  # today's number: `run evaluating` on the 4 mm deformations
                subprocess.run(bundle_command(BUNDLE, "evaluating", overlays, bundle_root=root, dataset_dir=data),
                               stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
            results[name]["run_evaluating"] = json.loads((root / "runs" / "eval" / "metrics.json").read_text())

    print(f"\n{hw}\nAFIDs, {args.minutes:g} min total training per run; errors in mm on 1 mm volumes")
    columns = ["run", "volumes", "train min", "MRE", "median", "SDR 2 mm %", "SDR 4 mm %", "> 10 mm", "missing"]
    rows = []
    for name, r in results.items():
        for tag in sets:
            s = r[tag]["summary"]
            rows.append([name, f"{tag} ({s['n_cases']})", _f(r["train_minutes"], 1), _f(s["mean"]), _f(s["median"]),
                         _f(s["sdr_2mm"], 1), _f(s["sdr_4mm"], 1), str(s["outliers_10mm"]), str(s["n_not_detected"])])
    print(table(columns, rows))
    ref = results["single"]["run_evaluating"]
    print(f"single stage, `run evaluating` on its 4 mm evaluation deformations: MRE {_f(ref['mean'])} mm")
    ratio = results["cascade"]["eval"]["summary"]["mean"] / results["single"]["eval"]["summary"]["mean"]
    print(f"cascade / single MRE on the evaluation volumes: {ratio:.2f}")

    single = per_landmark_table(results["single"]["eval"]["errors"], results["single"]["eval"]["names"])
    cascade = per_landmark_table(results["cascade"]["eval"]["errors"], results["cascade"]["eval"]["names"])
    print("\nper landmark, evaluation volumes (mean / median mm):")
    print(table(["landmark", "single mean", "single median", "cascade mean", "cascade median"],
                [[a["name"], _f(a["mean"]), _f(a["median"]), _f(b["mean"]), _f(b["median"])]
                 for a, b in zip(single, cascade)]))
    (out / "results.json").write_text(json.dumps(
        {k: {"train_minutes": v["train_minutes"], **{t: v[t]["summary"] for t in sets}} for k, v in results.items()},
        indent=1, default=float))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
