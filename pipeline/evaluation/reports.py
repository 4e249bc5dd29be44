"""Evaluation reports: plots of landmark errors and overlays, and the evaluation output folder.

Plots are drawn with matplotlib's object-oriented API on an Agg canvas (no :mod:`matplotlib.pyplot`,
no global figure state, never a window) and saved as PNG. Every file is written to a temporary
name and renamed (:func:`heatmark.core.fileio.atomic_path`), so an interrupted run leaves no
half-written output.

Errors follow :mod:`heatmark.evaluation.metrics`: ``(C, N)`` arrays in mm, NaN where the landmark is missing
in the truth (left out everywhere), ``+inf`` where it was not detected (counted in the
denominator of the success detection rate, left out of means and box plots and reported as a
count).

Overlays (:func:`plot_overlay`) are drawn on the original image (not on a network's resampled
grid) with axes in mm: points go from world mm to the image's voxels with
:func:`heatmark.core.geometry.world_to_voxel` and its own affine, and voxels to the plot with the
same affine (world coordinates for axis-aligned affines, mm along the image axes for oblique ones).
Arrays are indexed by voxel axes ``(i, j[, k])`` as in :mod:`heatmark.core.geometry`.
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
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from heatmark.core.fileio import atomic_path, atomic_write_text, csv_text
from heatmark.core.geometry import as_affine, world_to_voxel
from heatmark.landmarks import Landmarks, write_landmark_table
from heatmark.evaluation.metrics import DEFAULT_OUTLIER_RADII, DEFAULT_RADII, per_landmark_table, point_errors, summarize
from heatmark.transforms.io import ImageLoadError, LoadLandmarkImage

__all__ = [
    "plot_error_per_landmark",
    "plot_cumulative_error",
    "plot_overlay",
    "overlay_figure",
    "original_image",
    "original_or",
    "image_source",
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

#: Marker of a predicted landmark and of a true one (``gid`` of their scatter artists).
PRED_GID, TRUTH_GID, LABEL_GID = "prediction", "truth", "label"

#: Label offsets tried around a marker, in points (first the near ring, then a far ring drawn
#: with a leader line): ``(dx, dy, horizontal alignment, vertical alignment)``.
_LABEL_OFFSETS = [(dx * r, dy * r, "left" if dx > 0 else "right" if dx < 0 else "center",
                   "bottom" if dy > 0 else "top" if dy < 0 else "center")
                  for r in (1.0, 3.0)
                  for dx, dy in ((4, 4), (4, -4), (-4, 4), (-4, -4), (6, 0), (-6, 0), (0, 6), (0, -6))]
_MARKER_PX = 4.0  # half the side of the box around a marker that labels must avoid, pixels


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


def _image_array(image: Any, spatial_dims: int) -> np.ndarray:
    img = _numpy(image)
    if img.ndim == spatial_dims + 1:
        img = img[0]  # channel-first: show the first channel
    if img.ndim != spatial_dims:
        raise ValueError(f"image must have shape (C, *S) or (*S) with {spatial_dims} spatial dims "
                         f"(from the points), got {img.shape}")
    return img


class _DisplayAxes:
    """How voxel axes become plot axes in mm.

    Axis-aligned affines (a permutation of the world axes, flips and scales allowed): voxel axis
    ``a`` shows world coordinate ``world_axis[a]``, ``u = offset[a] + step[a] * i`` in world mm, so
    the tick labels are world coordinates. Oblique affines: ``u = spacing[a] * i``, mm from the
    centre of the first voxel along the image's own axis ``a`` (``world_axis`` is None).
    """

    def __init__(self, affine: np.ndarray, d: int, world_names: Sequence[str]):
        lin = affine[:d, :d]
        spacing = np.linalg.norm(lin, axis=0)
        dominant = np.argmax(np.abs(lin), axis=0)
        aligned = bool(np.all(np.abs(lin[dominant, np.arange(d)]) >= spacing * (1.0 - 1e-6))
                       and len(set(dominant.tolist())) == d)
        self.d = d
        if aligned:
            self.world_axis: list[int] | None = [int(k) for k in dominant]
            self.step = np.array([lin[k, a] for a, k in enumerate(dominant)])
            self.offset = np.array([affine[k, d] for k in dominant])
            self.names = [world_names[k] for k in dominant]
            self.labels = [f"{n} (mm)" for n in self.names]
        else:
            self.world_axis = None
            self.step, self.offset = spacing, np.zeros(d)
            self.names = [f"image axis {a}" for a in range(d)]
            self.labels = [f"image axis {a} (mm from the first voxel; oblique)" for a in range(d)]

    def to_mm(self, voxel: np.ndarray) -> np.ndarray:
        """``(N, D)`` voxel indices -> ``(N, D)`` display coordinates in mm (NaN stays NaN)."""
        return self.offset + self.step * voxel

    def edges(self, a: int, n: int) -> tuple[float, float]:
        """Display coordinates of the outer edges of the first and last voxel along axis ``a``."""
        return float(self.offset[a] + self.step[a] * -0.5), float(self.offset[a] + self.step[a] * (n - 0.5))

    def voxel_axis_of(self, world: int) -> int:
        """The voxel axis showing world axis ``world`` (aligned affines), else ``world`` itself."""
        return world if self.world_axis is None else self.world_axis.index(world)


def _world_names(image: Any, d: int) -> list[str]:
    """Names of the world axes for the axis labels: ``x: R``, ``y: A``, ``z: S`` (the direction the
    coordinate grows to), or ``x``/``y`` of a 2D picture's image frame (no patient frame)."""
    meta = getattr(image, "meta", None) or {}
    if d == 2 and meta.get("world_frame", "image") == "image":
        return ["x", "y"]
    letters = str(meta.get("world_axes") or "RAS") if d == 2 else "RAS"
    letters = letters if len(letters) >= d else "RAS"
    return [f"{'xyz'[k]}: {letters[k]}" for k in range(d)]


