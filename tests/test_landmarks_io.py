"""Landmark files: round trips of every format, Slicer frames, real data, errors, atomic writes, the
format registry."""

from __future__ import annotations

import ast
import csv
import json
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import heatmark.landmarks as landmarks_package
from heatmark.core.fileio import atomic_write_text
from heatmark.landmarks import (
    FORMATS,
    LandmarkContents,
    LandmarkFileError,
    LandmarkFormat,
    Landmarks,
    csv_frame_comment,
    file_stem,
    format_for,
    landmark_table_text,
    landmarks_to_tensor,
    lps_to_ras,
    ras_to_lps,
    read_landmark_table,
    read_landmarks,
    register_format,
    unregister_format,
    write_landmark_table,
    write_landmarks,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ISBI_CSV = DATA / "isbi2015" / "landmarks.csv"
AFIDS_FCSV = DATA / "afids" / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real landmark data not found at {DATA} "
                                "(../shared/data beside the repository; absent in a fresh clone)")

SUFFIXES = [".csv", ".json", ".mrk.json", ".fcsv"]
SLICER = (".mrk.json", ".fcsv")


def random_landmarks(dims: int, n: int = 6, seed: int = 0, missing: int | None = 2) -> Landmarks:
    rng = np.random.default_rng(seed)
    coords = rng.uniform(-150.0, 150.0, size=(n, dims))
    if missing is not None:
        coords[missing] = np.nan
    return Landmarks(coords, [f"lm{i}" if i != 3 else "point, with comma" for i in range(n)])


def assert_same(a: Landmarks, b: Landmarks, atol: float = 1e-6) -> None:
    assert a.names == b.names
    assert a.coords.shape == b.coords.shape
    np.testing.assert_array_equal(np.isnan(a.coords), np.isnan(b.coords))
    np.testing.assert_allclose(a.coords, b.coords, atol=atol, rtol=0)


# ---------------------------------------------------------------------------- in-memory form


def test_landmarks_validation_and_helpers():
    lm = Landmarks([[1, 2, 3], [np.nan] * 3], ["a", "b"])
    assert lm.coords.dtype == np.float64
    assert (lm.spatial_dims, lm.num_landmarks, len(lm)) == (3, 2, 2)
    np.testing.assert_array_equal(lm.missing, [False, True])
    assert lm.index("b") == 1
    with pytest.raises(ValueError, match="shape"):
        Landmarks(np.zeros((2, 4)), ["a", "b"])
    with pytest.raises(ValueError, match="names"):
        Landmarks(np.zeros((2, 2)), ["a"])
    with pytest.raises(ValueError, match="duplicate"):
        Landmarks(np.zeros((2, 2)), ["a", "a"])
    with pytest.raises(ValueError, match="finite"):
        Landmarks([[np.inf, 0.0]], ["a"])
    with pytest.raises(ValueError, match="partly NaN"):
        Landmarks([[np.nan, 0.0]], ["a"])


def test_select_reorders_and_fills_missing_names():
    lm = Landmarks([[1.0, 2.0], [3.0, 4.0]], ["a", "b"])
    sel = lm.select(["b", "zz", "a"])
    assert sel.names == ["b", "zz", "a"]
    np.testing.assert_array_equal(sel.coords[[0, 2]], [[3.0, 4.0], [1.0, 2.0]])
    assert sel.missing.tolist() == [False, True, False]
    with pytest.raises(KeyError):
        lm.select(["zz"], missing_ok=False)
    c = lm.copy()
    c.coords[0, 0] = 99.0
    assert lm.coords[0, 0] == 1.0 and c != lm and lm.copy() == lm


def test_landmarks_to_tensor():
    lm = random_landmarks(3)
    t = landmarks_to_tensor(lm)
    assert t.dtype == torch.float64 and t.shape == (6, 3)
    assert torch.isnan(t[2]).all()
    t[0, 0] = 1e9  # a copy
    assert lm.coords[0, 0] != 1e9


