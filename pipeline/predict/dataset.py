"""Data loading for prediction: a case or an error record, never an exception.

:class:`CaseDataset` runs the bundle's ``inference#preprocessing`` on one input (in a
``DataLoader`` worker); whatever goes wrong becomes an error record, so one bad file never stops
the batch. :func:`collate` keeps the error records aside and stacks the good cases, one group per
preprocessed shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from heatmark.predict.errors import describe

__all__ = ["CaseDataset", "collate"]


class CaseDataset:
    """Map-style dataset: item ``i`` is ``{"case", "path", "image", "affine"}`` (preprocessed) or,
    when anything goes wrong, ``{"case", "path", "error"}`` with the reason in words."""

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
            image = self.transform({self.image_key: path})[self.image_key]
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
                    "affine": torch.as_tensor(affine, dtype=torch.float64).clone()}
        except Exception as e:  # noqa: BLE001 - every failure becomes a record, the batch goes on
            return {"case": case, "path": path, "error": describe(e)}


def collate(items: Sequence[dict]) -> dict:
    """``{"errors": [error records], "groups": [{"cases", "paths", "images", "affines"}, ...]}``:
    the good cases stacked, one group per preprocessed shape."""
    errors = [it for it in items if "error" in it]
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        if "error" not in it:
            groups.setdefault(tuple(it["image"].shape), []).append(it)
    batches = [{"cases": [m["case"] for m in members], "paths": [m["path"] for m in members],
                "images": torch.stack([m["image"] for m in members]),
                "affines": torch.stack([m["affine"] for m in members])}
               for members in groups.values()]
    return {"errors": errors, "groups": batches}
