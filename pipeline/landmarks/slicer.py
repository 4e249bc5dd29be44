"""3D Slicer landmark files: markups JSON (``.mrk.json``) and the fiducial CSV (``.fcsv``).

``.mrk.json``
    Slicer markups JSON (schema v1.0.3), one ``Fiducial`` markup; written in LPS as Slicer does,
    read in LPS or RAS (mm or um); a missing landmark is a control point with ``positionStatus``
    ``"missing"``.
``.fcsv``
    Slicer markups fiducial CSV (version 4.11 header), written in RAS by default; read with any
    ``# CoordinateSystem`` header (``0``/``RAS``, ``1``/``LPS``; absent = RAS). A missing
    landmark has empty x, y, z cells (Slicer skips such rows).

Confidence: Slicer's markups have no confidence field, so a writer given ``confidence=`` puts
``confidence=<value>`` (:data:`CONFIDENCE_DESCRIPTION`) in each control point's description
(``description`` in ``.mrk.json``, the ``desc`` column of ``.fcsv``), where Slicer shows it in
the Markups module's control-point table; the readers parse it back
(:attr:`~heatmark.landmarks.registry.LandmarkContents.confidence`).

Slicer has no 2D points: 2D landmarks are written with ``z = 0`` and read back as 2D with
``read_landmarks(..., spatial_dims=2)`` (the readers set ``LandmarkContents.always_3d``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from heatmark.core.fileio import atomic_write_text, csv_cell, csv_text
from heatmark.landmarks.model import CoordinateSystem, Landmarks, convert_frame, file_error, landmarks_in_ras
from heatmark.landmarks.parsing import (
    AXES,
    CsvRow,
    check_unique_names,
    csv_lines,
    json_text,
    load_json,
    make_landmarks,
    parse_frame,
    parse_point,
    read_text,
)
from heatmark.landmarks.registry import LandmarkContents, LandmarkFormat

__all__ = ["CONFIDENCE_DESCRIPTION", "FCSV_COLUMNS", "FCSV_FORMAT", "FCSV_VERSION", "MRK_JSON_FORMAT", "SLICER_MARKUPS_SCHEMA",
           "mrk_landmarks"]

SLICER_MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
    "Schema/markups-schema-v1.0.3.json#"
)
FCSV_VERSION = "4.11"
FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID")
_FCSV_CODES = {"0": "RAS", "1": "LPS"}
_MRK_STATUSES = {"defined": True, "preview": True, "undefined": False, "missing": False}  # status -> has a position
_UNITS_TO_MM = {"mm": 1.0, "um": 1e-3}

#: A control point's description holding its confidence (``str.format`` with ``value``).
CONFIDENCE_DESCRIPTION = "confidence={value}"
_CONFIDENCE = re.compile(r"^\s*confidence\s*[=:]\s*(\S+)\s*$", re.IGNORECASE)


def _confidence_text(value: float) -> str:
    """The description of a point with confidence ``value`` (full precision; empty for NaN)."""
    return "" if np.isnan(value) else CONFIDENCE_DESCRIPTION.format(value=csv_cell(float(value)))


def _parse_confidence(text: str) -> float:
    """The confidence in a description written by :func:`_confidence_text`; NaN for any other text."""
    m = _CONFIDENCE.match(text or "")
    if not m:
        return float("nan")
    try:
        return float(m.group(1))
    except ValueError:
        return float("nan")


def _confidence_or_none(values: list[float]) -> np.ndarray | None:
    """``(N,)`` confidences, or None when no point has one."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr if np.isfinite(arr).any() else None


def _as_3d(lm: Landmarks) -> np.ndarray:
    """Coordinates with a z column: 2D points get z = 0 (NaN for missing points)."""
    if lm.spatial_dims == 3:
        return lm.coords
    z = np.where(lm.missing, np.nan, 0.0)[:, None]
    return np.concatenate([lm.coords, z], axis=1)


# ----------------------------------------------------------------------------------------------
# markups JSON


def _mrk_units(path: Path, units: Any) -> float:
    """Millimetres per unit of ``coordinateUnits`` (a code or a list of them)."""
    code = units[0] if isinstance(units, list) and units else units
    if code not in _UNITS_TO_MM:
        raise file_error(path, None, f"unsupported coordinateUnits {units!r} (expected mm or um)")
    return _UNITS_TO_MM[code]


