"""Peak memory and wall time of 3D prediction: whole-volume vs sliding windows (dense and streamed).

One synthetic volume (default 512 x 512 x 400 voxels at 1 mm, a bright blob per landmark) and a
network with RANDOM weights (``heatmark.networks.get_network(--network)``, ``--landmarks`` output
channels; the weights do not change the memory or the time). Each configuration runs in its own
child process, so each peak RSS (``ru_maxrss``) is its own:

- ``whole``: today's path without patches, the network on the whole volume (``SimpleInferer``)
  and :func:`heatmark.evaluation.decode_heatmaps`; run on the cubes of ``--whole-sizes`` (the big
  volume needs ``landmarks x volume`` floats of heatmaps plus the network's activations on the
  whole volume: it does not fit in most machines' memory);
- ``dense``: MONAI's ``SlidingWindowInferer`` (roi ``--roi``, overlap ``--overlap``), whose output
  buffer holds ``landmarks x volume`` floats, then decoding;
- ``stream``: :class:`heatmark.evaluation.StreamingSlidingWindowInferer` (same windows), which
  keeps one slab of windows and the boxes around the peaks, then decoding;
- ``baseline``: the child with torch imported and the volume allocated, nothing run (the floor
  under every RSS).

``dense`` runs on the big volume only with ``--dense-big`` (13 GB for 32 landmarks at 512 x 512 x
400); otherwise on the largest ``--whole-sizes`` cube, where the three paths are compared side by
side (and their decoded landmarks checked equal between dense and stream).

Windows per network call (``--sw-batch-size``, default 4): on the CPU, torch 2.13 runs a 3D
convolution of a batch of one through its slow reference kernel (``slow_conv3d_forward``, several
times slower per voxel than the oneDNN kernel it uses for larger batches), so one window per call
is much slower than a batch of windows.

Stitching overhead: the network forward through the sliding-window path (streamed, ``overlap 0``)
against the same network on one tensor of the same size (a volume of ``--forward-windows`` windows
per axis), median of ``--repeats``; target: within 25%.

Usage: python bench/memory_3d.py [--size 512 512 400] [--landmarks 32] [--roi 96 96 96]
       [--overlap 0.25] [--whole-sizes 96 128 160] [--network unet] [--filters 8] [--threads N]
       [--dense-big] [--forward-windows 2] [--repeats 3] [--sw-batch-size 4]
A quick check that it works: --size 96 80 64 --landmarks 4 --roi 32 32 32 --whole-sizes 48 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _timing import header, maxrss_mib, median, table
from heatmark.evaluation import decode_heatmaps, landmark_inferer
from heatmark.networks import get_network


def make_volume(size: list[int], landmarks: int, seed: int = 0) -> torch.Tensor:
    """``(1, 1, *size)`` float32: noise plus one Gaussian blob (sigma 3 voxels) per landmark."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *size, generator=g) * 0.05
    for _ in range(landmarks):
        c = [int(torch.randint(8, max(s - 8, 9), (1,), generator=g)) for s in size]
        sl = tuple(slice(max(ci - 9, 0), ci + 10) for ci in c)
        axes = torch.meshgrid(*[torch.arange(s.start, min(s.stop, n), dtype=torch.float32) for s, n in zip(sl, size)],
                              indexing="ij")
        r2 = sum((a - ci) ** 2 for a, ci in zip(axes, c))
        x[(0, 0, *sl)] += torch.exp(-0.5 * r2 / 9.0)
    return x


