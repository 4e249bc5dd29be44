"""Evaluate predicted landmarks against the truth from two landmark tables (world mm), as
``heatmark evaluate`` and the demo do: point errors, statistics, per-landmark table, plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from heatmark.evaluation.metrics import normalize_by_reference, point_errors, summarize
from heatmark.evaluation.reports import write_evaluation
from heatmark.landmarks import read_landmark_table

__all__ = ["TableEvaluation", "evaluate_tables", "summary_lines"]


@dataclass
class TableEvaluation:
    """What :func:`evaluate_tables` found.

    Attributes:
        cases: cases present in both tables, in the truth's order.
        missing: cases of the truth without a prediction (not scored).
        names: landmark names, in the truth's order.
        pred, truth: ``(cases, N, D)`` world coordinates in mm (NaN = missing).
        errors: ``(cases, N)`` point errors in mm (normalised when asked).
        summary: :func:`heatmark.evaluation.metrics.summarize` of ``errors``.
        files: the evaluation files written (name -> path).
    """

    cases: list[str]
    missing: list[str]
    names: list[str]
    pred: np.ndarray
    truth: np.ndarray
    errors: np.ndarray
    summary: dict
    files: dict[str, Path] = field(default_factory=dict)


def evaluate_tables(pred_file: str | os.PathLike, truth_file: str | os.PathLike, output: str | os.PathLike,
                    normalize: Sequence[str] | None = None, length_mm: float = 50.0) -> TableEvaluation:
    """Compare the landmarks of ``pred_file`` with ``truth_file`` and write the evaluation files to
    ``output`` (see :func:`heatmark.evaluation.reports.write_evaluation`).

    Args:
        pred_file, truth_file: landmark tables in any registered format (world mm); predictions are
            matched to the truth by case and landmark name.
        output: folder for the tables and plots.
        normalize: two landmark names ``(a, b)``: rescale each case's errors so that the true
            distance a-b equals ``length_mm`` (e.g. 50 mm wrist width for hand radiographs).

    Raises:
        ValueError: no case in common, different dimensions, or no landmark name in common.
    """
    pred_table = read_landmark_table(pred_file)
    truth_table = read_landmark_table(truth_file)
    cases = [c for c in truth_table if c in pred_table]
    if not cases:
        raise ValueError(f"no case of {truth_file} appears in {pred_file}")
    missing = [c for c in truth_table if c not in pred_table]
    names = list(truth_table[cases[0]].names)
    pred_dims, truth_dims = pred_table[cases[0]].coords.shape[1], truth_table[cases[0]].coords.shape[1]
    if pred_dims != truth_dims:
        raise ValueError(f"{pred_file} holds {pred_dims}D landmarks but {truth_file} holds {truth_dims}D landmarks")
    pred_names = set(pred_table[cases[0]].names)
    if not pred_names & set(names):
        raise ValueError(f"{pred_file} shares no landmark name with {truth_file} "
                         f"(e.g. {sorted(pred_names)[0]!r} vs {names[0]!r})")
    pred = np.stack([pred_table[c].select(names).coords for c in cases])
    truth = np.stack([truth_table[c].coords for c in cases])
    errors = point_errors(pred, truth)
    if normalize:
        errors = normalize_by_reference(pred, truth, tuple(normalize), names, length_mm)
    files = write_evaluation(Path(output), errors, cases, names, pred, truth)
    return TableEvaluation(cases, missing, names, pred, truth, errors, summarize(errors), files)


def summary_lines(result: TableEvaluation) -> list[str]:
    """The few lines ``heatmark evaluate`` prints: counts, MRE, SDR, outliers, files."""
    s = result.summary
    lines = [f"{len(result.cases)} cases x {len(result.names)} landmarks"
             + (f" ({len(result.missing)} cases without prediction)" if result.missing else ""),
             f"MRE {s['mean']:.2f} +- {s['sd']:.2f} mm, median {s['median']:.2f} mm, max {s['max']:.2f} mm",
             "SDR " + ", ".join(f"{k[4:-2]} mm {v:.1f}%" for k, v in s.items() if k.startswith("sdr_")),
             f"outliers > 10 mm: {s['outliers_10mm']} ({s['outliers_pct_10mm']:.2f}%); "
             f"not detected: {s['n_not_detected']}",
             f"written: {', '.join(str(p) for p in result.files.values())}"]
    return lines