def _mrk_point(path: Path, i: int, cp: Any) -> tuple[np.ndarray, str, float]:
    """Point (file frame and units; NaN when it has no position), name and confidence (NaN when
    its description holds none) of control point ``i``."""
    if not isinstance(cp, dict):
        raise file_error(path, None, f"control point {i + 1} is not an object")
    status = cp.get("positionStatus", "defined")
    if status not in _MRK_STATUSES:
        raise file_error(path, None, f"control point {i + 1}: unknown positionStatus {status!r}")
    if _MRK_STATUSES[status]:
        pos = cp.get("position")
        if not isinstance(pos, list) or len(pos) != 3:
            raise file_error(path, None, f"control point {i + 1}: position must be a list of 3 numbers, got {pos!r}")
        point = parse_point([(f"control point {i + 1} {a}", v) for a, v in zip(AXES, pos)], path, None)
    else:
        point = np.full(3, np.nan)
    name = str(cp.get("label") or cp.get("id") or i + 1).strip()
    return point, name, _parse_confidence(str(cp.get("description") or ""))


def mrk_landmarks(path: Path, doc: dict) -> Landmarks:
    """The one ``Fiducial`` markup of a parsed markups document, 3D, in world mm, RAS.

    Also used for markups saved under a plain ``.json`` name.
    """
    return _mrk_contents(path, doc)[0]


