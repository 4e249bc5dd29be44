"""Landmark evaluation in millimetres (DESIGN section 7).

All inputs are world coordinates in mm (any frame, the same for prediction and truth); all
arithmetic is numpy float64; tensors are accepted and moved to the CPU.

Missing landmarks (NaN rows):

- missing in the **truth**: the landmark is excluded from every statistic and counted as
  ``n_missing_truth`` (its error is NaN);
- missing in the **prediction** while present in the truth: a failure, "not detected". Its error is
  ``+inf``: it counts in the denominator of the success detection rate (as a miss) and as an
  outlier at every radius, is left out of mean / SD / median / max (which would be infinite) and is
  counted separately as ``n_not_detected``.

Conventions: SDR(r) = 100 * #(error <= r) / #(truth present), in percent; an outlier at r has
error > r (its count and its percentage of the same denominator); SD is the population SD
(``ddof=0``, as ``numpy.std`` and most landmark papers' code). Statistics of an empty set are NaN.
Summaries are plain ``dict``/``list`` of Python ``int``/``float``/``str`` (JSON-serialisable; NaN
is written as ``NaN`` by :mod:`json`). Their keys use only characters MLflow accepts in metric
names: ``sdr_2.5mm``, ``outliers_10mm``, ``outliers_pct_10mm``.

Shared-channel instances (landmarks that share a network channel, the bundle's ``channel_groups``):

- unordered groups (interchangeable instances) are scored by :func:`instance_detection`: per case,
  the optimal one-to-one matching (Hungarian, :func:`match_points`) of predicted to true instances
  within ``r`` mm (``<=``); counts are summed over the cases (micro average), precision =
  matched / predicted, recall = matched / true, F1 = 2 P R / (P + R), and the MRE is the mean
  distance of the matched pairs (a different set from the point errors above: misses are not in it);
- ordered groups (named instances, e.g. a left/right pair) are scored by the point errors above
  and by :func:`group_identification_rate` (:func:`identification_rate` among the group's own
  landmarks: the closest true instance is the right one and within ``r`` mm);
- :func:`left_right_swaps` counts the (case, pair) where the prediction fits the truth better with
  the two names exchanged: ``|pR - tL| + |pL - tR| < |pR - tR| + |pL - tL|`` (both present in
  prediction and truth).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "DEFAULT_RADII",
    "DEFAULT_OUTLIER_RADII",
    "MEASUREMENT_TYPES",
    "MatchResult",
    "point_errors",
    "summarize",
    "per_landmark_table",
    "identification_rate",
    "normalize_by_reference",
    "measure",
    "match_points",
    "radius_key",
    "instance_detection",
    "group_identification_rate",
    "left_right_swaps",
]

#: Success detection radii in mm (ISBI 2015 cephalometry and most landmark papers).
DEFAULT_RADII: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)
#: Outlier radii in mm (Payer et al. also count errors > 10 mm).
DEFAULT_OUTLIER_RADII: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0, 10.0)

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _array(x: ArrayLike) -> np.ndarray:
    """Any array-like (tensor included) as a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _points_pair(pred: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, t = _array(pred), _array(truth)
    if p.shape != t.shape or p.ndim < 2:
        raise ValueError(f"pred and truth must have the same shape (..., N, D), got {p.shape} and {t.shape}")
    return p, t


def _missing(points: np.ndarray) -> np.ndarray:
    """``(..., N)`` bool: the landmark row has a NaN (or non-finite) coordinate."""
    return ~np.isfinite(points).all(axis=-1)


def radius_key(radius: float) -> str:
    """``2.0 -> "2"``, ``2.5 -> "2.5"``: radii as they appear in summary keys (``sdr_2.5mm``)."""
    return f"{float(radius):g}"


# ----------------------------------------------------------------------------------------------
# point errors and their statistics


def point_errors(pred: ArrayLike, truth: ArrayLike) -> np.ndarray:
    """Euclidean distance between predicted and true landmarks, in mm.

    Args:
        pred, truth: ``(C, N, D)`` (or any ``(..., N, D)``) world coordinates in mm; NaN rows are
            missing landmarks.

    Returns:
        ``(C, N)`` float64: the distance; NaN where the truth is missing; ``+inf`` where the
        prediction is missing and the truth present (not detected).
    """
    p, t = _points_pair(pred, truth)
    err = np.linalg.norm(np.nan_to_num(p - t, nan=0.0), axis=-1)
    err = np.where(_missing(p), np.inf, err)
    return np.where(_missing(t), np.nan, err)


def _statistics(errors: np.ndarray, radii: Sequence[float], outlier_radii: Sequence[float]) -> dict[str, Any]:
    """Counts, mean / SD / median / max, SDR and outliers of a set of errors (any shape, mm)."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    valid = e[~np.isnan(e)]  # truth present; includes +inf (not detected)
    finite = valid[np.isfinite(valid)]
    n = int(valid.size)

    def pct(count: int) -> float:
        return 100.0 * count / n if n else math.nan

    def stat(fn: Callable[[np.ndarray], Any]) -> float:
        return float(fn(finite)) if finite.size else math.nan

    out: dict[str, Any] = {
        "n_valid": n,
        "n_missing_truth": int(e.size - n),
        "n_not_detected": int(np.isinf(valid).sum()),
        "mean": stat(np.mean),
        "sd": stat(np.std),
        "median": stat(np.median),
        "max": stat(np.max),
    }
    for r in radii:
        out[f"sdr_{radius_key(r)}mm"] = pct(int((valid <= r).sum()))
    for r in outlier_radii:
        count = int((valid > r).sum())
        out[f"outliers_{radius_key(r)}mm"] = count
        out[f"outliers_pct_{radius_key(r)}mm"] = pct(count)
    return out


def _errors_2d(errors: ArrayLike, names: Sequence[str] | None) -> np.ndarray:
    e = _array(errors)
    if e.ndim != 2:
        raise ValueError(f"errors must have shape (C, N), got {e.shape}")
    if names is not None and len(names) != e.shape[1]:
        raise ValueError(f"{len(names)} names for {e.shape[1]} landmarks")
    return e


def per_landmark_table(
    errors: ArrayLike,
    names: Sequence[str],
    radii: Sequence[float] = DEFAULT_RADII,
    outlier_radii: Sequence[float] = (),
) -> list[dict[str, Any]]:
    """One row per landmark (column of ``errors``), statistics over the cases.

    Args:
        errors: ``(C, N)`` mm, as from :func:`point_errors` (NaN: truth missing; inf: not detected).
        names: ``N`` landmark names.

    Returns:
        ``N`` dicts ``{"name", "n", "n_missing_truth", "n_not_detected", "mean", "sd", "median",
        "max", "sdr_<r>mm"..., ["outliers_<r>mm", "outliers_pct_<r>mm"...]}`` (``n`` = cases with
        the landmark in the truth).
    """
    e = _errors_2d(errors, names)
    rows = []
    for name, column in zip(names, e.T):
        stats = _statistics(column, radii, outlier_radii)
        rows.append({"name": str(name), "n": stats.pop("n_valid"), **stats})
    return rows


def summarize(
    errors: ArrayLike,
    radii: Sequence[float] = DEFAULT_RADII,
    outlier_radii: Sequence[float] = DEFAULT_OUTLIER_RADII,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Overall statistics of all errors (see the module documentation for the conventions).

    Args:
        errors: ``(C, N)`` mm, as from :func:`point_errors`.
        radii: SDR radii in mm. outlier_radii: outlier radii in mm.
        names: ``N`` landmark names; when given, the summary also holds ``"per_landmark"``, the
            rows of :func:`per_landmark_table` (same radii and outlier radii).

    Returns:
        ``{"n_cases", "n_landmarks", "n_valid", "n_missing_truth", "n_not_detected", "mean", "sd",
        "median", "max", "sdr_<r>mm"..., "outliers_<r>mm"..., "outliers_pct_<r>mm"...[,
        "per_landmark"]}``; counts are ``int``, the rest ``float`` (SDR and percentages in %).
    """
    e = _errors_2d(errors, names)
    out: dict[str, Any] = {"n_cases": int(e.shape[0]), "n_landmarks": int(e.shape[1])}
    out.update(_statistics(e, radii, outlier_radii))
    if names is not None:
        out["per_landmark"] = per_landmark_table(e, names, radii, outlier_radii)
    return out


# ----------------------------------------------------------------------------------------------
# identification and normalisation


def identification_rate(pred: ArrayLike, truth: ArrayLike, radius_mm: float) -> float:
    """Percentage of landmarks correctly identified (Payer et al., Lindner et al.).

    A landmark is identified when its prediction's closest true landmark (of the same case, among
    those present) is the right one **and** lies within ``radius_mm`` (``<=``). Denominator: the
    landmarks present in the truth; a missing prediction is not identified.

    Args:
        pred, truth: ``(C, N, D)`` mm (a single case ``(N, D)`` is accepted).

    Returns:
        The rate in percent (NaN when no landmark is present in the truth).
    """
    p, t = _points_pair(pred, truth)
    if p.ndim == 2:
        p, t = p[None], t[None]
    dist = np.linalg.norm(p[:, :, None, :] - t[:, None, :, :], axis=-1)  # (C, N pred, N truth)
    dist = np.where(np.isnan(dist), np.inf, dist)
    n = p.shape[1]
    own = dist[:, np.arange(n), np.arange(n)]
    identified = (np.argmin(dist, axis=-1) == np.arange(n)) & (own <= radius_mm)
    present = ~_missing(t)
    count = int(present.sum())
    return 100.0 * int((identified & present).sum()) / count if count else math.nan


def _name_index(names: Sequence[str], wanted: Sequence[str], what: str) -> list[int]:
    """Positions of ``wanted`` in ``names``; ValueError naming the first unknown one."""
    lookup = {name: i for i, name in enumerate(names)}
    for name in wanted:
        if name not in lookup:
            raise ValueError(f"{what}: unknown landmark name {name!r}; known: {list(names)}")
    return [lookup[name] for name in wanted]


def normalize_by_reference(
    pred: ArrayLike,
    truth: ArrayLike,
    ref_names: tuple[str, str],
    names: Sequence[str],
    length_mm: float = 50.0,
) -> np.ndarray:
    """Point errors rescaled per case so that the true reference distance equals ``length_mm``.

    Used where image spacing is unknown or unreliable, e.g. hand radiographs, where the distance
    between the two wrist landmarks is taken as 50 mm (Payer et al. 2016).

    Args:
        pred, truth: ``(C, N, D)`` coordinates (mm or pixels: only ratios matter).
        ref_names: the two landmarks that define the reference distance, by name.
        names: ``N`` landmark names.
        length_mm: the reference length.

    Returns:
        ``(C, N)`` errors in normalised mm (NaN / inf as :func:`point_errors`).

    Raises:
        ValueError: unknown name, or a case whose reference landmarks are missing or coincide.
    """
    p, t = _points_pair(pred, truth)
    if len(names) != t.shape[-2]:
        raise ValueError(f"{len(names)} names for {t.shape[-2]} landmarks")
    a, b = _name_index(names, ref_names, "normalize_by_reference")
    ref = np.linalg.norm(t[..., a, :] - t[..., b, :], axis=-1)
    bad = ~(np.isfinite(ref) & (ref > 0))
    if bad.any():
        raise ValueError(f"normalize_by_reference: reference {ref_names} missing or of zero length in the truth of "
                         f"case(s) {np.flatnonzero(bad).tolist()}")
    return point_errors(p, t) * (length_mm / ref)[..., None]


# ----------------------------------------------------------------------------------------------
# derived measurements


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def _ellipse_circumference(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> float:
    """Ramanujan's approximation from two diameters a-b and c-d: ``pi (3(p+q) - sqrt((3p+q)(p+3q)))``."""
    p, q = _distance(a, b) / 2, _distance(c, d) / 2
    return float(math.pi * (3 * (p + q) - math.sqrt((3 * p + q) * (p + 3 * q))))


def _angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """Angle a-b-c at ``b`` in degrees, in [0, 180]; NaN when a or c coincides with b."""
    u, v = a - b, c - b
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return math.nan
    u, v = u / nu, v / nv
    # atan2 of |u - v| and |u + v| halves: accurate at 0 and 180 degrees, unlike arccos
    return float(math.degrees(2 * math.atan2(np.linalg.norm(u - v), np.linalg.norm(u + v))))


#: Measurement type -> (number of landmarks, function of their coordinates). Units: mm, degrees.
MEASUREMENT_TYPES: dict[str, tuple[int, Callable[..., float]]] = {
    "distance": (2, _distance),
    "ellipse_circumference": (4, _ellipse_circumference),
    "angle": (3, _angle),
}


def _measurement_name(spec: Mapping[str, Any]) -> str:
    return str(spec.get("name") or f"{spec['type']}({','.join(spec['landmarks'])})")


def measure(coords: ArrayLike, names: Sequence[str], measurements: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Derived measurements between named landmarks of one case.

    Args:
        coords: ``(N, D)`` world coordinates in mm (NaN rows missing).
        names: ``N`` landmark names.
        measurements: dicts ``{"name": str, "type": str, "landmarks": [names]}`` with type

            - ``"distance"`` ``[a, b]``: ``|a - b|`` in mm;
            - ``"ellipse_circumference"`` ``[a, b, c, d]``: circumference in mm of the ellipse with
              diameters a-b and c-d (Ramanujan: ``pi (3(p+q) - sqrt((3p+q)(p+3q)))``, semi-axes
              ``p, q``), as in fetal head biometry;
            - ``"angle"`` ``[a, b, c]``: the angle at ``b`` in degrees.

            ``"name"`` defaults to ``"<type>(<a>,<b>,...)"``.

    Returns:
        ``{name: value}`` (Python floats; NaN if any of its landmarks is missing).

    Raises:
        ValueError: unknown type, unknown landmark name, wrong number of landmarks, duplicate name.
    """
    x = _array(coords)
    if x.ndim != 2 or x.shape[0] != len(names):
        raise ValueError(f"coords must have shape (N, D) with N = {len(names)} names, got {x.shape}")
    out: dict[str, float] = {}
    for spec in measurements:
        kind = spec.get("type")
        if kind not in MEASUREMENT_TYPES:
            raise ValueError(f"unknown measurement type {kind!r} in {dict(spec)}; known: {sorted(MEASUREMENT_TYPES)}")
        count, fn = MEASUREMENT_TYPES[kind]
        landmarks = list(spec.get("landmarks", ()))
        if len(landmarks) != count:
            raise ValueError(f"measurement {dict(spec)}: {kind!r} takes {count} landmarks, got {len(landmarks)}")
        name = _measurement_name(spec)
        if name in out:
            raise ValueError(f"duplicate measurement name {name!r}")
        points = x[_name_index(names, landmarks, f"measurement {name!r}")]
        out[name] = fn(*points) if np.isfinite(points).all() else math.nan
    return out


# ----------------------------------------------------------------------------------------------
# matching unordered point sets (multi-peak decoding)


@dataclass
class MatchResult:
    """Optimal one-to-one matching of predicted to true points.

    Attributes:
        pairs: ``(L, 2)`` int: (prediction index, truth index) of each match, by truth index.
        errors: ``(L,)`` float64 distances of the matches, mm.
        false_positives: indices of unmatched predictions.
        false_negatives: indices of unmatched true points.
        precision, recall: ``L / #predictions`` and ``L / #true points`` (fractions; NaN for an
            empty denominator). NaN rows of either input are not points and count nowhere.
    """

    pairs: np.ndarray
    errors: np.ndarray
    false_positives: np.ndarray
    false_negatives: np.ndarray
    precision: float
    recall: float

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable counts, precision, recall and mean error (mm)."""
        return {
            "n_matched": int(len(self.pairs)),
            "n_false_positives": int(len(self.false_positives)),
            "n_false_negatives": int(len(self.false_negatives)),
            "precision": float(self.precision),
            "recall": float(self.recall),
            "mean_error": float(self.errors.mean()) if len(self.errors) else math.nan,
        }


def match_points(pred: ArrayLike, truth: ArrayLike, max_distance_mm: float) -> MatchResult:
    """Match ``(K, D)`` predicted to ``(M, D)`` true points one to one (Hungarian algorithm).

    The matching first maximises the number of pairs within ``max_distance_mm`` (``<=``), then
    minimises their total distance: pairs farther apart cost more than any set of valid pairs
    together, and are dropped from the result.
    """
    p, t = _array(pred), _array(truth)
    if p.ndim != 2 or t.ndim != 2 or (p.size and t.size and p.shape[1] != t.shape[1]):
        raise ValueError(f"pred and truth must have shapes (K, D) and (M, D), got {p.shape} and {t.shape}")
    pi, ti = np.flatnonzero(~_missing(p)), np.flatnonzero(~_missing(t))
    dist = np.linalg.norm(p[pi][:, None, :] - t[ti][None, :, :], axis=-1) if len(pi) and len(ti) else np.zeros((len(pi), len(ti)))
    too_far = (min(len(pi), len(ti)) + 1) * float(max_distance_mm) + 1.0
    rows, cols = linear_sum_assignment(np.where(dist <= max_distance_mm, dist, too_far))
    good = dist[rows, cols] <= max_distance_mm
    rows, cols = rows[good], cols[good]
    order = np.argsort(cols)
    rows, cols = rows[order], cols[order]
    return MatchResult(
        pairs=np.stack([pi[rows], ti[cols]], axis=1).astype(np.int64).reshape(-1, 2),
        errors=dist[rows, cols].astype(np.float64),
        false_positives=np.setdiff1d(pi, pi[rows]),
        false_negatives=np.setdiff1d(ti, ti[cols]),
        precision=len(rows) / len(pi) if len(pi) else math.nan,
        recall=len(rows) / len(ti) if len(ti) else math.nan,
    )


# ----------------------------------------------------------------------------------------------
# shared-channel instances (see the module documentation)


def instance_detection(pred: ArrayLike, truth: ArrayLike, radius_mm: float) -> dict[str, Any]:
    """Precision, recall, F1 within ``radius_mm`` and MRE of the matched pairs, over cases.

    Args:
        pred: ``(C, K, D)`` predicted instances per case (NaN rows: no instance).
        truth: ``(C, M, D)`` true instances per case (NaN rows: absent); same ``C`` and ``D``.
        radius_mm: a prediction and a true instance match when ``<= radius_mm`` apart.

    Returns:
        ``{"n_predicted", "n_true", "n_matched", "precision", "recall", "f1", "mre"}``: counts summed
        over cases; precision / recall / F1 as fractions (NaN for an empty denominator; F1 is 0 when
        both are 0); ``mre`` in mm (NaN without a match).
    """
    p, t = _array(pred), _array(truth)
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.ndim != 3 or t.ndim != 3 or p.shape[0] != t.shape[0] or p.shape[2] != t.shape[2]:
        raise ValueError(f"pred and truth must have shapes (C, K, D) and (C, M, D), got {p.shape} and {t.shape}")
    n_pred = n_true = 0
    errors: list[np.ndarray] = []
    for pc, tc in zip(p, t):
        m = match_points(pc, tc, radius_mm)
        n_pred += int(np.count_nonzero(~_missing(pc)))
        n_true += int(np.count_nonzero(~_missing(tc)))
        errors.append(m.errors)
    e = np.concatenate(errors) if errors else np.zeros(0)
    matched = int(e.size)
    precision = matched / n_pred if n_pred else math.nan
    recall = matched / n_true if n_true else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"n_predicted": n_pred, "n_true": n_true, "n_matched": matched, "precision": precision,
            "recall": recall, "f1": f1, "mre": float(e.mean()) if matched else math.nan}


def group_identification_rate(pred: ArrayLike, truth: ArrayLike, members: Sequence[int], radius_mm: float) -> float:
    """:func:`identification_rate` of an ordered group among its own landmarks ``members`` (column
    indices of ``(C, N, D)`` ``pred`` and ``truth``), in percent."""
    p, t = _points_pair(pred, truth)
    if p.ndim == 2:
        p, t = p[None], t[None]
    idx = list(members)
    return identification_rate(p[:, idx], t[:, idx], radius_mm)


def left_right_swaps(pred: ArrayLike, truth: ArrayLike, pairs: Sequence[Sequence[int]]) -> int:
    """Number of (case, pair) whose two predictions fit the truth better exchanged.

    Args:
        pred, truth: ``(C, N, D)`` world mm (a single case ``(N, D)`` is accepted).
        pairs: ``(right, left)`` column indices (either order: the test is symmetric).

    Returns:
        The count; a pair with any of its four points missing is not counted.
    """
    p, t = _points_pair(pred, truth)
    if p.ndim == 2:
        p, t = p[None], t[None]
    count = 0
    for a, b in pairs:
        straight = np.linalg.norm(p[:, a] - t[:, a], axis=-1) + np.linalg.norm(p[:, b] - t[:, b], axis=-1)
        crossed = np.linalg.norm(p[:, a] - t[:, b], axis=-1) + np.linalg.norm(p[:, b] - t[:, a], axis=-1)
        count += int((crossed < straight).sum())  # NaN compares False: missing points never count
    return count
