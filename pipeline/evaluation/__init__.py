"""Evaluation: heatmaps -> world landmarks (:mod:`~heatmark.evaluation.decoding`), errors and
statistics in mm (:mod:`~heatmark.evaluation.metrics`), what an evaluator plugs in
(:mod:`~heatmark.evaluation.validation`), tables and plots (:mod:`~heatmark.evaluation.reports`)
and the evaluation of a prediction file against the truth (:mod:`~heatmark.evaluation.evaluate`)."""

from heatmark.evaluation.decoding import DecodedLandmarks, decode_heatmaps, decode_peaks
from heatmark.evaluation.metrics import per_landmark_table, point_errors, summarize
from heatmark.evaluation.sliding_window import (LocalHeatmaps, StreamingSlidingWindowInferer, landmark_inferer,
                                               sliding_window_settings)
from heatmark.evaluation.validation import DecodeLandmarksd, EvaluationWriter, LandmarkErrorMetric

__all__ = [
    "DecodeLandmarksd",
    "DecodedLandmarks",
    "EvaluationWriter",
    "LandmarkErrorMetric",
    "LocalHeatmaps",
    "StreamingSlidingWindowInferer",
    "decode_heatmaps",
    "decode_peaks",
    "landmark_inferer",
    "per_landmark_table",
    "point_errors",
    "sliding_window_settings",
    "summarize",
]