def _marker_boxes(ax: Any, points: np.ndarray) -> list[Any]:
    """Pixel boxes around the finite display points (that labels must not cover)."""
    px = ax.transData.transform(points[np.isfinite(points).all(axis=1)]) if len(points) else np.zeros((0, 2))
    return [Bbox.from_extents(x - _MARKER_PX, y - _MARKER_PX, x + _MARKER_PX, y + _MARKER_PX) for x, y in px]


def _place_labels(ax: Any, renderer: Any, points: np.ndarray, names: Sequence[str], avoid: list[Any],
                  fontsize: float = 6.0, near: np.ndarray | None = None) -> tuple[int, int]:
    """Label the ``(N, 2)`` display points without overlaps; returns ``(placed, skipped)``.

    Greedy: for each point (those ``near`` the slice first, then the others, drawn faded; each
    group top to bottom), the first offset of :data:`_LABEL_OFFSETS` whose text box stays inside
    the axes and overlaps neither a label placed before nor a marker (``avoid``, pixel boxes) is
    used; a far offset gets a leader line; a label that fits nowhere is skipped.
    """
    inside = ax.get_window_extent(renderer)
    taken = list(avoid)
    near = np.ones(len(points), dtype=bool) if near is None else np.asarray(near, dtype=bool)
    by_height = np.argsort(-points[:, 1], kind="stable")
    order = [i for group in (True, False) for i in by_height
             if near[i] == group and np.isfinite(points[i]).all()]
    placed = skipped = 0
    effects = [patheffects.withStroke(linewidth=1.5, foreground="black")]
    for i in order:
        x, y = float(points[i, 0]), float(points[i, 1])
        for k, (dx, dy, ha, va) in enumerate(_LABEL_OFFSETS):
            far = k >= len(_LABEL_OFFSETS) // 2
            text = ax.annotate(str(names[i]), (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=fontsize, color="red", path_effects=effects, gid=LABEL_GID,
                               alpha=None if near[i] else 0.5,
                               annotation_clip=True,
                               arrowprops={"arrowstyle": "-", "color": "red", "linewidth": 0.5,
                                           "shrinkA": 0, "shrinkB": 2} if far else None)
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer)  # the text only, not the leader line
            fits = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1
                    and not any(box.overlaps(other) for other in taken))
            if fits:
                taken.append(box)
                placed += 1
                break
            text.remove()
        else:
            skipped += 1
    return placed, skipped


