"""Training-step time and peak memory: fp32 vs. bf16 autocast on the CPU (and fp16/bf16 on CUDA).

The step is ``LandmarkTrainer``'s: forward under ``heatmark.training.autocast_context`` (CPU:
``torch.autocast('cpu', bfloat16)``; CUDA: fp16 with a GradScaler, or bf16), the loss
(``HeatmapLoss``, targets rendered on the device) in float32, backward, Adam step. Inputs are random
images with random landmark positions, so no data is needed. Settings:

- 2D: SpatialConfiguration-Net 2019 default (128 filters), 19 landmarks, batch 2 x 256 x 320 (the
  ``isbi2015_cephalometric`` bundle's input size)
- 3D: SCN 2019 with ``--filters-3d`` (32) filters, 32 landmarks, batch 1 x ``--size-3d`` (48 x 56 x 48)

Every row runs in a fresh (spawned) process. Peak memory: CPU rows give that process's ru_maxrss
(peak RSS, including the ~few hundred MiB of torch itself) and its growth during the steps (torch
on the CPU has no allocator statistics); CUDA rows give ``torch.cuda.max_memory_allocated``. CUDA rows read "not measured: no GPU" without one.

Usage: python bench/mixed_precision.py [--steps 5] [--warmup 2] [--filters-3d 32] [--size-3d 48 56 48] [--threads N]
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch
from _timing import header, maxrss_mib, median, table, time_steps

from heatmark.training import autocast_context
from heatmark.training.losses import HeatmapLoss
from heatmark.networks import SpatialConfigurationNet


def measure(dims: int, filters: int | None, batch: int, size: list[int], landmarks: int, device: str,
            dtype: torch.dtype | None, steps: int, warmup: int, threads: int | None) -> tuple[float, str]:
    """(median step seconds, peak memory text) of one setting; ``dtype`` None = fp32."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    net = SpatialConfigurationNet(dims, 1, landmarks, filters=filters).to(dev).train()
    loss_fn = HeatmapLoss(landmarks, sigma=2.0, learn_sigma=True, alpha=20.0, gamma=100.0).to(dev)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    x = torch.randn(batch, 1, *size, device=dev)
    pts = (torch.rand(batch, landmarks, dims) * (torch.tensor(size) - 1)).to(dev)
    amp_kwargs = {"dtype": dtype} if dtype is not None else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(dev, dtype is not None, amp_kwargs):
            pred = net(x)
        loss = loss_fn(pred, pts).mean()  # HeatmapLoss computes in float32
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        t = median(time_steps(step, steps, warmup))
        return t, f"{torch.cuda.max_memory_allocated() / 2**20:.0f} (max allocated)"
    before = maxrss_mib()
    t = median(time_steps(step, steps, warmup))
    return t, f"{maxrss_mib():.0f} peak RSS (+{maxrss_mib() - before:.0f} in the steps)"


def measure_in_fresh_process(*args) -> tuple[float, str]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each row")
    ap.add_argument("--filters-3d", type=int, default=32, help="SCN width of the 3D setting")
    ap.add_argument("--size-3d", type=int, nargs=3, default=[48, 56, 48], help="3D input size (voxels)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = [("3D", 3, args.filters_3d, 1, args.size_3d, 32), ("2D", 2, None, 2, [256, 320], 19)]
    precisions = [("cpu", "fp32", None), ("cpu", "bf16 autocast", torch.bfloat16),
                  ("cuda", "fp32", None), ("cuda", "fp16 autocast + GradScaler", torch.float16),
                  ("cuda", "bf16 autocast", torch.bfloat16)]
    print(header("training step, fp32 vs. mixed precision"))
    print(f"{args.warmup} warm-up + {args.steps} timed steps per row (median)\n")
    rows, ratios = [], []
    for label, dims, filters, batch, size, n in settings:
        name = f"{label} SCN2019 {filters or 128} filters, {batch} x {' x '.join(map(str, size))}, {n} landmarks"
        base = {}
        for device, prec, dtype in precisions:
            if device == "cuda" and not torch.cuda.is_available():
                rows.append([name, device, prec, "not measured: no GPU", "", ""])
                continue
            t, mem = measure_in_fresh_process(dims, filters, batch, size, n, device, dtype, args.steps, args.warmup,
                                              args.threads)
            base.setdefault(device, t)
            rows.append([name, device, prec, f"{t * 1e3:.0f}", f"{base[device] / t:.2f}x",
                         mem])
            if dtype is not None:
                ratios.append(f"{name}, {device} {prec}: {base[device] / t:.2f}x the fp32 speed")
    print(table(["setting", "device", "precision", "step ms", "speed vs fp32", "peak memory MiB"], rows))
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
