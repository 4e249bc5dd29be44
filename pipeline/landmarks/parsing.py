"""Parsing helpers shared by the format modules: file text, frame names, numbers, points, names,
CSV lines and JSON. Every problem becomes a :class:`~heatmark.landmarks.model.LandmarkFileError`
naming the file and, where known, the 1-based line."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from heatmark.landmarks.model import CoordinateSystem, Landmarks, file_error, frame_name

__all__ = [
    "AXES",
    "CsvRow",
    "check_unique_names",
    "csv_lines",
    "json_text",
    "load_json",
    "make_landmarks",
    "parse_frame",
    "parse_number",
    "parse_point",
    "read_text",
]

#: Axis letters, in column order.
AXES = ("x", "y", "z")


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped); missing, non-text or blank files raise."""
    if not path.exists():
        raise file_error(path, None, "file not found")
    if not path.is_file():
        raise file_error(path, None, "not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise file_error(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise file_error(path, None, "file is empty")
    return text


def parse_frame(value: Any, path: Path, line: int | None) -> CoordinateSystem:
    """A coordinate system name from a file: ``RAS`` or ``LPS`` (case-insensitive)."""
    name = frame_name(value)
    if name is None:
        raise file_error(path, line, f"unknown coordinate system {value!r} (expected RAS or LPS)")
    return name


def parse_number(value: Any, what: str, path: Path, line: int | None) -> float:
    """One coordinate (mm) from a CSV cell or a JSON value; empty / ``nan`` / ``None`` -> NaN.

    ``what`` names the value in messages (a column, ``coords[2][1]``, ...).
    """
    if value is None:
        return math.nan
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() == "nan":
            return math.nan
        try:
            number = float(text)
        except ValueError:
            raise file_error(path, line, f"{what} is not a number: {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise file_error(path, line, f"{what} is not a number: {value!r}")
    if math.isinf(number):
        raise file_error(path, line, f"{what} is not finite: {value!r}")
    return number


def parse_point(values: Sequence[tuple[str, Any]], path: Path, line: int | None) -> np.ndarray:
    """A point from ``(label, value)`` pairs, one per axis: complete, or missing (all NaN)."""
    p = np.array([parse_number(v, label, path, line) for label, v in values], dtype=np.float64)
    nan = np.isnan(p)
    if nan.any() and not nan.all():
        empty = ", ".join(label for (label, _), n in zip(values, nan) if n)
        given = ", ".join(label for (label, _), n in zip(values, nan) if not n)
        raise file_error(path, line, f"incomplete point: {empty} empty but {given} given (mixed 2D/3D rows?)")
    return p


def check_unique_names(path: Path, names: Sequence[str], lines: Sequence[int] | None = None,
                       where: str = "") -> None:
    """Raise on a repeated name, at the line of its second occurrence when ``lines`` are known
    (else by point number, after ``where`` when given)."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            j = first[name]
            if lines is not None:
                raise file_error(path, lines[i], f"duplicate landmark name {name!r} (first on line {lines[j]})")
            place = f"{where}: " if where else ""
            raise file_error(path, None, f"{place}duplicate landmark name {name!r} (points {j + 1} and {i + 1})")
        first[name] = i


def make_landmarks(path: Path, points: Sequence[np.ndarray], names: list[str], spatial_dims: int) -> Landmarks:
    """:class:`Landmarks` from parsed points (in the file's frame); invalid ones raise naming ``path``."""
    coords = np.array(points, dtype=np.float64).reshape(len(points), spatial_dims)
    try:
        return Landmarks(coords, names)
    except ValueError as e:  # names already checked; this guards odd names (e.g. empty)
        raise file_error(path, None, str(e)) from None


# ---- CSV lines


class CsvRow(NamedTuple):
    """One data row of a CSV file."""

    line: int  # 1-based line number in the file
    cells: list[str]  # stripped of surrounding white space


def csv_lines(text: str) -> tuple[list[tuple[int, str]], list[CsvRow]]:
    """Split CSV text into ``#`` comment lines and data rows (cells stripped), with line numbers.

    Blank lines are skipped. Quoted fields may hold commas but not line breaks.
    """
    comments: list[tuple[int, str]] = []
    rows: list[CsvRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            comments.append((number, stripped))
            continue
        cells = next(csv.reader([line]))
        rows.append(CsvRow(number, [c.strip() for c in cells]))
    return comments, rows


# ---- JSON


def load_json(path: Path) -> Any:
    """The parsed JSON document of ``path``; syntax errors name the line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise file_error(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None


def json_text(doc: Any) -> str:
    """The text every JSON landmark file is written as: indented, no NaN, final newline."""
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"
