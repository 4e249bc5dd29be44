"""Training: MONAI engines with device-aware mixed precision (:mod:`~heatmark.training.engines`),
the heatmap loss (:mod:`~heatmark.training.losses`), atomic checkpoints and resume
(:mod:`~heatmark.training.checkpoint`), stop, final-validation and learning-rate handlers
(:mod:`~heatmark.training.handlers`), precision per device (:mod:`~heatmark.training.precision`) and MLflow tracking (:mod:`~heatmark.training.tracking`)."""

from heatmark.training.checkpoint import AtomicCheckpointSaver, AtomicDiskSaver, TrainingCheckpoint, latest_checkpoint
from heatmark.training.engines import (
    LandmarkEvaluator,
    LandmarkPrepareBatch,
    LandmarkTrainer,
    NonFiniteError,
    autocast_context,
)
from heatmark.training.model_file import ModelFileLoader, build_network, model_description, read_model_file
from heatmark.training.handlers import EarlyStopping, FinalValidation, TimeCosineLR, TimeLimit
from heatmark.training.precision import Precision, choose_precision, cpu_info
from heatmark.training.losses import HeatmapLoss
from heatmark.training.tracking import MLflowExtrasHandler

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "EarlyStopping",
    "FinalValidation",
    "HeatmapLoss",
    "LandmarkEvaluator",
    "LandmarkPrepareBatch",
    "LandmarkTrainer",
    "MLflowExtrasHandler",
    "ModelFileLoader",
    "NonFiniteError",
    "Precision",
    "TimeCosineLR",
    "TimeLimit",
    "TrainingCheckpoint",
    "autocast_context",
    "build_network",
    "model_description",
    "read_model_file",
    "choose_precision",
    "cpu_info",
    "latest_checkpoint",
]
