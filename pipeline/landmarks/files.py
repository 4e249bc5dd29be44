"""Reading and writing landmark files of any registered format.

The format follows the file name's suffix (:func:`~heatmark.landmarks.registry.format_for`);
in memory coordinates are always world mm, RAS; files in LPS are converted both ways. All writes
are atomic (:mod:`heatmark.core.fileio`) and use full float precision, so every round trip is
exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from heatmark.landmarks.model import CoordinateSystem, Landmarks, coordinate_system_arg, file_error
from heatmark.landmarks.registry import FORMATS, TableLayout, file_stem, format_for, suffix_list, table_layout_arg

__all__ = ["read_confidence", "read_landmark_table", "read_landmarks", "write_landmark_table", "write_landmarks"]


def read_landmark_table(path: str | Path) -> dict[str, Landmarks]:
    """Read all cases of a landmark file: ``{case: Landmarks}`` in world mm, RAS.

    Long or wide ``.csv`` and multi-case ``.json`` give every case the same names in the same
    order (long CSV: by landmark id 1..N; absent landmarks are NaN). Files in LPS are converted.
    Single-case files (``.fcsv``, ``.mrk.json``, single-case ``.json`` without a ``case`` key)
    give one entry keyed by the file name without its suffix.

    Raises:
        LandmarkFileError: the file is missing, empty, malformed or of an unregistered type
            (message names file and line).
    """
    path = Path(path)
    table = format_for(path).read(path).table
    return {(file_stem(path) if case is None else case): lm for case, lm in table.items()}


def _pick_case(path: Path, table: dict[str | None, Landmarks], case: str | None) -> Landmarks:
    if case is not None and case in table:
        return table[case]
    if len(table) == 1 and (case is None or None in table):
        return next(iter(table.values()))
    listed = ", ".join(repr(c) for c in list(table)[:5]) + (", ..." if len(table) > 5 else "")
    if not table:
        raise file_error(path, None, "file holds no cases")
    if case is None:
        raise file_error(path, None, f"file holds {len(table)} cases ({listed}); pass case= to choose one")
    raise file_error(path, None, f"case {case!r} not found ({len(table)} cases: {listed})")


def _with_dims(path: Path, lm: Landmarks, spatial_dims: int, always_3d: bool) -> Landmarks:
    """``lm`` as ``spatial_dims``-D; 3D points of an always-3D format with every z = 0 become 2D."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if lm.spatial_dims == spatial_dims:
        return lm
    if always_3d and spatial_dims == 2:
        z = lm.coords[:, 2]
        off_plane = np.flatnonzero(~np.isnan(z) & (z != 0.0))
        if off_plane.size:
            i = off_plane[0]
            raise file_error(path, None, f"wrong dimensionality: landmark {lm.names[i]!r} has z = {z[i]!r} mm; "
                                         "only points with z = 0 can be read as 2D")
        return Landmarks(lm.coords[:, :2].copy(), lm.names)
    raise file_error(path, None, f"wrong dimensionality: the file holds {lm.spatial_dims}D landmarks, "
                                 f"expected {spatial_dims}D")


def read_landmarks(path: str | Path, case: str | None = None, names: Sequence[str] | None = None,
                   spatial_dims: int | None = None) -> Landmarks:
    """Read one case of landmarks, in world mm, RAS (files in LPS are converted).

    Args:
        path: a file of any registered format: ``.csv`` (long or wide), ``.json``,
            ``.mrk.json`` or ``.fcsv`` built in.
        case: the case to pick from a multi-case file (required when it holds several; ignored
            for Slicer files and single-case JSON without a ``case`` key).
        names: optional names to select and order; names not in the file become NaN rows.
        spatial_dims: the dimensionality the caller needs; a mismatch is an error, except that
            Slicer files (always 3D) are read as 2D when every z is 0.

    Raises:
        LandmarkFileError: missing/malformed file, unknown case, wrong dimensionality.
    """
    path = Path(path)
    contents = format_for(path).read(path)
    lm = _pick_case(path, contents.table, case)
    if spatial_dims is not None:
        lm = _with_dims(path, lm, spatial_dims, always_3d=contents.always_3d)
    return lm.select(list(names)) if names is not None else lm


