"""Landmarks in memory and in files.

In memory, landmarks have one form everywhere: :class:`Landmarks`, an ``(N, D)`` float64 array of
world coordinates in **millimetres, RAS** (the frame MONAI's readers report, DESIGN section 3)
plus ``N`` unique names. A missing landmark is a row of NaN.

On disk (format chosen by the file name's extension):

``.csv``
    Long table ``case,landmark,name,x_mm,y_mm[,z_mm][,confidence]`` (``landmark`` is the 1-based
    integer id: landmark ``i`` of :class:`Landmarks` has id ``i + 1``; extra columns are ignored;
    an empty coordinate cell is a missing landmark), or wide table, one row per case
    ``case,<name>_x_mm,<name>_y_mm[,<name>_z_mm],...``. The layout is recognised by the header.
    Lines starting with ``#`` are comments; we write the frame in one
    (``# coordinate system: RAS, units: mm``) and honour it on reading (RAS or LPS).
``.json``
    heatmark's plain form ``{"coordinate_system": "RAS", "units": "mm", "cases": {case:
    {"names": [...], "coords": [[x, y(, z)], null, ...]}}}`` (``null`` = missing), or the same
    for a single case with ``names``/``coords`` (and optionally ``case``) at the top level.
``.mrk.json``
    3D Slicer markups JSON (schema v1.0.3), one ``Fiducial`` markup; written in LPS as Slicer
    does, read in LPS or RAS; a missing landmark is a control point with ``positionStatus``
    ``"missing"``.
``.fcsv``
    3D Slicer markups fiducial CSV (version 4.11 header), written in RAS by default; read with
    any ``# CoordinateSystem`` header (``0``/``RAS``, ``1``/``LPS``; absent = RAS). A missing
    landmark has empty x, y, z cells (Slicer skips such rows).

Slicer has no 2D points: 2D landmarks are written to Slicer files with ``z = 0`` and read back as
2D with ``read_landmarks(..., spatial_dims=2)``.

RAS <-> LPS: LPS = (-x, -y, z) of RAS and back (the same map both ways). All writes are atomic
(:mod:`heatmark.fileio`) and use full float precision, so every round trip is exact.

Problems in a file raise :class:`LandmarkFileError` naming the file, the 1-based line (for
line-based formats) and the problem.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from .fileio import atomic_write_text, csv_cell, csv_text

__all__ = [
    "Landmarks",
    "LandmarkFileError",
    "read_landmarks",
    "read_landmark_table",
    "write_landmarks",
    "write_landmark_table",
    "landmarks_to_tensor",
    "ras_to_lps",
    "lps_to_ras",
    "CSV_FRAME_COMMENT",
    "SLICER_MARKUPS_SCHEMA",
]

CoordinateSystem = Literal["RAS", "LPS"]

#: Header comment of every CSV we write.
CSV_FRAME_COMMENT = "# coordinate system: RAS, units: mm"
SLICER_MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
    "Schema/markups-schema-v1.0.3.json#"
)
FCSV_VERSION = "4.11"
FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID")
_AXES = ("x", "y", "z")
_FCSV_CODES = {"0": "RAS", "1": "LPS"}
_MRK_STATUSES = {"defined": True, "preview": True, "undefined": False, "missing": False}
_UNITS_TO_MM = {"mm": 1.0, "um": 1e-3}
# (extension, kind); longest first so that ".mrk.json" wins over ".json"
_EXTENSIONS = ((".mrk.json", "mrk.json"), (".json", "json"), (".fcsv", "fcsv"), (".csv", "csv"))
_DEFAULT_FRAME = {"fcsv": "RAS", "mrk.json": "LPS", "json": "RAS", "csv": "RAS"}


# ----------------------------------------------------------------------------------------------
# errors


class LandmarkFileError(ValueError):
    """A landmark file is missing, malformed or does not fit the request.

    The message reads ``"<file>, line <n>: <problem>"`` (or ``"<file>: <problem>"`` where no line
    applies); ``path``, ``line`` and ``problem`` are also attributes.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 problem: str | None = None):
        super().__init__(message)
        self.path = path
        self.line = line
        self.problem = problem

    def __reduce__(self):  # keep the attributes through pickling (DataLoader workers)
        return (self.__class__, (str(self),), self.__dict__)


def _err(path: str | Path, line: int | None, problem: str) -> LandmarkFileError:
    where = f"{path}" if line is None else f"{path}, line {line}"
    return LandmarkFileError(f"{where}: {problem}", path=path, line=line, problem=problem)


# ----------------------------------------------------------------------------------------------
# the in-memory form