def build_network(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_network(args.network, spatial_dims=3, in_channels=1, num_landmarks=args.landmarks,
                       filters=args.filters).eval()


def child(args: argparse.Namespace) -> None:
    """One configuration in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    size = args.child_size
    volume = make_volume(size, args.landmarks)
    net = build_network(args)
    result: dict = {"config": args.child, "size": size}
    with torch.inference_mode():
        t0 = time.perf_counter()
        if args.child == "whole":
            dec = decode_heatmaps(net(volume), method="quadratic")
        elif args.child in ("dense", "stream"):
            inferer = landmark_inferer(args.roi, overlap=args.overlap, mode="gaussian", sw_batch_size=args.sw_batch_size,
                                       stream=args.child == "stream")
            pred = inferer(volume, net)
            dec = pred.decode() if args.child == "stream" else decode_heatmaps(pred, method="quadratic")
            if args.child == "stream":
                result["rows_held"] = inferer.rows_held
        elif args.child == "forward":
            # the network on one tensor vs through streamed windows without overlap (stitching overhead)
            one = median([_timed(lambda: net(volume)) for _ in range(args.repeats)])
            sw = landmark_inferer(args.roi, overlap=0.0, mode="constant", sw_batch_size=args.sw_batch_size, stream=True)
            windows = median([_timed(lambda: sw(volume, net)) for _ in range(args.repeats)])
            result.update(one_tensor_s=one, sliding_window_s=windows)
            dec = None
        else:  # baseline
            dec = None
        result["seconds"] = time.perf_counter() - t0
    result["maxrss_mib"] = maxrss_mib()
    if dec is not None:
        result["voxel"] = dec.voxel[0].tolist()
    print(json.dumps(result), flush=True)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spawn(args: argparse.Namespace, config: str, size: list[int]) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--child-size", *map(str, size),
           "--landmarks", str(args.landmarks), "--roi", *map(str, args.roi), "--overlap", str(args.overlap),
           "--network", args.network, "--filters", str(args.filters), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--sw-batch-size", str(args.sw_batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        reason = "killed (out of memory?)" if proc.returncode < 0 else tail[0][:160]
        return {"config": config, "size": size, "error": f"exit {proc.returncode}: {reason}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 400])
    p.add_argument("--landmarks", type=int, default=32)
    p.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96])
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--whole-sizes", type=int, nargs="+", default=[96, 128, 160])
    p.add_argument("--network", default="unet")
    p.add_argument("--filters", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dense-big", action="store_true")
    p.add_argument("--forward-windows", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-size", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    torch.set_num_threads(args.threads)
    print(header("3D prediction memory: whole volume vs sliding windows (dense, streamed)"))
    print(f"# network {args.network} (filters {args.filters}, random weights), {args.landmarks} landmarks, "
          f"roi {args.roi}, overlap {args.overlap}, {args.sw_batch_size} windows per call, {args.threads} threads; "
          "one process per row")
    runs = []
    for edge in args.whole_sizes:
        runs.append(spawn(args, "whole", [edge] * 3))
    mid = [max(args.whole_sizes)] * 3
    runs += [spawn(args, "baseline", mid), spawn(args, "dense", mid), spawn(args, "stream", mid)]
    runs.append(spawn(args, "baseline", args.size))
    if args.dense_big:
        runs.append(spawn(args, "dense", args.size))
    runs.append(spawn(args, "stream", args.size))

    rows = []
    for r in runs:
        voxels = r["size"][0] * r["size"][1] * r["size"][2]
        heat_mib = args.landmarks * voxels * 4 / 2**20
        if "error" in r:
            rows.append([r["config"], "x".join(map(str, r["size"])), f"{heat_mib:.0f}", "-", "-", r["error"]])
            continue
        note = ""
        if "rows_held" in r:  # the streamed slab: rows of the first axis, all channels, the full width
            slab = args.landmarks * r["rows_held"] * r["size"][1] * r["size"][2] * 4 / 2**20
            note = f"slab {r['rows_held']} rows, {slab:.0f} MiB"
        rows.append([r["config"], "x".join(map(str, r["size"])), f"{heat_mib:.0f}", f"{r['maxrss_mib']:.0f}",
                     f"{r['seconds']:.2f}", note])
    print(table(["path", "volume", "N x volume fp32 (MiB)", "peak RSS (MiB)", "wall (s)", "note"], rows))

    by = {(r["config"], tuple(r["size"])): r for r in runs if "error" not in r}
    d, s, w, b = (by.get((k, tuple(mid))) for k in ("dense", "stream", "whole", "baseline"))
    if d and s and w and b:
        print(f"\nratios at {'x'.join(map(str, mid))} (RSS above the baseline {b['maxrss_mib']:.0f} MiB): "
              f"stream / dense {(s['maxrss_mib'] - b['maxrss_mib']) / max(d['maxrss_mib'] - b['maxrss_mib'], 1):.2f}, "
              f"stream / whole {(s['maxrss_mib'] - b['maxrss_mib']) / max(w['maxrss_mib'] - b['maxrss_mib'], 1):.2f}; "
              f"time stream / dense {s['seconds'] / d['seconds']:.2f}, stream / whole {s['seconds'] / w['seconds']:.2f}")
        same = torch.allclose(torch.tensor(d["voxel"]), torch.tensor(s["voxel"]), atol=1e-6, equal_nan=True)
        print(f"dense and streamed decode to the same landmarks: {same}")
    big_s, big_b = by.get(("stream", tuple(args.size))), by.get(("baseline", tuple(args.size)))
    if big_s and big_b:
        print(f"{'x'.join(map(str, args.size))}: streamed peak RSS {big_s['maxrss_mib']:.0f} MiB "
              f"({big_s['maxrss_mib'] - big_b['maxrss_mib']:.0f} above the volume alone), vs "
              f"{args.landmarks * args.size[0] * args.size[1] * args.size[2] * 4 / 2**20:.0f} MiB for dense heatmaps alone")

    fw_size = [r * args.forward_windows for r in args.roi]
    f = spawn(args, "forward", fw_size)
    if "error" in f:
        print(f"\nforward comparison failed: {f['error']}")
    else:
        ratio = f["sliding_window_s"] / f["one_tensor_s"]
        print(f"\nnetwork forward on {'x'.join(map(str, fw_size))}: one tensor {f['one_tensor_s']:.3f} s, "
              f"streamed windows (overlap 0, {args.forward_windows ** 3} windows) {f['sliding_window_s']:.3f} s, "
              f"ratio {ratio:.2f} (target <= 1.25)")


if __name__ == "__main__":
    main()
