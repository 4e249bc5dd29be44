"""Shared building blocks of the heatmap networks: one code path for 2D and 3D.

Everything here is ``spatial_dims``-generic: convolutions and pooling layers come from MONAI's
layer factories (``Conv[Conv.CONV, spatial_dims]``, ``Pool[Pool.AVG, spatial_dims]``),
activations from :func:`monai.networks.layers.utils.get_act_layer`. The networks import only
torch, MONAI and :mod:`heatmark.core`.

Shapes: ``B`` batch, ``C`` channels, ``N`` landmarks, ``D`` spatial dims (2 or 3), ``*S`` spatial
size (``D`` values).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer
from torch import nn

from heatmark.core.axes import per_axis

__all__ = [
    "ActType",
    "AutocastSafeConv3d",
    "HeatmapNetwork",
    "act_layer",
    "avg_pool",
    "check_spatial_dims",
    "conv",
    "conv_stack",
    "crop_to",
    "init_heatmap_conv_",
    "init_hidden_conv_",
    "lcm",
    "pad_to_multiple",
    "resize",
    "resolve_upsample_mode",
]

#: An activation as accepted by :func:`monai.networks.layers.utils.get_act_layer`:
#: a name (``"relu"``) or a ``(name, kwargs)`` tuple (``("leakyrelu", {"negative_slope": 0.1})``).
ActType = str | tuple[str, dict[str, Any]]


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise ``ValueError``."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


class AutocastSafeConv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes in float32, outside CPU autocast, where its kernel is larger than
    its input along an axis (the coarse grids of the spatial-configuration component, the deepest
    levels of a U-Net on small volumes).

    Why: with torch 2.13 on CPUs with native bf16 (AVX-512-BF16/AMX), the bf16 weight gradient of
    a 3D convolution whose kernel exceeds the input extent along an axis is wrong (NaN in about half
    the calls, values of no relation to the true gradient in the others), while the forward and the
    input gradient are right; 2D convolutions and kernels within the input are not affected
    (``tests/test_networks_bf16.py`` checks the gradients against float32). Such layers work on
    a few hundred voxels, so float32 costs nothing measurable. Same parameters, ``state_dict`` and
    outputs as ``nn.Conv3d`` otherwise (exports trace it without autocast: a plain convolution).
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (input.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and any(s < k for s, k in zip(input.shape[2:], self.kernel_size))):
            with torch.autocast("cpu", enabled=False):
                return super()._conv_forward(input.float(), weight.float(), None if bias is None else bias.float())
        return super()._conv_forward(input, weight, bias)


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    padding_mode: str = "zeros",
    bias: bool = True,
) -> nn.Module:
    """A 'same'-padded convolution ``(B, in_channels, *S) -> (B, out_channels, *S)``.

    Built with MONAI's ``Conv[Conv.CONV, spatial_dims]`` factory (in 3D its subclass
    :class:`AutocastSafeConv3d`); kernel sizes must be odd so that the output stays aligned with
    the input voxel grid.
    """
    k = per_axis(kernel_size, spatial_dims, "kernel_size")
    if any(ki < 1 or ki % 2 == 0 for ki in k):
        raise ValueError(f"kernel sizes must be odd and positive (same padding), got {k}")
    conv_type = AutocastSafeConv3d if spatial_dims == 3 else Conv[Conv.CONV, spatial_dims]
    return conv_type(
        in_channels,
        out_channels,
        kernel_size=k,
        padding=tuple(ki // 2 for ki in k),
        padding_mode=padding_mode,
        bias=bias,
    )


def conv_stack(spatial_dims: int, in_channels: int, filters: int, num_convs: int, kernel_size: int | Sequence[int],
               act: ActType = "relu", padding_mode: str = "zeros") -> nn.Sequential:
    """``num_convs`` x (same-padded conv with He init, activation): ``(B, in_channels, *S)`` ->
    ``(B, filters, *S)`` (``in_channels`` when ``num_convs`` is 0). Layers are numbered conv, act,
    conv, act ... in one ``nn.Sequential``."""
    layers: list[nn.Module] = []
    ch = in_channels
    for _ in range(num_convs):
        c = conv(spatial_dims, ch, filters, kernel_size, padding_mode)
        init_hidden_conv_(c, act)
        layers += [c, act_layer(act)]
        ch = filters
    return nn.Sequential(*layers)


def avg_pool(spatial_dims: int, factor: int | Sequence[int]) -> nn.Module:
    """Average pooling by ``factor`` (kernel = stride = factor), MONAI ``Pool[Pool.AVG, dims]``.

    ``(B, C, *S) -> (B, C, *floor(S / factor))``.
    """
    f = per_axis(factor, spatial_dims, "factor")
    return Pool[Pool.AVG, spatial_dims](kernel_size=f, stride=f)


def act_layer(act: ActType) -> nn.Module:
    """An activation module from a MONAI activation spec (see :data:`ActType`)."""
    return get_act_layer(act)


def _negative_slope(act: ActType) -> float:
    """Slope of the negative part of ``act`` for He initialisation (0 for ReLU)."""
    if isinstance(act, tuple) and str(act[0]).lower() in ("leakyrelu", "leaky_relu"):
        return float(act[1].get("negative_slope", 0.01))
    if isinstance(act, str) and act.lower() in ("leakyrelu", "leaky_relu"):
        return 0.01
    return 0.0


def init_hidden_conv_(module: nn.Module, act: ActType = "relu") -> None:
    """He (Kaiming normal, fan-in) initialisation of a hidden conv/linear layer, zero bias."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return
    nn.init.kaiming_normal_(weight, a=_negative_slope(act), mode="fan_in", nonlinearity="leaky_relu")
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_heatmap_conv_(module: nn.Module, std: float) -> None:
    """Initialise a heatmap-output conv: truncated normal (2 std) with ``std``, zero bias.

    Payer et al. (2019) use std 1e-4 (2D) / 1e-3 (3D) for the two heatmap-producing convolutions
    of the SpatialConfiguration-Net; without it the product of the two does not train.
    """
    nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int], mode: str = "replicate") -> torch.Tensor:
    """Pad the spatial axes of ``x`` (B, C, *S) at their END up to multiples of ``multiple``.

    Padding only at the end keeps voxel ``i`` of the input at index ``i``: crop the output back
    with :func:`crop_to` and coordinates are unchanged. ``mode`` is passed to ``F.pad``
    (``"replicate"``, ``"reflect"``, ``"constant"`` (zeros)). Returns ``x`` itself when no padding
    is needed.
    """
    spatial = x.shape[2:]
    pads = [(-int(s)) % int(m) for s, m in zip(spatial, multiple)]
    if not any(pads):
        return x
    flat: list[int] = []
    for p in reversed(pads):  # F.pad wants the last axis first
        flat += [0, p]
    if mode == "reflect" and any(p >= int(s) for p, s in zip(pads, spatial)):
        mode = "replicate"  # reflect padding needs pad < size
    return F.pad(x, flat, mode=mode)


