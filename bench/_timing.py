"""Small helpers shared by the bench scripts: the header line, step timing, peak memory, data paths."""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from heatmark.training.precision import cpu_info

REPO = Path(__file__).resolve().parents[1]
ISBI_DIR = REPO.parent / "shared" / "data" / "isbi2015"


def header(title: str) -> str:
    """``# title, CPU: <model>, <torch capability>, native bf16 or not, N torch threads, torch X``
    (plus the GPU when there is one): a timing means little without the machine it came from."""
    gpu = f", GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"# {title}, CPU: {cpu_info().describe()} ({platform.machine()}), {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}{gpu}")


def require_isbi() -> Path:
    """The ISBI 2015 data folder, or exit with a clear message when it is absent."""
    if not (ISBI_DIR / "images").is_dir() or not (ISBI_DIR / "landmarks.csv").is_file():
        sys.exit(f"ISBI 2015 data not found at {ISBI_DIR} (expected images/, landmarks.csv, splits/); "
                 "this benchmark needs it")
    return ISBI_DIR


def time_steps(step: Callable[[], object], steps: int, warmup: int = 2) -> list[float]:
    """Run ``step`` ``warmup`` times untimed, then ``steps`` times; the seconds of each timed call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def maxrss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table; every column after the first right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