def test_ras_lps_negates_x_and_y():
    p = np.array([[1.0, -2.0, 3.0]])
    np.testing.assert_array_equal(ras_to_lps(p), [[-1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(lps_to_ras(ras_to_lps(p)), p)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("ext", SUFFIXES)
def test_round_trip_every_format(tmp_path, ext, dims):
    lm = random_landmarks(dims, seed=dims)
    path = tmp_path / f"case7{ext}"
    write_landmarks(path, lm)
    back = read_landmarks(path, spatial_dims=dims)
    assert_same(back, lm)
    if ext in SLICER and dims == 2:
        assert read_landmarks(path).spatial_dims == 3  # Slicer points are 3D, z = 0
        np.testing.assert_array_equal(read_landmarks(path).coords[~lm.missing, 2], 0.0)


@pytest.mark.parametrize("ext", SUFFIXES)
@pytest.mark.parametrize("frame", ["RAS", "LPS"])
def test_round_trip_both_frames(tmp_path, ext, frame):
    lm = random_landmarks(3, seed=5)
    path = tmp_path / f"x{ext}"
    write_landmarks(path, lm, coordinate_system=frame)
    assert_same(read_landmarks(path), lm)


def test_mrk_json_is_written_in_lps(tmp_path):
    lm = random_landmarks(3, seed=1)
    path = tmp_path / "case.mrk.json"
    write_landmarks(path, lm)
    doc = json.loads(path.read_text())
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = doc["markups"]
    assert (markup["type"], markup["coordinateSystem"], markup["coordinateUnits"]) == ("Fiducial", "LPS", "mm")
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == lm.names
    assert points[2]["positionStatus"] == "missing" and "position" not in points[2]
    raw = np.array(points[0]["position"])
    np.testing.assert_allclose(raw, [-lm.coords[0, 0], -lm.coords[0, 1], lm.coords[0, 2]], atol=1e-12)
    assert_same(read_landmarks(path), lm)


def test_fcsv_header_and_missing_row(tmp_path):
    lm = random_landmarks(3, seed=2)
    path = tmp_path / "case.fcsv"
    write_landmarks(path, lm)
    lines = path.read_text().splitlines()
    assert lines[0] == "# Markups fiducial file version = 4.11"
    assert lines[1] == "# CoordinateSystem = RAS"
    assert lines[2] == "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
    assert lines[3 + 2].split(",")[1:4] == ["", "", ""]  # missing landmark: empty x, y, z
    assert '"point, with comma"' in lines[3 + 3]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("layout", ["long", "wide"])
def test_table_round_trip_csv(tmp_path, layout, dims):
    table = {f"{i:03d}": random_landmarks(dims, seed=i, missing=i % 3 or None) for i in range(1, 5)}
    path = tmp_path / "landmarks.csv"
    write_landmark_table(path, table, layout=layout)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:2] == ["case", "frame"] if layout == "wide" else header[:4] == ["case", "landmark", "name", "frame"]
    back = read_landmark_table(path)
    assert list(back) == list(table)
    for case in table:
        assert back[case] == table[case]  # exact: full float precision, NaN as empty cells
    assert read_landmarks(path, case="003") == table["003"]


def test_table_round_trip_json_and_single_case_json(tmp_path):
    table = {"a": random_landmarks(2, seed=1), "b": random_landmarks(2, seed=2, missing=None)}
    path = tmp_path / "all.json"
    write_landmark_table(path, table)
    doc = json.loads(path.read_text())
    assert (doc["coordinate_system"], doc["units"]) == ("RAS", "mm")
    assert doc["cases"]["a"]["coords"][2] is None
    back = read_landmark_table(path)
    assert back == table
    single = tmp_path / "one.json"
    write_landmarks(single, table["a"], case="a")
    assert read_landmark_table(single) == {"a": table["a"]}
    write_landmarks(single, table["a"])
    assert read_landmark_table(single) == {"one": table["a"]}
    assert read_landmarks(single, case="anything") == table["a"]  # no case id in the file


def test_multi_case_json_gets_the_union_of_names(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text(json.dumps({"coordinate_system": "LPS", "units": "mm", "cases": {
        "a": {"names": ["p", "q"], "coords": [[1, 2], None]},
        "b": {"names": ["r", "p"], "coords": [[5, 6], [7, 8]]}}}))
    table = read_landmark_table(path)
    assert table["a"].names == table["b"].names == ["p", "q", "r"]
    np.testing.assert_array_equal(table["a"].coords[0], [-1.0, -2.0])  # LPS -> RAS
    assert table["a"].missing.tolist() == [False, True, True]
    np.testing.assert_array_equal(table["b"].coords[[0, 2]], [[-7.0, -8.0], [-5.0, -6.0]])


def test_slicer_markups_saved_as_plain_json(tmp_path):
    lm = random_landmarks(2, seed=9)
    write_landmarks(tmp_path / "a.mrk.json", lm)
    (tmp_path / "b.json").write_text((tmp_path / "a.mrk.json").read_text())
    assert_same(read_landmarks(tmp_path / "b.json", spatial_dims=2), lm)


def test_long_csv_confidence_column(tmp_path):
    table = {"x": random_landmarks(3, seed=3), "y": random_landmarks(3, seed=4)}
    conf = {"x": np.linspace(0.1, 0.6, 6)}
    path = tmp_path / "pred.csv"
    write_landmark_table(path, table, confidence=conf)
    rows = list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))
    assert list(rows[0]) == ["case", "landmark", "name", "frame", "x_mm", "y_mm", "z_mm", "confidence"]
    assert [float(r["confidence"]) for r in rows[:6]] == conf["x"].tolist()
    assert rows[6]["confidence"] == "" and rows[2]["x_mm"] == ""
    assert read_landmark_table(path) == table  # the extra column is ignored on reading


def test_long_csv_reading_details(tmp_path):
    path = tmp_path / "lm.csv"
    path.write_text(
        "# coordinate system: LPS, units: mm\n"
        "case,landmark,name,x_mm,y_mm,confidence,comment\n"
        "b,2,beta,1.5,2.5,0.9,hi\n"
        "\n"
        "a,1,alpha,,,0.1,empty = missing\n"
        "a,2,beta,3,4,,\n"
    )
    table = read_landmark_table(path)
    assert list(table) == ["b", "a"]  # first-appearance order
    assert table["b"].names == ["alpha", "beta"]
    assert table["b"].missing.tolist() == [True, False]  # absent id -> NaN
    np.testing.assert_array_equal(table["b"].coords[1], [-1.5, -2.5])  # LPS comment honoured
    assert table["a"].missing.tolist() == [True, False]
    sel = read_landmarks(path, case="a", names=["beta", "gamma"])
    assert sel.names == ["beta", "gamma"] and sel.missing.tolist() == [False, True]


# ---------------------------------------------------------------------------- Slicer fcsv variants


FCSV_ROW = "vtkMRMLMarkupsFiducialNode_0,10.5,-20.25,30,0,0,0,1,1,1,0,F-1,,\n"
FCSV_ROW2 = "vtkMRMLMarkupsFiducialNode_1,-1,2,-3,0,0,0,1,1,1,0,F-2,desc,vtkMRMLScalarVolumeNode1\n"


@pytest.mark.parametrize("line, frame", [
    ("# CoordinateSystem = 0\n", "RAS"),
    ("# CoordinateSystem = 1\n", "LPS"),
    ("# CoordinateSystem = RAS\n", "RAS"),
    ("# CoordinateSystem = LPS\n", "LPS"),
    ("", "RAS"),  # old files without the line
])
def test_fcsv_coordinate_system_variants(tmp_path, line, frame):
    path = tmp_path / "pts.fcsv"
    path.write_text("# Markups fiducial file version = 4.6\n" + line
                    + "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                    + FCSV_ROW + FCSV_ROW2)
    lm = read_landmarks(path)
    raw = np.array([[10.5, -20.25, 30.0], [-1.0, 2.0, -3.0]])
    expected = raw if frame == "RAS" else raw * [-1, -1, 1]
    assert lm.names == ["F-1", "F-2"]
    np.testing.assert_array_equal(lm.coords, expected)


def test_fcsv_numeric_labels_use_descriptions(tmp_path):
    path = tmp_path / "afids_like.fcsv"
    path.write_text("# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"
                    "n_1,1,2,3,0,0,0,1,1,1,0,1,AC,vol\nn_2,4,5,6,0,0,0,1,1,1,0,2,PC,vol\n")
    assert read_landmarks(path).names == ["AC", "PC"]


def test_mrk_json_in_ras_and_units(tmp_path):
    path = tmp_path / "ras.mrk.json"
    doc = {"@schema": "x", "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "um",
                                        "controlPoints": [{"label": "a", "position": [1000, 2000, 3000]},
                                                          {"label": "b", "positionStatus": "undefined"}]}]}
    path.write_text(json.dumps(doc))
    lm = read_landmarks(path)
    np.testing.assert_allclose(lm.coords[0], [1.0, 2.0, 3.0])
    assert lm.missing.tolist() == [False, True]


