"""``heatmark predict`` throughput vs. the network forward alone, 2D (ISBI test1) and 3D (synthetic MR).

Both bundles get a model with RANDOM weights (``torch.manual_seed(0)``, the bundle's
``network_def``), saved as ``models/model.pt`` in a temporary copy of the bundle: no training is
needed and the timings do not depend on the weights (decoding may mark flat heatmaps as failed
cases; those are counted). Per case, in one run:

- predict: ``run_predict(PredictOptions(...))`` over the inputs (loading, the bundle's
  ``inference#preprocessing``, forward at ``--batch-size`` (partial batches padded), decoding to
  world mm, writing landmarks.csv and one .mrk.json per case), wall time including the model load
- forward: the same network and weights, ``eval()`` + ``inference_mode``, on a random batch of
  the same batch size and the bundle's ``input_size``; median of ``--forward-steps`` batches,
  scaled to the batches predict runs

overhead = t_predict / t_forward - 1. Peak memory: ``resource.getrusage`` ru_maxrss of this process
(after each case; it only grows) and of the largest finished child (DataLoader workers). torch on
the CPU has no allocator statistics, so no tensor-level peak is reported.

2D: ``isbi2015_cephalometric`` on the first ``--cases`` ISBI test1 images (../shared/data/isbi2015).
3D: ``afids_brain_mr`` (its inference configs, ``--cpu-overlay`` adds cpu.yaml) on
``--volumes`` synthetic T1w-like NIfTI volumes of 256 x 256 x 180 voxels at 1 mm written to a
temporary folder (no 3D data of that size ships).

Usage: python bench/predict_throughput.py [--cases 150] [--volumes 3] [--batch-size 2]
       [--num-workers N] [--forward-steps 5] [--cpu-overlay] [--skip-2d] [--skip-3d] [--threads N]
Target (issue): overhead <= 25%.
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from _timing import REPO, header, maxrss_mib, median, require_isbi, table, time_steps
from monai.bundle import ConfigParser

from heatmark.bundle import bundle_config_files
from heatmark.predict import PredictOptions, run_predict


def random_bundle(src: Path, dst: Path, configs: list[str]) -> tuple[torch.nn.Module, list[int]]:
    """Copy the bundle's configs to ``dst``, save a random-weight model there; the network and input size."""
    shutil.copytree(src / "configs", dst / "configs")
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(dst, "inference", configs)])
    parser["bundle_root"] = str(dst)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (dst / "models").mkdir()
    torch.save(network.state_dict(), dst / "models" / "model.pt")
    return network, [int(s) for s in parser.get_parsed_content("input_size")]


def synthetic_volumes(folder: Path, n: int, shape=(256, 256, 180)) -> Path:
    """``n`` T1w-like volumes (a bright ellipsoid 'head' with a darker core, noise), 1 mm, RAS, centred."""
    folder.mkdir()
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, (0.7, 0.85, 0.8))))
    base = np.where(r < 1, 600.0, 0.0) + np.where(r < 0.6, -200.0, 0.0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2.0
    rng = np.random.default_rng(0)
    for i in range(n):
        vol = (base + rng.normal(0, 20, shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, affine), folder / f"synthetic_{i:02d}.nii.gz")
    return folder


def measure(name: str, bundle: Path, inputs: Path, configs: list[str], args, work: Path) -> dict:
    network, input_size = random_bundle(bundle, work / "bundle", configs)
    n = sum(1 for line in inputs.read_text().splitlines() if line.strip()) if inputs.is_file() else len(list(inputs.iterdir()))
    batches = math.ceil(n / args.batch_size)
    network.eval()
    x = torch.randn(args.batch_size, 1, *input_size)
    with torch.inference_mode():
        t_batch = median(time_steps(lambda: network(x), args.forward_steps, warmup=1))
    opts = PredictOptions(bundle=work / "bundle", input=inputs, output=work / "out", configs=configs, device="cpu",
                          batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
    t0 = time.perf_counter()
    summary = run_predict(opts, log=lambda msg: None)
    t_predict = time.perf_counter() - t0
    return {"name": name, "n": n, "input": input_size, "predict": t_predict, "forward": t_batch * batches,
            "failed": summary.failed, "rss": maxrss_mib(),
            "rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=150, help="ISBI test1 images (2D), at most 150")
    ap.add_argument("--volumes", type=int, default=3, help="synthetic 256 x 256 x 180 volumes (3D)")
    ap.add_argument("--batch-size", type=int, default=2, help="predict --batch-size, also the forward batch")
    ap.add_argument("--num-workers", type=int, default=None, help="predict --num-workers (default: its own)")
    ap.add_argument("--forward-steps", type=int, default=5, help="timed forward batches (median)")
    ap.add_argument("--cpu-overlay", action="store_true", help="3D: add afids_brain_mr's cpu.yaml (4 mm, 16 filters)")
    ap.add_argument("--skip-2d", action="store_true")
    ap.add_argument("--skip-3d", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = None if args.skip_2d else require_isbi()

    print(header("heatmark predict vs. network forward alone"))
    print("models: RANDOM weights (seed 0) saved into a temporary copy of each bundle; no training needed")
    results = []
    with tempfile.TemporaryDirectory(prefix="heatmark-bench-") as tmp:
        tmp = Path(tmp)
        if not args.skip_2d:
            ids = (data_dir / "splits" / "test1.txt").read_text().split()[: args.cases]
            listing = tmp / "test1.txt"
            listing.write_text("".join(f"{data_dir / 'images' / (i + '.nii.gz')}\n" for i in ids))
            (tmp / "2d").mkdir()
            results.append(measure("2D isbi2015_cephalometric, ISBI test1", REPO / "bundles" / "isbi2015_cephalometric",
                                   listing, [], args, tmp / "2d"))
        if not args.skip_3d:
            volumes = synthetic_volumes(tmp / "volumes", args.volumes)
            (tmp / "3d").mkdir()
            configs = ["cpu.yaml"] if args.cpu_overlay else []
            results.append(measure("3D afids_brain_mr" + (" + cpu.yaml" if configs else "") + ", synthetic 256x256x180 1 mm",
                                   REPO / "bundles" / "afids_brain_mr", volumes, configs, args, tmp / "3d"))

    print(f"batch size {args.batch_size}, predict num_workers {args.num_workers or 'default'}, "
          f"forward: median of {args.forward_steps} batches x batches predict runs\n")
    rows = [[r["name"], str(r["n"]), " x ".join(map(str, r["input"])), f"{r['n'] / r['predict']:.2f}",
             f"{r['n'] / r['forward']:.2f}", f"{(r['predict'] / r['forward'] - 1) * 100:+.1f}%", str(r["failed"]),
             f"{r['rss']:.0f}", f"{r['rss_children']:.0f}"] for r in results]
    print(table(["case", "inputs", "network input", "predict cases/s", "forward only cases/s", "overhead",
                 "failed", "peak RSS process MiB", "peak RSS worker MiB"], rows))
    print("\npeak RSS: ru_maxrss (process peak so far, cumulative across rows; workers: largest finished child); "
          "torch CPU has no allocator peak statistic")
    for r in results:
        ov = (r["predict"] / r["forward"] - 1) * 100
        print(f"{r['name']}: t_predict / t_forward = {r['predict'] / r['forward']:.3f} "
              f"(overhead {ov:+.1f}%; target <= 25%: {'met' if ov <= 25 else 'MISSED'})")


if __name__ == "__main__":
    main()
