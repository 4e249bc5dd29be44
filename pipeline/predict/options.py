"""What a ``heatmark predict`` run takes (:class:`PredictOptions`) and gives back
(:class:`PredictSummary`, its exit status)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from heatmark.predict.errors import PredictUsageError

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "FORMATS", "DEFAULT_FORMATS",
           "PredictOptions", "PredictSummary", "check_options"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Per-case landmark formats (``csv`` is the aggregate ``landmarks.csv``).
FORMATS = ("csv", "mrk.json", "fcsv", "json")
DEFAULT_FORMATS = ("csv", "mrk.json")


@dataclass
class PredictOptions:
    """Everything ``heatmark predict`` takes; see :func:`heatmark.predict.add_predict_parser` for the meaning."""

    bundle: str | os.PathLike
    input: str | os.PathLike
    output: str | os.PathLike
    model: str | os.PathLike | None = None
    configs: Sequence[str] = ()
    device: str = "auto"
    batch_size: int = 1
    num_workers: int | None = None  # None: min(4, cpus)
    spacing: Sequence[float] | None = None
    pixel_units: bool = False
    amp: bool | None = None  # None: the bundle's `amp`, on CUDA only
    save_heatmaps: bool = False
    overlays: bool = False
    formats: Sequence[str] = DEFAULT_FORMATS
    overwrite: bool = False
    recursive: bool = False
    pattern: str | None = None
    progress: bool = True
    backend: str = "torch"  # where the network runs: torch, or onnxruntime (models/model.onnx, CPU)


@dataclass
class PredictSummary:
    """What a run did. ``failures`` are ``(case, path, error)`` of this run; ``warned`` counts the
    landmarks of this run's cases set missing (predicted outside the image, see warnings.csv). Under
    torchrun the counts are those of all processes (of this one after an interruption)."""

    output: Path
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    warned: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    rank: int = 0  # under torchrun: this process's rank (0 prints the summary) and the number of processes
    world_size: int = 1

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed else EXIT_OK

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        procs = f" over {self.world_size} processes" if self.world_size > 1 else ""
        text = (f"{self.processed} processed, {self.skipped} skipped (done before), {self.failed} failed "
                f"in {self.seconds:.1f} s ({rate:.2f} cases/s{procs}); results in {self.output}")
        if self.failed:
            text += f" (failures listed in {self.output / 'errors.csv'})"
        if self.warned:
            text += (f"; {self.warned} landmark{'s' if self.warned != 1 else ''} set missing, predicted outside "
                     f"the image (listed in {self.output / 'warnings.csv'})")
        return text


def check_options(opts: PredictOptions) -> PredictOptions:
    """``opts`` checked and normalised: formats as a tuple of known names without duplicates,
    ``num_workers`` resolved, ``spacing`` as a list of floats.

    Raises:
        PredictUsageError: an unknown or no format, a batch size below 1, negative workers, a
            spacing that is not positive.
    """
    formats: list[str] = []
    for item in opts.formats or ():
        for f in str(item).split(","):
            f = f.strip().lower().lstrip(".")
            if not f:
                continue
            if f not in FORMATS:
                raise PredictUsageError(f"--format {f!r}: choose among {', '.join(FORMATS)}")
            if f not in formats:
                formats.append(f)
    if not formats:
        raise PredictUsageError(f"--format: choose at least one of {', '.join(FORMATS)}")
    if opts.backend not in ("torch", "onnxruntime"):
        raise PredictUsageError(f"--backend {opts.backend!r}: choose torch or onnxruntime")
    if int(opts.batch_size) < 1:
        raise PredictUsageError(f"--batch-size must be at least 1, got {opts.batch_size}")
    workers = min(4, os.cpu_count() or 1) if opts.num_workers is None else int(opts.num_workers)
    if workers < 0:
        raise PredictUsageError(f"--num-workers must be 0 or more, got {opts.num_workers}")
    spacing = None
    if opts.spacing is not None:
        spacing = [float(s) for s in np.atleast_1d(np.asarray(opts.spacing, dtype=np.float64))]
        if not spacing or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise PredictUsageError(f"--spacing must be positive numbers (mm), got {opts.spacing}")
    return PredictOptions(**{**opts.__dict__, "formats": tuple(formats), "batch_size": int(opts.batch_size),
                             "num_workers": workers, "spacing": spacing})
