"""Data loading for prediction: a case or an error record, never an exception.

:class:`CaseDataset` runs the bundle's ``inference#preprocessing`` (with the plausibility checks of
:mod:`heatmark.predict.checks` after the loader) on one input (in a ``DataLoader`` worker);
whatever goes wrong, an ``OSError`` reading the file included, becomes an error record, so one bad
file never stops the batch. :func:`collate` keeps the error records aside and stacks the good
cases, one group per preprocessed shape. :func:`die_with_parent` (the workers' ``worker_init_fn``)
makes a worker end with the process that started it, even when that one is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence

import torch

from heatmark.predict.checks import GEOMETRY_KEY
from heatmark.predict.errors import describe

__all__ = ["CaseDataset", "collate", "die_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """``worker_init_fn`` of the data loading workers: on Linux, ask the kernel to send SIGTERM to
    this process when its parent ends (``prctl(PR_SET_PDEATHSIG)``), so that no worker outlives a
    killed ``heatmark predict``; exit at once when the parent is already gone. Elsewhere a no-op
    (torch's workers then end at their next status check, within seconds)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's prctl among them
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request: nobody will send the signal
        os._exit(1)


class CaseDataset:
    """Map-style dataset: item ``i`` is ``{"case", "path", "image", "affine", "geometry"}``
    (preprocessed; ``geometry``: the loaded image's ``(spatial_shape, affine)``, or None) or, when
    anything goes wrong, ``{"case", "path", "error"}`` with the reason in words."""

    def __init__(self, items: Sequence[tuple[str, str]], transform: Callable, spatial_dims: int,
                 image_key: str = "image"):
        self.items = list(items)
        self.transform = transform
        self.spatial_dims = spatial_dims
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        case, path = self.items[index]
        try:
            out = self.transform({self.image_key: path})
            image = out[self.image_key]
            affine = getattr(image, "affine", None)
            if affine is None:
                raise ValueError("preprocessing lost the image's affine (world coordinates)")
            if image.ndim != self.spatial_dims + 1:
                raise ValueError(f"preprocessed image has shape {tuple(image.shape)}; expected channel + "
                                 f"{self.spatial_dims} spatial axes")
            data = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image, dtype=torch.float32)
            if not torch.isfinite(data).all():
                raise ValueError("preprocessing produced non-finite values (NaN or infinity)")
            return {"case": case, "path": path, "image": data.contiguous(),
                    "affine": torch.as_tensor(affine, dtype=torch.float64).clone(),
                    "geometry": out.get(GEOMETRY_KEY) if isinstance(out, dict) else None}
        except Exception as e:  # noqa: BLE001 - every failure becomes a record, the batch goes on
            return {"case": case, "path": path, "error": describe(e)}


def collate(items: Sequence[dict]) -> dict:
    """``{"errors": [error records], "groups": [{"cases", "paths", "images", "affines",
    "geometries"}, ...]}``: the good cases stacked, one group per preprocessed shape."""
    errors = [it for it in items if "error" in it]
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        if "error" not in it:
            groups.setdefault(tuple(it["image"].shape), []).append(it)
    batches = [{"cases": [m["case"] for m in members], "paths": [m["path"] for m in members],
                "images": torch.stack([m["image"] for m in members]),
                "affines": torch.stack([m["affine"] for m in members]),
                "geometries": [m.get("geometry") for m in members]}
               for members in groups.values()]
    return {"errors": errors, "groups": batches}