# ---------------------------------------------------------------------------- real data


@needs_data
def test_real_isbi_csv():
    table = read_landmark_table(ISBI_CSV)
    assert len(table) == 300
    assert all(lm.num_landmarks == 19 and lm.spatial_dims == 2 for lm in table.values())
    first = next(iter(table.values()))
    assert first.names[0] == "sella" and first.names[-1] == "articulare"
    with open(ISBI_CSV, newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["case"] == "151" and r["landmark"] == "7")
    lm = read_landmarks(ISBI_CSV, case="151")
    i = int(row["landmark"]) - 1
    assert lm.names[i] == row["name"]
    assert lm.coords[i].tolist() == [float(row["x_mm"]), float(row["y_mm"])]


@needs_data
def test_real_afids_fcsv():
    lm = read_landmarks(AFIDS_FCSV, spatial_dims=3)
    assert lm.num_landmarks == 32 and not lm.missing.any()
    assert lm.names[:2] == ["AC", "PC"]
    with open(AFIDS_FCSV, newline="") as f:
        raw = next(r for r in csv.reader(f) if not r[0].startswith("#"))
    np.testing.assert_array_equal(lm.coords[0], [float(v) for v in raw[1:4]])  # CoordinateSystem = 0: RAS as is
    assert list(read_landmark_table(AFIDS_FCSV)) == ["tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids"]