def crop_to(x: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (B, C, *S') to their first ``spatial_size`` voxels."""
    if tuple(x.shape[2:]) == tuple(spatial_size):
        return x
    index = (slice(None), slice(None)) + tuple(slice(0, int(s)) for s in spatial_size)
    return x[index]


_LINEAR = {2: "bilinear", 3: "trilinear"}


def resolve_upsample_mode(mode: str, spatial_dims: int, default_cubic: bool = False) -> str:
    """Normalise an upsampling mode name for ``spatial_dims``.

    Accepted: ``"auto"`` (cubic in 2D / linear in 3D when ``default_cubic`` is true, else linear),
    ``"linear"``, ``"bilinear"``, ``"trilinear"``, ``"cubic"``, ``"bicubic"``, ``"tricubic"``,
    ``"nearest"``. Returns one of ``"linear"``, ``"cubic"``, ``"nearest"``.
    """
    m = mode.lower()
    if m == "auto":
        return "cubic" if (default_cubic and spatial_dims == 2) else "linear"
    if m in ("linear", "bilinear", "trilinear"):
        return "linear"
    if m in ("cubic", "bicubic", "tricubic"):
        return "cubic"
    if m == "nearest":
        return "nearest"
    raise ValueError(
        f"unknown upsampling mode {mode!r}; use 'auto', 'linear' (bi/trilinear), 'cubic' or 'nearest'"
    )


def resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Resize ``x`` (B, C, *S) to ``size`` with half-pixel geometry (``align_corners=False``).

    ``mode`` is ``"linear"`` (bi/trilinear), ``"cubic"`` (bicubic, Keys a=-0.75 as in
    ``F.interpolate``; in 3D it is evaluated separably: bicubic over the last two axes, then
    bicubic over the first axis with the others kept, which is exact tricubic because a cubic
    resample with scale 1 and half-pixel centres is the identity) or ``"nearest"``. With the
    half-pixel convention, resizing by an integer factor after average pooling by the same
    factor keeps every voxel centre where it was.
    """
    size = tuple(int(s) for s in size)
    spatial_dims = x.dim() - 2
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "linear":
        return F.interpolate(x, size=size, mode=_LINEAR[spatial_dims], align_corners=False)
    if mode != "cubic":
        raise ValueError(f"unknown resize mode {mode!r}")
    if spatial_dims == 2:
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    b, c, d, h, w = x.shape
    y = F.interpolate(x.reshape(b, c * d, h, w), size=size[1:], mode="bicubic", align_corners=False)
    y = y.reshape(b, c, d, size[1] * size[2])
    y = F.interpolate(y, size=(size[0], size[1] * size[2]), mode="bicubic", align_corners=False)
    return y.reshape(b, c, size[0], size[1], size[2])


def lcm(values: Sequence[int]) -> int:
    """Least common multiple of positive ints."""
    out = 1
    for v in values:
        out = out * int(v) // math.gcd(out, int(v))
    return out


class HeatmapNetwork(nn.Module):
    """Base class of the landmark networks: common attributes, no layers.

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: number of input channels ``C``.
        num_landmarks: number of landmarks ``N`` (output heatmap channels).
        output_stride: per spatial axis, input voxels per output voxel (1s except for
            :class:`~heatmark.networks.DownsamplingNet`).
            Output voxel ``j`` is centred on input voxel ``j * s + (s - 1) / 2``: the convention of
            :func:`heatmark.core.geometry.output_to_input_voxels`, used by decoding and the loss.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass records the arguments it was built with (``init_arguments``)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_arguments", False):
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            init(self, *args, **kw)
            arguments: dict[str, Any] = {}  # the outermost __init__ finishes last: its arguments stay
            for name, value in list(bound.arguments.items())[1:]:
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif signature.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                    arguments[name] = value
            object.__setattr__(self, "_init_arguments", arguments)

        __init__._records_arguments = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    @property
    def init_arguments(self) -> dict[str, Any]:
        """The keyword arguments the network was built with, defaults included: with the class
        (``_target_``) they rebuild it (the description a model file stores)."""
        return dict(getattr(self, "_init_arguments", {}))

    def __init__(self, spatial_dims: int, in_channels: int, num_landmarks: int) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if in_channels < 1 or num_landmarks < 1:
            raise ValueError(
                f"in_channels and num_landmarks must be >= 1, got {in_channels} and {num_landmarks}"
            )
        self.in_channels = int(in_channels)
        self.num_landmarks = int(num_landmarks)
        self.output_stride: tuple[int, ...] = (1,) * self.spatial_dims

    def output_spatial_size(self, input_spatial_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the output for an input of ``input_spatial_size``."""
        return tuple(int(s) // st for s, st in zip(input_spatial_size, self.output_stride))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__} with spatial_dims={self.spatial_dims} expects input "
                f"(B, C, {', '.join('S' + str(i) for i in range(self.spatial_dims))}), got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]}"
            )