def _draw_view(ax: Any, plane: np.ndarray, extent: tuple[float, float, float, float], vmin: float, vmax: float,
               pred: np.ndarray, truth: np.ndarray | None, near: np.ndarray | None) -> None:
    """Image ``plane`` (rows: vertical axis, row 0 at ``extent[2]``) and the markers, in mm."""
    ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest",
              extent=extent, aspect="equal")
    if truth is not None:
        for p, t in zip(pred, truth):
            if np.isfinite(p).all() and np.isfinite(t).all():
                ax.plot([p[0], t[0]], [p[1], t[1]], color="yellow", linewidth=0.8)
        ok = np.isfinite(truth).all(axis=1)
        ax.scatter(truth[ok, 0], truth[ok, 1], s=14, marker="o", facecolors="none", edgecolors="lime",
                   linewidths=1.0, label="truth", gid=TRUTH_GID)
    ok = np.isfinite(pred).all(axis=1)
    shown = ok if near is None else ok & near
    ax.scatter(pred[shown, 0], pred[shown, 1], s=16, marker="+", color="red", linewidths=1.0,
               label="prediction", gid=PRED_GID)
    if near is not None and (ok & ~near).any():
        ax.scatter(pred[ok & ~near, 0], pred[ok & ~near, 1], s=16, marker="+", color="red", linewidths=1.0,
                   alpha=0.35, label="prediction (off this slice)", gid=PRED_GID + "_far")


