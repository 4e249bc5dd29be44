"""Accuracy on the ISBI 2015 cephalograms: train on ``train`` (150 images), evaluate on ``test1`` (150).

Every run trains within a wall-time budget (``--minutes``; runs compared with each other use the
same) on this machine and is evaluated on all 150 test1 images with the same statistics code (heatmark.evaluation.metrics):

- ``scn``:          the bundle ``isbi2015_cephalometric`` with ``configs/cpu.yaml`` (SCN 2019).
- ``baseline``:     what a MONAI user would write without heatmark (:func:`train_monai_baseline`):
                    MONAI ``BasicUNet``, targets from ``monai.transforms.GenerateHeatmapd`` scaled by
                    ``--baseline-target-scale``, MSE, the same affine augmentation applied to image
                    and heatmaps, integer argmax decoding, pixel -> mm by the grid's spacing.
- ``unet``, ``downsampling``: the ``scn`` pipeline with only the network changed (heatmark's U-Net /
                    Downsampling-Net, same width).
- ``scn_10``, ``unet_10``: SCN and U-Net trained on only 10 training images (+2 for model
                    selection), the robustness comparison of Payer et al. 2016 (outliers > 4 mm).
- ``cascade``:      the coarse-to-fine cascade at the same total budget: stage 1 = ``scn`` (cpu.yaml,
                    1 mm) for ``--cascade-share`` of the minutes, stage 2 = 0.4 mm patches of the original
                    images (``cascade.yaml`` + ``cpu_cascade.yaml``) for the rest; scored on test1 through
                    ``heatmark predict`` (both stages) and ``heatmark evaluate``; its stage 1 alone is
                    reported too (``run evaluating``), so the table shows what the fine stage adds.
- ``scn_full``:     the bundle's full settings (``train.yaml`` alone: 0.75 mm, 128-filter SCN,
                    100 epochs); meant for a GPU, not run unless asked for.

The inter-observer row compares ``landmarks_senior.csv`` with ``landmarks_junior.csv`` on the same
test1 images; the published rows are figures from the papers, not runs of this script.

Each run writes ``<out>/<run>_<minutes>min/result.json`` (``<out>/scn_full`` for the full
settings); a run whose result exists is not repeated unless ``--rerun`` is given, so the runs can
be spread over several invocations. The script ends with markdown tables of every finished run in
``<out>``: the statistics, the landmarks that failed on >= 90% of the images (error > 10 mm) with
the statistics without them, and the per-landmark table of the longest ``scn`` run.

Usage: python bench/isbi2015.py [--runs scn baseline ...] [--minutes 30] [--out bench/results/isbi2015]
       [--rerun] [--threads N]
The README's rows: ``--minutes 15`` (default runs except the 10-image ones), ``--runs scn_10 unet_10
--minutes 5`` and ``--runs scn --minutes 45``; ``--runs`` alone prints the table of finished runs.
Targets (issue #6, CPU, <= 90 min): test1 MRE <= 1.4 mm, SDR@2mm >= 82 %, errors > 10 mm <= 0.5 %.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from _timing import REPO, header, require_isbi, table

from heatmark.bundle import bundle_command
from heatmark.core.geometry import voxel_to_world, world_to_voxel
from heatmark.data import split_datalist
from heatmark.core.fileio import atomic_write_text as atomic_write
from heatmark.evaluation.evaluate import evaluate_tables
from heatmark.landmarks import read_landmark_table, write_landmark_table
from heatmark.evaluation.metrics import point_errors, summarize

BUNDLE = REPO / "bundles" / "isbi2015_cephalometric"

#: Published figures (test1, 150 images), for the table only.
PUBLISHED = [
    # label, MRE, SDR 2 / 2.5 / 3 / 4 mm
    ("Payer et al. 2019 SCN, as reported by `landmarker` (published)", 1.20, (84.5, 90.2, 93.5, 97.2)),
]

_NET = {
    "unet": {"_target_": "heatmark.networks.HeatmapUNet"},
    "downsampling": {"_target_": "heatmark.networks.DownsamplingNet"},
}
RUNS: dict[str, dict] = {
    "scn": {"label": "heatmark SCN 2019 (cpu.yaml)"},
    "baseline": {"label": "MONAI baseline: BasicUNet + GenerateHeatmapd + argmax"},
    "unet": {"label": "heatmark pipeline, U-Net", "network": "unet"},
    "downsampling": {"label": "heatmark pipeline, Downsampling-Net", "network": "downsampling"},
    "scn_10": {"label": "heatmark SCN 2019, 10 training images", "train_cases": 10},
    "unet_10": {"label": "heatmark pipeline, U-Net, 10 training images", "network": "unet", "train_cases": 10},
    "cascade": {"label": "heatmark cascade: cpu.yaml + 0.4 mm patches (cpu_cascade.yaml)", "cascade": True},
    "scn_full": {"label": "heatmark SCN 2019, full settings (train.yaml)", "full": True},
}
DEFAULT_RUNS = ["scn", "cascade", "baseline", "unet", "downsampling", "scn_10", "unet_10"]
#: the cascade run's overlays after cpu.yaml
CASCADE_OVERLAYS = ["cascade.yaml", "cpu_cascade.yaml"]


# ---- heatmark runs: the bundle, trained and evaluated by `python -m monai.bundle run` -------------------

def _overlay(spec: dict, width: int, test_cases: int = 0) -> str:
    """A YAML overlay (JSON is YAML) for a run's network and training cases (and, with
    ``test_cases``, only the first that many test1 images: a quick check that the run works)."""
    o: dict = {}
    if test_cases:
        o["eval_datalist"] = (f"$heatmark.data.datalist_from_table(@dataset_dir + '/images', @landmarks_file, "
                              f"@eval_cases)[:{int(test_cases)}]")
    if "network" in spec:
        o["network_def"] = {**_NET[spec["network"]], "spatial_dims": "@spatial_dims", "in_channels": 1,
                            "num_landmarks": "@num_landmarks", "filters": width}
    if "train_cases" in spec:
        n = spec["train_cases"]
        # the first n + 2 cases of the train split: n for training and 2 for model selection
        o["datalist"] = (f"$heatmark.data.datalist_from_table(@dataset_dir + '/images', @landmarks_file, "
                         f"@train_cases)[:{n + 2}]")
        o["val_fraction"] = 2 / (n + 2)
    return json.dumps(o, indent=1)


def run_bundle(name: str, spec: dict, data_dir: Path, root: Path, minutes: float, width: int,
               cascade_share: float = 0.5, test_cases: int = 0) -> dict:
    """Train and evaluate one bundle run in the folder ``root`` (its ``bundle_root``)."""
    root.mkdir(parents=True, exist_ok=True)
    overlay = root / "overlay.yaml"
    atomic_write(overlay, _overlay(spec, width, test_cases))
    cascade = spec.get("cascade", False)
    overlays = ([] if spec.get("full") else ["cpu.yaml"]) + (CASCADE_OVERLAYS if cascade else []) + [overlay]
    common = {"bundle_root": root, "dataset_dir": data_dir}
    train_args = {} if spec.get("full") else {"time_limit_minutes": minutes}
    if cascade:  # the same total budget, split between the two stages
        train_args = {"time_limit_minutes": minutes * cascade_share,
                      "fine_time_limit_minutes": minutes * (1.0 - cascade_share)}
    log = root / "train.log"
    print(f"[{name}] training ({'full settings' if spec.get('full') else f'{minutes:g} min budget'}), "
          f"log: {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(bundle_command(BUNDLE, "training", overlays, **common, **train_args),
                       stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    train_s = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    epochs = len(re.findall(r"LandmarkTrainer - INFO - Epoch\[\d+\] Complete", text))
    print(f"[{name}] evaluating on test1", flush=True)
    with open(root / "eval.log", "w") as f:
        subprocess.run(bundle_command(BUNDLE, "evaluating", overlays, **common),
                       stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    metrics = json.loads((root / "runs" / "eval" / "metrics.json").read_text())
    if not cascade:
        return {"metrics": metrics, "train_minutes": train_s / 60, "epochs": epochs}
    print(f"[{name}] heatmark predict (both stages) on test1, then heatmark evaluate", flush=True)
    return {"metrics": evaluate_cascade(root, data_dir, [*overlays[:-1], overlay], test_cases),
            "coarse_metrics": metrics, "train_minutes": train_s / 60, "epochs": epochs,
            "cascade_share": cascade_share}


def evaluate_cascade(root: Path, data_dir: Path, overlays: list, test_cases: int = 0) -> dict:
    """The cascade of the bundle trained in ``root`` on test1: ``heatmark predict`` over the images
    (stage 1, then stage 2 per landmark), ``heatmark evaluate`` against the truth; files in
    ``root/cascade_eval``. Returns its metrics."""
    cases = [c for c in (data_dir / "splits" / "test1.txt").read_text().split() if c]
    cases = cases[:test_cases] if test_cases else cases
    images = {p.name.split(".")[0]: p for p in (data_dir / "images").iterdir()}
    listing = root / "test1_images.txt"
    atomic_write(listing, "".join(f"{images[c]}\n" for c in cases))
    truth_all = read_landmark_table(data_dir / "landmarks.csv")
    truth = root / "test1_truth.csv"
    write_landmark_table(truth, {c: truth_all[c] for c in cases})
    bundle = root / "bundle"
    if not bundle.exists():  # the configs beside the run's models (bundle_root = root)
        bundle.mkdir()
        (bundle / "configs").symlink_to(BUNDLE / "configs")
        (bundle / "models").symlink_to(root / "models")
    pred = root / "cascade_predictions"
    cmd = [sys.executable, "-m", "heatmark", "predict", str(bundle), str(listing), str(pred), "--quiet",
           "--overwrite", "--num-workers", "0"]
    for o in overlays:
        cmd += ["--config", str(o)]
    with open(root / "predict.log", "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    result = evaluate_tables(pred / "landmarks.csv", truth, root / "cascade_eval")
    return json.loads((root / "cascade_eval" / "metrics.json").read_text()) if (
        root / "cascade_eval" / "metrics.json").is_file() else dict(result.summary)


# ---- the MONAI baseline: no heatmark in the model, the targets or the decoding ---------------------------

def train_monai_baseline(data_dir: Path, root: Path, minutes: float, size=(256, 320), sigma: float = 2.0,
                         target_scale: float = 100.0, lr: float = 1e-4, batch_size: int = 2,
                         val_every: int = 5, seed: int = 0) -> dict:
    """BasicUNet on a ``size`` grid (the 483 x 600 images resized, about 0.75 mm pixels), trained for
    ``minutes`` of wall time; the model with the best validation MRE is evaluated on test1.

    Only the case lists (the same train/validation split as the bundle) and the final statistics
    come from heatmark; landmarks are converted with the images' affine (origin and spacing)."""
    from monai.data import CacheDataset, DataLoader
    from monai.networks.nets import BasicUNet
    from monai.transforms import (Compose, EnsureChannelFirstd, GenerateHeatmapd, Lambdad, LoadImaged,
                                  RandAffined, Resized, ScaleIntensityd)
    from monai.utils import set_determinism

    set_determinism(seed)
    table_ = read_landmark_table(data_dir / "landmarks.csv")
    train_ids = (data_dir / "splits" / "train.txt").read_text().split()
    test_ids = (data_dir / "splits" / "test1.txt").read_text().split()
    tr, va = split_datalist([{"case": c} for c in train_ids], 0.1, seed)
    def geometry(case: str) -> tuple[np.ndarray, np.ndarray]:
        """The image's 2D affine (voxel index -> mm, from its header) and the Resize scale per axis."""
        img = nib.load(str(data_dir / "images" / f"{case}.nii.gz"))
        affine = np.eye(3)
        affine[:2, :2], affine[:2, 2] = img.affine[:2, :2], img.affine[:2, 3]
        return affine, np.array(size, float) / np.array(img.shape[:2], float)  # Resize: new = (old + 0.5) * s - 0.5

    def to_px(mm: np.ndarray, affine: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return (world_to_voxel(mm, affine) + 0.5) * scale - 0.5

    def to_mm(px: np.ndarray, affine: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return voxel_to_world((px + 0.5) / scale - 0.5, affine)

    def items(ids):
        out = []
        for c in ids:
            affine, scale = geometry(c)
            out.append({"image": str(data_dir / "images" / f"{c}.nii.gz"), "case": c, "affine2d": affine,
                        "scale": scale, "points": to_px(table_[c].coords, affine, scale).astype(np.float32)})
        return out

    deterministic = [
        LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
        Resized("image", spatial_size=size, mode="bilinear", anti_aliasing=True), ScaleIntensityd("image"),
        # spatial_shape, not ref_image_keys: the latter takes the image's pre-Resize shape from its metadata
        GenerateHeatmapd("points", heatmap_keys="heatmap", spatial_shape=size, sigma=sigma),
        Lambdad("heatmap", lambda h: h * target_scale),
    ]
    augment = [RandAffined(["image", "heatmap"], prob=1.0, rotate_range=0.26, scale_range=(0.15, 0.15),
                           translate_range=(20, 20), padding_mode="zeros", mode="bilinear")]
    train_ds = CacheDataset(items([d["case"] for d in tr]), Compose(deterministic + augment), num_workers=2)
    val_ds = CacheDataset(items([d["case"] for d in va]), Compose(deterministic), num_workers=2)
    test_ds = CacheDataset(items(test_ids), Compose(deterministic), num_workers=2)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=2,
                        persistent_workers=True)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=19)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def predict_mm(ds) -> tuple[np.ndarray, np.ndarray]:
        net.eval()
        preds, truths = [], []
        with torch.no_grad():
            for d in DataLoader(ds, batch_size=4, num_workers=0):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    h = net(d["image"]).float()
                flat = h.flatten(2).argmax(-1)  # (B, N), row-major over (x, y)
                px = torch.stack([flat // h.shape[-1], flat % h.shape[-1]], -1).numpy()
                for i in range(px.shape[0]):
                    affine, scale = d["affine2d"][i].double().numpy(), d["scale"][i].double().numpy()
                    preds.append(to_mm(px[i].astype(np.float64), affine, scale))
                    truths.append(to_mm(d["points"][i].double().numpy(), affine, scale))
        net.train()
        return np.stack(preds), np.stack(truths)

    best, best_state, epoch = math.inf, None, 0
    t0 = time.perf_counter()
    deadline = t0 + 60 * minutes
    while time.perf_counter() < deadline:
        epoch += 1
        for d in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = net(d["image"])
            loss = torch.nn.functional.mse_loss(y.float(), d["heatmap"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.perf_counter() >= deadline:
                break
        if epoch % val_every == 0 or time.perf_counter() >= deadline:
            p, t = predict_mm(val_ds)
            mre = float(summarize(point_errors(p, t))["mean"])
            print(f"[baseline] epoch {epoch}: loss {loss.item():.4f}, validation MRE {mre:.2f} mm", flush=True)
            if mre < best:
                best, best_state = mre, {k: v.clone() for k, v in net.state_dict().items()}
    train_s = time.perf_counter() - t0
    net.load_state_dict(best_state)
    p, t = predict_mm(test_ds)
    errors = point_errors(p, t)
    metrics = summarize(errors)
    atomic_write(root / "metrics.json", json.dumps(metrics, indent=1))
    affine, scale = geometry(test_ids[0])
    mm_per_px = np.linalg.norm(affine[:2, :2], axis=0) / scale
    return {"metrics": metrics, "train_minutes": train_s / 60, "epochs": epoch,
            "mm_per_pixel": mm_per_px.round(4).tolist()}


# ---- the table ------------------------------------------------------------------------------------------

def inter_observer(data_dir: Path) -> dict:
    """Senior vs junior doctor on the test1 images, with heatmark's statistics."""
    ids = (data_dir / "splits" / "test1.txt").read_text().split()
    senior = read_landmark_table(data_dir / "landmarks_senior.csv")
    junior = read_landmark_table(data_dir / "landmarks_junior.csv")
    return summarize(point_errors(np.stack([junior[c].coords for c in ids]), np.stack([senior[c].coords for c in ids])))


def _f(x, nd=2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _budget(result: dict) -> str:
    return "no limit" if result["budget_minutes"] is None else f"{result['budget_minutes']:g} min"


def row(label: str, m: dict, result: dict | None = None) -> list[str]:
    extra = [_f(result["train_minutes"], 0), str(result["epochs"])] if result else ["", ""]
    return [label, _f(m["mean"]), _f(m["sd"]), _f(m["median"])] + \
        [_f(m[f"sdr_{r}mm"], 1) for r in ("2", "2.5", "3", "4")] + [_f(m[f"outliers_pct_{r}mm"], 1) for r in ("4", "10")] + extra


COLUMNS = ["test1 (150 images)", "MRE mm", "SD", "median", "SDR 2", "SDR 2.5", "SDR 3", "SDR 4",
           "> 4 mm %", "> 10 mm %", "train min", "epochs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, choices=list(RUNS),
                    help=f"runs to do (default: {' '.join(DEFAULT_RUNS)}); none: only print the table of finished runs")
    ap.add_argument("--minutes", type=float, default=30.0, help="training wall time per run (default 30)")
    ap.add_argument("--width", type=int, default=32, help="filters of the U-Net / Downsampling-Net runs (default 32)")
    ap.add_argument("--baseline-target-scale", type=float, default=100.0,
                    help="GenerateHeatmapd peak scale of the baseline (1 collapses to zero heatmaps)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "isbi2015")
    ap.add_argument("--rerun", action="store_true", help="repeat runs whose result.json exists")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--cascade-share", type=float, default=0.5,
                    help="share of --minutes for the cascade's stage 1 (the rest trains stage 2; default 0.5)")
    ap.add_argument("--test-cases", type=int, default=0,
                    help="score only the first N test1 images (a quick check that a run works; default all 150)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = require_isbi()
    hw = header("bench/isbi2015.py")
    if args.runs:
        print(hw, flush=True)
    for name in args.runs:
        full = RUNS[name].get("full", False)
        root = args.out / (name if full else f"{name}_{args.minutes:g}min")
        res_file = root / "result.json"
        if res_file.is_file() and not args.rerun:
            print(f"[{name}] result exists ({res_file}); --rerun repeats it", flush=True)
            continue
        root.mkdir(parents=True, exist_ok=True)
        try:
            if name == "baseline":
                res = train_monai_baseline(data_dir, root, args.minutes, target_scale=args.baseline_target_scale)
            else:
                res = run_bundle(name, RUNS[name], data_dir, root, args.minutes, args.width, args.cascade_share,
                                 args.test_cases)
        except (subprocess.CalledProcessError, RuntimeError) as e:  # one failed run does not stop the others
            print(f"[{name}] FAILED: {e} (see {root})", flush=True)
            continue
        res.update(run=name, label=RUNS[name]["label"], budget_minutes=None if full else args.minutes,
                   date=datetime.date.today().isoformat(), hardware=hw, command=" ".join(sys.argv))
        atomic_write(res_file, json.dumps(res, indent=1))
        m = res["metrics"]
        print(f"[{name}] test1 MRE {m['mean']:.2f} mm, SDR@2mm {m['sdr_2mm']:.1f} %, "
              f"{res['train_minutes']:.1f} min, {res['epochs']} epochs", flush=True)

    rows = [[label, _f(mre), "", ""] + [_f(s, 1) for s in sdr] + ["", "", "", ""] for label, mre, sdr in PUBLISHED]
    rows.append(row("inter-observer: junior vs senior doctor (our evaluator)", inter_observer(data_dir)))
    order = {name: i for i, name in enumerate(RUNS)}
    results = sorted((json.loads(f.read_text()) | {"dir": f.parent} for f in args.out.glob("*/result.json")),
                     key=lambda r: (order.get(r["run"], len(order)), r["budget_minutes"] or math.inf))
    for r in results:
        rows.append(row(f"{r['label']}, {_budget(r)}", r["metrics"], r))
        if "coarse_metrics" in r:  # the cascade's stage 1 alone: what the fine stage adds
            rows.append(row(f"{r['label']}, its stage 1 alone ({r['cascade_share']:.0%} of the budget)",
                            r["coarse_metrics"], r))
    print()
    print(f"{hw}; {datetime.date.today().isoformat()}; results in {args.out}")
    print(table(COLUMNS, rows))
    print("\nlandmarks that failed on >= 90% of the test images (error > 10 mm), and the statistics without them:")
    frows = []
    for r in results:
        f = r["dir"] / ("cascade_eval" if "coarse_metrics" in r else "runs/eval") / "point_errors.csv"
        if not f.is_file():
            continue
        by_name: dict[str, list[float]] = {}
        with open(f, newline="") as fh:
            for p in csv.DictReader(fh):
                by_name.setdefault(p["name"], []).append(float(p["error_mm"]) if p["error_mm"] else math.nan)
        failed = [n for n, e in by_name.items() if np.mean(np.asarray(e) > 10.0) >= 0.9]
        kept = [e for n, e in by_name.items() if n not in failed]
        if not kept:  # every landmark failed (e.g. a seconds-long check run)
            frows.append([f"{r['label']}, {_budget(r)}", "all", "-", "-", "-"])
            continue
        m = summarize(np.array(kept))  # (landmarks, cases)
        frows.append([f"{r['label']}, {_budget(r)}", ", ".join(failed) or "none", _f(m["mean"]),
                      _f(m["outliers_pct_4mm"], 1), _f(m["outliers_pct_10mm"], 2)])
    print(table(["run", "failed landmarks", "MRE mm, others", "> 4 mm %, others", "> 10 mm %, others"], frows))
    scn = [r for r in results if r["run"] == "scn" and (r["dir"] / "runs" / "eval" / "per_landmark.csv").is_file()]
    if scn:
        r = max(scn, key=lambda r: r["budget_minutes"])
        with open(r["dir"] / "runs" / "eval" / "per_landmark.csv", newline="") as f:
            pl = list(csv.DictReader(f))
        print(f"\nper landmark, {r['label']}, {r['budget_minutes']:g} min:")
        print(table(["landmark", "MRE mm", "SD", "median", "SDR 2", "SDR 4", "> 4 mm", "> 10 mm"],
                    [[p["name"]] + [_f(float(p[k])) for k in ("mean", "sd", "median")]
                     + [_f(float(p[k]), 1) for k in ("sdr_2mm", "sdr_4mm")] + [p["outliers_4mm"], p["outliers_10mm"]]
                     for p in pl]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
