"""Writing the results: each case's own files as soon as it is done, and the tables of the run.

Per case (:func:`write_case`): ``<case>.mrk.json`` / ``.fcsv`` / ``.json`` per format,
``<case>_heatmaps.nii.gz`` (the network output, landmarks along the 4th axis, 2D as
X x Y x 1 x N, with the output grid's affine) and ``<case>_overlay.png`` when asked (drawn on the
original image, read again from its file by the bundle's loader, axes in mm; see
:func:`heatmark.evaluation.reports.plot_overlay`), every name from
:func:`heatmark.predict.inputs.case_file_name`. The Slicer files carry each landmark's confidence
in the control point's description (``confidence=<value>``). The tables (:func:`write_tables`) are rebuilt
from the case states: ``landmarks.csv``, ``measurements.csv`` (when the bundle defines
``measurements``), ``errors.csv`` and ``warnings.csv``, rows sorted by case, numbers at full
precision. Every file is written to a temporary name and renamed (:mod:`heatmark.core.fileio`); an
``OSError`` of a write is a :class:`~heatmark.predict.errors.PredictOutputError` naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from heatmark.core.fileio import atomic_path, atomic_write_text, csv_cell, csv_text
from heatmark.core.geometry import nifti_affine, output_grid_affine
from heatmark.evaluation.metrics import measure
from heatmark.evaluation.reports import original_image, plot_overlay
from heatmark.landmarks import Landmarks, format_for, landmark_table_text, write_landmarks
from heatmark.predict.errors import writing
from heatmark.predict.inputs import case_file_name, case_file_names
from heatmark.predict.model import LoadedBundle
from heatmark.predict.options import PredictOptions
from heatmark.transforms.io import ImageLoadError, LoadLandmarkImaged

__all__ = ["TABLES", "case_files", "overlay_image", "save_heatmaps", "write_case", "write_tables"]

#: The tables of OUTPUT (rebuilt from the states).
TABLES = ("landmarks.csv", "measurements.csv", "errors.csv", "warnings.csv")


def case_files(case: str, opts: PredictOptions) -> list[str]:
    """The names of the files of ``case`` the options ask for (``landmarks.csv`` aside)."""
    return case_file_names(case, opts)


def save_heatmaps(path: Path, heatmap: Any, grid_affine: np.ndarray, output_stride: Sequence[int]) -> None:
    """``(N, *S)`` heatmaps as NIfTI, landmarks along the 4th axis, with the affine of the output
    grid (``grid_affine`` is the network input's)."""
    data = np.asarray(heatmap, dtype=np.float32)  # (N, *S)
    data = np.moveaxis(data, 0, -1)  # (*S, N)
    if data.ndim == 3:  # 2D: X x Y x 1 x N
        data = data[:, :, None, :]
    img = nib.Nifti1Image(np.ascontiguousarray(data), nifti_affine(output_grid_affine(grid_affine, output_stride)))
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"heatmark heatmaps; landmarks along axis 4"
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def overlay_image(bundle: LoadedBundle, source: str | Path | None, result: dict) -> tuple[Any, np.ndarray]:
    """The image an overlay is drawn on, with its affine: the original image at ``source`` read
    by the bundle's own loader (its first ``LoadLandmarkImaged``: same spacing for pictures, same
    2D reduction), else by :func:`heatmark.evaluation.reports.original_image`; the network's
    preprocessed image (``result["image"]``, ``result["affine"]``) only when there is no
    ``source`` or it can no longer be read.
    """
    if source is not None:
        transforms = getattr(bundle.preprocessing, "transforms", (bundle.preprocessing,))
        loader = next((t for t in transforms if isinstance(t, LoadLandmarkImaged)), None)
        try:
            if loader is not None:
                image = loader({bundle.image_key: str(source)})[bundle.image_key]
            else:
                image = original_image(source, bundle.spatial_dims)
            return image, np.asarray(image.affine, dtype=np.float64)
        except (ImageLoadError, OSError, ValueError):
            pass  # moved or unreadable since it was predicted: the network's grid is still in world mm
    return result["image"], np.asarray(result["affine"], dtype=np.float64)


def write_case(out: Path, case: str, result: dict, bundle: LoadedBundle, opts: PredictOptions,
               source: str | Path | None = None) -> dict:
    """Write one case's own files (atomically); returns the case's state payload: ``coords``,
    ``confidence``, ``measurements``, ``files`` and ``warnings`` (``result["warnings"]``).
    ``source`` is the input image's path (the overlay is drawn on it; see :func:`overlay_image`).

    Raises:
        PredictOutputError: a file could not be written (an ``OSError``: disk full, permissions).
    """
    lm = Landmarks(result["world"], bundle.names)
    confidence = np.asarray(result["confidence"], dtype=np.float64)
    for fmt in opts.formats:
        if fmt != "csv":
            path = out / case_file_name(case, fmt)
            with writing(path):
                write_landmarks(path, lm, case=case if fmt == "json" else None,
                                confidence=confidence if format_for(path).stores_confidence else None)
    if opts.save_heatmaps:
        path = out / case_file_name(case, "heatmaps")
        with writing(path):
            save_heatmaps(path, result["heatmap"], result["affine"], bundle.output_stride)
    if opts.overlays:
        path = out / case_file_name(case, "overlay")
        with writing(path):
            image, affine = overlay_image(bundle, source if source is not None else result.get("path"), result)
            plot_overlay(image, affine, lm.coords, path, names=bundle.names, title=case)
    values = measure(lm.coords, bundle.names, bundle.measurements) if bundle.measurements else {}
    return {
        "coords": [None if np.isnan(p).any() else [float(v) for v in p] for p in lm.coords],
        "confidence": [float(c) for c in result["confidence"]],
        "measurements": {k: (None if math.isnan(v) else float(v)) for k, v in values.items()},
        "files": case_files(case, opts),
        "warnings": [str(w) for w in result.get("warnings", [])],
    }


def _write_table(path: Path, text: str) -> None:
    with writing(path):
        atomic_write_text(path, text)


def write_tables(out: Path, states: Mapping[str, dict], bundle: LoadedBundle, opts: PredictOptions) -> None:
    """(Re)write ``landmarks.csv`` (with the ``csv`` format), ``measurements.csv`` (when the bundle
    has measurements), ``errors.csv`` (cases that failed) and ``warnings.csv`` (``case,path,warning``:
    one row per warning of a case done, e.g. a landmark set missing) from the case states, rows
    sorted by case. Raises PredictOutputError."""
    b = bundle
    done = sorted(c for c, s in states.items() if s["status"] == "done")
    failed = sorted(c for c, s in states.items() if s["status"] == "failed")
    if "csv" in opts.formats:
        table, conf = {}, {}
        for c in done:
            s = states[c]
            coords = np.array([p if p is not None else [np.nan] * b.spatial_dims for p in s["coords"]],
                              dtype=np.float64)
            table[c] = Landmarks(coords, b.names)
            conf[c] = np.asarray(s["confidence"], dtype=np.float64)
        text = landmark_table_text(table, confidence=conf, names=b.names, spatial_dims=b.spatial_dims)
        _write_table(out / "landmarks.csv", text)
    if b.measurement_names:
        rows: list[list[Any]] = [["case", *b.measurement_names]]
        for c in done:
            m = states[c].get("measurements") or {}
            rows.append([c, *("" if m.get(n) is None else csv_cell(float(m[n])) for n in b.measurement_names)])
        _write_table(out / "measurements.csv", csv_text(rows))
    rows = [["case", "path", "error"]]
    rows += [[c, states[c].get("path", ""), states[c].get("error", "")] for c in failed]
    _write_table(out / "errors.csv", csv_text(rows))
    rows = [["case", "path", "warning"]]
    rows += [[c, states[c].get("path", ""), w] for c in done for w in states[c].get("warnings") or ()]
    _write_table(out / "warnings.csv", csv_text(rows))
