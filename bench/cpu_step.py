"""CPU training step of the ISBI CPU overlay, side by side: eager float32 against channels_last,
torch.compile (inductor), bf16 autocast, and thread settings — each row in a fresh process.

The step is ``LandmarkTrainer``'s (forward, ``HeatmapLoss`` with learned sigma in float32, backward,
Adam) on the ``isbi2015_cephalometric`` + ``cpu.yaml`` setting: SCN 2019 with 32 filters, 19
landmarks, batch 2 x 192 x 240 (1 mm pixels). Inputs are random, so no data is needed; DataLoader
workers are measured by ``bench/pipeline_overhead.py``. ``torch.compile`` rows report the one-off
compile time apart from the step time, and say so when compiling fails (no C++ compiler). Every
timing depends on the CPU: the header gives its model, torch's kernel level and whether bf16 is native.

Usage: python bench/cpu_step.py [--steps 6] [--warmup 3] [--filters 32] [--size 192 240]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from _timing import header, median, table, time_steps

from heatmark.networks import SpatialConfigurationNet
from heatmark.training import autocast_context
from heatmark.training.losses import HeatmapLoss

#: (label, channels_last, compile, bf16 autocast, torch threads (0: torch's default), interop threads (0: default))
VARIANTS = [
    ("eager fp32 (today's CPU overlay on a CPU without native bf16)", False, False, False, 0, 0),
    ("eager fp32, channels_last", True, False, False, 0, 0),
    ("torch.compile fp32", False, True, False, 0, 0),
    ("torch.compile fp32, channels_last", True, True, False, 0, 0),
    ("eager bf16 autocast", False, False, True, 0, 0),
    ("eager fp32, 1 thread", False, False, False, 1, 0),
    ("eager fp32, interop threads 1", False, False, False, 0, 1),
]


def measure(filters: int, size: list[int], batch: int, landmarks: int, channels_last: bool, compile_: bool,
            bf16: bool, threads: int, interop: int, steps: int, warmup: int) -> tuple[float, float, str]:
    """(median step s, compile s, note) of one variant, in this (fresh) process."""
    if threads:
        torch.set_num_threads(threads)
    if interop:
        torch.set_num_interop_threads(interop)
    torch.manual_seed(0)
    net = SpatialConfigurationNet(2, 1, landmarks, filters=filters).train()
    loss_fn = HeatmapLoss(landmarks, sigma=1.5, learn_sigma=True, alpha=20.0, gamma=100.0, reduction="sum")
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=5e-4)
    x = torch.randn(batch, 1, *size)
    pts = torch.rand(batch, landmarks, 2) * (torch.tensor(size) - 1)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model = torch.compile(net) if compile_ else net
    amp = {"dtype": torch.bfloat16}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context("cpu", bf16, amp):
            pred = model(x)
        loss_fn(pred, pts).mean().backward()
        opt.step()

    compile_s, note = 0.0, ""
    if compile_:
        t0 = time.perf_counter()
        try:
            step()
        except Exception as e:  # noqa: BLE001 - reported in the table, the other rows go on
            return float("nan"), 0.0, f"compile failed: {str(e).splitlines()[0][:80]}"
        compile_s = time.perf_counter() - t0
    return median(time_steps(step, steps, warmup)), compile_s, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each row")
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--size", type=int, nargs=2, default=[192, 240])
    args = ap.parse_args()
    print(header("CPU training step, SCN 2019 2D (ISBI cpu.yaml setting)"))
    print(f"{args.filters} filters, batch 2 x {args.size[0]} x {args.size[1]}, 19 landmarks; {args.warmup} warm-up + "
          f"{args.steps} timed steps per row (median); {os.cpu_count()} CPUs; each row in a fresh process\n")
    rows, base = [], None
    ctx = multiprocessing.get_context("spawn")
    for label, cl, comp, bf16, threads, interop in VARIANTS:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            t, compile_s, note = pool.submit(measure, args.filters, args.size, 2, 19, cl, comp, bf16, threads,
                                             interop, args.steps, args.warmup).result()
        base = base if base is not None else t
        rows.append([label, f"{t * 1e3:.0f}" if t == t else "-", f"{base / t:.2f}x" if t == t else "-",
                     f"{compile_s:.0f}" if compile_s else "", note])
    print(table(["variant", "step ms", "speed vs eager fp32", "compile s", "note"], rows))


if __name__ == "__main__":
    main()