# ---------------------------------------------------------------------------- errors

HEAD = "# coordinate system: RAS, units: mm\ncase,landmark,name,x_mm,y_mm\n"
HEAD3 = "# coordinate system: RAS, units: mm\ncase,landmark,name,x_mm,y_mm,z_mm\n"
FCSV_HEAD = "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"

MALFORMED = {
    # name: (file name, content, line or None, word in the message)
    "missing column": ("lm.csv", "# c\ncase,landmark,name,x_mm\n1,1,a,2\n", 2, "missing required column(s): y_mm"),
    "neither layout": ("lm.csv", "case,foo,bar\n", 1, "required"),
    "not a number": ("lm.csv", HEAD + "1,1,a,1,2\n1,2,b,3,4\n\n# note\n1,3,c,abc,5\n", 7, "abc"),
    "not finite": ("lm.csv", HEAD + "1,1,a,inf,2\n", 3, "finite"),
    "id not integer": ("lm.csv", HEAD + "1,x,a,1,2\n", 3, "integer"),
    "mixed 2D/3D width": ("lm.csv", HEAD3 + "1,1,a,1,2,3\n1,2,b,1,2\n", 4, "2D/3D"),
    "mixed 2D/3D empty z": ("lm.csv", HEAD3 + "1,1,a,1,2,3\n1,2,b,1,2,\n", 4, "z_mm"),
    "duplicate id": ("lm.csv", HEAD + "1,1,a,1,2\n1,2,b,1,2\n1,1,a,5,6\n", 5, "duplicate"),
    "name conflict": ("lm.csv", HEAD + "1,1,a,1,2\n2,1,b,1,2\n", 4, "named"),
    "duplicate name": ("lm.csv", HEAD + "1,1,a,1,2\n1,2,a,1,2\n", 4, "duplicate"),
    "id gap": ("lm.csv", HEAD + "1,1,a,1,2\n1,3,c,1,2\n", None, "1..3"),
    "empty case": ("lm.csv", HEAD + ",1,a,1,2\n", 3, "case"),
    "unknown csv frame": ("lm.csv", "# coordinate system: XYZ\ncase,landmark,name,x_mm,y_mm\n", 1, "XYZ"),
    "wide duplicate name": ("w.csv", "case,a_x_mm,a_y_mm,a_x_mm\n1,1,2,3\n", 1, "duplicate"),
    "wide mixed dims": ("w.csv", "case,a_x_mm,a_y_mm,a_z_mm,b_x_mm,b_y_mm\n", 1, "2D/3D"),
    "wide orphan column": ("w.csv", "case,a_x_mm,a_y_mm,b_y_mm\n", 1, "b_x_mm"),
    "wide duplicate case": ("w.csv", "case,a_x_mm,a_y_mm\n1,1,2\n1,3,4\n", 3, "duplicate"),
    "wide not a number": ("w.csv", "# x\ncase,a_x_mm,a_y_mm\n1,1,2\n2,1,?\n", 4, "a_y_mm"),
    "fcsv unknown frame": ("p.fcsv", "# Markups fiducial file version = 4.11\n# CoordinateSystem = IJK\n", 2, "IJK"),
    "fcsv not a number": ("p.fcsv", FCSV_HEAD + "id1,1,2,3,0,0,0,1,1,1,0,a,,\nid2,1,zz,3,0,0,0,1,1,1,0,b,,\n", 4, "zz"),
    "fcsv short row": ("p.fcsv", FCSV_HEAD + "id1,1,2\n", 3, "fields"),
    "fcsv duplicate name": ("p.fcsv", FCSV_HEAD + "i,1,2,3,0,0,0,1,1,1,0,a,,\n" * 2, 4, "duplicate"),
    "fcsv inf": ("p.fcsv", FCSV_HEAD + "i,1,2,-inf,0,0,0,1,1,1,0,a,,\n", 3, "finite"),
    "malformed json": ("c.json", '{\n  "names": ["a"],\n  "coords": [[1, 2],\n}\n', 4, "malformed"),
    "malformed mrk.json": ("c.mrk.json", '{"markups": [\n', 2, "malformed"),
    "json unknown frame": ("c.json", '{"coordinate_system": "XYZ", "names": ["a"], "coords": [[1, 2]]}', None, "XYZ"),
    "json not a number": ("c.json", '{"names": ["a"], "coords": [[1, "b"]]}', None, "number"),
    "json infinity": ("c.json", '{"names": ["a"], "coords": [[1, Infinity]]}', None, "finite"),
    "json mixed dims": ("c.json", '{"names": ["a", "b"], "coords": [[1, 2], [1, 2, 3]]}', None, "2D/3D"),
    "json duplicate name": ("c.json", '{"names": ["a", "a"], "coords": [[1, 2], null]}', None, "duplicate"),
    "json missing keys": ("c.json", '{"names": ["a"]}', None, "coords"),
    "mrk unknown frame": ("c.mrk.json", json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "IJK",
                                                                "controlPoints": []}]}), None, "IJK"),
    "mrk bad status": ("c.mrk.json", json.dumps({"markups": [{"type": "Fiducial", "controlPoints": [
        {"label": "a", "position": [1, 2, 3], "positionStatus": "maybe"}]}]}), None, "positionStatus"),
    "mrk no fiducial": ("c.mrk.json", json.dumps({"markups": [{"type": "Line"}]}), None, "Fiducial"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_files_raise_with_file_line_and_problem(tmp_path, name):
    file_name, content, line, word = MALFORMED[name]
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(path)
    message = str(info.value)
    assert file_name in message
    assert word in message
    if line is not None:
        assert f"line {line}:" in message
        assert info.value.line == line
    assert isinstance(info.value, ValueError)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(LandmarkFileError, match=r"nope\.csv: file not found"):
        read_landmarks(tmp_path / "nope.csv")
    for name in ("empty.csv", "empty.fcsv", "empty.mrk.json", "empty.json"):
        (tmp_path / name).write_text("\n  \n")
        with pytest.raises(LandmarkFileError, match=rf"{name}: file is empty"):
            read_landmarks(tmp_path / name)
    (tmp_path / "comments.csv").write_text("# only a comment\n")
    with pytest.raises(LandmarkFileError, match="comments.csv: no header"):
        read_landmarks(tmp_path / "comments.csv")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(LandmarkFileError, match="x.txt: unsupported"):
        read_landmarks(tmp_path / "x.txt")


def test_case_selection_errors(tmp_path):
    path = tmp_path / "two.csv"
    write_landmark_table(path, {"a": random_landmarks(2), "b": random_landmarks(2)})
    with pytest.raises(LandmarkFileError, match="two.csv: file holds 2 cases.*case="):
        read_landmarks(path)
    with pytest.raises(LandmarkFileError, match="'c' not found"):
        read_landmarks(path, case="c")


def test_wrong_dimensionality(tmp_path):
    path = tmp_path / "two_d.csv"
    write_landmarks(path, random_landmarks(2))
    with pytest.raises(LandmarkFileError, match="two_d.csv: wrong dimensionality.*2D.*3D"):
        read_landmarks(path, spatial_dims=3)
    fcsv = tmp_path / "three_d.fcsv"
    write_landmarks(fcsv, random_landmarks(3))
    with pytest.raises(LandmarkFileError, match="three_d.fcsv: wrong dimensionality.*z ="):
        read_landmarks(fcsv, spatial_dims=2)


def test_error_survives_pickling():
    err = LandmarkFileError("f.csv, line 3: bad", path="f.csv", line=3, problem="bad")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.line == 3


def test_writer_argument_errors(tmp_path):
    lm = random_landmarks(3)
    with pytest.raises(ValueError, match="same|share"):
        write_landmark_table(tmp_path / "t.csv", {"a": lm, "b": random_landmarks(2)})
    with pytest.raises(ValueError, match="coordinate_system"):
        write_landmarks(tmp_path / "a.fcsv", lm, coordinate_system="XYZ")
    with pytest.raises(ValueError, match="confidence"):
        write_landmark_table(tmp_path / "t.csv", {"a": lm}, layout="wide", confidence={"a": np.ones(6)})
    with pytest.raises(ValueError, match="6 values"):
        write_landmark_table(tmp_path / "t.csv", {"a": lm}, confidence={"a": np.ones(3)})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("ext", SUFFIXES)
def test_writes_are_atomic(tmp_path, monkeypatch, ext):
    path = tmp_path / f"out{ext}"
    path.write_text("previous content")

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the data is written, before the rename
    with pytest.raises(OSError, match="disk full"):
        write_landmarks(path, random_landmarks(3))
    with pytest.raises(OSError, match="disk full"):
        write_landmarks(tmp_path / f"new{ext}", random_landmarks(3))
    assert os.listdir(tmp_path) == [path.name]
    assert path.read_text() == "previous content"


# ---------------------------------------------------------------------------- the format registry


def assert_round_trips(fmt: LandmarkFormat, tmp_path: Path) -> None:
    """``fmt`` writes and reads back a 3D case with a missing (NaN) row exactly, in its default
    frame and in both frames; a table writer, where the format has one, round-trips too."""
    lm = random_landmarks(3, seed=11, missing=2)
    assert lm.missing.tolist() == [False, False, True, False, False, False]
    path = tmp_path / f"case{fmt.suffixes[0]}"
    assert format_for(path) is fmt
    for frame in (None, "RAS", "LPS"):
        write_landmarks(path, lm, coordinate_system=frame)
        back = read_landmarks(path, spatial_dims=3)
        assert back == lm, (fmt.name, frame)  # exact, NaN row included
        assert read_landmark_table(path) == {"case": lm}  # no case id: the file name without suffix
    if fmt.write_table is not None:
        table = {"a": lm, "b": random_landmarks(3, seed=12, missing=4)}
        tpath = tmp_path / f"table{fmt.suffixes[0]}"
        for frame in ("RAS", "LPS"):
            write_landmark_table(tpath, table, coordinate_system=frame)
            assert read_landmark_table(tpath) == table, (fmt.name, frame)


@pytest.mark.parametrize("fmt", list(FORMATS), ids=lambda f: f.name)
def test_every_registered_format_round_trips_exactly(tmp_path, fmt):
    assert_round_trips(fmt, tmp_path)


def test_builtin_formats_are_registered_longest_suffix_first():
    assert {f.name for f in FORMATS} >= {"csv", "fcsv", "mrk.json", "json"}
    lengths = [f.longest_suffix for f in FORMATS]
    assert lengths == sorted(lengths, reverse=True)
    assert [f.name for f in FORMATS].index("mrk.json") < [f.name for f in FORMATS].index("json")
    defaults = {f.name: f.default_frame for f in FORMATS}
    assert (defaults["mrk.json"], defaults["fcsv"], defaults["json"], defaults["csv"]) == ("LPS", "RAS", "RAS", "RAS")


@pytest.mark.parametrize("name, kind", [
    ("a.mrk.json", "mrk.json"), ("a.json", "json"), ("dir.json/B.MRK.JSON", "mrk.json"), ("x.mrk.JSON", "mrk.json"),
    ("a.fcsv", "fcsv"), ("a.csv", "csv"), ("mrk.json.csv", "csv"),
])
def test_format_for_picks_the_longest_suffix(name, kind):
    assert format_for(name).name == kind
    assert format_for(Path(name)).name == kind


def test_format_for_unknown_suffix_names_the_file():
    for name in ("scan.nii.gz", "points.txt", "mrk", "a.json.bak"):
        with pytest.raises(LandmarkFileError) as info:
            format_for(Path("some/folder") / name)
        message = str(info.value)
        assert name in message and "unsupported landmark file type" in message
        assert all(s in message for f in FORMATS for s in f.suffixes)  # says what would work
        assert info.value.path == Path("some/folder") / name and info.value.line is None


def test_file_stem_drops_the_whole_landmark_suffix():
    assert file_stem("out/001.mrk.json") == "001"
    assert file_stem("001.MRK.JSON") == "001"
    assert file_stem("001.json") == "001"
    assert file_stem("case.v2.csv") == "case.v2"
    assert file_stem("x.nii.gz") == "x.nii"  # unregistered: Path.stem


def test_register_format_rejects_clashes_and_bad_formats():
    csv_fmt = format_for("a.csv")
    assert register_format(csv_fmt) is csv_fmt  # the same object again: nothing happens
    assert sum(f is csv_fmt for f in FORMATS) == 1
    with pytest.raises(ValueError, match="named 'csv'"):
        register_format(LandmarkFormat("csv", (".csv2",), "RAS", csv_fmt.read, csv_fmt.write))
    with pytest.raises(ValueError, match=r"\.json.*'json'"):
        register_format(LandmarkFormat("other", (".json",), "RAS", csv_fmt.read, csv_fmt.write))
    with pytest.raises(ValueError, match="lowercase"):
        LandmarkFormat("upper", (".PTS",), "RAS", csv_fmt.read, csv_fmt.write)
    with pytest.raises(ValueError, match="default_frame"):
        LandmarkFormat("ijk", (".ijk",), "IJK", csv_fmt.read, csv_fmt.write)
    with pytest.raises(KeyError):
        unregister_format("no such format")


# A toy format defined only here: "# <frame>" then one "name<TAB>x<TAB>y<TAB>z" line per landmark,
# "nan" for a missing one. Registering it must be all it takes for the generic readers/writers.


def _read_pts(path: Path) -> LandmarkContents:
    lines = path.read_text(encoding="utf-8").splitlines()
    frame = lines[0].lstrip("# ").strip()
    rows = [line.split("\t") for line in lines[1:]]
    coords = np.array([[float(v) for v in row[1:]] for row in rows], dtype=np.float64).reshape(len(rows), -1)
    if frame == "LPS":
        coords = lps_to_ras(coords)
    return LandmarkContents({None: Landmarks(coords, [row[0] for row in rows])})


def _write_pts(path: Path, lm: Landmarks, frame: str, case: str | None) -> None:
    coords = ras_to_lps(lm.coords) if frame == "LPS" else lm.coords
    lines = [f"# {frame}", *("\t".join([name, *(repr(float(v)) for v in p)]) for name, p in zip(lm.names, coords))]
    atomic_write_text(path, "\n".join(lines) + "\n")


PTS = LandmarkFormat(name="pts", suffixes=(".pts",), default_frame="LPS", read=_read_pts, write=_write_pts,
                     description="toy format of the tests")


@pytest.fixture
def pts_format():
    register_format(PTS)
    try:
        yield PTS
    finally:
        unregister_format("pts")
    assert all(f is not PTS for f in FORMATS)


def test_registering_a_format_is_all_it_takes(tmp_path, pts_format):
    path = tmp_path / "Case_9.PTS"
    assert format_for(path) is pts_format
    lm = random_landmarks(3, seed=21)
    write_landmarks(path, lm)
    assert path.read_text().startswith("# LPS\n")  # the format's default frame
    assert read_landmarks(path) == lm
    assert read_landmarks(path, names=["lm1", "nope"]).missing.tolist() == [False, True]
    assert read_landmark_table(path) == {"Case_9": lm}
    assert_round_trips(pts_format, tmp_path)  # the registry round trip covers it like the built-ins
    with pytest.raises(ValueError, match=r"write pts files per case"):  # no table writer
        write_landmark_table(tmp_path / "t.pts", {"a": lm})
    with pytest.raises(LandmarkFileError, match=r"unsupported.*\.pts"):  # listed among the suffixes
        format_for(tmp_path / "x.unknown")


def test_unregistered_format_is_unsupported_again(tmp_path):
    assert all(f.name != "pts" for f in FORMATS)
    with pytest.raises(LandmarkFileError, match=r"x\.pts: unsupported"):
        write_landmarks(tmp_path / "x.pts", random_landmarks(3))


# ---------------------------------------------------------------------------- landmark_table_text


def test_landmark_table_text_is_what_write_landmark_table_writes(tmp_path):
    table = {"001": random_landmarks(3, seed=1), "002": random_landmarks(3, seed=2, missing=None)}
    conf = {"001": np.linspace(0.0, 1.0, 6)}
    for layout, confidence in (("long", conf), ("long", None), ("wide", None)):
        path = tmp_path / f"{layout}.csv"
        write_landmark_table(path, table, layout=layout, confidence=confidence)
        assert path.read_text() == landmark_table_text(table, layout=layout, confidence=confidence)
    lps = landmark_table_text(table, coordinate_system="LPS")
    rows = list(csv.DictReader(lps.splitlines()))
    assert {r["frame"] for r in rows} == {"LPS"}
    assert float(rows[0]["x_mm"]) == -table["001"].coords[0, 0]  # x negated in LPS
    (tmp_path / "lps.csv").write_text(lps)
    assert read_landmark_table(tmp_path / "lps.csv") == table
    # the old form (frame in a first comment line, no frame column) still reads
    buf = io.StringIO()
    buf.write(csv_frame_comment("LPS") + "\n")
    csv.writer(buf, lineterminator="\n").writerows(r[:3] + r[4:] for r in csv.reader(lps.splitlines()))
    old = buf.getvalue()
    assert old.splitlines()[1] == "case,landmark,name,x_mm,y_mm,z_mm"
    (tmp_path / "old.csv").write_text(old)
    assert read_landmark_table(tmp_path / "old.csv") == table


def test_landmark_table_text_of_an_empty_table():
    text = landmark_table_text({}, names=["a", "b"], spatial_dims=2, confidence={})
    assert text.splitlines() == ["case,landmark,name,frame,x_mm,y_mm,confidence"]
    assert landmark_table_text({}, names=["a", "b"], spatial_dims=3, layout="wide").splitlines() == \
        ["case,frame,a_x_mm,a_y_mm,a_z_mm,b_x_mm,b_y_mm,b_z_mm"]
    lm = random_landmarks(2)
    with pytest.raises(ValueError, match="spatial_dims"):
        landmark_table_text({"a": lm}, spatial_dims=3)
    with pytest.raises(ValueError, match="names"):
        landmark_table_text({"a": lm}, names=[])
    with pytest.raises(ValueError, match="confidence"):
        landmark_table_text({"a": lm}, layout="wide", confidence={})
    with pytest.raises(ValueError, match="layout"):
        landmark_table_text({"a": lm}, layout="diagonal")


# ---------------------------------------------------------------------------- the package's imports


def test_landmarks_package_imports_only_core_and_itself_at_module_top():
    package = Path(landmarks_package.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "model.py", "registry.py", "files.py"}
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            assert id(node) in top, f"{path.name}:{node.lineno}: import inside a function or block"
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}:{node.lineno}: relative import"
                names = [node.module or ""]
            else:
                names = [a.name for a in node.names]
            for name in names:
                if name == "heatmark" or name.startswith("heatmark."):
                    assert name.startswith(("heatmark.core.", "heatmark.landmarks.")) or name in (
                        "heatmark.core", "heatmark.landmarks"), f"{path.name}:{node.lineno}: imports {name}"
