"""``heatmark predict`` over 1 and 2 (or more) processes under torchrun: cases/s side by side.

Each row is one ``torchrun --standalone --nproc_per_node P -m heatmark predict`` of the
``isbi2015_cephalometric`` bundle (RANDOM weights, seed 0, saved into a temporary copy of the
bundle: no training needed; timings do not depend on the weights) over the first ``--cases`` ISBI
test1 images, into a fresh OUTPUT. Every row runs under the same launcher (P = 1 is torchrun too:
WORLD_SIZE 1, no process group), on the CPU or ``--device``, with the machine's cores split evenly:
``OMP_NUM_THREADS`` = cores // P per process (``--threads`` to fix it).

- wall cases/s: cases / the whole command's wall time (Python and torch start-up, model load,
  prediction, rank 0's merge of the tables);
- run cases/s: from rank 0's summary line (its ``run_predict`` from the options check to the merged
  tables, start-up excluded);
- the merged ``landmarks.csv`` of every row is compared with the first row's: byte-identical when
  the threads per process are the same (``--threads``); with other thread counts torch's parallel
  reductions round differently, so the column gives the largest coordinate difference in mm.

Usage: python bench/predict_scaling.py [--cases 150] [--procs 1,2] [--num-workers 1] [--batch-size 1]
       [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import REPO, header, require_isbi, table
from predict_throughput import random_bundle

from heatmark.landmarks import read_landmark_table

TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_row(procs: int, bundle: Path, listing: Path, out: Path, args: argparse.Namespace) -> dict:
    """One torchrun of ``procs`` processes; wall seconds, rank 0's summary and the merged table."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(procs), "-m", "heatmark", "predict",
           str(bundle), str(listing), str(out), "--quiet", "--device", args.device,
           "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    m = re.search(r"(\d+) processed, \d+ skipped \(done before\), (\d+) failed in ([0-9.]+) s", log)
    if proc.returncode not in (0, 1) or m is None:
        sys.exit(f"torchrun with {procs} processes failed (exit {proc.returncode}):\n{log[-4000:]}")
    processed, failed, seconds = int(m.group(1)), int(m.group(2)), float(m.group(3))
    return {"procs": procs, "threads": threads, "wall": wall, "run": seconds, "n": processed + failed,
            "failed": failed, "table": (out / "landmarks.csv").read_bytes(),
            "landmarks": read_landmark_table(out / "landmarks.csv")}


def difference(row: dict, base: dict) -> str:
    """"identical" (same bytes), or the largest coordinate difference in mm from the first row."""
    if row["table"] == base["table"]:
        return "identical"
    if set(row["landmarks"]) != set(base["landmarks"]):
        return "other cases"
    diff = max(float(np.nanmax(np.abs(row["landmarks"][c].coords - base["landmarks"][c].coords), initial=0.0))
               for c in base["landmarks"])
    return f"max {diff:.2g} mm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=150, help="ISBI test1 images, at most 150")
    ap.add_argument("--procs", default="1,2", help="process counts to compare, comma-separated (default 1,2)")
    ap.add_argument("--num-workers", type=int, default=1, help="predict --num-workers per process (default 1)")
    ap.add_argument("--batch-size", type=int, default=1, help="predict --batch-size (default 1)")
    ap.add_argument("--device", default="cpu", help="predict --device (default cpu; auto: cuda:LOCAL_RANK)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per process (default cores // P)")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",") if p.strip()]
    data_dir = require_isbi()
    if not TORCHRUN.is_file():
        sys.exit(f"torchrun not found beside {sys.executable}")

    print(header("heatmark predict, 1 vs N processes under torchrun"))
    print("model: RANDOM weights (seed 0) in a temporary copy of isbi2015_cephalometric; no training needed")
    rows = []
    with tempfile.TemporaryDirectory(prefix="heatmark-bench-") as tmp:
        tmp = Path(tmp)
        random_bundle(REPO / "bundles" / "isbi2015_cephalometric", tmp / "bundle", [])
        ids = (data_dir / "splits" / "test1.txt").read_text().split()[: args.cases]
        listing = tmp / "test1.txt"
        listing.write_text("".join(f"{data_dir / 'images' / (i + '.nii.gz')}\n" for i in ids))
        for p in procs:
            rows.append(run_row(p, tmp / "bundle", listing, tmp / f"out{p}", args))

    base = rows[0]
    print(f"{len(ids)} ISBI test1 images, device {args.device}, batch size {args.batch_size}, "
          f"{args.num_workers} loading worker(s) per process, {os.cpu_count()} cores\n")
    print(table(["processes", "threads each", "wall s", "wall cases/s", "run cases/s", "speed-up (run)",
                 "failed", "landmarks.csv vs first row"],
                [[str(r["procs"]), str(r["threads"]), f"{r['wall']:.1f}", f"{r['n'] / r['wall']:.2f}",
                  f"{r['n'] / r['run']:.2f}", f"{base['run'] / r['run']:.2f}x", str(r["failed"]),
                  difference(r, base)] for r in rows]))


if __name__ == "__main__":
    main()
