"""heatmark's plain landmark JSON (``.json``).

Multi-case: ``{"coordinate_system": "RAS", "units": "mm", "spatial_dims": D, "cases": {case:
{"names": [...], "coords": [[x, y(, z)], null, ...]}}}`` (``null`` = missing; cases with other
names get the union of all names, absent ones missing). Single case: the same with
``names``/``coords`` (and optionally ``case``) at the top level. Written in RAS by default, read
in RAS or LPS (mm). A Slicer markups document saved under a plain ``.json`` name is read as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from heatmark.core.fileio import atomic_write_text
from heatmark.landmarks.model import (
    CoordinateSystem,
    Landmarks,
    check_table,
    convert_frame,
    file_error,
    landmarks_in_ras,
)
from heatmark.landmarks.parsing import (
    check_unique_names,
    json_text,
    load_json,
    make_landmarks,
    parse_frame,
    parse_point,
)
from heatmark.landmarks.registry import LandmarkContents, LandmarkFormat, TableLayout
from heatmark.landmarks.slicer import mrk_landmarks

__all__ = ["JSON_FORMAT"]


def _json_case(path: Path, where: str, entry: Any, dims: int | None) -> Landmarks:
    """One case of heatmark's plain JSON: ``{"names": [...], "coords": [[...], null, ...]}``
    (in the file's frame, mm).

    ``where`` locates the entry in messages (``"cases['001']."``, or ``""`` at the top level).
    """
    place = where.rstrip(".") or "top level"
    if not isinstance(entry, dict):
        raise file_error(path, None, f"{place}: expected an object with 'names' and 'coords'")
    absent = [repr(k) for k in ("names", "coords") if k not in entry]
    if absent:
        raise file_error(path, None, f"{place}: missing required key(s) {', '.join(absent)}")
    names, coords = entry["names"], entry["coords"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise file_error(path, None, f"{where}names must be a list of strings")
    if not isinstance(coords, list) or len(coords) != len(names):
        raise file_error(path, None, f"{where}coords must be a list with one entry per name ({len(names)})")
    check_unique_names(path, names, where=where.rstrip("."))
    if dims is None:
        sizes = {len(c) for c in coords if isinstance(c, list)}
        if len(sizes) > 1:
            raise file_error(path, None, f"{where}coords mix points of {sorted(sizes)} coordinates "
                                         "(mixed 2D/3D points)")
        dims = sizes.pop() if sizes else 3
    points = []
    for i, c in enumerate(coords):
        label = f"{where}coords[{i}]"
        if c is None:
            c = [None] * dims
        if not isinstance(c, list) or len(c) != dims or dims not in (2, 3):
            raise file_error(path, None, f"{label} must be null or a list of {dims} numbers "
                                         f"(2 or 3, all points alike), got {c!r}")
        points.append(parse_point([(f"{label}[{k}]", v) for k, v in enumerate(c)], path, None))
    return make_landmarks(path, points, list(names), dims)


def _unify(path: Path, table: dict[Any, Landmarks]) -> dict[Any, Landmarks]:
    """Give every case the union of all names (first-appearance order); absent ones NaN."""
    dims = {lm.spatial_dims for lm in table.values()}
    if len(dims) > 1:
        raise file_error(path, None, "mixed 2D/3D cases")
    union = list(dict.fromkeys(n for lm in table.values() for n in lm.names))
    return {case: lm if lm.names == union else lm.select(union) for case, lm in table.items()}


def _read_plain_json(path: Path, doc: dict) -> dict[str | None, Landmarks]:
    """Every case of a parsed plain-JSON document, in world mm, RAS (key None: no case id)."""
    frame = parse_frame(doc.get("coordinate_system", "RAS"), path, None)
    units = doc.get("units", "mm")
    if units != "mm":
        raise file_error(path, None, f"unsupported units {units!r} (expected mm)")
    dims = doc.get("spatial_dims")
    if dims is not None and dims not in (2, 3):
        raise file_error(path, None, f"spatial_dims must be 2 or 3, got {dims!r}")
    if "cases" in doc:
        cases = doc["cases"]
        if not isinstance(cases, dict):
            raise file_error(path, None, "'cases' must be an object mapping case ids to landmarks")
        table = {str(c): _json_case(path, f"cases[{c!r}].", e, dims) for c, e in cases.items()}
        table = _unify(path, table)
    else:
        case = doc.get("case")
        table = {None if case is None else str(case): _json_case(path, "", doc, dims)}
    return {c: landmarks_in_ras(lm, frame) for c, lm in table.items()}


def _read_json(path: Path) -> LandmarkContents:
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise file_error(path, None, "expected a JSON object at the top level")
    if "markups" in doc:  # a Slicer markups file saved as plain .json
        return LandmarkContents({None: mrk_landmarks(path, doc)}, always_3d=True)
    return LandmarkContents(_read_plain_json(path, doc))


def _json_case_entry(lm: Landmarks, frame: CoordinateSystem) -> dict[str, Any]:
    """``{"names": [...], "coords": [...]}`` of one case, coordinates in ``frame`` (mm)."""
    coords = convert_frame(lm.coords, "RAS", frame)
    return {"names": list(lm.names),
            "coords": [None if np.isnan(p).any() else [float(v) for v in p] for p in coords]}


def _write_json_case(path: Path, lm: Landmarks, frame: CoordinateSystem, case: str | None) -> None:
    """The single-case form, with a ``case`` key when ``case`` is given."""
    doc: dict[str, Any] = {"coordinate_system": frame, "units": "mm", "spatial_dims": lm.spatial_dims}
    if case is not None:
        doc["case"] = case
    atomic_write_text(path, json_text({**doc, **_json_case_entry(lm, frame)}))


def _write_json_table(path: Path, table: Mapping[str, Landmarks], frame: CoordinateSystem, layout: TableLayout,
                      confidence: Mapping[str, Any] | None) -> None:
    """The multi-case form; JSON has one layout (``"long"``) and no confidence."""
    if layout != "long":
        raise ValueError(f"{path.name}: JSON tables have no {layout!r} layout; write a wide table as .csv")
    if confidence is not None:
        raise ValueError("confidence is written only to long CSV tables")
    _, dims = check_table(table)
    doc = {"coordinate_system": frame, "units": "mm", "spatial_dims": dims,
           "cases": {case: _json_case_entry(lm, frame) for case, lm in table.items()}}
    atomic_write_text(path, json_text(doc))


JSON_FORMAT = LandmarkFormat(
    name="json", suffixes=(".json",), default_frame="RAS", read=_read_json, write=_write_json_case,
    write_table=_write_json_table, description="heatmark's plain landmark JSON, one or many cases",
)