def overlay_figure(
    image: Any,
    affine: Any,
    pred_world: Any,
    truth_world: Any | None = None,
    names: Sequence[str] | None = None,
    title: str | None = None,
    view: str = "slices",
    as_stored: bool | None = None,
    near_mm: float = 3.0,
    label_fontsize: float = 6.0,
) -> Figure:
    """The overlay figure of :func:`plot_overlay` (not saved): axes in mm, labels placed.

    Returns the :class:`~matplotlib.figure.Figure`; its predicted markers are the scatter
    collections with ``gid`` :data:`PRED_GID` (offsets: the display coordinates in mm), true ones
    :data:`TRUTH_GID`, labels the annotations with ``gid`` :data:`LABEL_GID`; ``fig.overlay_info``
    holds ``{"placed": labels drawn, "skipped": labels left out, "slice_mm": ...}``.
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
    if view not in ("slices", "mip"):
        raise ValueError(f"view must be 'slices' or 'mip', got {view!r}")
    if affine is None:
        affine = getattr(image, "affine", None)
        if affine is None:
            raise ValueError("affine is None and the image carries none (pass the image's affine)")
    aff = as_affine(_numpy(affine), d).numpy()
    img = _image_array(image, d)
    axes_mm = _DisplayAxes(aff, d, _world_names(image, d))
    # points far outside the image (an untrained network) are drawn at most one image size beyond its
    # border, outside the view: unbounded coordinates make matplotlib's renderer fail
    size = np.asarray(img.shape[:d], dtype=float)
    pred_v = np.clip(_numpy(world_to_voxel(pred_w, aff)), -size, 2 * size)
    truth_v = None if truth_w is None else np.clip(_numpy(world_to_voxel(truth_w, aff)), -size, 2 * size)
    pred_mm = axes_mm.to_mm(pred_v)
    truth_mm = None if truth_v is None else axes_mm.to_mm(truth_v)
    vmin, vmax = _display_range(img)
    as_stored = d == 2 if as_stored is None else bool(as_stored)

    if d == 2:
        # (horizontal voxel axis, vertical voxel axis, fixed axis or None)
        views: list[tuple[int, int, int | None]] = [(0, 1, None)] if as_stored else \
            [(axes_mm.voxel_axis_of(0), axes_mm.voxel_axis_of(1), None)]
        fig = _new_figure(7.0, 7.0)
    else:
        pairs = [(0, 1, 2), (0, 2, 1), (1, 2, 0)]  # world (or oblique: voxel) axes: axial, coronal, sagittal
        views = [(axes_mm.voxel_axis_of(h), axes_mm.voxel_axis_of(v), axes_mm.voxel_axis_of(f)) for h, v, f in pairs]
        fig = _new_figure(15.0, 5.6)
    ok = np.isfinite(pred_v).all(axis=1)
    centre = pred_v[ok].mean(axis=0) if ok.any() else (np.asarray(img.shape) - 1) / 2.0
    index = [int(np.clip(round(float(c)), 0, s - 1)) for c, s in zip(centre, img.shape)]
    panels = []
    for col, (a, b, fixed) in enumerate(views):
        ax = fig.add_subplot(1, len(views), col + 1)
        near = None
        if fixed is None:
            plane = img
            ax_title = ""
        elif view == "mip":
            plane = np.nanmax(img, axis=fixed)
            ax_title = f"maximum intensity projection along {axes_mm.names[fixed]}"
        else:
            plane = np.take(img, index[fixed], axis=fixed)
            slice_mm = float(axes_mm.to_mm(np.array(index, dtype=np.float64))[fixed])
            ax_title = f"slice {axes_mm.names[fixed]} = {slice_mm:.1f} mm"
            depth = np.abs(pred_v[:, fixed] - index[fixed]) * abs(float(axes_mm.step[fixed]))
            near = depth <= near_mm
        # the remaining array axes are in increasing order: rows must run along the vertical axis b
        data = plane.T if a < b else plane
        left, right = axes_mm.edges(a, img.shape[a])
        bottom, top = axes_mm.edges(b, img.shape[b])
        pt = truth_mm[:, [a, b]] if truth_mm is not None else None
        _draw_view(ax, data, (left, right, bottom, top), vmin, vmax, pred_mm[:, [a, b]], pt, near)
        if as_stored:  # first column on the left, first row at the top; the mm ticks may run either way
            ax.set_xlim(left, right)
            ax.set_ylim(top, bottom)
        else:  # world coordinates growing to the right and upwards
            ax.set_xlim(min(left, right), max(left, right))
            ax.set_ylim(min(bottom, top), max(bottom, top))
        ax.set_xlabel(axes_mm.labels[a], fontsize=8)
        ax.set_ylabel(axes_mm.labels[b], fontsize=8)
        if ax_title:
            ax.set_title(ax_title, fontsize=9)
        panels.append((ax, pred_mm[:, [a, b]], pt, near))
    panels[0][0].legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    for ax, *_ in panels:
        ax.apply_aspect()  # the final box of an equal-aspect axes: data -> pixels as it will be drawn
    placed = skipped = 0
    for ax, p, t, near in panels:
        avoid = _marker_boxes(ax, p) + (_marker_boxes(ax, t) if t is not None else [])
        if ax.get_legend() is not None:
            avoid.append(ax.get_legend().get_window_extent(renderer))
        k_placed, k_skipped = _place_labels(ax, renderer, p, names, avoid, label_fontsize, near)
        placed, skipped = placed + k_placed, skipped + k_skipped
        if k_skipped:
            ax.text(0.01, 0.99, f"{k_skipped} label(s) left out (crowded)", transform=ax.transAxes, fontsize=6,
                    color="orange", ha="left", va="top")
    fig.overlay_info = {"placed": placed, "skipped": skipped, "view": view}
    return fig


def plot_overlay(
    image: Any,
    affine: Any,
    pred_world: Any,
    path: str | Path,
    truth_world: Any | None = None,
    names: Sequence[str] | None = None,
    title: str | None = None,
    view: str = "slices",
    as_stored: bool | None = None,
    near_mm: float = 3.0,
) -> Path:
    """Draw predicted (and true) landmarks on an image, axes in mm, and save it as PNG.

    Pass the *original* image (as read from its file, e.g. by
    :class:`heatmark.transforms.io.LoadLandmarkImage` or :func:`original_image`) with its own
    affine: the points (world mm) are mapped into it with
    :func:`heatmark.core.geometry.world_to_voxel`, never through a network's resampled grid.

    - Axes: when the affine is a permutation of the world axes (flips and scales allowed), each
      plot axis shows a world coordinate in mm; an oblique affine is shown on its own voxel grid,
      in mm from the first voxel along each image axis. Voxels are drawn at their physical size.
    - 2D: the picture as stored (``as_stored``, the default for 2D): array axis 0 (columns) to
      the right, axis 1 (rows) downwards, whatever the signs of the affine (a radiograph saved as
      NIfTI with y growing down the rows is not turned upside down); the tick labels are the world
      mm of each position, so they may decrease. With ``as_stored=False`` the world axes grow to
      the right and upwards and the picture is flipped to match.
    - 3D: three views, axial (x-y), coronal (x-z) and sagittal (y-z), either slices
      through the voxel nearest to the centroid of the predicted landmarks (``view="slices"``;
      points farther than ``near_mm`` from the slice are drawn faded) or maximum intensity
      projections (``view="mip"``). Oblique 3D affines: the planes of voxel axes (0, 1), (0, 2), (1, 2).
    - Labels: placed greedily around their marker so that they overlap no other label or marker,
      with a leader line when pushed further out; a label that fits nowhere is left out and the
      view says how many were.

    Args:
        image: ``(C, *S)`` (first channel shown) or ``(*S)`` array, tensor or MetaTensor; a
            MetaTensor's ``meta["world_frame"]``/``["world_axes"]`` name the axes.
        affine: the image's affine (``(D+1, D+1)``, or MONAI's 4x4 for 2D); None: ``image.affine``.
        pred_world, truth_world: ``(N, D)`` world coordinates in mm (NaN rows: missing, not drawn).
        path: the PNG to write.
        names: ``N`` labels (default ``"1"``..``"N"``).
        title: figure title.
        view: ``"slices"`` or ``"mip"`` (3D only).
        as_stored: show the array as stored (default for 2D) rather than reoriented so that the
            world axes grow to the right and upwards (default for 3D: R right, A/S up).
        near_mm: 3D slices: points within this distance (mm) of the slice are drawn solid.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    fig = overlay_figure(image, affine, pred_world, truth_world, names, title, view, as_stored, near_mm)
    return _save(fig, path)