@dataclass(eq=False)
class Landmarks:
    """Landmarks of one case in world coordinates: millimetres, RAS.

    Attributes:
        coords: ``(N, D)`` float64, ``D`` in (2, 3); a row of NaN is a missing landmark. Finite
            or NaN only, and a row is either complete or entirely NaN.
        names: ``N`` unique, non-empty names without surrounding white space.
    """

    coords: np.ndarray
    names: list[str]

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] not in (2, 3):
            raise ValueError(f"coords must have shape (N, 2) or (N, 3), got {coords.shape}")
        names = list(self.names)
        if len(names) != coords.shape[0]:
            raise ValueError(f"{len(names)} names for {coords.shape[0]} landmarks")
        for name in names:
            if not isinstance(name, str) or not name or name != name.strip():
                raise ValueError(f"landmark names must be non-empty strings without surrounding spaces, got {name!r}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate landmark names: {dup}")
        if np.isinf(coords).any():
            raise ValueError("landmark coordinates must be finite (or NaN for a missing landmark)")
        nan = np.isnan(coords)
        partial = nan.any(axis=1) & ~nan.all(axis=1)
        if partial.any():
            bad = [names[i] for i in np.flatnonzero(partial)]
            raise ValueError(f"landmarks {bad} are partly NaN; a missing landmark is NaN in every coordinate")
        self.coords = coords
        self.names = names

    @property
    def spatial_dims(self) -> int:
        return int(self.coords.shape[1])

    @property
    def num_landmarks(self) -> int:
        return int(self.coords.shape[0])

    def __len__(self) -> int:
        return self.num_landmarks

    @property
    def missing(self) -> np.ndarray:
        """``(N,)`` bool, True where the landmark is missing (NaN)."""
        return np.isnan(self.coords).any(axis=1)

    def index(self, name: str) -> int:
        """Position of landmark ``name`` (``KeyError`` if absent)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no landmark named {name!r}") from None

    def copy(self) -> Landmarks:
        return Landmarks(self.coords.copy(), list(self.names))

    def select(self, names: Sequence[str], missing_ok: bool = True) -> Landmarks:
        """Landmarks ``names`` in that order; names not present become NaN rows
        (``KeyError`` instead when ``missing_ok`` is False)."""
        position = {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in names if n not in position]
        if unknown and not missing_ok:
            raise KeyError(f"no landmarks named {unknown}")
        out = np.full((len(names), self.spatial_dims), np.nan)
        for row, name in enumerate(names):
            if name in position:
                out[row] = self.coords[position[name]]
        return Landmarks(out, list(names))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Landmarks):
            return NotImplemented
        return self.names == other.names and np.array_equal(self.coords, other.coords, equal_nan=True)

    __hash__ = None  # mutable


def landmarks_to_tensor(lm: Landmarks) -> torch.Tensor:
    """``(N, D)`` float64 tensor (a copy) of the world coordinates (mm, RAS); NaN = missing."""
    return torch.tensor(lm.coords, dtype=torch.float64)


def ras_to_lps(coords: np.ndarray) -> np.ndarray:
    """Convert ``(..., D)`` points between RAS and LPS (negate x and y); returns a new array.

    The map is its own inverse, so :func:`lps_to_ras` is the same operation.
    """
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., :2] *= -1.0
    return out


def lps_to_ras(coords: np.ndarray) -> np.ndarray:
    """Convert ``(..., D)`` points from LPS to RAS (negate x and y); see :func:`ras_to_lps`."""
    return ras_to_lps(coords)


def _convert(coords: np.ndarray, src: str, dst: str) -> np.ndarray:
    return np.array(coords, dtype=np.float64) if src == dst else ras_to_lps(coords)


# ----------------------------------------------------------------------------------------------
# shared parsing helpers


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    for ext, kind in _EXTENSIONS:
        if name.endswith(ext):
            return kind
    raise _err(path, None, "unsupported landmark file type; expected .csv, .json, .mrk.json or .fcsv")


def _stem(path: Path) -> str:
    """File name without its landmark extension (``001.mrk.json`` -> ``001``)."""
    name = path.name
    for ext, _ in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _read_text(path: Path) -> str:
    if not path.exists():
        raise _err(path, None, "file not found")
    if not path.is_file():
        raise _err(path, None, "not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _err(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise _err(path, None, "file is empty")
    return text


def _frame(value: Any, path: Path, line: int | None) -> str:
    """Validate a coordinate system name: ``RAS`` or ``LPS`` (case-insensitive)."""
    name = str(value).strip().upper() if isinstance(value, str) else None
    if name not in ("RAS", "LPS"):
        raise _err(path, line, f"unknown coordinate system {value!r} (expected RAS or LPS)")
    return name


def _frame_arg(value: str) -> str:
    """Validate a caller's ``coordinate_system`` argument."""
    name = value.strip().upper() if isinstance(value, str) else None
    if name not in ("RAS", "LPS"):
        raise ValueError(f"coordinate_system must be 'RAS' or 'LPS', got {value!r}")
    return name


