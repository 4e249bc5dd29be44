"""Datalists: which image goes with which landmarks, checked before any training starts.

A datalist is a list of dictionaries ``{"case": str, "image": path, "landmarks": (N, D) world mm}``
(MONAI / Decathlon style). Landmarks are carried inline as nested lists with NaN rows for missing
landmarks, so workers never re-read landmark files; :class:`heatmark.transforms.LoadLandmarksd`
turns them into float64 tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from heatmark.landmarks import Landmarks, read_landmark_table, read_landmarks
from heatmark.transforms.io import ImageLoadError, LoadLandmarkImage

__all__ = [
    "DataCheckError",
    "read_case_list",
    "datalist_from_table",
    "load_datalist",
    "split_datalist",
    "check_datalist",
    "check_landmarks_in_image",
    "landmark_names",
]


class DataCheckError(ValueError):
    """Every problem found in a datalist, reported at once before training starts."""

    def __init__(self, problems: Sequence[str], source: str = "datalist"):
        self.problems = list(problems)
        head = f"{source}: {len(self.problems)} problem(s) found before training:"
        super().__init__("\n  - ".join([head, *self.problems]))


def read_case_list(path: str | os.PathLike) -> list[str]:
    """Case ids from a text file, one per line (blank lines and ``#`` comments ignored)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def landmark_names(landmarks_file: str | os.PathLike) -> list[str]:
    """Landmark names, in order, of a landmark table (long/wide CSV or JSON)."""
    table = read_landmark_table(landmarks_file)
    if not table:
        raise ValueError(f"{landmarks_file}: no cases")
    return list(next(iter(table.values())).names)


def _coords_list(lm: Landmarks) -> list[list[float]]:
    return [[float(v) for v in row] for row in lm.coords]


def datalist_from_table(
    images_dir: str | os.PathLike,
    landmarks_file: str | os.PathLike,
    cases: Sequence[str] | str | os.PathLike | None = None,
    image_pattern: str = "{case}.nii.gz",
) -> list[dict[str, Any]]:
    """Build a datalist from a folder of images and one landmark table.

    Args:
        images_dir: folder with the images.
        landmarks_file: long/wide landmark CSV (or multi-case JSON) in world mm.
        cases: case ids, or a text file listing them (e.g. ``splits/train.txt``); default: every
            case of the table.
        image_pattern: image file name for a case, ``{case}`` substituted.
    """
    table = read_landmark_table(landmarks_file)
    if cases is None:
        ids = list(table)
    elif isinstance(cases, (str, os.PathLike)):
        ids = read_case_list(cases)
    else:
        ids = [str(c) for c in cases]
    missing = [c for c in ids if c not in table]
    if missing:
        raise DataCheckError([f"case {c!r} has no landmarks in {landmarks_file}" for c in missing], str(landmarks_file))
    root = Path(images_dir)
    return [{"case": c, "image": str(root / image_pattern.format(case=c)), "landmarks": _coords_list(table[c])}
            for c in ids]


def load_datalist(path: str | os.PathLike, key: str = "training", base_dir: str | os.PathLike | None = None) -> list[dict]:
    """A Decathlon-style JSON datalist (``{"training": [{"image": ..., "landmarks": ...}, ...]}``).

    Relative image paths (and landmark file paths) are resolved against ``base_dir`` (default: the
    JSON file's folder); inline landmark coordinates (``null`` for a missing one) are kept.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataCheckError([f"cannot read datalist: {e}"], str(path)) from e
    if key not in doc:
        raise DataCheckError([f"no {key!r} list (keys: {sorted(doc)})"], str(path))
    base = Path(base_dir) if base_dir is not None else path.parent
    items = []
    for i, item in enumerate(doc[key]):
        item = dict(item)
        item.setdefault("case", Path(str(item.get("image", i))).name.split(".")[0])
        for k in ("image", "landmarks"):
            if isinstance(item.get(k), str) and not os.path.isabs(item[k]):
                item[k] = str(base / item[k])
        if isinstance(item.get("landmarks"), list):
            item["landmarks"] = [[np.nan] * len(next((r for r in item["landmarks"] if r), [0, 0])) if r is None else r
                                 for r in item["landmarks"]]
        items.append(item)
    return items


def split_datalist(datalist: Sequence[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split off a validation part (deterministic, by ``seed``); ``val_fraction`` of 0 gives none."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(datalist) * val_fraction))
    order = np.random.default_rng(seed).permutation(len(datalist))
    val_idx = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(datalist) if i not in val_idx]
    val = [d for i, d in enumerate(datalist) if i in val_idx]
    return train, val


def check_landmarks_in_image(landmarks: Any, image: Any, margin_mm: float = 10.0,
                             names: Sequence[str] | None = None) -> list[str]:
    """Problems with landmarks (world mm) that lie outside an image's field of view.

    Args:
        landmarks: ``(N, D)`` world mm (RAS); NaN rows (missing landmarks) are ignored.
        image: a ``MetaTensor`` (``.affine`` and spatial shape are used) or a
            ``(spatial_shape, affine)`` pair, e.g. from a header.
        margin_mm: how far outside the field of view (the voxel boxes' outer faces) a landmark
            may lie before it is reported.
        names: landmark names for the messages.

    Returns:
        messages such as ``"landmark 3 (Sella) lies 412 mm outside the image"``; empty if all fit.
    """
    if isinstance(image, tuple):
        shape, affine = image
    else:
        shape, affine = tuple(image.shape[1:]), image.affine
    affine = np.asarray(affine, dtype=np.float64)
    shape = np.asarray([int(s) for s in shape], dtype=np.float64)
    pts = np.asarray(landmarks, dtype=np.float64)
    nd = len(shape)
    if pts.ndim != 2 or pts.shape[1] != nd or affine.shape != (nd + 1, nd + 1):
        return [f"landmarks are {pts.shape[-1] if pts.ndim == 2 else '?'}D but the image is {nd}D"]
    lin, off = affine[:nd, :nd], affine[:nd, nd]
    try:
        vox = np.linalg.solve(lin, (pts - off).T).T
    except np.linalg.LinAlgError:
        return ["the image's orientation matrix is singular; landmarks cannot be placed in it"]
    inside = np.clip(vox, -0.5, shape - 0.5)
    dist = np.linalg.norm((vox - inside) @ lin.T, axis=1)
    out = []
    for i in np.flatnonzero(np.isfinite(dist) & (dist > margin_mm)):
        label = f"landmark {i + 1}" + (f" ({names[i]})" if names is not None and i < len(names) else "")
        out.append(f"{label} lies {dist[i]:.0f} mm outside the image")
    return out


def _image_geometry(path: Path, spatial_dims: int | None) -> tuple[tuple[int, ...], np.ndarray]:
    """``(spatial_shape, affine)`` of an image; NIfTI volumes from the header alone."""
    name = path.name.lower()
    if path.is_file() and name.endswith((".nii", ".nii.gz")) and spatial_dims != 2:
        try:
            header = nib.load(str(path))
            shape, affine = tuple(int(s) for s in header.shape), np.asarray(header.affine, dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - reported as a problem of the case
            raise ImageLoadError(path, f"cannot read its header ({type(e).__name__}: {e})") from None
        if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
            return shape[:3], affine
    img = LoadLandmarkImage(spatial_dims=spatial_dims, allow_constant=True)(path)
    return tuple(img.shape[1:]), np.asarray(img.affine, dtype=np.float64)


def check_datalist(datalist: Sequence[dict], num_landmarks: int | None = None, spatial_dims: int | None = None,
                   image_key: str = "image", landmark_key: str = "landmarks", source: str = "datalist",
                   check_images: bool = False, margin_mm: float = 10.0) -> list[dict]:
    """Check every entry up front and raise one :class:`DataCheckError` listing all problems.

    Checks: the list is not empty; image files exist and are readable, non-empty files (or
    folders, for DICOM series); inline landmarks have ``num_landmarks`` rows of ``spatial_dims``
    finite-or-NaN numbers; landmark files exist. With ``check_images``, each image's geometry is
    read (NIfTI volumes: the header only) and inline landmarks more than ``margin_mm`` outside its
    field of view are reported (:func:`check_landmarks_in_image`), as are images that cannot be
    read. Returns the datalist unchanged when it is valid.
    """
    problems: list[str] = []
    if not datalist:
        problems.append("no cases")
    for i, item in enumerate(datalist):
        where = f"case {item.get('case', i)!r}"
        img = item.get(image_key)
        if img is None:
            problems.append(f"{where}: no {image_key!r} entry")
        else:
            p = Path(str(img))
            if not p.exists():
                problems.append(f"{where}: image not found: {p}")
            elif p.is_file() and p.stat().st_size == 0:
                problems.append(f"{where}: image file is empty (0 bytes): {p}")
            elif not os.access(p, os.R_OK):
                problems.append(f"{where}: image not readable (permissions): {p}")
        lms = item.get(landmark_key)
        if lms is None:
            problems.append(f"{where}: no {landmark_key!r} entry")
        elif isinstance(lms, (str, os.PathLike)):
            if not Path(lms).exists():
                problems.append(f"{where}: landmark file not found: {lms}")
        else:
            try:
                arr = np.asarray(lms, dtype=np.float64)
            except (TypeError, ValueError):
                problems.append(f"{where}: landmarks are not numbers")
                continue
            if arr.ndim != 2:
                problems.append(f"{where}: landmarks must be an (N, D) table, got shape {arr.shape}")
                continue
            if num_landmarks is not None and arr.shape[0] != num_landmarks:
                problems.append(f"{where}: {arr.shape[0]} landmarks, expected {num_landmarks}")
            if spatial_dims is not None and arr.shape[1] != spatial_dims:
                problems.append(f"{where}: {arr.shape[1]}D landmarks, expected {spatial_dims}D")
            if np.isinf(arr).any():
                problems.append(f"{where}: landmarks contain infinite values")
            if np.isnan(arr).all():
                problems.append(f"{where}: all landmarks are missing")
            if check_images and img is not None and Path(str(img)).exists():
                try:
                    geometry = _image_geometry(Path(str(img)), spatial_dims)
                except ImageLoadError as e:
                    problems.append(f"{where}: {e}")
                    continue
                problems += [f"{where}: {m}" for m in
                             check_landmarks_in_image(arr, geometry, margin_mm, item.get("names"))]
    if problems:
        raise DataCheckError(problems, source)
    return list(datalist)


def deformation_datalist(image: str | os.PathLike, landmarks_file: str | os.PathLike, n: int, seed0: int = 0,
                         names: Sequence[str] | None = None, spatial_dims: int | None = None) -> list[dict[str, Any]]:
    """``n`` virtual cases of one annotated image, for training from random deformations of it.

    Every entry holds the same image and the same landmarks (inline world mm, read once with
    :func:`heatmark.landmarks.read_landmarks`) plus its own integer ``seed`` (``seed0 + i``) and
    case name ``f"deform{seed}"``. Training ignores the seed (random augmentation draws a new
    deformation every time); validation and evaluation pass the entries through
    :class:`heatmark.transforms.augment.SeededRandomd`, which turns each seed into one fixed
    deformation. Use disjoint seed ranges for training, validation and evaluation cases.

    Args:
        image: the image file.
        landmarks_file: its landmarks (``.fcsv``, ``.mrk.json``, CSV, JSON).
        n: number of entries.
        seed0: seed of the first entry.
        names: landmark names to select and order; a name absent from the file is an error (a typo
            would otherwise become a silently missing landmark).
        spatial_dims: expected dimensionality of the landmarks.
    """
    if int(n) < 0 or int(seed0) < 0:
        raise ValueError(f"n and seed0 must be >= 0, got n={n}, seed0={seed0}")
    lm = read_landmarks(landmarks_file, spatial_dims=spatial_dims)
    if names is not None:
        unknown = [nm for nm in names if nm not in lm.names]
        if unknown:
            raise DataCheckError([f"landmark {nm!r} is not in the file (it has: {', '.join(lm.names)})"
                                  for nm in unknown], str(landmarks_file))
        lm = lm.select(list(names))
    coords = _coords_list(lm)
    return [{"case": f"deform{seed}", "image": str(image), "landmarks": [list(r) for r in coords], "seed": seed}
            for seed in range(int(seed0), int(seed0) + int(n))]


__all__ += ["deformation_datalist"]
