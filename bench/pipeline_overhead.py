"""Training-step throughput: the bundle's full data pipeline vs. the same step on a batch in memory.

Built from the ``isbi2015_cephalometric`` bundle's training configs with MONAI's ``ConfigParser``
(``dataset_dir`` = ../shared/data/isbi2015): ``train#dataloader`` (CacheDataset of the deterministic
preprocessing, then per step RandAffined, RandLandmarkElasticd, intensity augmentation and
WorldToVoxeld in ``--num-workers`` worker processes), ``network``, ``loss_function`` (targets
rendered on the device inside the loss) and ``optimizer``. One step = LandmarkPrepareBatch,
forward, loss, backward, optimizer step, as in ``LandmarkTrainer`` (fp32). Timed per network width:

- full:      next batch from ``train#dataloader`` + the step
- in memory: the step on one batch taken from that loader before timing, reused every step,
             as plain tensors (and, to split the overhead, as the loader's MetaTensors)

overhead = t_full / t_memory - 1 (plain tensors). The CacheDataset fills its cache (``--cases``
training images, default all) before any timing; a few warm-up steps precede the ``--steps`` timed ones.

Usage: python bench/pipeline_overhead.py [--steps 8] [--warmup 2] [--cases 0] [--num-workers 2]
       [--filters 128 32] [--threads N]
Target (issue): overhead <= 15% with the 2D default network (128 filters).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from _timing import REPO, header, median, require_isbi, table, time_steps
from monai.bundle import ConfigParser

from heatmark.bundle import bundle_config_files
from heatmark.training import LandmarkPrepareBatch

BUNDLE = REPO / "bundles" / "isbi2015_cephalometric"


def build(data_dir, filters: int, cases: int, num_workers: int) -> dict:
    parser = ConfigParser()
    parser.read_config([str(f) for f in bundle_config_files(BUNDLE, "training")])
    parser["bundle_root"] = str(BUNDLE)
    parser["dataset_dir"] = str(data_dir)
    parser["device"] = "$torch.device('cpu')"
    parser["num_workers"] = num_workers
    parser["network_def#filters"] = filters
    if cases:
        parser["train#dataset#data"] = f"$@train_datalist_checked[:{cases}]"
    parser["initialize"] = []
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")  # CacheDataset caches here
    cache_s = time.perf_counter() - t0
    return {"loader": loader, "network": parser.get_parsed_content("network"),
            "loss": parser.get_parsed_content("loss_function"), "optimizer": parser.get_parsed_content("optimizer"),
            "device": parser.get_parsed_content("device"), "cache_s": cache_s}


def make_step(parts: dict):
    prepare, net, loss_fn, opt, device = LandmarkPrepareBatch(), parts["network"], parts["loss"], parts["optimizer"], parts["device"]
    net.train()

    def step(batch: dict) -> None:
        image, target = prepare(batch, device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), target).mean()
        loss.backward()
        opt.step()

    return step


def measure(data_dir, filters: int, args) -> dict:
    parts = build(data_dir, filters, args.cases, args.num_workers)
    step = make_step(parts)
    batches = (b for _ in itertools.count() for b in parts["loader"])  # endless, epoch after epoch
    first = next(batches)
    meta = {"image": first["image"], "landmarks_voxel": first["landmarks_voxel"]}
    plain = {"image": first["image"].as_tensor().clone(), "landmarks_voxel": torch.as_tensor(first["landmarks_voxel"]).clone()}
    t_plain = median(time_steps(lambda: step(plain), args.steps, args.warmup))
    t_meta = median(time_steps(lambda: step(meta), args.steps, args.warmup))
    t_full = median(time_steps(lambda: step(next(batches)), args.steps, args.warmup))
    return {"filters": filters, "cache_s": parts["cache_s"], "full": t_full, "meta": t_meta, "plain": t_plain,
            "batch": int(first["image"].shape[0]), "cases": len(parts["loader"].dataset), "shape": tuple(first["image"].shape[2:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    ap.add_argument("--cases", type=int, default=0,
                    help="training images in the CacheDataset (0: all; keep >= 2 x (steps + warmup + 1) so no "
                         "epoch, i.e. no worker start-up, begins while timing)")
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--filters", "--network-filters", type=int, nargs="+", default=[128, 32],
                    help="SCN widths to measure (128 = the 2D default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = require_isbi()

    print(header("training step, full pipeline vs. batch in memory"))
    rows, results = [], []
    for f in args.filters:
        r = measure(data_dir, f, args)
        results.append(r)
        b = r["batch"]
        rows.append([f"SCN2019 {f} filters", f"{b} x {' x '.join(map(str, r['shape']))}", f"{b / r['full']:.2f}",
                     f"{b / r['meta']:.2f}", f"{b / r['plain']:.2f}", f"{(r['full'] / r['plain'] - 1) * 100:+.1f}%",
                     f"{(r['meta'] / r['plain'] - 1) * 100:+.1f}%", f"{r['cache_s']:.1f}"])
    print(f"{results[0]['cases']} cached training images, {args.num_workers} DataLoader workers, {args.warmup} warm-up + "
          f"{args.steps} timed steps (median), fp32\n")
    print(table(["network", "batch", "full samples/s", "in memory (MetaTensor) samples/s",
                 "in memory (tensor) samples/s", "overhead full", "of which MetaTensor", "cache fill s"], rows))
    print()
    for r in results:
        ov = (r["full"] / r["plain"] - 1) * 100
        verdict = ("met" if ov <= 15 else "MISSED") if r["filters"] == 128 else "(reference only)"
        print(f"{r['filters']} filters: t_full / t_memory = {r['full'] / r['plain']:.3f} "
              f"(overhead {ov:+.1f}%; target <= 15% for the 128-filter default: {verdict})")


if __name__ == "__main__":
    main()