def _number(value: Any, what: str, path: Path, line: int | None) -> float:
    """One coordinate from a CSV cell or a JSON value; empty / ``nan`` / ``None`` -> NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() == "nan":
            return math.nan
        try:
            number = float(text)
        except ValueError:
            raise _err(path, line, f"{what} is not a number: {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise _err(path, line, f"{what} is not a number: {value!r}")
    if math.isinf(number):
        raise _err(path, line, f"{what} is not finite: {value!r}")
    return number


def _point(values: Sequence[tuple[str, Any]], path: Path, line: int | None) -> np.ndarray:
    """A point from ``(label, value)`` pairs, one per axis: complete, or missing (all NaN)."""
    p = np.array([_number(v, label, path, line) for label, v in values], dtype=np.float64)
    nan = np.isnan(p)
    if nan.any() and not nan.all():
        empty = ", ".join(label for (label, _), n in zip(values, nan) if n)
        given = ", ".join(label for (label, _), n in zip(values, nan) if not n)
        raise _err(path, line, f"incomplete point: {empty} empty but {given} given (mixed 2D/3D rows?)")
    return p


def _check_unique_names(path: Path, names: Sequence[str], lines: Sequence[int] | None = None,
                        where: str = "") -> None:
    """Raise on a repeated name, at the line of its second occurrence when ``lines`` are known."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            j = first[name]
            if lines is not None:
                raise _err(path, lines[i], f"duplicate landmark name {name!r} (first on line {lines[j]})")
            place = f"{where}: " if where else ""
            raise _err(path, None, f"{place}duplicate landmark name {name!r} (points {j + 1} and {i + 1})")
        first[name] = i


def _landmarks(path: Path, points: Sequence[np.ndarray], names: list[str], spatial_dims: int) -> Landmarks:
    coords = np.array(points, dtype=np.float64).reshape(len(points), spatial_dims)
    try:
        return Landmarks(coords, names)
    except ValueError as e:  # names already checked; this guards odd names (e.g. empty)
        raise _err(path, None, str(e)) from None


# ---- CSV lines


class _Row(NamedTuple):
    line: int  # 1-based line number in the file
    cells: list[str]


