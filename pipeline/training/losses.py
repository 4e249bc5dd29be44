"""Heatmap losses with targets generated on the training device from voxel landmarks.

A batch never carries ``N`` full target heatmaps through the data loader: the loss receives the
landmarks' voxel positions on the network *input* grid ``(B, N, D)`` and renders the Gaussian
targets on the prediction's grid with :func:`heatmark.core.heatmaps.gaussian_heatmaps`.

Missing landmarks (NaN) and landmarks that an augmentation moved off the grid are masked: they
contribute neither to the data term nor to the normaliser.

Shared channels (``channels``, from the bundle's ``channel_groups``): the prediction has ``C``
channels; a shared channel's target is the maximum of its landmarks' Gaussians
(:func:`heatmark.core.heatmaps.combine_channels`), sigma is one per channel (each landmark is
rendered with its channel's sigma), a missing or off-grid instance is simply absent from its
channel's target, and a channel is masked only when all its landmarks are.

Beware the trivial optimum (DESIGN section 6): with peak-1 targets a network outputting zeros
already has a tiny mean squared error. Use ``gamma`` (Payer et al. 2019 scaling), a sum
reduction, or ``learn_sigma`` with its regulariser, and watch the peak values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from heatmark.core.geometry import input_to_output_voxels
from heatmark.core.heatmaps import gaussian_heatmaps

__all__ = ["HeatmapLoss"]

LOSS_KINDS = ("l2", "bce")
REDUCTIONS = ("mean", "sum")


class HeatmapLoss(nn.Module):
    """L2 (or BCE) between predicted heatmaps and Gaussian targets at the landmarks.

    Args:
        num_landmarks: N.
        sigma: initial Gaussian width in voxels of the network *input* grid (scalar or ``(N,)``).
        learn_sigma: make sigma a trainable parameter (Payer et al. 2019); it is optimised with
            the network (pass ``loss.parameters()`` to the optimizer) and saved in checkpoints.
        alpha: weight of the regulariser ``alpha / 2 * sum(sigma^2)`` (2019 paper: ~20 in 2D,
            ~100 in 3D with a sum reduction); only used with ``learn_sigma``.
        gamma: ``None`` for peak-1 targets, else targets scaled by ``gamma / ((2 pi)^(D/2) prod sigma)``.
        kind: ``"l2"`` or ``"bce"`` (Huang et al.; predictions are logits, targets peak-1).
        reduction: ``"mean"`` over valid channels and voxels, or ``"sum"`` over them divided by
            the batch size (Payer's choice, to be used with small learning rates).
        output_stride: per-axis stride of the prediction grid w.r.t. the input (Downsampling-Net).
        sigma_min: lower bound applied to a learned sigma.
        channels: ``None`` (one channel per landmark) or ``C`` lists of landmark indices, the
            landmarks of each output channel (``ChannelGroups.members``; a
            :class:`heatmark.core.heatmaps.ChannelGroups` is accepted too). Sigma then has ``C`` values.

    ``forward(pred (B, C, *S), landmarks_voxel (B, N, D))`` returns a scalar float32 loss; the
    prediction is cast to float32 so mixed-precision training keeps the loss exact.
    """

    def __init__(
        self,
        num_landmarks: int,
        sigma: float | Sequence[float] = 2.0,
        learn_sigma: bool = False,
        alpha: float = 0.0,
        gamma: float | None = None,
        kind: str = "l2",
        reduction: str = "mean",
        output_stride: Sequence[int] | None = None,
        sigma_min: float = 0.5,
        channels: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        if channels is not None and hasattr(channels, "members"):
            channels = channels.members
        self.channels = None if channels is None else [[int(i) for i in c] for c in channels]
        if self.channels is not None and sorted(i for c in self.channels for i in c) != list(range(num_landmarks)):
            raise ValueError(f"channels {self.channels} must hold every landmark index 0..{num_landmarks - 1} exactly once")
        if self.channels is not None and all(len(c) == 1 for c in self.channels) and \
                [c[0] for c in self.channels] == list(range(num_landmarks)):
            self.channels = None  # one channel per landmark, in order: the plain case
        num_channels = num_landmarks if self.channels is None else len(self.channels)
        if kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if kind == "bce" and gamma is not None:
            raise ValueError("BCE needs targets in [0, 1]: use gamma=None with kind='bce'")
        s = torch.as_tensor(sigma, dtype=torch.float32)
        s = s.expand(num_channels).clone() if s.ndim == 0 else s.clone()
        if s.shape != (num_channels,):
            raise ValueError(f"sigma must be a scalar or have {num_channels} values (one per output channel), got "
                             f"shape {tuple(s.shape)}")
        if learn_sigma:
            self.sigma = nn.Parameter(s)
        else:
            self.register_buffer("sigma", s)
        self.num_landmarks = num_landmarks
        self.num_channels = num_channels
        self.learn_sigma = learn_sigma
        self.alpha = float(alpha)
        self.gamma = gamma
        self.kind = kind
        self.reduction = reduction
        self.output_stride = tuple(int(x) for x in output_stride) if output_stride is not None else None
        self.sigma_min = float(sigma_min)

    def effective_sigma(self) -> torch.Tensor:
        """Sigma in input-grid voxels, clamped to ``sigma_min``: ``(C,)``, one per output channel."""
        return self.sigma.clamp(min=self.sigma_min)

    def targets(self, landmarks_voxel: torch.Tensor, spatial_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets ``(B, C, *spatial_shape)`` on the prediction grid and the validity mask ``(B, C)``
        (a shared channel is valid when any of its landmarks is)."""
        d = landmarks_voxel.shape[-1]
        pts = input_to_output_voxels(landmarks_voxel.to(torch.float64), self.output_stride)
        shape = torch.as_tensor(list(spatial_shape), dtype=pts.dtype, device=pts.device)
        valid = torch.isfinite(pts).all(-1) & ((pts >= -0.5) & (pts <= shape - 0.5)).all(-1)
        pts = torch.where(valid.unsqueeze(-1), pts, torch.full_like(pts, float("nan")))
        sigma = self.effective_sigma().to(pts.device)
        if self.channels is not None:  # each landmark drawn with its channel's sigma
            channel_of = torch.empty(self.num_landmarks, dtype=torch.long)
            for c, members in enumerate(self.channels):
                channel_of[members] = c
            sigma = sigma[channel_of.to(sigma.device)]
        sigma = sigma.unsqueeze(-1).expand(self.num_landmarks, d)
        if self.output_stride is not None:
            sigma = sigma / torch.as_tensor(self.output_stride, dtype=sigma.dtype, device=sigma.device)
        target = gaussian_heatmaps(pts, spatial_shape, sigma=sigma, gamma=self.gamma, dtype=torch.float32,
                                   channels=self.channels)
        if self.channels is not None:
            valid = torch.stack([valid[:, c].any(dim=1) for c in self.channels], dim=1)
        return target, valid

    def forward(self, pred: torch.Tensor, landmarks_voxel: torch.Tensor) -> torch.Tensor:
        if pred.shape[1] != self.num_channels:
            raise ValueError(f"prediction has {pred.shape[1]} channels, the loss expects {self.num_channels} "
                             f"({self.num_landmarks} landmarks)")
        pred = pred.float()
        target, valid = self.targets(landmarks_voxel.to(pred.device), pred.shape[2:])
        mask = valid.to(pred.dtype).reshape(*valid.shape, *([1] * (pred.ndim - 2)))
        if self.kind == "l2":
            per_voxel = (pred - target) ** 2
        else:
            per_voxel = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        data = (per_voxel * mask).sum()
        if self.reduction == "mean":
            voxels = float(torch.tensor(pred.shape[2:]).prod())
            data = data / (valid.sum().clamp(min=1) * voxels)
        else:
            data = data / pred.shape[0]
        if self.learn_sigma and self.alpha > 0:
            data = data + 0.5 * self.alpha * (self.effective_sigma() ** 2).sum()
        return data