def image_source(image: Any) -> dict[str, Any] | None:
    """Where a loaded image came from, to read it again with :func:`original_image`: from the meta
    of one item (not a batch: index it first) of a MetaTensor made by ``LoadLandmarkImage``,
    resampled or not: ``{"source", "spatial_dims", "spacing", "allow_pixel_units"}``; None when
    the meta names no file."""
    meta = getattr(image, "meta", None) or {}
    source = meta.get("filename_or_obj")
    if not isinstance(source, (str, Path)) or not str(source):
        return None
    dims = meta.get("spatial_dims")
    spacing = meta.get("spacing")
    return {"source": str(source),
            "spatial_dims": int(_numpy(dims).reshape(-1)[0]) if dims is not None else int(image.ndim) - 1,
            "spacing": None if spacing is None else _numpy(spacing).reshape(-1).tolist(),
            "allow_pixel_units": meta.get("spacing_units") == "pixel"}


def original_or(source: Mapping[str, Any] | None, image: Any, affine: Any) -> tuple[Any, Any]:
    """``(original image, its affine)`` read again from ``source`` (:func:`image_source`), or the
    given ``image`` and ``affine`` when there is no source or it cannot be read any more."""
    if source is not None:
        try:
            original = original_image(source["source"], source["spatial_dims"], source.get("spacing"),
                                      bool(source.get("allow_pixel_units")))
            return original, original.affine
        except (ImageLoadError, OSError, ValueError):
            pass
    return image, affine


def original_image(source: str | Path, spatial_dims: int, spacing: Any | None = None,
                   allow_pixel_units: bool = False) -> Any:
    """The original image behind a prediction, read again from ``source`` (a file or DICOM folder)
    as a channel-first ``MetaTensor`` with its own world affine, for :func:`plot_overlay`.

    ``spacing`` (mm per array axis, e.g. the loaded image's ``meta["spacing"]``) stands in for a
    file without one (PNG & co.), as the bundle's loader did. Raises ``ImageLoadError`` naming the file.
    """
    # only 2D pictures take a spacing from outside; volumes always have their own
    s = None if spacing is None or spatial_dims != 2 else [float(v) for v in _numpy(spacing).reshape(-1)[:2]]
    loader = LoadLandmarkImage(spatial_dims=spatial_dims, spacing=s, allow_pixel_units=allow_pixel_units,
                               allow_constant=True)
    return loader(source)


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
    - ``predictions.csv`` (``predictions``): ``case,landmark,name,frame,x_mm,y_mm[,z_mm][,confidence]``,
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
