"""Per-axis arguments: one value for every spatial axis, or one value per axis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

__all__ = ["per_axis"]

T = TypeVar("T", int, float)


def per_axis(value: Any, dims: int, name: str = "value", default: Any = None,
             cast: Callable[[Any], T] = int) -> tuple[T, ...]:
    """``value`` as a ``dims``-tuple: a scalar (or a 1-sequence) is repeated, a ``dims``-sequence is
    taken as it is, ``None`` gives ``default`` repeated (or is an error when ``default`` is None).

    Args:
        value: a number, a sequence of numbers, a numpy array or a tensor.
        dims: number of spatial axes (2 or 3).
        name: the argument's name, for the error message.
        default: used for ``None``.
        cast: ``int`` or ``float``.

    Raises:
        ValueError: a sequence of another length, or ``None`` without a default.
    """
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        value = default
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value).ravel()
    if arr.size == 1:
        return (cast(arr[0].item()),) * dims
    if arr.size != dims:
        raise ValueError(f"{name} needs 1 or {dims} values (one per spatial axis), got {arr.size}: {value!r}")
    return tuple(cast(v.item()) for v in arr)
