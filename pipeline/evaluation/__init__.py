"""Evaluation: heatmaps -> world landmarks (:mod:`~heatmark.evaluation.decoding`), errors and
statistics in mm (:mod:`~heatmark.evaluation.metrics`), what an evaluator plugs in
(:mod:`~heatmark.evaluation.validation`), tables and plots (:mod:`~heatmark.evaluation.reports`)
and the evaluation of a prediction file against the truth (:mod:`~heatmark.evaluation.evaluate`)."""

from heatmark.evaluation.decoding import DecodedLandmarks, decode_heatmaps, decode_peaks
from heatmark.evaluation.metrics import per_landmark_table, point_errors, summarize
from heatmark.evaluation.validation import DecodeLandmarksd, EvaluationWriter, LandmarkErrorMetric

__all__ = [
    "DecodeLandmarksd",
    "DecodedLandmarks",
    "EvaluationWriter",
    "LandmarkErrorMetric",
    "decode_heatmaps",
    "decode_peaks",
    "per_landmark_table",
    "point_errors",
    "summarize",
]