def _mrk_contents(path: Path, doc: dict) -> tuple[Landmarks, np.ndarray | None]:
    """The landmarks of :func:`mrk_landmarks` and the points' confidence (None: no point has one)."""
    markups = doc.get("markups")
    if not isinstance(markups, list):
        raise file_error(path, None, "'markups' must be a list (not a Slicer markups file?)")
    fiducials = [m for m in markups if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if len(fiducials) != 1:
        raise file_error(path, None, f"expected one markup of type 'Fiducial', found {len(fiducials)}")
    markup = fiducials[0]
    frame = parse_frame(markup.get("coordinateSystem", "LPS"), path, None)  # the schema's default is LPS
    scale = _mrk_units(path, markup.get("coordinateUnits", "mm"))
    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise file_error(path, None, "'controlPoints' must be a list")
    parsed = [_mrk_point(path, i, cp) for i, cp in enumerate(control_points)]
    names = [n for _, n, _ in parsed]
    check_unique_names(path, names)
    lm = landmarks_in_ras(make_landmarks(path, [p * scale for p, _, _ in parsed], names, 3), frame)
    return lm, _confidence_or_none([c for _, _, c in parsed])


def _read_mrk_json(path: Path) -> LandmarkContents:
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise file_error(path, None, "expected a JSON object at the top level")
    lm, confidence = _mrk_contents(path, doc)
    return LandmarkContents({None: lm}, always_3d=True, confidence=None if confidence is None else {None: confidence})


def _descriptions(lm: Landmarks, confidence: np.ndarray | None) -> list[str]:
    """Each point's description: its confidence when given, else empty."""
    if confidence is None:
        return [""] * lm.num_landmarks
    return [_confidence_text(c) for c in np.asarray(confidence, dtype=np.float64).reshape(-1)]


def _mrk_json_text(lm: Landmarks, frame: CoordinateSystem, confidence: np.ndarray | None = None) -> str:
    control_points = []
    descriptions = _descriptions(lm, confidence)
    for i, (name, p) in enumerate(zip(lm.names, convert_frame(_as_3d(lm), "RAS", frame))):
        cp: dict[str, Any] = {"id": str(i + 1), "label": name, "description": descriptions[i], "associatedNodeID": ""}
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
    return json_text({"@schema": SLICER_MARKUPS_SCHEMA, "markups": [markup]})


def _write_mrk_json(path: Path, lm: Landmarks, frame: CoordinateSystem, case: str | None,
                    confidence: np.ndarray | None = None) -> None:
    """One case in ``frame`` (mm); Slicer files hold no case id, so ``case`` is not written;
    ``(N,)`` ``confidence`` goes to the descriptions."""
    atomic_write_text(path, _mrk_json_text(lm, frame, confidence))


MRK_JSON_FORMAT = LandmarkFormat(
    name="mrk.json", suffixes=(".mrk.json",), default_frame="LPS", read=_read_mrk_json, write=_write_mrk_json,
    description="3D Slicer markups JSON, one Fiducial markup", stores_confidence=True,
)


# ----------------------------------------------------------------------------------------------
# fiducial CSV


def _fcsv_header(path: Path, comments: Sequence[tuple[int, str]]) -> tuple[CoordinateSystem, dict[str, int]]:
    """Frame and column index from an fcsv's header comments (defaults: RAS, Slicer's columns)."""
    frame, columns, columns_line = "RAS", list(FCSV_COLUMNS), None
    for line, text in comments:
        key, sep, value = text.lstrip("#").partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep:
            continue
        if key == "coordinatesystem":
            frame = parse_frame(_FCSV_CODES.get(value, value), path, line)
        elif key == "columns":
            columns, columns_line = [c.strip() for c in value.split(",")], line
    index = {c: i for i, c in reversed(list(enumerate(columns)))}
    absent = [c for c in AXES if c not in index]
    if absent:
        raise file_error(path, columns_line, f"missing required column(s): {', '.join(absent)}")
    return frame, index


def _fcsv_names(labels: list[str], descs: list[str]) -> list[str]:
    """Point labels as names; when every label is a plain number and every description is set
    (AFIDs' convention: label "1", description "AC"), the descriptions; empty labels -> index."""
    named = all(descs) and not any(_CONFIDENCE.match(d) for d in descs)
    if labels and all(lb.isdigit() for lb in labels) and named and len(set(descs)) == len(descs):
        return descs
    return [lb or str(i + 1) for i, lb in enumerate(labels)]


def _read_fcsv(path: Path) -> LandmarkContents:
    comments, rows = csv_lines(read_text(path))
    frame, cols = _fcsv_header(path, comments)
    width = max(cols["x"], cols["y"], cols["z"]) + 1

    def cell(row: CsvRow, column: str) -> str:
        i = cols.get(column)
        return row.cells[i] if i is not None and i < len(row.cells) else ""

    points, labels, descs = [], [], []
    for row in rows:
        if len(row.cells) < width:
            raise file_error(path, row.line, f"has {len(row.cells)} fields, expected at least {width} (id,x,y,z)")
        points.append(parse_point([(a, cell(row, a)) for a in AXES], path, row.line))
        labels.append(cell(row, "label"))
        descs.append(cell(row, "desc"))
    names = _fcsv_names(labels, descs)
    check_unique_names(path, names, [r.line for r in rows])
    lm = landmarks_in_ras(make_landmarks(path, points, names, 3), frame)
    confidence = _confidence_or_none([_parse_confidence(d) for d in descs])
    return LandmarkContents({None: lm}, always_3d=True, confidence=None if confidence is None else {None: confidence})


def _fcsv_text(lm: Landmarks, frame: CoordinateSystem, confidence: np.ndarray | None = None) -> str:
    header = "\n".join([f"# Markups fiducial file version = {FCSV_VERSION}", f"# CoordinateSystem = {frame}",
                        f"# columns = {','.join(FCSV_COLUMNS)}"])
    rows = []
    descriptions = _descriptions(lm, confidence)
    for i, (name, p) in enumerate(zip(lm.names, convert_frame(_as_3d(lm), "RAS", frame))):
        visible = 0 if np.isnan(p).any() else 1
        rows.append([f"vtkMRMLMarkupsFiducialNode_{i + 1}", *(csv_cell(v) for v in p), 0, 0, 0, 1,
                     visible, 1, 0, name, descriptions[i], ""])
    return csv_text(rows, comment=header)


def _write_fcsv(path: Path, lm: Landmarks, frame: CoordinateSystem, case: str | None,
                confidence: np.ndarray | None = None) -> None:
    """One case in ``frame`` (mm); Slicer files hold no case id, so ``case`` is not written;
    ``(N,)`` ``confidence`` goes to the ``desc`` column."""
    atomic_write_text(path, _fcsv_text(lm, frame, confidence))


FCSV_FORMAT = LandmarkFormat(
    name="fcsv", suffixes=(".fcsv",), default_frame="RAS", read=_read_fcsv, write=_write_fcsv,
    description="3D Slicer markups fiducial CSV", stores_confidence=True,
)
