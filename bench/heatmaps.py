"""Heatmap generation: heatmark vs. MONAI's GenerateHeatmap, side by side in one run.

For each case (19 landmarks on 512 x 512; 32 landmarks on 96 x 96 x 96) both generate peak-1
Gaussian heatmaps (sigma in voxels) for the same random sub-voxel points on the CPU. Printed per
case: the median time of each, the speed-up over MONAI, the largest absolute error of each against
a float64 analytic reference, and the physical floor: the time to create a filled float32 tensor
of the output size (``torch.ones``) in the same run, with our time as a multiple of it.

Usage: python bench/heatmaps.py [--repeats 30] [--threads N] [--sigma 3]
Targets (issue 2): >= 50x faster than MONAI, <= 1.5x the floor, error <= 1e-5.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from monai.transforms import GenerateHeatmap

from heatmark.core.heatmaps import gaussian_heatmaps


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def max_error(heatmaps: torch.Tensor, points: np.ndarray, sigma: float) -> float:
    """Largest |h - exact| over all voxels, the exact Gaussian evaluated in float64 per landmark."""
    shape = heatmaps.shape[1:]
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij", sparse=True)
    worst = 0.0
    for k, p in enumerate(points):
        exact = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, p)) / (2.0 * sigma**2))
        worst = max(worst, float(np.abs(heatmaps[k].double().numpy() - exact).max()))
    return worst


def run_case(name: str, shape: tuple[int, ...], n: int, sigma: float, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    # random sub-voxel positions, away from the border so neither method is clipped
    pts = rng.uniform(8, np.array(shape) - 9, size=(n, len(shape)))
    pts_t = torch.as_tensor(pts)
    ours_fn = lambda: gaussian_heatmaps(pts_t, shape, sigma=sigma)  # noqa: E731
    monai = GenerateHeatmap(sigma=sigma, spatial_shape=shape, normalize=True)
    pts_f = torch.as_tensor(pts, dtype=torch.float32)
    monai_fn = lambda: monai(pts_f)  # noqa: E731
    floor_fn = lambda: torch.ones((n, *shape), dtype=torch.float32)  # noqa: E731

    # interleave the measurements so that machine load affects all three alike
    t_ours, t_floor, t_monai = [], [], []
    for _ in range(3):
        t_ours.append(median_time(ours_fn, repeats))
        t_floor.append(median_time(floor_fn, repeats))
        t_monai.append(median_time(monai_fn, max(3, repeats // 10), warmup=1))
    ours, floor, ref = min(t_ours), min(t_floor), min(t_monai)
    return {
        "name": name,
        "ours_s": ours,
        "monai_s": ref,
        "floor_s": floor,
        "speedup": ref / ours,
        "floor_ratio": ours / floor,
        "err_ours": max_error(ours_fn(), pts, sigma),
        "err_monai": max_error(torch.as_tensor(monai_fn()), pts, sigma),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--sigma", type=float, default=3.0, help="Gaussian sigma in voxels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cases = [("2D 19 x 512 x 512", (512, 512), 19), ("3D 32 x 96 x 96 x 96", (96, 96, 96), 32)]
    print(f"# heatmap generation, CPU: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, sigma {args.sigma} voxels")
    for i, (name, shape, n) in enumerate(cases):
        r = run_case(name, shape, n, args.sigma, args.repeats, seed=i)
        print(f"\n## {r['name']}")
        print(f"heatmark gaussian_heatmaps   median {r['ours_s'] * 1e3:9.2f} ms   max abs error {r['err_ours']:.1e}")
        print(f"MONAI GenerateHeatmap        median {r['monai_s'] * 1e3:9.2f} ms   max abs error {r['err_monai']:.1e}")
        print(f"floor torch.ones (same size) median {r['floor_s'] * 1e3:9.2f} ms")
        print(f"speed-up over MONAI GenerateHeatmap: {r['speedup']:.0f}x")
        print(f"heatmark time / torch.ones floor: {r['floor_ratio']:.2f}")
        ok = r["speedup"] >= 50 and r["floor_ratio"] <= 1.5 and r["err_ours"] <= 1e-5
        print(f"targets (>= 50 times MONAI, <= 1.5 floor, error <= 1e-5): {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
