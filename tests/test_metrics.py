"""Known-answer tests of the evaluation metrics (DESIGN section 7); answers computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import ellipe

from heatmark.evaluation.metrics import (
    identification_rate,
    match_points,
    measure,
    normalize_by_reference,
    per_landmark_table,
    point_errors,
    summarize,
)

NAN, INF = math.nan, math.inf


def test_point_errors_with_missing_truth_and_missing_prediction():
    truth = np.array([[[0, 0, 0], [1, 1, 1], [NAN, NAN, NAN]]], dtype=float)
    pred = np.array([[[3, 4, 0], [NAN, NAN, NAN], [5, 5, 5]]], dtype=float)
    err = point_errors(pred, truth)
    assert err.shape == (1, 3) and err.dtype == np.float64
    assert err[0, 0] == 5.0 and err[0, 1] == INF and math.isnan(err[0, 2])
    # a missing prediction where the truth is missing too is just missing truth
    assert math.isnan(point_errors(np.full((1, 1, 2), NAN), np.full((1, 1, 2), NAN))[0, 0])
    # tensors are accepted
    torch.testing.assert_close(torch.as_tensor(point_errors(torch.tensor(pred), torch.tensor(truth))), torch.as_tensor(err),
                               equal_nan=True)
    with pytest.raises(ValueError, match="same shape"):
        point_errors(pred, truth[:, :2])


def test_summarize_known_answer():
    errors = np.array([[1.0, 2.0, 3.0], [4.0, NAN, 11.0]])
    s = summarize(errors)
    # valid errors: 1, 2, 3, 4, 11 (n = 5); mean 21/5; population SD: squares of deviations
    # 3.2^2 + 2.2^2 + 1.2^2 + 0.2^2 + 6.8^2 = 62.8 -> sqrt(62.8 / 5)
    assert s["n_cases"] == 2 and s["n_landmarks"] == 3
    assert s["n_valid"] == 5 and s["n_missing_truth"] == 1 and s["n_not_detected"] == 0
    assert s["mean"] == pytest.approx(4.2)
    assert s["sd"] == pytest.approx(math.sqrt(12.56))
    assert s["median"] == 3.0 and s["max"] == 11.0
    # SDR uses "<=": 2 of 5 within 2 mm (1, 2), 2 within 2.5, 3 within 3, 4 within 4
    assert [s[f"sdr_{r}mm"] for r in ("2", "2.5", "3", "4")] == pytest.approx([40.0, 40.0, 60.0, 80.0])
    # outliers use ">": > 2: 3, 4, 11; > 3: 4, 11; > 4: 11; > 10: 11
    assert [s[f"outliers_{r}mm"] for r in ("2", "2.5", "3", "4", "10")] == [3, 3, 2, 1, 1]
    assert [s[f"outliers_pct_{r}mm"] for r in ("2", "2.5", "3", "4", "10")] == pytest.approx([60, 60, 40, 20, 20])
    assert all(type(v) in (int, float) for v in s.values())
    json.dumps(s)


def test_summarize_not_detected_counts_as_failure():
    errors = np.array([[1.0, INF], [NAN, 3.0]])
    s = summarize(errors, radii=(2.0,), outlier_radii=(10.0,))
    assert s["n_valid"] == 3 and s["n_missing_truth"] == 1 and s["n_not_detected"] == 1
    assert s["mean"] == 2.0 and s["median"] == 2.0 and s["max"] == 3.0  # over the finite errors
    assert s["sdr_2mm"] == pytest.approx(100 / 3)  # the undetected landmark is a miss
    assert s["outliers_10mm"] == 1 and s["outliers_pct_10mm"] == pytest.approx(100 / 3)


def test_summarize_all_missing_gives_nan_not_a_crash():
    s = summarize(np.full((2, 2), NAN))
    assert s["n_valid"] == 0 and s["n_missing_truth"] == 4
    assert math.isnan(s["mean"]) and math.isnan(s["sdr_2mm"]) and s["outliers_10mm"] == 0


def test_per_landmark_table_and_summary_with_names():
    errors = np.array([[1.0, 2.0, 3.0], [4.0, NAN, 11.0]])
    rows = per_landmark_table(errors, ["a", "b", "c"])
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert [r["n"] for r in rows] == [2, 1, 2]
    assert [r["mean"] for r in rows] == [2.5, 2.0, 7.0]
    assert [r["sd"] for r in rows] == [1.5, 0.0, 4.0]
    assert [r["median"] for r in rows] == [2.5, 2.0, 7.0]
    assert [r["max"] for r in rows] == [4.0, 2.0, 11.0]
    assert [r["sdr_2mm"] for r in rows] == [50.0, 100.0, 0.0]
    assert [r["sdr_4mm"] for r in rows] == [100.0, 100.0, 50.0]
    assert rows[1]["n_missing_truth"] == 1
    s = summarize(errors, names=["a", "b", "c"])
    assert [r["outliers_10mm"] for r in s["per_landmark"]] == [0, 0, 1]
    json.dumps(s)
    with pytest.raises(ValueError, match="2 names for 3"):
        per_landmark_table(errors, ["a", "b"])


def test_identification_rate_with_a_swapped_pair():
    truth = np.array([[[0, 0], [10, 0], [0, 10]],
                      [[0, 0], [10, 0], [0, 10]]], dtype=float)
    pred = np.array([[[10, 0.5], [0.5, 0], [0, 11]],  # 0 and 1 swapped; 2 right (1 mm)
                     [[0, 3], [NAN, NAN], [0.5, 10]]], dtype=float)  # 0 too far (3 mm); 1 not detected
    assert identification_rate(pred, truth, radius_mm=2.0) == pytest.approx(100 * 2 / 6)
    assert identification_rate(pred, truth, radius_mm=4.0) == pytest.approx(100 * 3 / 6)
    # plain radius test would call the swapped pair correct at 11 mm; identification does not
    assert identification_rate(pred, truth, radius_mm=20.0) == pytest.approx(100 * 3 / 6)
    # missing truth is left out of the denominator
    truth[1, 1] = NAN
    assert identification_rate(pred, truth, radius_mm=4.0) == pytest.approx(100 * 3 / 5)


def test_normalize_by_reference():
    names = ["wrist_a", "tip", "wrist_b"]
    truth = np.array([[[0, 0], [5, 5], [25, 0]],  # reference 25 -> factor 2
                      [[0, 0], [5, 5], [0, 100]]], dtype=float)  # reference 100 -> factor 0.5
    pred = truth + np.array([[[0, 0], [3, 4], [0, 0]],
                             [[0, 0], [3, 4], [NAN, NAN]]])
    err = normalize_by_reference(pred, truth, ("wrist_a", "wrist_b"), names, length_mm=50.0)
    np.testing.assert_allclose(err, [[0, 10, 0], [0, 2.5, INF]])
    with pytest.raises(ValueError, match="'ulna'"):
        normalize_by_reference(pred, truth, ("wrist_a", "ulna"), names)
    truth[1, 2] = NAN
    with pytest.raises(ValueError, match=r"case\(s\) \[1\]"):
        normalize_by_reference(pred, truth, ("wrist_a", "wrist_b"), names)


def test_measurements_on_constructed_geometry():
    r = 7.0
    names = ["left", "right", "front", "back", "a", "apex", "c", "p", "q", "gone"]
    centre = np.array([3.0, -2.0, 5.0])
    apex = np.array([1.0, 1.0, 1.0])
    coords = np.array([
        centre + [r, 0, 0], centre - [r, 0, 0], centre + [0, r, 0], centre - [0, r, 0],  # circle diameters
        apex + [2, 0, 0], apex, apex + [0, 0, 8],  # a - apex along x, c - apex along z: right angle
        [0, 0, 0], [3, 4, 0],  # 3-4-5
        [NAN, NAN, NAN],
    ])
    specs = [
        {"name": "bpd", "type": "distance", "landmarks": ["left", "right"]},
        {"name": "hc", "type": "ellipse_circumference", "landmarks": ["left", "right", "front", "back"]},
        {"name": "right_angle", "type": "angle", "landmarks": ["a", "apex", "c"]},
        {"name": "five", "type": "distance", "landmarks": ["p", "q"]},
        {"type": "distance", "landmarks": ["apex", "gone"]},
    ]
    out = measure(coords, names, specs)
    assert out["bpd"] == pytest.approx(2 * r)
    assert out["hc"] == pytest.approx(2 * math.pi * r)
    assert out["right_angle"] == pytest.approx(90.0)
    assert math.isnan(out["distance(apex,gone)"])
    assert out["five"] == 5.0
    assert list(out) == ["bpd", "hc", "right_angle", "five", "distance(apex,gone)"]
    json.dumps(out)


def test_ellipse_circumference_matches_exact_value_and_angles():
    # semi-axes 5 and 3: exact circumference 4 a E(1 - b^2 / a^2); Ramanujan is within 1e-5 relative
    coords = np.array([[-5, 0], [5, 0], [0, -3], [0, 3], [2, 2], [4, 4], [0, 0]], dtype=float)
    names = ["a", "b", "c", "d", "p", "q", "o"]
    out = measure(coords, names, [
        {"name": "e", "type": "ellipse_circumference", "landmarks": ["a", "b", "c", "d"]},
        {"name": "straight", "type": "angle", "landmarks": ["o", "p", "q"]},
        {"name": "zero", "type": "angle", "landmarks": ["p", "o", "q"]},
        {"name": "deg45", "type": "angle", "landmarks": ["b", "o", "q"]},
        {"name": "degenerate", "type": "angle", "landmarks": ["o", "o", "q"]},
    ])
    assert out["e"] == pytest.approx(4 * 5 * ellipe(1 - 9 / 25), rel=1e-5)
    assert out["straight"] == pytest.approx(180.0)
    assert out["zero"] == pytest.approx(0.0, abs=1e-12)
    assert out["deg45"] == pytest.approx(45.0)
    assert math.isnan(out["degenerate"])


def test_measurement_errors_name_the_problem():
    coords, names = np.zeros((2, 2)), ["a", "b"]
    with pytest.raises(ValueError, match="'area'"):
        measure(coords, names, [{"name": "x", "type": "area", "landmarks": ["a", "b"]}])
    with pytest.raises(ValueError, match="'nasion'"):
        measure(coords, names, [{"name": "x", "type": "distance", "landmarks": ["a", "nasion"]}])
    with pytest.raises(ValueError, match="takes 3 landmarks"):
        measure(coords, names, [{"name": "x", "type": "angle", "landmarks": ["a", "b"]}])
    with pytest.raises(ValueError, match="duplicate"):
        measure(coords, names, [{"name": "x", "type": "distance", "landmarks": ["a", "b"]}] * 2)


def test_match_points_optimal_assignment():
    truth = np.array([[0.0, 0.0], [2.0, 0.0], [20.0, 20.0], [NAN, NAN]])
    pred = np.array([[1.1, 0.0], [3.5, 0.0], [-30.0, 0.0]])
    m = match_points(pred, truth, max_distance_mm=1.6)
    # greedy nearest-first would pair pred 0 with truth 1 (0.9) and leave pred 1 unmatched;
    # the optimal matching pairs both: pred 0 - truth 0 (1.1), pred 1 - truth 1 (1.5)
    np.testing.assert_array_equal(m.pairs, [[0, 0], [1, 1]])
    np.testing.assert_allclose(m.errors, [1.1, 1.5])
    np.testing.assert_array_equal(m.false_positives, [2])
    np.testing.assert_array_equal(m.false_negatives, [2])  # the NaN row is not a point
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3)
    summary = m.summary()
    assert summary["n_matched"] == 2 and summary["mean_error"] == pytest.approx(1.3)
    json.dumps(summary)


def test_match_points_empty_sets():
    none = match_points(np.zeros((0, 3)), np.ones((2, 3)), 1.0)
    assert none.pairs.shape == (0, 2) and math.isnan(none.precision) and none.recall == 0.0
    np.testing.assert_array_equal(none.false_negatives, [0, 1])
    only_pred = match_points(np.ones((2, 3)), np.zeros((0, 3)), 1.0)
    assert only_pred.precision == 0.0 and math.isnan(only_pred.recall)