def _csv_lines(text: str) -> tuple[list[tuple[int, str]], list[_Row]]:
    """Split CSV text into ``#`` comment lines and data rows (cells stripped), with line numbers.

    Blank lines are skipped. Quoted fields may hold commas but not line breaks.
    """
    comments: list[tuple[int, str]] = []
    rows: list[_Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            comments.append((number, stripped))
            continue
        cells = next(csv.reader([line]))
        rows.append(_Row(number, [c.strip() for c in cells]))
    return comments, rows


def _column_index(path: Path, header: _Row, required: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(header.cells):
        if name in index:
            raise _err(path, header.line, f"duplicate column {name!r}")
        index[name] = i
    absent = [c for c in required if c not in index]
    if absent:
        raise _err(path, header.line, f"missing required column(s): {', '.join(absent)}")
    return index


def _check_width(path: Path, row: _Row, header: _Row) -> None:
    if len(row.cells) != len(header.cells):
        raise _err(path, row.line, f"has {len(row.cells)} fields but the header has {len(header.cells)} "
                                   "(mixed 2D/3D rows or a stray comma?)")


def _case_cell(path: Path, row: _Row, column: int) -> str:
    case = row.cells[column]
    if not case:
        raise _err(path, row.line, "case is empty")
    return case


_COMMENT_FRAME = re.compile(r"coordinate\s*system\s*[:=]\s*([^,\s]+)", re.IGNORECASE)
_COMMENT_UNITS = re.compile(r"units\s*[:=]\s*([^,\s]+)", re.IGNORECASE)


def _csv_frame(path: Path, comments: Sequence[tuple[int, str]]) -> str:
    """The frame stated in a CSV's comments (``# coordinate system: RAS, units: mm``); RAS if none."""
    frame = "RAS"
    for line, text in comments:
        if m := _COMMENT_FRAME.search(text):
            frame = _frame(m.group(1), path, line)
        if (m := _COMMENT_UNITS.search(text)) and m.group(1) != "mm":
            raise _err(path, line, f"unsupported units {m.group(1)!r} (expected mm)")
    return frame


# ----------------------------------------------------------------------------------------------
# CSV tables


def _read_csv_table(path: Path) -> dict[str, Landmarks]:
    comments, rows = _csv_lines(_read_text(path))
    if not rows:
        raise _err(path, None, "no header row (file holds only comments)")
    frame = _csv_frame(path, comments)
    header, body = rows[0], rows[1:]
    if "landmark" in header.cells:
        table = _read_long(path, header, body)
    elif any(c.endswith("_x_mm") for c in header.cells):
        table = _read_wide(path, header, body)
    else:
        raise _err(path, header.line, "missing required columns: expected a long table "
                                      "(case,landmark,name,x_mm,y_mm[,z_mm]) or a wide table "
                                      "(case,<name>_x_mm,<name>_y_mm[,<name>_z_mm],...)")
    return {case: Landmarks(_convert(lm.coords, frame, "RAS"), lm.names) for case, lm in table.items()}


def _landmark_id(path: Path, row: _Row, column: int) -> int:
    text = row.cells[column]
    try:
        lid = int(text)
    except ValueError:
        lid = 0
    if lid < 1:
        raise _err(path, row.line, f"landmark is not a positive integer id: {text!r}")
    return lid


class _NameRegistry:
    """Landmark id <-> name, consistent over all rows of a long table."""

    def __init__(self, path: Path):
        self.path = path
        self.by_id: dict[int, tuple[str, int]] = {}
        self.by_name: dict[str, tuple[int, int]] = {}

    def add(self, lid: int, name: str, line: int) -> None:
        if lid in self.by_id and self.by_id[lid][0] != name:
            other, other_line = self.by_id[lid]
            raise _err(self.path, line, f"landmark {lid} is named {name!r} here but {other!r} on line {other_line}")
        if name in self.by_name and self.by_name[name][0] != lid:
            other, other_line = self.by_name[name]
            raise _err(self.path, line, f"duplicate landmark name {name!r}: landmark {lid} here, "
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
            raise _err(self.path, None, f"landmark ids must run 1..{n}; ids {gaps} appear in no row")
        return [self.by_id[i][0] for i in range(1, n + 1)]


def _read_long(path: Path, header: _Row, rows: Sequence[_Row]) -> dict[str, Landmarks]:
    cols = _column_index(path, header, ("case", "landmark", "x_mm", "y_mm"))
    dims = 3 if "z_mm" in cols else 2
    axis_cols = [f"{a}_mm" for a in _AXES[:dims]]
    registry = _NameRegistry(path)
    points: dict[str, dict[int, np.ndarray]] = {}
    first_line: dict[tuple[str, int], int] = {}
    for row in rows:
        _check_width(path, row, header)
        case = _case_cell(path, row, cols["case"])
        lid = _landmark_id(path, row, cols["landmark"])
        name = row.cells[cols["name"]] if "name" in cols else str(lid)
        if not name:
            raise _err(path, row.line, "name is empty")
        registry.add(lid, name, row.line)
        if (case, lid) in first_line:
            raise _err(path, row.line, f"duplicate landmark id {lid} in case {case!r} "
                                       f"(first on line {first_line[case, lid]})")
        first_line[case, lid] = row.line
        points.setdefault(case, {})[lid] = _point([(c, row.cells[cols[c]]) for c in axis_cols], path, row.line)
    names = registry.names()
    nan = np.full(dims, np.nan)
    return {case: _landmarks(path, [by_id.get(i + 1, nan) for i in range(len(names))], names, dims)
            for case, by_id in points.items()}


def _wide_names(path: Path, header: _Row, cols: Mapping[str, int]) -> tuple[list[str], int]:
    """Landmark names (order of their ``_x_mm`` columns) and dimensionality of a wide header."""
    names = [c[:-5] for c in header.cells if c.endswith("_x_mm")]
    for c in header.cells:
        if c.endswith(("_y_mm", "_z_mm")) and c[:-5] not in names:
            raise _err(path, header.line, f"column {c!r} has no matching {c[:-5] + '_x_mm'!r}")
    absent = [f"{n}_y_mm" for n in names if f"{n}_y_mm" not in cols]
    if absent:
        raise _err(path, header.line, f"missing required column(s): {', '.join(absent)}")
    has_z = [f"{n}_z_mm" in cols for n in names]
    if any(has_z) and not all(has_z):
        with_z, without_z = names[has_z.index(True)], names[has_z.index(False)]
        raise _err(path, header.line, f"mixed 2D/3D columns: {with_z}_z_mm present but {without_z}_z_mm missing")
    return names, 3 if all(has_z) else 2


def _read_wide(path: Path, header: _Row, rows: Sequence[_Row]) -> dict[str, Landmarks]:
    cols = _column_index(path, header, ("case",))
    names, dims = _wide_names(path, header, cols)
    table: dict[str, Landmarks] = {}
    first_line: dict[str, int] = {}
    for row in rows:
        _check_width(path, row, header)
        case = _case_cell(path, row, cols["case"])
        if case in first_line:
            raise _err(path, row.line, f"duplicate case {case!r} (first on line {first_line[case]})")
        first_line[case] = row.line
        points = [_point([(f"{n}_{a}_mm", row.cells[cols[f"{n}_{a}_mm"]]) for a in _AXES[:dims]], path, row.line)
                  for n in names]
        table[case] = _landmarks(path, points, names, dims)
    return table


def _long_rows(coords: Mapping[str, np.ndarray], names: list[str], dims: int,
               confidence: Mapping[str, np.ndarray] | None) -> list[list[Any]]:
    """Rows of a long table from ``{case: (N, D) coordinates}`` (already in the output frame)."""
    header = ["case", "landmark", "name", *(f"{a}_mm" for a in _AXES[:dims])]
    if confidence is not None:
        header.append("confidence")
    rows: list[list[Any]] = [header]
    for case, points in coords.items():
        conf = None if confidence is None else confidence.get(case)
        for i, (name, p) in enumerate(zip(names, points)):
            row = [case, i + 1, name, *(csv_cell(v) for v in p)]
            if confidence is not None:
                row.append("" if conf is None else csv_cell(conf[i]))
            rows.append(row)
    return rows


def _wide_rows(coords: Mapping[str, np.ndarray], names: list[str], dims: int) -> list[list[Any]]:
    """Rows of a wide table from ``{case: (N, D) coordinates}`` (already in the output frame)."""
    header = ["case", *(f"{n}_{a}_mm" for n in names for a in _AXES[:dims])]
    return [header, *([case, *(csv_cell(v) for v in points.reshape(-1))] for case, points in coords.items())]


# ----------------------------------------------------------------------------------------------
# JSON


def _load_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _err(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None


def _json_case(path: Path, where: str, entry: Any, dims: int | None) -> Landmarks:
    """One case of heatmark's plain JSON: ``{"names": [...], "coords": [[...], null, ...]}``.

    ``where`` locates the entry in messages (``"cases['001']."``, or ``""`` at the top level).
    """
    place = where.rstrip(".") or "top level"
    if not isinstance(entry, dict):
        raise _err(path, None, f"{place}: expected an object with 'names' and 'coords'")
    absent = [repr(k) for k in ("names", "coords") if k not in entry]
    if absent:
        raise _err(path, None, f"{place}: missing required key(s) {', '.join(absent)}")
    names, coords = entry["names"], entry["coords"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _err(path, None, f"{where}names must be a list of strings")
    if not isinstance(coords, list) or len(coords) != len(names):
        raise _err(path, None, f"{where}coords must be a list with one entry per name ({len(names)})")
    _check_unique_names(path, names, where=where.rstrip("."))
    if dims is None:
        sizes = {len(c) for c in coords if isinstance(c, list)}
        if len(sizes) > 1:
            raise _err(path, None, f"{where}coords mix points of {sorted(sizes)} coordinates (mixed 2D/3D points)")
        dims = sizes.pop() if sizes else 3
    points = []
    for i, c in enumerate(coords):
        label = f"{where}coords[{i}]"
        if c is None:
            c = [None] * dims
        if not isinstance(c, list) or len(c) != dims or dims not in (2, 3):
            raise _err(path, None, f"{label} must be null or a list of {dims} numbers "
                                   f"(2 or 3, all points alike), got {c!r}")
        points.append(_point([(f"{label}[{k}]", v) for k, v in enumerate(c)], path, None))
    return _landmarks(path, points, list(names), dims)


def _unify(path: Path, table: dict[Any, Landmarks]) -> dict[Any, Landmarks]:
    """Give every case the union of all names (first-appearance order); absent ones NaN."""
    dims = {lm.spatial_dims for lm in table.values()}
    if len(dims) > 1:
        raise _err(path, None, "mixed 2D/3D cases")
    union = list(dict.fromkeys(n for lm in table.values() for n in lm.names))
    return {case: lm if lm.names == union else lm.select(union) for case, lm in table.items()}


def _read_plain_json(path: Path, doc: dict) -> dict[str | None, Landmarks]:
    frame = _frame(doc.get("coordinate_system", "RAS"), path, None)
    units = doc.get("units", "mm")
    if units != "mm":
        raise _err(path, None, f"unsupported units {units!r} (expected mm)")
    dims = doc.get("spatial_dims")
    if dims is not None and dims not in (2, 3):
        raise _err(path, None, f"spatial_dims must be 2 or 3, got {dims!r}")
    if "cases" in doc:
        cases = doc["cases"]
        if not isinstance(cases, dict):
            raise _err(path, None, "'cases' must be an object mapping case ids to landmarks")
        table = {str(c): _json_case(path, f"cases[{c!r}].", e, dims) for c, e in cases.items()}
        table = _unify(path, table)
    else:
        case = doc.get("case")
        table = {None if case is None else str(case): _json_case(path, "", doc, dims)}
    return {c: Landmarks(_convert(lm.coords, frame, "RAS"), lm.names) for c, lm in table.items()}


def _read_json(path: Path) -> _Contents:
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise _err(path, None, "expected a JSON object at the top level")
    if "markups" in doc:  # a Slicer markups file saved as plain .json
        return _Contents({None: _mrk_landmarks(path, doc)}, True)
    return _Contents(_read_plain_json(path, doc), False)


def _plain_json_case(lm: Landmarks, frame: str) -> dict[str, Any]:
    coords = _convert(lm.coords, "RAS", frame)
    return {"names": list(lm.names),
            "coords": [None if np.isnan(p).any() else [float(v) for v in p] for p in coords]}


def _json_dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


# ---- Slicer markups JSON


def _mrk_units(path: Path, units: Any) -> float:
    code = units[0] if isinstance(units, list) and units else units
    if code not in _UNITS_TO_MM:
        raise _err(path, None, f"unsupported coordinateUnits {units!r} (expected mm or um)")
    return _UNITS_TO_MM[code]


def _mrk_point(path: Path, i: int, cp: Any) -> tuple[np.ndarray, str]:
    if not isinstance(cp, dict):
        raise _err(path, None, f"control point {i + 1} is not an object")
    status = cp.get("positionStatus", "defined")
    if status not in _MRK_STATUSES:
        raise _err(path, None, f"control point {i + 1}: unknown positionStatus {status!r}")
    if _MRK_STATUSES[status]:
        pos = cp.get("position")
        if not isinstance(pos, list) or len(pos) != 3:
            raise _err(path, None, f"control point {i + 1}: position must be a list of 3 numbers, got {pos!r}")
        point = _point([(f"control point {i + 1} {a}", v) for a, v in zip(_AXES, pos)], path, None)
    else:
        point = np.full(3, np.nan)
    name = str(cp.get("label") or cp.get("id") or i + 1).strip()
    return point, name


def _mrk_landmarks(path: Path, doc: dict) -> Landmarks:
    markups = doc.get("markups")
    if not isinstance(markups, list):
        raise _err(path, None, "'markups' must be a list (not a Slicer markups file?)")
    fiducials = [m for m in markups if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if len(fiducials) != 1:
        raise _err(path, None, f"expected one markup of type 'Fiducial', found {len(fiducials)}")
    markup = fiducials[0]
    frame = _frame(markup.get("coordinateSystem", "LPS"), path, None)  # the schema's default is LPS
    scale = _mrk_units(path, markup.get("coordinateUnits", "mm"))
    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise _err(path, None, "'controlPoints' must be a list")
    parsed = [_mrk_point(path, i, cp) for i, cp in enumerate(control_points)]
    names = [n for _, n in parsed]
    _check_unique_names(path, names)
    lm = _landmarks(path, [p * scale for p, _ in parsed], names, 3)
    return Landmarks(_convert(lm.coords, frame, "RAS"), lm.names)


def _read_mrk_json(path: Path) -> Landmarks:
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise _err(path, None, "expected a JSON object at the top level")
    return _mrk_landmarks(path, doc)


def _as_3d(lm: Landmarks) -> np.ndarray:
    """Coordinates with a z column: 2D points get z = 0 (NaN for missing points)."""
    if lm.spatial_dims == 3:
        return lm.coords
    z = np.where(lm.missing, np.nan, 0.0)[:, None]
    return np.concatenate([lm.coords, z], axis=1)


def _mrk_json_text(lm: Landmarks, frame: str) -> str:
    control_points = []
    for i, (name, p) in enumerate(zip(lm.names, _convert(_as_3d(lm), "RAS", frame))):
        cp: dict[str, Any] = {"id": str(i + 1), "label": name, "description": "", "associatedNodeID": ""}
        if np.isnan(p).any():
            cp["positionStatus"] = "missing"
        else:
            cp["position"] = [float(v) for v in p]
            cp["positionStatus"] = "defined"
        cp.update(selected=True, locked=False, visibility=True)
        control_points.append(cp)
    markup = {
        "type": "Fiducial",
        "coordinateSystem": frame,
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(control_points),
        "controlPoints": control_points,
        "measurements": [],
    }
    return _json_dump({"@schema": SLICER_MARKUPS_SCHEMA, "markups": [markup]})


# ---- Slicer fiducial CSV


def _fcsv_header(path: Path, comments: Sequence[tuple[int, str]]) -> tuple[str, dict[str, int]]:
    """Frame and column index from an fcsv's header comments (defaults: RAS, Slicer's columns)."""
    frame, columns, columns_line = "RAS", list(FCSV_COLUMNS), None
    for line, text in comments:
        key, sep, value = text.lstrip("#").partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep:
            continue
        if key == "coordinatesystem":
            frame = _frame(_FCSV_CODES.get(value, value), path, line)
        elif key == "columns":
            columns, columns_line = [c.strip() for c in value.split(",")], line
    index = {c: i for i, c in reversed(list(enumerate(columns)))}
    absent = [c for c in ("x", "y", "z") if c not in index]
    if absent:
        raise _err(path, columns_line, f"missing required column(s): {', '.join(absent)}")
    return frame, index


def _fcsv_names(labels: list[str], descs: list[str]) -> list[str]:
    """Point labels as names; when every label is a plain number and every description is set
    (AFIDs' convention: label "1", description "AC"), the descriptions; empty labels -> index."""
    if labels and all(lb.isdigit() for lb in labels) and all(descs) and len(set(descs)) == len(descs):
        return descs
    return [lb or str(i + 1) for i, lb in enumerate(labels)]


def _read_fcsv(path: Path) -> Landmarks:
    comments, rows = _csv_lines(_read_text(path))
    frame, cols = _fcsv_header(path, comments)
    width = max(cols["x"], cols["y"], cols["z"]) + 1

    def cell(row: _Row, column: str) -> str:
        i = cols.get(column)
        return row.cells[i] if i is not None and i < len(row.cells) else ""

    points, labels, descs = [], [], []
    for row in rows:
        if len(row.cells) < width:
            raise _err(path, row.line, f"has {len(row.cells)} fields, expected at least {width} (id,x,y,z)")
        points.append(_point([(a, cell(row, a)) for a in _AXES], path, row.line))
        labels.append(cell(row, "label"))
        descs.append(cell(row, "desc"))
    names = _fcsv_names(labels, descs)
    _check_unique_names(path, names, [r.line for r in rows])
    lm = _landmarks(path, points, names, 3)
    return Landmarks(_convert(lm.coords, frame, "RAS"), lm.names)


def _fcsv_text(lm: Landmarks, frame: str) -> str:
    header = "\n".join([f"# Markups fiducial file version = {FCSV_VERSION}", f"# CoordinateSystem = {frame}",
                        f"# columns = {','.join(FCSV_COLUMNS)}"])
    rows = []
    for i, (name, p) in enumerate(zip(lm.names, _convert(_as_3d(lm), "RAS", frame))):
        visible = 0 if np.isnan(p).any() else 1
        rows.append([f"vtkMRMLMarkupsFiducialNode_{i + 1}", *(csv_cell(v) for v in p), 0, 0, 0, 1,
                     visible, 1, 0, name, "", ""])
    return csv_text(rows, comment=header)


# ----------------------------------------------------------------------------------------------
# public API


class _Contents(NamedTuple):
    table: dict[str | None, Landmarks]  # key None: the file carries no case id
    slicer: bool  # from a Slicer file: always 3D, z = 0 padding for 2D points


def _read_any(path: Path) -> _Contents:
    kind = _file_kind(path)
    if kind == "csv":
        return _Contents(dict(_read_csv_table(path)), False)
    if kind == "json":
        return _read_json(path)
    return _Contents({None: _read_fcsv(path) if kind == "fcsv" else _read_mrk_json(path)}, True)


def read_landmark_table(path: str | Path) -> dict[str, Landmarks]:
    """Read all cases of a landmark file: ``{case: Landmarks}`` in world mm, RAS.

    Long or wide ``.csv`` and multi-case ``.json`` give every case the same names in the same
    order (long CSV: by landmark id 1..N; absent landmarks are NaN). Files in LPS are converted.
    Single-case files (``.fcsv``, ``.mrk.json``, single-case ``.json`` without a ``case`` key)
    give one entry keyed by the file name without its extension.

    Raises:
        LandmarkFileError: the file is missing, empty or malformed (message names file and line).
    """
    path = Path(path)
    return {(_stem(path) if case is None else case): lm for case, lm in _read_any(path).table.items()}


def _pick_case(path: Path, table: dict[str | None, Landmarks], case: str | None) -> Landmarks:
    if case is not None and case in table:
        return table[case]
    if len(table) == 1 and (case is None or None in table):
        return next(iter(table.values()))
    listed = ", ".join(repr(c) for c in list(table)[:5]) + (", ..." if len(table) > 5 else "")
    if not table:
        raise _err(path, None, "file holds no cases")
    if case is None:
        raise _err(path, None, f"file holds {len(table)} cases ({listed}); pass case= to choose one")
    raise _err(path, None, f"case {case!r} not found ({len(table)} cases: {listed})")


def _with_dims(path: Path, lm: Landmarks, spatial_dims: int, slicer: bool) -> Landmarks:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if lm.spatial_dims == spatial_dims:
        return lm
    if slicer and spatial_dims == 2:
        z = lm.coords[:, 2]
        off_plane = np.flatnonzero(~np.isnan(z) & (z != 0.0))
        if off_plane.size:
            i = off_plane[0]
            raise _err(path, None, f"wrong dimensionality: landmark {lm.names[i]!r} has z = {z[i]!r} mm; "
                                   "only points with z = 0 can be read as 2D")
        return Landmarks(lm.coords[:, :2].copy(), lm.names)
    raise _err(path, None, f"wrong dimensionality: the file holds {lm.spatial_dims}D landmarks, "
                           f"expected {spatial_dims}D")


def read_landmarks(path: str | Path, case: str | None = None, names: Sequence[str] | None = None,
                   spatial_dims: int | None = None) -> Landmarks:
    """Read one case of landmarks, in world mm, RAS (files in LPS are converted).

    Args:
        path: ``.csv`` (long or wide), ``.json``, ``.mrk.json`` or ``.fcsv``.
        case: the case to pick from a multi-case file (required when it holds several; ignored
            for Slicer files and single-case JSON without a ``case`` key).
        names: optional names to select and order; names not in the file become NaN rows.
        spatial_dims: the dimensionality the caller needs; a mismatch is an error, except that
            Slicer files (always 3D) are read as 2D when every z is 0.

    Raises:
        LandmarkFileError: missing/malformed file, unknown case, wrong dimensionality.
    """
    path = Path(path)
    contents = _read_any(path)
    lm = _pick_case(path, contents.table, case)
    if spatial_dims is not None:
        lm = _with_dims(path, lm, spatial_dims, slicer=contents.slicer)
    return lm.select(list(names)) if names is not None else lm


def _check_table(table: Mapping[str, Landmarks]) -> tuple[list[str], int]:
    """Common names and dimensionality of all cases (``ValueError`` if they differ)."""
    names: list[str] | None = None
    dims = 3
    for case, lm in table.items():
        if not isinstance(case, str) or not case or case != case.strip() or case.startswith("#"):
            raise ValueError(f"case ids must be non-empty strings without surrounding spaces or a leading '#', "
                             f"got {case!r}")
        if names is None:
            names, dims = lm.names, lm.spatial_dims
        elif lm.names != names or lm.spatial_dims != dims:
            raise ValueError(f"case {case!r} has other landmarks or dimensionality than the first case; "
                             "all cases must share names, order and spatial_dims (see Landmarks.select)")
    return names or [], dims


def _check_confidence(table: Mapping[str, Landmarks], confidence: Mapping[str, Any]) -> dict[str, np.ndarray]:
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


def write_landmark_table(path: str | Path, table: Mapping[str, Landmarks], layout: Literal["long", "wide"] = "long",
                         confidence: Mapping[str, np.ndarray] | None = None,
                         coordinate_system: CoordinateSystem = "RAS") -> None:
    """Write all cases atomically, in world mm (RAS unless ``coordinate_system="LPS"``).

    ``.csv``: long (``case,landmark,name,x_mm,y_mm[,z_mm][,confidence]``, one row per landmark,
    ids 1..N) or wide (``case,<name>_x_mm,...``, one row per case) layout, the frame stated in a
    first comment line, missing values as empty cells, full float precision. ``.json``:
    heatmark's multi-case JSON (``layout`` must be "long"). All cases must share names, order and
    dimensionality. ``confidence`` (``{case: (N,) array}``, long CSV only) fills a
    ``confidence`` column; cases without an entry get empty cells.
    """
    path = Path(path)
    frame = _frame_arg(coordinate_system)
    kind = _file_kind(path)
    if layout not in ("long", "wide"):
        raise ValueError(f"layout must be 'long' or 'wide', got {layout!r}")
    if kind not in ("csv", "json") or (kind == "json" and layout != "long"):
        raise ValueError(f"{path.name}: tables are written as .csv (long or wide) or .json; "
                         "write Slicer files per case with write_landmarks")
    if confidence is not None and (kind != "csv" or layout != "long"):
        raise ValueError("confidence is written only to long CSV tables")
    names, dims = _check_table(table)
    if kind == "json":
        doc = {"coordinate_system": frame, "units": "mm", "spatial_dims": dims,
               "cases": {case: _plain_json_case(lm, frame) for case, lm in table.items()}}
        atomic_write_text(path, _json_dump(doc))
        return
    conf = None if confidence is None else _check_confidence(table, confidence)
    coords = {case: _convert(lm.coords, "RAS", frame) for case, lm in table.items()}
    rows = _long_rows(coords, names, dims, conf) if layout == "long" else _wide_rows(coords, names, dims)
    atomic_write_text(path, csv_text(rows, comment=CSV_FRAME_COMMENT.replace("RAS", frame)))


def write_landmarks(path: str | Path, lm: Landmarks, coordinate_system: CoordinateSystem | None = None,
                    case: str | None = None) -> None:
    """Write one case atomically; the format follows the extension.

    - ``.fcsv``: Slicer fiducial CSV, RAS by default (``# CoordinateSystem = RAS``);
    - ``.mrk.json``: Slicer markups JSON, LPS by default as Slicer writes it (x, y negated);
      missing landmarks get ``positionStatus: "missing"``;
    - ``.json``: heatmark's single-case JSON (with ``case`` when given), RAS by default;
    - ``.csv``: long CSV with one case (``case`` defaults to the file name without extension).

    2D landmarks go to Slicer files with z = 0. Coordinates in ``lm`` are world mm, RAS.
    """
    path = Path(path)
    kind = _file_kind(path)
    frame = _frame_arg(coordinate_system or _DEFAULT_FRAME[kind])
    if kind == "csv":
        write_landmark_table(path, {case or _stem(path): lm}, coordinate_system=frame)
        return
    if kind == "json":
        doc: dict[str, Any] = {"coordinate_system": frame, "units": "mm", "spatial_dims": lm.spatial_dims}
        if case is not None:
            doc["case"] = case
        text = _json_dump({**doc, **_plain_json_case(lm, frame)})
    elif kind == "mrk.json":
        text = _mrk_json_text(lm, frame)
    else:
        text = _fcsv_text(lm, frame)
    atomic_write_text(path, text)
