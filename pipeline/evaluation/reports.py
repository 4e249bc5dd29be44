"""Evaluation reports: plots of landmark errors and overlays, and the evaluation output folder.

Plots are drawn with matplotlib's object-oriented API on an Agg canvas (no :mod:`matplotlib.pyplot`,
no global figure state, never a window) and saved as PNG. Every file is written to a temporary
name and renamed (:func:`heatmark.core.fileio.atomic_path`), so an interrupted run leaves no
half-written output.

Errors follow :mod:`heatmark.evaluation.metrics`: ``(C, N)`` arrays in mm, NaN where the landmark is missing
in the truth (left out everywhere), ``+inf`` where it was not detected (counted in the
denominator of the success detection rate, left out of means and box plots and reported as a
count).

Image display (:func:`plot_overlay`): arrays are indexed by voxel axes ``(i, j[, k])`` as in
:mod:`heatmark.core.geometry`; for 2D images axis 0 is x (the columns) and axis 1 is y (the rows), so
the *transpose* of the array is shown with the origin at the upper left, which shows a picture read
by MONAI's PIL reader the right way up. Points are mapped to voxel coordinates with
:func:`heatmark.core.geometry.world_to_voxel` and the image's affine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from heatmark.core.fileio import atomic_path, atomic_write_text, csv_text
from heatmark.core.geometry import spacing_from_affine, world_to_voxel
from heatmark.landmarks import Landmarks, write_landmark_table
from heatmark.evaluation.metrics import DEFAULT_OUTLIER_RADII, DEFAULT_RADII, per_landmark_table, point_errors, summarize

__all__ = [
    "plot_error_per_landmark",
    "plot_cumulative_error",
    "plot_overlay",
    "write_evaluation",
    "EVALUATION_FILES",
    "CONVENTIONS",
]

#: Keys of :func:`write_evaluation`'s result and the file names they stand for.
EVALUATION_FILES: dict[str, str] = {
    "metrics": "metrics.json",
    "per_landmark": "per_landmark.csv",
    "point_errors": "point_errors.csv",
    "predictions": "predictions.csv",
    "plot_error_per_landmark": "error_per_landmark.png",
    "plot_cumulative_error": "cumulative_error.png",
}

#: The conventions written into ``metrics.json``.
CONVENTIONS: dict[str, str] = {
    "units": "mm; coordinates in world space, RAS",
    "error": "Euclidean distance between predicted and true landmark",
    "sdr": "share of landmarks with error <= r mm, denominator: landmarks present in the truth (percent)",
    "outliers": "count of landmarks with error > r mm (outliers_pct: percent of the same denominator)",
    "missing_truth": "landmarks missing in the truth are excluded from every statistic (n_missing_truth)",
    "not_detected": "landmarks present in the truth but not predicted count as misses in sdr and as "
                    "outliers at every radius, and are left out of mean/sd/median/max (n_not_detected)",
    "sd": "population standard deviation (ddof=0)",
}

_DPI = 100


# ----------------------------------------------------------------------------------------------
# helpers


def _numpy(x: Any) -> np.ndarray:
    """Array-like (tensor or MetaTensor included) as a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().as_subclass(torch.Tensor).to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _errors(errors: Any) -> np.ndarray:
    e = _numpy(errors)
    if e.ndim == 1:
        e = e[None]
    if e.ndim != 2:
        raise ValueError(f"errors must have shape (C, N), got {e.shape}")
    return e


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return path


