"""Shared channels vs one channel per landmark on AFIDs (issue #16), at the same CPU budget.

Runs (each trains the ``afids_brain_mr`` bundle with ``configs/cpu.yaml`` in its own folder, within
``--minutes`` of wall time and the overlay's epoch cap, then is evaluated on the same held-out
deformations: the bundle's ``eval_datalist``, fixed by ``eval_seed``):

- ``per_landmark``:      32 channels, no flip (the bundle as shipped).
- ``shared``:            ``configs/shared_pairs.yaml``: the 11 R/L pairs in 11 shared channels (21 in
                         all), left/right flip on (probability 0.5); peaks named by RAS side.
- ``per_landmark_flip``: 32 channels with the same flip (pairs swapped by ``flip_pairs``): separates
                         the effect of the flip from that of sharing (not in the default runs).

Reported per run, all in world mm over every (case, landmark) of the held-out set
(heatmark.evaluation.metrics): MRE, median, errors > 4 mm and > 10 mm (count and percent; a landmark
not detected counts as > r), landmarks not detected, L/R swaps (a pair whose predictions fit the
truth better exchanged, :func:`~heatmark.evaluation.metrics.left_right_swaps`, out of the
case x pair count), the MRE of the 22 paired and of the 10 midline landmarks, training minutes and
epochs.

Each run writes ``<out>/<run>_<minutes>min/result.json``; a finished run is not repeated unless
``--rerun``. The script ends with a markdown table of every finished run in ``<out>``.

Usage: python bench/shared_channels.py [--runs per_landmark shared] [--minutes 15] [--threads N]
       [--out bench/results/shared_channels] [--rerun]
       python bench/shared_channels.py --tiny      # seconds: smoke.yaml grid, 2 epochs, 2 eval cases
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from _timing import header
from heatmark.bundle import bundle_command, bundle_config_files
from heatmark.core.fileio import atomic_write_text
from heatmark.evaluation.metrics import left_right_swaps, point_errors, summarize

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "afids_brain_mr"
AFIDS_DIR = REPO.parent / "shared" / "data" / "afids"
RUNS: dict[str, dict] = {
    "per_landmark": {"label": "one channel per landmark (32), no flip", "overlays": []},
    "shared": {"label": "R/L pairs shared (21 channels), flip 0.5", "overlays": ["shared_pairs.yaml"]},
    "per_landmark_flip": {"label": "one channel per landmark (32), flip 0.5 with pair swap", "overlays": [],
                          "set": {"flip_prob": 0.5}},
}
DEFAULT_RUNS = ("per_landmark", "shared")
COLUMNS = ["run", "MRE mm", "median", "> 4 mm", "> 4 mm %", "> 10 mm", "not detected", "L/R swaps",
           "MRE paired", "MRE midline", "train min", "epochs"]


def _evaluate(root: Path, overlays: list[str], data_dir: Path, extra: dict) -> dict:
    """The trained model of ``root`` on the held-out deformations, in this process: world predictions
    and truth per case through the bundle's own evaluator, then the statistics."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(BUNDLE, "evaluating", overlays)])
    parser["bundle_root"] = str(root)
    parser["dataset_dir"] = str(data_dir)
    for key, value in extra.items():
        parser[key] = value
    evaluator = parser.get_parsed_content("evaluator")
    names = list(parser.get_parsed_content("landmark_names"))
    pairs = [tuple(p) for p in parser.get_parsed_content("flip_pairs")]
    pred, truth = [], []

    def collect(engine) -> None:
        pred.append(torch.as_tensor(engine.state.output["pred_world"]).double().cpu().numpy())
        truth.append(torch.as_tensor(engine.state.batch["landmarks"]).double().cpu().numpy())

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
    evaluator.run()
    p, t = np.concatenate(pred), np.concatenate(truth)
    errors = point_errors(p, t)
    paired = sorted({i for pair in pairs for i in pair})
    midline = [i for i in range(len(names)) if i not in paired]
    s = summarize(errors, radii=(2.0, 4.0), outlier_radii=(4.0, 10.0))
    return {"n_cases": int(p.shape[0]), "mre": s["mean"], "median": s["median"], "over_4mm": s["outliers_4mm"],
            "over_4mm_pct": s["outliers_pct_4mm"], "over_10mm": s["outliers_10mm"],
            "not_detected": s["n_not_detected"], "lr_swaps": left_right_swaps(p, t, pairs),
            "lr_pairs_evaluated": int(p.shape[0]) * len(pairs),
            "mre_paired": summarize(errors[:, paired])["mean"] if paired else math.nan,
            "mre_midline": summarize(errors[:, midline])["mean"] if midline else math.nan}


