"""``heatmark demo``: the whole tool on real data in one command.

3D (default): fetch the AFIDs brain MR template and its 32 expert landmarks the way a user would
(``heatmark data afids``), train the ``afids_brain_mr`` bundle with its CPU overlay (``cpu.yaml``: the
whole head on a 4 mm grid; ``--cascade`` adds ``cascade.yaml`` and ``cpu_cascade.yaml``, a 1 mm fine
stage, which at this budget is still less accurate, see bench/afids_cascade.py) for a bounded time
(MLflow-tracked), evaluate on held-out deformations of the template, write a few more held-out
deformed volumes to disk as NIfTI files at the template's 1 mm, run ``heatmark predict`` over that
folder, and compare the predictions with the known landmark positions (``heatmark evaluate``).

Everything lands in one output folder; the bundle configs are copied there so that the trained
model, checkpoints and the MLflow store stay out of the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser
from monai.transforms import Compose, RandAffined

from heatmark.bundle import bundle_config_files, run_bundle
from heatmark.core.fileio import atomic_path
from heatmark.core.geometry import nifti_affine, world_to_voxel
from heatmark.data.fetch import DatasetFetchError, fetch_afids, find_afids
from heatmark.evaluation.evaluate import evaluate_tables
from heatmark.evaluation.metrics import per_landmark_table
from heatmark.landmarks import Landmarks, read_landmarks, write_landmark_table
from heatmark.predict import PredictOptions, run_predict
from heatmark.transforms import LoadLandmarkImaged, LoadLandmarksd, RandLandmarkElasticd

__all__ = ["add_demo_parser", "cmd_demo", "run_demo", "write_deformed_cases", "prepare_midsagittal"]

BUNDLE_NAME = "afids_brain_mr"


def _bundle_source() -> Path:
    src = Path(__file__).resolve().parents[1] / "bundles" / BUNDLE_NAME
    if not (src / "configs" / "train.yaml").is_file():
        raise FileNotFoundError(f"the demo needs the repository's bundles/{BUNDLE_NAME} folder (looked in {src}); "
                                "run it from a clone of heatmark installed with `make setup`")
    return src


def _say(step: str, text: str) -> None:
    print(f"\n== {step}: {text}", flush=True)


MIDLINE_AFIDS = ("AC", "PC", "infracollicular sulcus", "PMJ", "superior interpeduncular fossa", "culmen",
                 "intermammillary sulcus", "pineal gland", "genu of CC", "splenium of CC")


def prepare_midsagittal(data_dir: Path, out_dir: Path) -> Path:
    """The 2D demo data: the template's mid-sagittal slice (x = 0 mm) as a 2D NIfTI in the slice's
    own frame (axis 0 = RAS y, axis 1 = RAS z, mm) and the midline AFIDs projected onto it
    (``midline_afids.csv``). Returns ``out_dir``."""
    template, fcsv = find_afids(data_dir)
    img = nib.load(str(template))
    affine = img.affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or affine[0, 0] <= 0:
        raise ValueError(f"{template}: expected an axis-aligned RAS volume")
    x_index = int(round(float(world_to_voxel(np.zeros((1, 3)), affine)[0, 0])))
    plane = np.asarray(img.dataobj[x_index, :, :], dtype=np.float32)
    slice_affine = np.eye(4)
    slice_affine[0, 0], slice_affine[1, 1] = affine[1, 1], affine[2, 2]
    slice_affine[0, 3], slice_affine[1, 3] = affine[1, 3], affine[2, 3]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "midsagittal_T1w.nii.gz") as tmp:
        nib.save(nib.Nifti1Image(plane, slice_affine), str(tmp))
    lm = read_landmarks(fcsv).select(list(MIDLINE_AFIDS))
    write_landmark_table(out_dir / "midline_afids.csv", {"template": Landmarks(lm.coords[:, 1:3].copy(), lm.names)})
    return out_dir


def write_deformed_cases(bundle: Path, dataset_dir: Path, out_dir: Path, num_cases: int, seed0: int,
                         overlays: Sequence[str] = ()) -> Path:
    """Write ``num_cases`` random deformations of the bundle's image (``image_file``) at its own
    resolution as NIfTI files, with their true landmarks (world mm) in ``truth.csv``; the
    deformation ranges are the bundle's training ranges. Returns the truth table's path."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(bundle, "training", overlays)])
    parser["dataset_dir"] = str(dataset_dir)
    get = parser.get_parsed_content
    names = list(get("landmark_names"))
    dims = int(get("spatial_dims"))
    rot = math.radians(float(get("rotate_deg")))
    deform = Compose([
        LoadLandmarkImaged("image", spatial_dims=dims),
        LoadLandmarksd("landmarks", names=names, spatial_dims=dims),
        RandAffined("image", prob=1.0, rotate_range=(rot,) * (1 if dims == 2 else 3),
                    scale_range=(float(get("scale")),) * dims, translate_range=(float(get("translate_mm")),) * dims,
                    padding_mode="zeros"),
        RandLandmarkElasticd("image", "landmarks", prob=1.0, control_spacing_mm=float(get("elastic_spacing_mm")),
                             magnitude_mm=float(get("elastic_mm"))),
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    table = {}
    for i in range(num_cases):
        case = f"heldout{i + 1:02d}"
        deform.set_random_state(seed=seed0 + i)
        d = deform({"image": get("image_file"), "landmarks": get("landmarks_file")})
        image = d["image"]
        with atomic_path(out_dir / f"{case}.nii.gz") as tmp:
            nib.save(nib.Nifti1Image(image[0].numpy().astype(np.float32), nifti_affine(image.affine)), str(tmp))
        table[case] = Landmarks(d["landmarks"].numpy(), names)
    truth = out_dir / "truth.csv"
    write_landmark_table(truth, table)
    return truth


def _print_table(per_landmark: list[dict], summary: dict) -> None:
    print(f"{'landmark':<30} {'mean':>7} {'median':>7} {'max':>7}   (mm)")
    for row in per_landmark:
        print(f"{row['name']:<30} {row['mean']:7.2f} {row['median']:7.2f} {row['max']:7.2f}")
    sdr = ", ".join(f"{k[4:-2]} mm: {v:.1f}%" for k, v in summary.items() if k.startswith("sdr_"))
    print(f"\nMRE {summary['mean']:.2f} +- {summary['sd']:.2f} mm, median {summary['median']:.2f} mm, "
          f"max {summary['max']:.2f} mm over {summary['n_valid']} landmarks")
    print(f"SDR (error <= r): {sdr}")


#: the cascade overlays after the main overlay (3D): heatmark's and the bundle's cascade.yaml, the CPU sizes
CASCADE_OVERLAYS = ("cascade.yaml", "cpu_cascade.yaml")


def run_demo(minutes: float = 8.0, output: str | os.PathLike = "heatmark-demo", data: str | None = None,
             num_cases: int = 3, fresh: bool = False, overlay: str = "cpu.yaml", dims: int = 3,
             cascade: Sequence[str] = ()) -> int:
    """Run the demo; returns the exit status. ``overlay`` is the bundle overlay used for training,
    evaluation and prediction (``cpu.yaml``; the tests use ``smoke.yaml``), followed in 3D by the
    ``cascade`` overlays (empty: the single-stage model alone); ``minutes`` is then split evenly
    between the two stages. ``dims=2`` runs the single-stage model on the template's mid-sagittal
    slice with its 10 midline landmarks."""
    t0 = time.monotonic()
    out = Path(output).resolve()
    bundle = out / "bundle"
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    _say("1/5 data", "AFIDs: MNI152 2009c T1w template with 32 expert landmarks")
    data_dir = Path(data).resolve() if data else fetch_afids()
    find_afids(data_dir)
    print(f"data in {data_dir}")
    overlays = [overlay]
    if dims == 2:
        data_dir = prepare_midsagittal(data_dir, out / "midsagittal_data")
        overlays.append("midsagittal2d.yaml")
        print(f"2D: mid-sagittal slice and {len(MIDLINE_AFIDS)} midline landmarks in {data_dir}")
    elif dims != 3:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    stages = {"time_limit_minutes": float(minutes)}
    if dims == 3 and cascade:
        overlays.extend(cascade)
        stages = {"time_limit_minutes": float(minutes) / 2, "fine_time_limit_minutes": float(minutes) / 2}

    src = _bundle_source()
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    for f in (src / "configs").iterdir():
        shutil.copy2(f, bundle / "configs" / f.name)

    _say("2/5 train", f"bundle {BUNDLE_NAME} ({', '.join(overlays)}), {dims}D, at most {minutes:g} min, "
                      "tracked in MLflow")
    run_bundle(bundle, "training", overlays, tracking="mlflow", dataset_dir=str(data_dir), **stages)

    _say("3/5 evaluate", "held-out deformations of the template (fixed seeds, never seen in training)"
         + (", coarse stage" if len(stages) > 1 else ""))
    run_bundle(bundle, "evaluating", overlays, tracking="mlflow", dataset_dir=str(data_dir))
    eval_metrics = json.loads((bundle / "runs" / "eval" / "metrics.json").read_text())

    _say("4/5 predict", f"heatmark predict over {num_cases} more held-out {'images' if dims == 2 else 'volumes'} "
                        "written as NIfTI files")
    cases_dir = out / "heldout_volumes"
    truth_csv = write_deformed_cases(bundle, data_dir, cases_dir, num_cases, seed0=900_000, overlays=overlays)
    pred_dir = out / "predictions"
    summary = run_predict(PredictOptions(bundle=bundle, input=cases_dir, output=pred_dir, configs=overlays,
                                         overlays=True, overwrite=True))
    print(summary.line())
    if summary.failed:
        return 1

    _say("5/5 compare", "predicted vs. known landmark positions")
    result = evaluate_tables(pred_dir / "landmarks.csv", truth_csv, out / "evaluation")
    _print_table(per_landmark_table(result.errors, result.names), result.summary)

    print(f"\nheld-out evaluation of the {'coarse stage' if len(stages) > 1 else 'bundle'} "
          f"({eval_metrics['n_cases']} deformations): "
          f"MRE {eval_metrics['mean']:.2f} mm, SDR 4 mm {eval_metrics.get('sdr_4mm', float('nan')):.1f}%")
    print("\noutputs:")
    frame = "slice frame mm" if dims == 2 else "RAS mm"
    print(f"  predicted landmarks (CSV, {frame}): {pred_dir / 'landmarks.csv'}")
    print(f"  3D Slicer markups:                 {pred_dir}/<case>.mrk.json (open with the volume in {cases_dir})")
    print(f"  overlays:                          {pred_dir}/<case>_overlay.png")
    print(f"  error tables and plots:            {out / 'evaluation'}, {bundle / 'runs' / 'eval'}")
    print(f"  trained model:                     {bundle / 'models' / 'model.pt'}")
    if len(stages) > 1:
        print(f"  fine stage (1 mm patches):         {bundle / 'models' / 'model_fine.pt'}")
    print(f"  MLflow UI:                         heatmark ui {bundle / 'runs'}")
    print(f"\ndemo finished in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="train, evaluate and predict on real MR data in one go",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, choices=(2, 3), default=3,
                   help="3: brain MR volumes (default); 2: the template's mid-sagittal slice, midline landmarks")
    p.add_argument("--minutes", type=float, default=8.0, help="training time limit in minutes (default 8)")
    p.add_argument("--output", default="heatmark-demo", help="output folder (default ./heatmark-demo)")
    p.add_argument("--data", help="folder with the AFIDs template and .fcsv (default: fetch into the cache)")
    p.add_argument("--cases", type=int, default=3, help="held-out volumes for heatmark predict (default 3)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--overlay", default="cpu.yaml", help="bundle overlay for the run (default cpu.yaml; smoke.yaml: seconds)")
    p.add_argument("--cascade", action="store_true",
                   help="3D: train the coarse-to-fine cascade (4 mm whole head, then 1 mm patches; minutes split "
                        "evenly); at the demo's budget it is still less accurate than the 4 mm model alone")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        cascade: tuple[str, ...] = CASCADE_OVERLAYS if args.cascade else ()
        if args.overlay == "smoke.yaml" and cascade:
            cascade = ("cascade.yaml", "smoke_cascade.yaml")
        return run_demo(args.minutes, args.output, args.data, args.cases, args.fresh, args.overlay, args.dims,
                        cascade)
    except DatasetFetchError as e:
        print(f"heatmark demo: {e}", file=sys.stderr)
        return 1
