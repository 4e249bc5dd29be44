"""Landmark tables as CSV (``.csv``): many cases in one file, long or wide layout.

Long: ``case,landmark,name,frame,x_mm,y_mm[,z_mm][,confidence]``, one row per landmark
(``landmark`` is the 1-based integer id: landmark ``i`` of
:class:`~heatmark.landmarks.model.Landmarks` has id ``i + 1``; extra columns are ignored on
reading; an empty coordinate cell is a missing landmark). Wide: ``case,frame,<name>_x_mm,
<name>_y_mm[,<name>_z_mm],...``, one row per case. The layout is recognised by the header.

The frame of the coordinates (``RAS`` or ``LPS``; units are mm, as the column names say) is the
``frame`` column of every row, so the file is a plain CSV that ``pandas.read_csv(path)`` and
``csv.DictReader`` read without options. Files of heatmark <= 0.1 stated the frame in a first
comment line instead (``# coordinate system: RAS, units: mm``, :data:`CSV_FRAME_COMMENT`); the
reader still accepts them: lines starting with ``#`` are comments, such a frame comment is
honoured, and a ``frame`` cell (when present and not empty) wins over it.

:func:`landmark_table_text` is the one place that builds this text (``landmarks.csv`` of
``heatmark predict`` included); :func:`read_csv_confidence` reads the ``confidence`` column back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from heatmark.core.fileio import atomic_write_text, csv_cell, csv_text
from heatmark.landmarks.model import (
    CoordinateSystem,
    Landmarks,
    check_table,
    convert_frame,
    coordinate_system_arg,
    file_error,
    landmarks_in_ras,
)
from heatmark.landmarks.parsing import (
    AXES,
    CsvRow,
    csv_lines,
    make_landmarks,
    parse_frame,
    parse_number,
    parse_point,
    read_text,
)
from heatmark.landmarks.registry import LandmarkContents, LandmarkFormat, TableLayout, file_stem, table_layout_arg

__all__ = ["CSV_FORMAT", "CSV_FRAME_COLUMN", "CSV_FRAME_COMMENT", "csv_frame_comment", "landmark_table_text",
           "read_csv_confidence", "read_csv_table"]

#: The column stating each row's coordinate frame (``RAS`` or ``LPS``).
CSV_FRAME_COLUMN = "frame"

#: The frame comment that headed the CSV tables of heatmark <= 0.1 (RAS); still read, no longer written.
CSV_FRAME_COMMENT = "# coordinate system: RAS, units: mm"

_COMMENT_FRAME = re.compile(r"coordinate\s*system\s*[:=]\s*([^,\s]+)", re.IGNORECASE)
_COMMENT_UNITS = re.compile(r"units\s*[:=]\s*([^,\s]+)", re.IGNORECASE)


def csv_frame_comment(frame: CoordinateSystem = "RAS") -> str:
    """The old-style frame comment for ``frame`` (``# coordinate system: <frame>, units: mm``): what
    heatmark <= 0.1 wrote as the first line; still understood on reading."""
    return CSV_FRAME_COMMENT.replace("RAS", coordinate_system_arg(frame))


# ----------------------------------------------------------------------------------------------
# reading


def _csv_frame(path: Path, comments: Sequence[tuple[int, str]]) -> CoordinateSystem:
    """The frame stated in a CSV's comments (``# coordinate system: RAS, units: mm``); RAS if none."""
    frame = "RAS"
    for line, text in comments:
        if m := _COMMENT_FRAME.search(text):
            frame = parse_frame(m.group(1), path, line)
        if (m := _COMMENT_UNITS.search(text)) and m.group(1) != "mm":
            raise file_error(path, line, f"unsupported units {m.group(1)!r} (expected mm)")
    return frame


def _column_index(path: Path, header: CsvRow, required: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(header.cells):
        if name in index:
            raise file_error(path, header.line, f"duplicate column {name!r}")
        index[name] = i
    absent = [c for c in required if c not in index]
    if absent:
        raise file_error(path, header.line, f"missing required column(s): {', '.join(absent)}")
    return index


def _check_width(path: Path, row: CsvRow, header: CsvRow) -> None:
    if len(row.cells) != len(header.cells):
        raise file_error(path, row.line, f"has {len(row.cells)} fields but the header has {len(header.cells)} "
                                         "(mixed 2D/3D rows or a stray comma?)")


def _case_cell(path: Path, row: CsvRow, column: int) -> str:
    case = row.cells[column]
    if not case:
        raise file_error(path, row.line, "case is empty")
    return case


def _parse_csv(path: Path) -> tuple[dict[str, Landmarks], dict[str, np.ndarray] | None]:
    """Every case (world mm, RAS) and, for a long table with a ``confidence`` column, every case's
    ``(N,)`` confidence (NaN where the cell is empty)."""
    comments, rows = csv_lines(read_text(path))
    if not rows:
        raise file_error(path, None, "no header row (file holds only comments)")
    frame = _csv_frame(path, comments)
    header, body = rows[0], rows[1:]
    if "landmark" in header.cells:
        return _read_long(path, header, body, frame)
    if any(c.endswith("_x_mm") for c in header.cells):
        return _read_wide(path, header, body, frame), None
    raise file_error(path, header.line, "missing required columns: expected a long table "
                                        "(case,landmark,name,frame,x_mm,y_mm[,z_mm]) or a wide table "
                                        "(case,frame,<name>_x_mm,<name>_y_mm[,<name>_z_mm],...)")


def read_csv_table(path: Path) -> dict[str, Landmarks]:
    """Every case of a long or wide CSV table, in world mm, RAS (LPS rows are converted)."""
    return _parse_csv(path)[0]


def read_csv_confidence(path: Path) -> dict[str, np.ndarray]:
    """``{case: (N,) confidence}`` of a long CSV table's ``confidence`` column (NaN: empty cell);
    ``{}`` when the table has no such column."""
    return _parse_csv(path)[1] or {}


def _row_frame(path: Path, row: CsvRow, cols: Mapping[str, int], default: CoordinateSystem) -> CoordinateSystem:
    """The frame of one row: its ``frame`` cell, else the file's (comment or RAS)."""
    column = cols.get(CSV_FRAME_COLUMN)
    text = row.cells[column] if column is not None else ""
    return parse_frame(text, path, row.line) if text else default


def _landmark_id(path: Path, row: CsvRow, column: int) -> int:
    text = row.cells[column]
    try:
        lid = int(text)
    except ValueError:
        lid = 0
    if lid < 1:
        raise file_error(path, row.line, f"landmark is not a positive integer id: {text!r}")
    return lid


class _LandmarkIds:
    """Landmark id <-> name, consistent over all rows of a long table."""

    def __init__(self, path: Path):
        self.path = path
        self.by_id: dict[int, tuple[str, int]] = {}
        self.by_name: dict[str, tuple[int, int]] = {}

    def add(self, lid: int, name: str, line: int) -> None:
        if lid in self.by_id and self.by_id[lid][0] != name:
            other, other_line = self.by_id[lid]
            raise file_error(self.path, line, f"landmark {lid} is named {name!r} here but {other!r} "
                                              f"on line {other_line}")
        if name in self.by_name and self.by_name[name][0] != lid:
            other, other_line = self.by_name[name]
            raise file_error(self.path, line, f"duplicate landmark name {name!r}: landmark {lid} here, "
                                              f"landmark {other} on line {other_line}")
        self.by_id.setdefault(lid, (name, line))
        self.by_name.setdefault(name, (lid, line))

    def names(self) -> list[str]:
        """Names in id order; ids must run 1..N."""
        if not self.by_id:
            return []
        n = max(self.by_id)
        gaps = [i for i in range(1, n + 1) if i not in self.by_id]
        if gaps:
            raise file_error(self.path, None, f"landmark ids must run 1..{n}; ids {gaps} appear in no row")
        return [self.by_id[i][0] for i in range(1, n + 1)]


def _read_long(path: Path, header: CsvRow, rows: Sequence[CsvRow], frame: CoordinateSystem
               ) -> tuple[dict[str, Landmarks], dict[str, np.ndarray] | None]:
    cols = _column_index(path, header, ("case", "landmark", "x_mm", "y_mm"))
    dims = 3 if "z_mm" in cols else 2
    axis_cols = [f"{a}_mm" for a in AXES[:dims]]
    ids = _LandmarkIds(path)
    points: dict[str, dict[int, np.ndarray]] = {}
    conf: dict[str, dict[int, float]] = {}
    first_line: dict[tuple[str, int], int] = {}
    for row in rows:
        _check_width(path, row, header)
        case = _case_cell(path, row, cols["case"])
        lid = _landmark_id(path, row, cols["landmark"])
        name = row.cells[cols["name"]] if "name" in cols else str(lid)
        if not name:
            raise file_error(path, row.line, "name is empty")
        ids.add(lid, name, row.line)
        if (case, lid) in first_line:
            raise file_error(path, row.line, f"duplicate landmark id {lid} in case {case!r} "
                                             f"(first on line {first_line[case, lid]})")
        first_line[case, lid] = row.line
        point = parse_point([(c, row.cells[cols[c]]) for c in axis_cols], path, row.line)
        points.setdefault(case, {})[lid] = convert_frame(point, _row_frame(path, row, cols, frame), "RAS")
        if "confidence" in cols:
            conf.setdefault(case, {})[lid] = parse_number(row.cells[cols["confidence"]], "confidence", path, row.line)
    names = ids.names()
    nan = np.full(dims, np.nan)
    table = {case: make_landmarks(path, [by_id.get(i + 1, nan) for i in range(len(names))], names, dims)
             for case, by_id in points.items()}
    if "confidence" not in cols:
        return table, None
    return table, {case: np.array([conf[case].get(i + 1, np.nan) for i in range(len(names))], dtype=np.float64)
                   for case in table}


def _wide_names(path: Path, header: CsvRow, cols: Mapping[str, int]) -> tuple[list[str], int]:
    """Landmark names (order of their ``_x_mm`` columns) and dimensionality of a wide header."""
    names = [c[:-5] for c in header.cells if c.endswith("_x_mm")]
    for c in header.cells:
        if c.endswith(("_y_mm", "_z_mm")) and c[:-5] not in names:
            raise file_error(path, header.line, f"column {c!r} has no matching {c[:-5] + '_x_mm'!r}")
    absent = [f"{n}_y_mm" for n in names if f"{n}_y_mm" not in cols]
    if absent:
        raise file_error(path, header.line, f"missing required column(s): {', '.join(absent)}")
    has_z = [f"{n}_z_mm" in cols for n in names]
    if any(has_z) and not all(has_z):
        with_z, without_z = names[has_z.index(True)], names[has_z.index(False)]
        raise file_error(path, header.line,
                         f"mixed 2D/3D columns: {with_z}_z_mm present but {without_z}_z_mm missing")
    return names, 3 if all(has_z) else 2


def _read_wide(path: Path, header: CsvRow, rows: Sequence[CsvRow], frame: CoordinateSystem) -> dict[str, Landmarks]:
    cols = _column_index(path, header, ("case",))
    names, dims = _wide_names(path, header, cols)
    table: dict[str, Landmarks] = {}
    first_line: dict[str, int] = {}
    for row in rows:
        _check_width(path, row, header)
        case = _case_cell(path, row, cols["case"])
        if case in first_line:
            raise file_error(path, row.line, f"duplicate case {case!r} (first on line {first_line[case]})")
        first_line[case] = row.line
        points = [parse_point([(f"{n}_{a}_mm", row.cells[cols[f"{n}_{a}_mm"]]) for a in AXES[:dims]],
                              path, row.line)
                  for n in names]
        table[case] = landmarks_in_ras(make_landmarks(path, points, names, dims), _row_frame(path, row, cols, frame))
    return table


def _read_csv(path: Path) -> LandmarkContents:
    table, confidence = _parse_csv(path)
    return LandmarkContents(dict(table), confidence=None if confidence is None else dict(confidence))


# ----------------------------------------------------------------------------------------------
# writing


def _check_confidence(table: Mapping[str, Landmarks], confidence: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{case: (N,) float64}`` from the caller's confidence values; unknown cases and wrong
    lengths raise ``ValueError``."""
    out = {}
    for case, values in confidence.items():
        if case not in table:
            raise ValueError(f"confidence given for unknown case {case!r}")
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.shape != (table[case].num_landmarks,):
            raise ValueError(f"confidence of case {case!r} must have {table[case].num_landmarks} values, "
                             f"got {np.shape(values)}")
        out[case] = arr
    return out


def _long_rows(coords: Mapping[str, np.ndarray], names: list[str], dims: int, frame: CoordinateSystem,
               confidence: Mapping[str, np.ndarray] | None) -> list[list[Any]]:
    """Rows of a long table from ``{case: (N, D) coordinates}`` (already in ``frame``).

    One row per (case, landmark); a later kind of row (e.g. several instances of one landmark)
    extends this function and the header together."""
    header = ["case", "landmark", "name", CSV_FRAME_COLUMN, *(f"{a}_mm" for a in AXES[:dims])]
    if confidence is not None:
        header.append("confidence")
    rows: list[list[Any]] = [header]
    for case, points in coords.items():
        conf = None if confidence is None else confidence.get(case)
        for i, (name, p) in enumerate(zip(names, points)):
            row = [case, i + 1, name, frame, *(csv_cell(v) for v in p)]
            if confidence is not None:
                row.append("" if conf is None else csv_cell(conf[i]))
            rows.append(row)
    return rows


def _wide_rows(coords: Mapping[str, np.ndarray], names: list[str], dims: int,
               frame: CoordinateSystem) -> list[list[Any]]:
    """Rows of a wide table from ``{case: (N, D) coordinates}`` (already in ``frame``)."""
    header = ["case", CSV_FRAME_COLUMN, *(f"{n}_{a}_mm" for n in names for a in AXES[:dims])]
    return [header, *([case, frame, *(csv_cell(v) for v in points.reshape(-1))] for case, points in coords.items())]


def landmark_table_text(table: Mapping[str, Landmarks], *, layout: TableLayout = "long",
                        confidence: Mapping[str, Any] | None = None, coordinate_system: CoordinateSystem = "RAS",
                        names: Sequence[str] | None = None, spatial_dims: int | None = None) -> str:
    """The CSV text of a landmark table: the header, then the rows (no comment line).

    Args:
        table: ``{case: Landmarks}`` in world mm, RAS; all cases share names, order and
            dimensionality. Rows follow the table's order.
        layout: ``"long"`` (``case,landmark,name,frame,x_mm,y_mm[,z_mm][,confidence]``, one row
            per landmark, ids 1..N) or ``"wide"`` (``case,frame,<name>_x_mm,...``, one row per case).
        confidence: ``{case: (N,) values}`` (long layout only): adds a ``confidence`` column;
            cases without an entry get empty cells (``{}`` gives the column with no values).
        coordinate_system: the frame of the written coordinates (mm), stated in the ``frame``
            column of every row.
        names, spatial_dims: the landmarks of every case; needed only to give an empty table its
            header (default: no names, 3D), else they must match the cases.

    Missing values are empty cells; floats have full precision, so reading back is exact.

    Raises:
        ValueError: bad ``layout`` / ``coordinate_system``, cases that differ, bad confidence.
    """
    frame = coordinate_system_arg(coordinate_system)
    layout = table_layout_arg(layout)
    if confidence is not None and layout != "long":
        raise ValueError("confidence is written only to long CSV tables")
    names, dims = check_table(table, names, spatial_dims)
    conf = None if confidence is None else _check_confidence(table, confidence)
    coords = {case: convert_frame(lm.coords, "RAS", frame) for case, lm in table.items()}
    rows = _long_rows(coords, names, dims, frame, conf) if layout == "long" else _wide_rows(coords, names, dims, frame)
    return csv_text(rows)


def _write_csv_table(path: Path, table: Mapping[str, Landmarks], frame: CoordinateSystem, layout: TableLayout,
                     confidence: Mapping[str, Any] | None) -> None:
    atomic_write_text(path, landmark_table_text(table, layout=layout, confidence=confidence,
                                                coordinate_system=frame))


def _write_csv_case(path: Path, lm: Landmarks, frame: CoordinateSystem, case: str | None,
                    confidence: np.ndarray | None = None) -> None:
    """One case as a long table; ``case`` defaults to the file name without ``.csv``; ``(N,)``
    ``confidence`` fills the ``confidence`` column."""
    name = case or file_stem(path)
    _write_csv_table(path, {name: lm}, frame, "long", None if confidence is None else {name: confidence})


CSV_FORMAT = LandmarkFormat(
    name="csv", suffixes=(".csv",), default_frame="RAS", read=_read_csv, write=_write_csv_case,
    write_table=_write_csv_table, description="landmark table, long or wide layout (heatmark)",
    stores_confidence=True,
)