def plot_error_per_landmark(
    errors: Any,
    names: Sequence[str],
    path: str | Path,
    title: str | None = None,
    radii: Sequence[float] | None = None,
) -> Path:
    """Box plot of the point error of each landmark over the cases, mean marked.

    Args:
        errors: ``(C, N)`` mm (NaN: truth missing, left out; inf: not detected, counted and shown
            as ``"k not det."`` above the box, left out of the box and the mean).
        names: ``N`` landmark names (x axis).
        path: the PNG to write.
        title: figure title (default: ``"Point error per landmark"``).
        radii: optional radii in mm drawn as dashed horizontal lines (e.g. the SDR radii).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    e = _errors(errors)
    names = [str(n) for n in names]
    if len(names) != e.shape[1]:
        raise ValueError(f"{len(names)} names for {e.shape[1]} landmarks")
    n = len(names)
    finite = [col[np.isfinite(col)] for col in e.T]
    not_detected = [int(np.isinf(col).sum()) for col in e.T]

    fig = _new_figure(max(6.0, 0.45 * n + 2.0), 4.8)
    ax = fig.add_subplot()
    positions = np.arange(1, n + 1)
    if n:
        ax.boxplot([f if f.size else [np.nan] for f in finite], positions=positions, widths=0.6,
                   showfliers=True, flierprops={"markersize": 3})
        means = [float(f.mean()) if f.size else np.nan for f in finite]
        ax.plot(positions, means, linestyle="none", marker="D", markersize=4, color="tab:green", label="mean")
    top = max((float(f.max()) for f in finite if f.size), default=1.0)
    for r in radii or ():
        ax.axhline(float(r), linestyle="--", linewidth=0.8, color="tab:gray")
        ax.annotate(f"{float(r):g} mm", (1.0, float(r)), xycoords=("axes fraction", "data"), xytext=(-2, 1),
                    textcoords="offset points", fontsize=7, color="tab:gray", ha="right", va="bottom")
    for x, k in zip(positions, not_detected):
        if k:
            ax.annotate(f"{k} not det.", (x, top), xytext=(0, 4), textcoords="offset points", ha="center",
                        fontsize=7, color="tab:red", rotation=90 if n > 12 else 0)
    ax.set_xticks(positions, names, rotation=90 if n > 8 else 0, fontsize=8)
    ax.set_xlim(0.4, n + 0.6)
    ax.set_ylim(0.0, 1.15 * max([top, *(float(r) for r in radii or ())]))
    ax.set_ylabel("point error (mm)")
    ax.set_title(title or "Point error per landmark")
    if n:
        ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", linewidth=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _cdf(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sorted finite errors, the percentage of landmarks (truth present) at or below each, and
    the denominator."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    valid = e[~np.isnan(e)]
    finite = np.sort(valid[np.isfinite(valid)])
    n = int(valid.size)
    pct = 100.0 * np.arange(1, finite.size + 1) / n if n else np.zeros(0)
    return finite, pct, n


def plot_cumulative_error(
    errors: Any,
    path: str | Path,
    radii: Sequence[float] = (2.0, 2.5, 3.0, 4.0),
    label: str | None = None,
    others: Mapping[str, Any] | None = None,
    title: str | None = None,
    max_error: float | None = None,
) -> Path:
    """Cumulative distribution of point errors: x error (mm), y % of landmarks with error <= x.

    The denominator is the number of landmarks present in the truth (NaN errors are left out),
    so not-detected landmarks (inf) keep the curve below 100 %, as the SDR; the curve at a radius
    ``r`` reads SDR(r).

    Args:
        errors: errors in mm, any shape (typically ``(C, N)``).
        path: the PNG to write.
        radii: vertical dashed lines (mm).
        label: legend label of ``errors`` (default ``"model"``); the MRE is appended.
        others: further curves, ``{label: errors}`` (e.g. baselines), drawn on the same axes.
        title: figure title (default: ``"Cumulative point error"``).
        max_error: right end of the x axis in mm (default: the larger of twice the largest radius
            and the 95th percentile of all finite errors).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    curves = {label or "model": _numpy(errors)}
    for name, other in (others or {}).items():
        curves[str(name)] = _numpy(other)
    radii = [float(r) for r in radii]

    cdfs = {name: _cdf(e) for name, e in curves.items()}
    if max_error is None:
        pooled = np.concatenate([x for x, _, _ in cdfs.values()])
        q95 = float(np.percentile(pooled, 95)) if pooled.size else 0.0
        max_error = max(2.0 * max(radii, default=5.0), q95)
    max_error = float(max_error)

    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    for name, (x, y, n) in cdfs.items():
        mre = f"MRE {x.mean():.2f} mm" if x.size else "no errors"
        # start at (0, 0), step up at each error, run on flat to the right edge
        right = max(max_error, float(x[-1]) if x.size else 0.0)
        xs = np.concatenate([[0.0], x, [right]])
        ys = np.concatenate([[0.0], y, [y[-1] if y.size else 0.0]])
        ax.step(xs, ys, where="post", label=f"{name} ({mre}, n={n})")
    for r in radii:
        ax.axvline(r, linestyle="--", linewidth=0.8, color="tab:gray")
        ax.annotate(f"{r:g}", (r, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="tab:gray")
    ax.set_xlim(0.0, max_error)
    ax.set_ylim(0.0, 100.0)
    ax.set_xlabel("point error (mm)")
    ax.set_ylabel("landmarks with error <= x (%)")
    ax.set_title(title or "Cumulative point error")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(linewidth=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# overlays


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentile of the finite values (min/max if those coincide)."""
    values = image[np.isfinite(image)]
    if not values.size:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1.0, 99.0])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _draw_points(ax: Any, pred: np.ndarray, truth: np.ndarray | None, names: Sequence[str]) -> None:
    """Draw ``(N, 2)`` display points (x, y) of the prediction and truth with error lines and labels."""
    if truth is not None:
        for p, t in zip(pred, truth):
            if np.isfinite(p).all() and np.isfinite(t).all():
                ax.plot([p[0], t[0]], [p[1], t[1]], color="yellow", linewidth=0.8)
        ok = np.isfinite(truth).all(axis=1)
        ax.scatter(truth[ok, 0], truth[ok, 1], s=14, marker="o", facecolors="none", edgecolors="lime",
                   linewidths=1.0, label="truth")
    ok = np.isfinite(pred).all(axis=1)
    ax.scatter(pred[ok, 0], pred[ok, 1], s=16, marker="+", color="red", linewidths=1.0, label="prediction")
    for name, p in zip(names, pred):
        if np.isfinite(p).all():
            ax.annotate(str(name), (p[0], p[1]), xytext=(3, 3), textcoords="offset points", fontsize=6,
                        color="red", path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])


def _image_array(image: Any, spatial_dims: int) -> np.ndarray:
    img = _numpy(image)
    if img.ndim == spatial_dims + 1:
        img = img[0]  # channel-first: show the first channel
    if img.ndim != spatial_dims:
        raise ValueError(f"image must have shape (C, *S) or (*S) with {spatial_dims} spatial dims "
                         f"(from the points), got {img.shape}")
    return img


def plot_overlay(
    image: Any,
    affine: Any,
    pred_world: Any,
    path: str | Path,
    truth_world: Any | None = None,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw predicted (and true) landmarks on the image; error lines join prediction and truth.

    - 2D: the image with the points at their voxel positions. Array axis 0 is x (columns) and
      axis 1 is y (rows): the transpose is shown, origin at the upper left.
    - 3D: three orthogonal slices through the centroid of the predicted landmarks (voxel
      coordinates; the image centre when no landmark is predicted): the plane of axes (0, 1) at
      the centroid's index 2, axes (0, 2) at index 1 and axes (1, 2) at index 0. *All* points are
      projected orthogonally onto each view and labelled, so points away from the slice are drawn
      over anatomy of another depth. Axis 0 runs left to right and the vertical axis upwards in every
      view (origin at the lower left), so a RAS-oriented volume appears in neurological convention:
      right on the right, anterior up in the axial view, superior up in the others. Pixel aspect
      follows the voxel spacing.

    Args:
        image: ``(C, *S)`` (first channel shown) or ``(*S)`` array, tensor or MetaTensor.
        affine: the image's affine (``(D+1, D+1)``, or MONAI's 4x4 for 2D).
        pred_world, truth_world: ``(N, D)`` world coordinates in mm (NaN rows: missing, not drawn).
        path: the PNG to write.
        names: ``N`` labels (default ``"1"``..``"N"``).
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    pred_w = _numpy(pred_world)
    if pred_w.ndim != 2 or pred_w.shape[1] not in (2, 3):
        raise ValueError(f"pred_world must have shape (N, 2) or (N, 3), got {pred_w.shape}")
    d = pred_w.shape[1]
    truth_w = None if truth_world is None else _numpy(truth_world)
    if truth_w is not None and truth_w.shape != pred_w.shape:
        raise ValueError(f"truth_world must have the shape of pred_world {pred_w.shape}, got {truth_w.shape}")
    names = [str(i + 1) for i in range(pred_w.shape[0])] if names is None else [str(n) for n in names]
    if len(names) != pred_w.shape[0]:
        raise ValueError(f"{len(names)} names for {pred_w.shape[0]} landmarks")
    img = _image_array(image, d)
    pred_v = _numpy(world_to_voxel(pred_w, affine))
    truth_v = None if truth_w is None else _numpy(world_to_voxel(truth_w, affine))
    vmin, vmax = _display_range(img)
    spacing = spacing_from_affine(affine, d).numpy()

    if d == 2:
        fig = _new_figure(7.0, 7.0)
        ax = fig.add_subplot()
        ax.imshow(img.T, cmap="gray", vmin=vmin, vmax=vmax, origin="upper", interpolation="nearest",
                  aspect=float(spacing[1] / spacing[0]))
        _draw_points(ax, pred_v, truth_v, names)
        ax.set_xlim(-0.5, img.shape[0] - 0.5)
        ax.set_ylim(img.shape[1] - 0.5, -0.5)
        ax.set_xlabel("x (voxel axis 0)")
        ax.set_ylabel("y (voxel axis 1)")
        ax.legend(loc="lower right", fontsize=7)
        axes = [ax]
    else:
        ok = np.isfinite(pred_v).all(axis=1)
        centre = pred_v[ok].mean(axis=0) if ok.any() else (np.asarray(img.shape) - 1) / 2.0
        index = [int(np.clip(round(float(c)), 0, s - 1)) for c, s in zip(centre, img.shape)]
        # (horizontal axis, vertical axis, fixed axis, origin)
        views = [(0, 1, 2, "lower"), (0, 2, 1, "lower"), (1, 2, 0, "lower")]
        fig = _new_figure(15.0, 5.4)
        axes = []
        for col, (a, b, fixed, origin) in enumerate(views):
            ax = fig.add_subplot(1, 3, col + 1)
            plane = np.take(img, index[fixed], axis=fixed)  # axes (a, b) remain, in that order
            ax.imshow(plane.T, cmap="gray", vmin=vmin, vmax=vmax, origin=origin, interpolation="nearest",
                      aspect=float(spacing[b] / spacing[a]))
            _draw_points(ax, pred_v[:, [a, b]], None if truth_v is None else truth_v[:, [a, b]], names)
            ax.set_xlim(-0.5, img.shape[a] - 0.5)
            lims = (-0.5, img.shape[b] - 0.5)
            ax.set_ylim(lims if origin == "lower" else lims[::-1])
            ax.set_xlabel(f"voxel axis {a}")
            ax.set_ylabel(f"voxel axis {b}")
            ax.set_title(f"axis {fixed} = {index[fixed]}", fontsize=9)
            axes.append(ax)
        axes[0].legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# the evaluation folder


def write_evaluation(
    output_dir: str | Path,
    errors: Any,
    case_ids: Sequence[str],
    names: Sequence[str],
    pred_world: Any,
    truth_world: Any | None = None,
    radii: Sequence[float] = DEFAULT_RADII,
    outlier_radii: Sequence[float] = DEFAULT_OUTLIER_RADII,
    confidence: Any | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write the evaluation of a set of cases to ``output_dir`` (every file atomically).

    Files (keys of the result in brackets, see :data:`EVALUATION_FILES`):

    - ``metrics.json`` (``metrics``): :func:`heatmark.evaluation.metrics.summarize` of all errors (no
      per-landmark list) plus ``"radii"``, ``"outlier_radii"`` and ``"conventions"``
      (:data:`CONVENTIONS`, e.g. ``"sdr": "share of landmarks with error <= r mm, denominator:
      landmarks present in the truth (percent)"``); NaN is written as ``NaN``.
    - ``per_landmark.csv`` (``per_landmark``): ``landmark`` (1-based id) followed by the columns of
      :func:`heatmark.evaluation.metrics.per_landmark_table` (with the outlier radii).
    - ``point_errors.csv`` (``point_errors``): long table ``case,landmark,name,error_mm``; ``error_mm`` is
      empty where the truth is missing and ``inf`` where the landmark was not detected.
    - ``predictions.csv`` (``predictions``): ``case,landmark,name,x_mm,y_mm[,z_mm][,confidence]``,
      RAS, via :func:`heatmark.landmarks.write_landmark_table`.
    - ``error_per_landmark.png`` and ``cumulative_error.png`` (``plot_error_per_landmark``,
      ``plot_cumulative_error``) unless ``plots`` is False.

    In CSV files NaN is an empty cell and floats are written at full precision.

    Args:
        output_dir: the folder (created if needed).
        errors: ``(C, N)`` point errors in mm (:func:`heatmark.evaluation.metrics.point_errors`), or None to
            compute them from ``pred_world`` and ``truth_world``.
        case_ids: ``C`` unique case ids.
        names: ``N`` landmark names.
        pred_world: ``(C, N, D)`` predicted world coordinates, mm, RAS (NaN rows: not detected).
        truth_world: ``(C, N, D)`` true coordinates or None; used to compute missing ``errors`` and
            to check shapes (not written).
        radii: SDR radii in mm; outlier_radii: outlier radii in mm.
        confidence: optional ``(C, N)`` peak values, written to ``predictions.csv``.
        plots: also write the two PNG plots.

    Returns:
        ``{key: path}`` of the files written.
    """
    out = Path(output_dir)
    names = [str(n) for n in names]
    case_ids = [str(c) for c in case_ids]
    pred = _numpy(pred_world)
    if pred.ndim != 3 or pred.shape[0] != len(case_ids) or pred.shape[1] != len(names):
        raise ValueError(f"pred_world must have shape (C={len(case_ids)}, N={len(names)}, D), got {pred.shape}")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be unique")
    if truth_world is not None:
        truth = _numpy(truth_world)
        if truth.shape != pred.shape:
            raise ValueError(f"truth_world must have the shape of pred_world {pred.shape}, got {truth.shape}")
        if errors is None:
            errors = point_errors(pred, truth)
    if errors is None:
        raise ValueError("errors or truth_world must be given")
    e = _numpy(errors)
    if e.shape != pred.shape[:2]:
        raise ValueError(f"errors must have shape {pred.shape[:2]} (cases, landmarks), got {e.shape}")

    paths = {key: out / name for key, name in EVALUATION_FILES.items()}
    written: dict[str, Path] = {}

    summary = summarize(e, radii=radii, outlier_radii=outlier_radii)
    summary.pop("per_landmark", None)
    summary["radii"] = [float(r) for r in radii]
    summary["outlier_radii"] = [float(r) for r in outlier_radii]
    summary["conventions"] = dict(CONVENTIONS)
    atomic_write_text(paths["metrics"], json.dumps(summary, indent=2) + "\n")
    written["metrics"] = paths["metrics"]

    rows = per_landmark_table(e, names, radii=radii, outlier_radii=outlier_radii)
    header = ["landmark", *rows[0].keys()] if rows else ["landmark", "name"]
    atomic_write_text(paths["per_landmark"],
                      csv_text([header, *([i + 1, *row.values()] for i, row in enumerate(rows))]))
    written["per_landmark"] = paths["per_landmark"]

    long_rows = [[case, i + 1, name, float(e[c, i])]
                 for c, case in enumerate(case_ids) for i, name in enumerate(names)]
    atomic_write_text(paths["point_errors"], csv_text([["case", "landmark", "name", "error_mm"], *long_rows]))
    written["point_errors"] = paths["point_errors"]

    table = {case: Landmarks(pred[c], names) for c, case in enumerate(case_ids)}
    conf = None
    if confidence is not None:
        cvals = _numpy(confidence)
        if cvals.shape != pred.shape[:2]:
            raise ValueError(f"confidence must have shape {pred.shape[:2]}, got {cvals.shape}")
        conf = {case: cvals[c] for c, case in enumerate(case_ids)}
    write_landmark_table(paths["predictions"], table, confidence=conf)
    written["predictions"] = paths["predictions"]

    if plots:
        written["plot_error_per_landmark"] = plot_error_per_landmark(
            e, names, paths["plot_error_per_landmark"], radii=radii)
        written["plot_cumulative_error"] = plot_cumulative_error(e, paths["plot_cumulative_error"], radii=radii)
    return written