def run(name: str, root: Path, data_dir: Path, minutes: float, base: str, extra: dict, env: dict) -> dict:
    """Train one run in ``root`` (its ``bundle_root``) within ``minutes``, then evaluate it."""
    spec = RUNS[name]
    overlays = [base, *spec["overlays"]]
    settings = {"dataset_dir": data_dir, "time_limit_minutes": minutes, **spec.get("set", {}), **extra}
    root.mkdir(parents=True, exist_ok=True)
    log = root / "train.log"
    print(f"[{name}] training ({minutes:g} min budget, {' + '.join(overlays)}), log: {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(bundle_command(BUNDLE, "training", overlays, bundle_root=root, **settings),
                       stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO, env=env)
    train_s = time.perf_counter() - t0
    epochs = len(re.findall(r"LandmarkTrainer - INFO - Epoch\[\d+\] Complete", log.read_text(errors="replace")))
    print(f"[{name}] evaluating on the held-out deformations", flush=True)
    result = _evaluate(root, overlays, data_dir, {k: v for k, v in settings.items() if k != "dataset_dir"})
    return {**result, "train_minutes": train_s / 60, "epochs": epochs}


def _f(x: float, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS), choices=list(RUNS))
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall time per run (default 15)")
    ap.add_argument("--threads", type=int, default=0, help="torch / OpenMP threads (default: torch's choice)")
    ap.add_argument("--data", type=Path, default=AFIDS_DIR, help="the AFIDs folder (`heatmark data afids`)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shared_channels")
    ap.add_argument("--rerun", action="store_true", help="repeat runs whose result.json exists")
    ap.add_argument("--tiny", action="store_true",
                    help="a seconds-long check that the script works: smoke.yaml, 2 epochs, 2 eval cases")
    args = ap.parse_args(argv)
    if not (args.data / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz").is_file():
        sys.exit(f"AFIDs data not found in {args.data}: run `heatmark data afids` or pass --data")
    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    base, extra = ("smoke.yaml", {"num_eval_cases": 2, "val_overlays": 0, "eval_overlays": 0}) if args.tiny \
        else ("cpu.yaml", {})
    out = args.out / "tiny" if args.tiny else args.out
    hw = header("bench/shared_channels.py")
    print(hw, flush=True)
    for name in args.runs:
        root = out / f"{name}_{args.minutes:g}min"
        res_file = root / "result.json"
        if res_file.is_file() and not args.rerun:
            print(f"[{name}] result exists ({res_file}); --rerun repeats it", flush=True)
            continue
        try:
            res = run(name, root, args.data, args.minutes, base, extra, env)
        except (subprocess.CalledProcessError, RuntimeError) as e:  # one failed run does not stop the others
            print(f"[{name}] FAILED: {e} (see {root})", flush=True)
            continue
        res.update(run=name, label=RUNS[name]["label"], budget_minutes=args.minutes, tiny=args.tiny,
                   date=datetime.date.today().isoformat(), hardware=hw, command=" ".join(sys.argv))
        atomic_write_text(res_file, json.dumps(res, indent=1))
        print(f"[{name}] MRE {res['mre']:.2f} mm, > 4 mm {res['over_4mm']}, L/R swaps {res['lr_swaps']}", flush=True)

    rows = []
    for f in sorted(out.glob("*/result.json")):
        r = json.loads(f.read_text())
        rows.append([f"{r['label']}, {r['budget_minutes']:g} min", _f(r["mre"]), _f(r["median"]), str(r["over_4mm"]),
                     _f(r["over_4mm_pct"], 1), str(r["over_10mm"]), str(r["not_detected"]),
                     f"{r['lr_swaps']} / {r['lr_pairs_evaluated']}", _f(r["mre_paired"]), _f(r["mre_midline"]),
                     _f(r["train_minutes"], 1), str(r["epochs"])])
    print(f"\n{hw}; results in {out}" + (" (--tiny: a check of the script, not a result)" if args.tiny else ""))
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