def read_confidence(path: str | Path, case: str | None = None) -> np.ndarray:
    """The per-landmark confidence stored in a landmark file, ``(N,)`` float64 in landmark order
    (NaN where a point has none): the ``confidence`` column of a long ``.csv`` table, or the
    ``confidence=<value>`` that :func:`write_landmarks` puts in each Slicer control point's
    description (``.mrk.json``, ``.fcsv``). ``case`` picks the case as in :func:`read_landmarks`.

    Raises:
        LandmarkFileError: the file is malformed, the case unknown, or the file stores no
            confidence at all.
    """
    path = Path(path)
    contents = format_for(path).read(path)
    if contents.confidence is None:
        raise file_error(path, None, "the file stores no confidence (a long .csv with a confidence column, "
                                     "or a Slicer file written with confidence=, does)")
    lm = _pick_case(path, contents.table, case)
    key = next(k for k, v in contents.table.items() if v is lm)
    return np.asarray(contents.confidence[key], dtype=np.float64)


def write_landmark_table(path: str | Path, table: Mapping[str, Landmarks], layout: TableLayout = "long",
                         confidence: Mapping[str, np.ndarray] | None = None,
                         coordinate_system: CoordinateSystem = "RAS") -> None:
    """Write all cases atomically, in world mm (RAS unless ``coordinate_system="LPS"``).

    ``.csv``: long (``case,landmark,name,frame,x_mm,y_mm[,z_mm][,confidence]``, one row per
    landmark, ids 1..N) or wide (``case,frame,<name>_x_mm,...``, one row per case) layout, the
    frame in the ``frame`` column, missing values as empty cells, full float precision (see
    :func:`~heatmark.landmarks.csv_table.landmark_table_text`). ``.json``: heatmark's multi-case
    JSON (``layout`` must be "long"). Other formats with a table writer in the registry likewise.
    All cases must share names, order and dimensionality. ``confidence`` (``{case: (N,) array}``,
    long CSV only) fills a ``confidence`` column; cases without an entry get empty cells.

    Raises:
        LandmarkFileError: the suffix is not registered.
        ValueError: a single-case format, or options the format does not support; nothing is
            written then.
    """
    path = Path(path)
    frame = coordinate_system_arg(coordinate_system)
    fmt = format_for(path)
    layout = table_layout_arg(layout)
    if fmt.write_table is None:
        tables = suffix_list([f for f in FORMATS if f.write_table is not None])
        raise ValueError(f"{path.name}: tables are written as {tables}; "
                         f"write {fmt.name} files per case with write_landmarks")
    fmt.write_table(path, table, frame, layout, confidence)


def write_landmarks(path: str | Path, lm: Landmarks, coordinate_system: CoordinateSystem | None = None,
                    case: str | None = None, confidence: np.ndarray | Sequence[float] | None = None) -> None:
    """Write one case atomically; the format follows the suffix.

    - ``.fcsv``: Slicer fiducial CSV, RAS by default (``# CoordinateSystem = RAS``);
    - ``.mrk.json``: Slicer markups JSON, LPS by default as Slicer writes it (x, y negated);
      missing landmarks get ``positionStatus: "missing"``;
    - ``.json``: heatmark's single-case JSON (with ``case`` when given), RAS by default;
    - ``.csv``: long CSV with one case (``case`` defaults to the file name without suffix);
    - any other registered format: its writer, in its ``default_frame`` unless told.

    2D landmarks go to Slicer files with z = 0. Coordinates in ``lm`` are world mm, RAS.

    ``confidence`` (``N`` values, e.g. the heatmap peak of each landmark) goes to the formats that
    store one (``LandmarkFormat.stores_confidence``): Slicer files get ``confidence=<value>`` as each
    control point's description (Slicer's markups schema has no confidence field; the description is
    shown in the Markups module's control-point table); :func:`read_confidence` reads it back.

    Raises:
        LandmarkFileError: the suffix is not registered.
        ValueError: ``coordinate_system`` is neither RAS nor LPS; ``confidence`` has the wrong
            length or the format does not store it.
    """
    path = Path(path)
    fmt = format_for(path)
    frame = coordinate_system_arg(coordinate_system or fmt.default_frame)
    if confidence is None:
        fmt.write(path, lm, frame, case)
        return
    if not fmt.stores_confidence:
        stores = suffix_list([f for f in FORMATS if f.stores_confidence])
        raise ValueError(f"{path.name}: {fmt.name} files store no confidence (formats that do: {stores})")
    values = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if values.shape != (lm.num_landmarks,):
        raise ValueError(f"confidence must have {lm.num_landmarks} values (one per landmark), got {np.shape(confidence)}")
    fmt.write(path, lm, frame, case, confidence=values)
