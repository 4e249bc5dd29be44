"""The outputs people open: overlays on the original image in mm, confidence in Slicer markups,
and ``landmarks.csv`` as a plain CSV (issue 13, item 8).

Overlay tests are known-answer tests: an image holds one bright voxel, a landmark is put at that
voxel's world position through the image's (flipped, permuted or oblique) affine, and the pixel of
the rendered figure under the drawn marker must be the bright voxel (with markers and labels hidden).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text
from monai.data import list_data_collate
from monai.transforms import Spacingd
from PIL import Image

from heatmark.evaluation import reports
from heatmark.evaluation.reports import LABEL_GID, PRED_GID, TRUTH_GID, overlay_figure
from heatmark.landmarks import (
    CONFIDENCE_DESCRIPTION,
    Landmarks,
    LandmarkFileError,
    csv_frame_comment,
    landmark_table_text,
    read_confidence,
    read_landmark_table,
    read_landmarks,
    write_landmark_table,
    write_landmarks,
)
from heatmark.predict import export
from heatmark.predict.options import PredictOptions
from heatmark.transforms.io import LoadLandmarkImaged

# ---------------------------------------------------------------------------- overlays


def rotation_2d(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def affine_2d(linear: np.ndarray, origin: tuple[float, float]) -> np.ndarray:
    a = np.eye(3)
    a[:2, :2], a[:2, 2] = linear, origin
    return a


def affine_3d(linear: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = linear, origin
    return a


AFFINES_2D = {
    "flipped": affine_2d(np.diag([-0.5, 0.8]), (10.0, -3.0)),
    "swapped axes": affine_2d(np.array([[0.0, 0.7], [-0.4, 0.0]]), (2.0, 30.0)),
    "oblique": affine_2d(rotation_2d(30.0) @ np.diag([0.5, 0.8]), (4.0, -6.0)),
}
AFFINES_3D = {
    "permuted and flipped": affine_3d(np.array([[0.0, 0.0, -2.0], [1.5, 0.0, 0.0], [0.0, -1.0, 0.0]]), (5, -7, 3)),
    "oblique": affine_3d(np.array([[0.9, -0.3, 0.0], [0.3, 0.9, 0.0], [0.0, 0.0, 1.2]]), (-10, 4, 2)),
}


def to_world(affine: np.ndarray, voxel: tuple[int, ...]) -> np.ndarray:
    return (affine @ np.array([*voxel, 1.0]))[:-1]


def marker_pixels(fig, gid: str = PRED_GID) -> list[tuple[object, np.ndarray]]:
    """``(axes, (K, 2) figure pixels with y from the top)`` of each axes' markers ``gid``."""
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    out = []
    for ax in fig.axes:
        for coll in ax.collections:
            if coll.get_gid() == gid and len(coll.get_offsets()):
                px = ax.transData.transform(np.asarray(coll.get_offsets()))
                out.append((ax, np.column_stack([px[:, 0], height - px[:, 1]])))
    return out


def image_only_pixels(fig) -> np.ndarray:
    """The figure rendered with markers, lines, labels and legends hidden: ``(H, W)`` grey 0..255."""
    for ax in fig.axes:
        for artist in [*ax.collections, *ax.lines, *ax.texts]:
            artist.set_visible(False)
        if ax.get_legend() is not None:
            ax.get_legend().set_visible(False)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].mean(axis=-1)


def value_at(pixels: np.ndarray, xy: np.ndarray) -> float:
    return float(pixels[int(round(xy[1])), int(round(xy[0]))])


@pytest.mark.parametrize("name", sorted(AFFINES_2D))
def test_2d_marker_sits_on_the_voxel_of_its_world_point(name):
    affine = AFFINES_2D[name]
    img = np.zeros((60, 40), np.float32)
    dot, off = (41, 12), (8, 30)
    img[dot] = 1000.0
    world = np.stack([to_world(affine, dot), to_world(affine, off)])  # the second one lies on black
    fig = overlay_figure(img, affine, world, names=["on", "off"])
    ((ax, px),) = marker_pixels(fig)
    if name != "oblique":  # axis-aligned: the plot axes are world coordinates in mm
        shown = np.argmax(np.abs(affine[:2, :2]), axis=0)  # world axis along array axis 0 and 1
        np.testing.assert_allclose(np.asarray(ax.collections[-1].get_offsets()), world[:, shown], atol=1e-9)
        first, last = to_world(affine, (-0.5, -0.5)), to_world(affine, (59.5, 39.5))  # outer voxel corners
        # the picture as stored: first column at the left, first row at the top
        assert ax.get_xlim() == pytest.approx((first[shown[0]], last[shown[0]]))
        assert ax.get_ylim() == pytest.approx((last[shown[1]], first[shown[1]]))
    else:  # oblique: mm from the first voxel along the image axes
        np.testing.assert_allclose(np.asarray(ax.collections[-1].get_offsets()),
                                   np.array([dot, off]) * np.array([0.5, 0.8]), atol=1e-9)
    pixels = image_only_pixels(fig)
    assert value_at(pixels, px[0]) > 200, "the marker is not on the bright voxel"
    assert value_at(pixels, px[1]) < 50, "the control marker is not on black"


def test_2d_picture_in_a_patient_frame_is_not_turned_over():
    """A radiograph stored as NIfTI (RAS, y growing down the rows) shows as stored by default, and
    with world axes growing upwards on request: the same marker stays on the same voxel."""
    affine = affine_2d(np.diag([0.4, 0.4]), (0.15, 0.15))
    img = np.zeros((50, 30), np.float32)
    img[40, 5] = 1000.0
    world = to_world(affine, (40, 5))[None]
    for as_stored, row0_at_top in ((None, True), (False, False)):
        fig = overlay_figure(img, affine, world, as_stored=as_stored)
        ((ax, px),) = marker_pixels(fig)
        assert (ax.get_ylim()[0] > ax.get_ylim()[1]) == row0_at_top
        assert value_at(image_only_pixels(fig), px[0]) > 200
        assert (px[0][1] < fig.canvas.get_width_height()[1] / 2) == row0_at_top  # row 5 of 30: near the top


@pytest.mark.parametrize("name", sorted(AFFINES_3D))
@pytest.mark.parametrize("view", ["slices", "mip"])
def test_3d_markers_sit_on_the_voxel_in_every_view(name, view):
    affine = AFFINES_3D[name]
    vol = np.zeros((24, 30, 20), np.float32)
    dot = (7, 19, 13)
    vol[dot] = 1000.0
    # slices go through the centroid of the landmarks: with one landmark, through the dot
    fig = overlay_figure(vol, affine, to_world(affine, dot)[None], names=["AC"], view=view)
    found = marker_pixels(fig)
    assert len(found) == 3, "one marker per view"
    pixels = image_only_pixels(fig)
    for ax, px in found:
        assert value_at(pixels, px[0]) > 200, f"view {ax.get_title()!r}: the marker is not on the bright voxel"
    if name == "permuted and flipped":  # views are world planes, axes increasing: R right, A/S up
        axial = found[0][0]
        assert (axial.get_xlabel(), axial.get_ylabel()) == ("x: R (mm)", "y: A (mm)")
        assert axial.get_xlim()[0] < axial.get_xlim()[1] and axial.get_ylim()[0] < axial.get_ylim()[1]
        np.testing.assert_allclose(axial.collections[-1].get_offsets()[0], to_world(affine, dot)[:2])


def test_3d_slices_fade_points_off_the_slice_and_truth_is_drawn():
    affine = AFFINES_3D["permuted and flipped"]
    vol = np.random.default_rng(0).normal(size=(24, 30, 20)).astype(np.float32)
    # voxel axis 1 is world z (1 mm): the axial slice is at index 14, the last point 11 mm away
    pred = np.stack([to_world(affine, v) for v in [(5, 10, 5), (6, 10, 6), (7, 10, 7), (5, 25, 5)]])
    fig = overlay_figure(vol, affine, pred, truth_world=pred + 1.0, names=list("abcd"), near_mm=5.0)
    by_gid = {c.get_gid(): len(c.get_offsets()) for c in fig.axes[0].collections}
    assert by_gid == {PRED_GID: 3, PRED_GID + "_far": 1, TRUTH_GID: 4}
    assert fig.axes[0].get_title() == "slice z: S = -11.0 mm"  # 3 - 1.0 * 14


def label_boxes(fig) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(ax, Text.get_window_extent(t, renderer)) for ax in fig.axes for t in ax.texts
            if t.get_gid() == LABEL_GID and t.get_visible()]


def test_labels_do_not_overlap_and_crowded_ones_are_left_out():
    img = np.random.default_rng(1).normal(size=(200, 150)).astype(np.float32)
    affine = affine_2d(np.diag([0.5, 0.5]), (0.0, 0.0))
    rng = np.random.default_rng(2)
    crowd = 40.0 + rng.uniform(0, 3.0, size=(30, 2))  # 30 landmarks within 3 mm
    names = [f"landmark-{i:02d}" for i in range(30)]
    fig = overlay_figure(img, affine, crowd, names=names)
    boxes = label_boxes(fig)
    assert fig.overlay_info["placed"] == len(boxes) and fig.overlay_info["placed"] + fig.overlay_info["skipped"] == 30
    assert 0 < fig.overlay_info["skipped"] < 30, "a crowd gets some labels, not all"
    for i, (_, a) in enumerate(boxes):
        for _, b in boxes[i + 1:]:
            assert not a.overlaps(b), "two labels overlap"
    spread = np.column_stack([np.linspace(5, 90, 6), np.linspace(5, 70, 6)])
    fig = overlay_figure(img, affine, spread, names=names[:6])
    assert fig.overlay_info == {"placed": 6, "skipped": 0, "view": "slices"}


def test_plot_overlay_writes_a_png_and_checks_its_arguments(tmp_path):
    img = np.zeros((20, 20), np.float32)
    img[5, 5] = 1.0
    path = reports.plot_overlay(img, np.eye(3), np.array([[5.0, 5.0]]), tmp_path / "o.png", names=["a"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="view"):
        overlay_figure(img, np.eye(3), np.array([[5.0, 5.0]]), view="sideways")
    with pytest.raises(ValueError, match="names"):
        overlay_figure(img, np.eye(3), np.array([[5.0, 5.0]]), names=["a", "b"])


# ---------------------------------------------------------------------------- predict: overlay on the original


def test_predict_overlay_is_drawn_on_the_original_image(tmp_path, monkeypatch):
    """write_case reads the input again with the bundle's loader: the overlay gets the file's own
    grid and affine, not the network's resampled one; the markups carry the confidence."""
    data = np.zeros((50, 30, 12), np.float32)
    data[10:20, 5:25, 3:9] = 100.0
    affine = affine_3d(np.diag([-1.2, 0.9, 2.5]), (30.0, -10.0, 5.0))
    src = tmp_path / "case1.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(src))
    loader = LoadLandmarkImaged(keys="image", spatial_dims=3)
    bundle = SimpleNamespace(names=["a", "b"], preprocessing=SimpleNamespace(transforms=[loader]), image_key="image",
                             spatial_dims=3, measurements=[], output_stride=(1, 1, 1))
    grid = np.eye(4) * 4.0
    grid[3, 3] = 1.0
    result = {"world": np.array([[10.0, 0.0, 12.0], [np.nan] * 3]), "confidence": np.array([0.75, 0.125]),
              "image": np.zeros((1, 8, 8, 8), np.float32), "affine": grid, "warnings": []}
    seen = {}

    def spy(image, aff, pred, path, **kwargs):
        seen.update(shape=tuple(image.shape), affine=np.asarray(aff), pred=np.asarray(pred))
        Path(path).write_bytes(b"png")
        return Path(path)

    monkeypatch.setattr(export, "plot_overlay", spy)
    opts = PredictOptions(bundle=tmp_path, input=src, output=tmp_path / "out", formats=("csv", "mrk.json"),
                          overlays=True)
    (tmp_path / "out").mkdir()
    payload = export.write_case(tmp_path / "out", "case1", result, bundle, opts, source=src)
    assert seen["shape"] == (1, 50, 30, 12)
    np.testing.assert_allclose(seen["affine"], affine, atol=1e-5)
    np.testing.assert_array_equal(seen["pred"][0], [10.0, 0.0, 12.0])
    assert payload["confidence"] == [0.75, 0.125]
    mrk = tmp_path / "out" / "case1.mrk.json"
    points = json.loads(mrk.read_text())["markups"][0]["controlPoints"]
    assert [p["description"] for p in points] == ["confidence=0.75", "confidence=0.125"]
    np.testing.assert_array_equal(read_confidence(mrk), [0.75, 0.125])
    # without a readable source the network's grid is used (still world mm)
    image, aff = export.overlay_image(bundle, tmp_path / "gone.nii.gz", result)
    assert tuple(image.shape) == (1, 8, 8, 8) and np.array_equal(aff, grid)


# ---------------------------------------------------------------------------- Slicer confidence


@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv"])
def test_slicer_files_carry_confidence(tmp_path, suffix):
    lm = Landmarks(np.array([[1.0, 2.0, 3.0], [np.nan] * 3, [4.0, 5.0, 6.0]]), ["1", "2", "3"])
    conf = np.array([0.9, 0.05, 1 / 3])
    path = tmp_path / f"case{suffix}"
    write_landmarks(path, lm, confidence=conf)
    np.testing.assert_array_equal(read_confidence(path), conf)  # full precision
    assert read_landmarks(path) == lm  # numeric labels stay the names (the descriptions are no names)
    if suffix == ".mrk.json":
        cps = json.loads(path.read_text())["markups"][0]["controlPoints"]
        assert cps[2]["description"] == CONFIDENCE_DESCRIPTION.format(value=repr(1 / 3))
    write_landmarks(path, lm)  # no confidence: empty descriptions, and reading it says so
    with pytest.raises(LandmarkFileError, match="no confidence"):
        read_confidence(path)
    with pytest.raises(ValueError, match="3 values"):
        write_landmarks(path, lm, confidence=[0.5])


def test_formats_without_confidence_refuse_it(tmp_path):
    lm = Landmarks(np.array([[1.0, 2.0]]), ["a"])
    with pytest.raises(ValueError, match="store no confidence"):
        write_landmarks(tmp_path / "a.json", lm, confidence=[0.5])
    write_landmarks(tmp_path / "a.csv", lm, confidence=[0.5], case="c1")
    np.testing.assert_array_equal(read_confidence(tmp_path / "a.csv"), [0.5])


# ---------------------------------------------------------------------------- landmarks.csv with pandas


def table_2d() -> dict[str, Landmarks]:
    return {"c1": Landmarks(np.array([[1.5, -2.25], [np.nan, np.nan]]), ["Sella", "Nasion, soft"]),
            "c2": Landmarks(np.array([[3.0, 4.0], [5.0, 6.0]]), ["Sella", "Nasion, soft"])}


def test_landmarks_csv_reads_with_pandas_without_options(tmp_path):
    path = tmp_path / "landmarks.csv"
    table = table_2d()
    write_landmark_table(path, table, confidence={"c1": [0.5, 0.0], "c2": [0.25, 1.0]})
    df = pd.read_csv(path)
    assert list(df.columns) == ["case", "landmark", "name", "frame", "x_mm", "y_mm", "confidence"]
    assert df["frame"].tolist() == ["RAS"] * 4
    assert df["name"].tolist() == ["Sella", "Nasion, soft"] * 2
    assert df.loc[0, ["x_mm", "y_mm"]].tolist() == [1.5, -2.25]
    assert np.isnan(df.loc[1, "x_mm"])  # missing landmark: empty cells -> NaN
    assert df["confidence"].tolist() == [0.5, 0.0, 0.25, 1.0]
    wide = tmp_path / "wide.csv"
    write_landmark_table(wide, table, layout="wide", coordinate_system="LPS")
    dw = pd.read_csv(wide)
    assert dw["frame"].tolist() == ["LPS", "LPS"] and dw.loc[1, "Sella_x_mm"] == -3.0
    assert read_landmark_table(wide) == table


def test_landmarks_csv_old_form_and_mixed_frames_still_read(tmp_path):
    table = table_2d()
    old = tmp_path / "old.csv"  # heatmark 0.1: a comment line states the frame, no frame column
    old.write_text(csv_frame_comment("LPS") + "\n" + "case,landmark,name,x_mm,y_mm\n"
                   "c1,1,Sella,-1.5,2.25\nc1,2,\"Nasion, soft\",,\nc2,1,Sella,-3,-4\nc2,2,\"Nasion, soft\",-5,-6\n")
    assert read_landmark_table(old) == table
    mixed = tmp_path / "mixed.csv"  # per-row frames
    mixed.write_text("case,landmark,name,frame,x_mm,y_mm\nc1,1,Sella,LPS,-1.5,2.25\nc1,2,\"Nasion, soft\",RAS,,\n"
                     "c2,1,Sella,RAS,3,4\nc2,2,\"Nasion, soft\",lps,-5,-6\n")
    assert read_landmark_table(mixed) == table
    bad = tmp_path / "bad.csv"
    bad.write_text("case,landmark,name,frame,x_mm,y_mm\nc1,1,Sella,RAS,1,2\nc1,2,Nasion,IJK,3,4\n")
    with pytest.raises(LandmarkFileError, match=r"bad\.csv, line 3: unknown coordinate system 'IJK'"):
        read_landmark_table(bad)


def test_predict_table_text_is_a_plain_csv():
    text = landmark_table_text(table_2d(), confidence={"c1": [0.5, 0.25]}, names=["Sella", "Nasion, soft"],
                               spatial_dims=2)
    assert not any(line.startswith("#") for line in text.splitlines())
    assert text.splitlines()[0] == "case,landmark,name,frame,x_mm,y_mm,confidence"


def test_validation_overlays_read_the_original_again(tmp_path):
    """EvaluationWriter keeps where each image came from (image_source) and draws on the original
    (original_or): a PNG with a user spacing, resampled for the network, comes back at full size."""
    path = tmp_path / "xray.png"
    Image.fromarray((np.arange(40 * 64).reshape(40, 64) % 251).astype(np.uint8)).save(path)  # 64 wide, 40 high
    load = LoadLandmarkImaged(keys="image", spatial_dims=2, spacing=(0.25, 0.5))
    item = Spacingd(keys="image", pixdim=(1.0, 1.0))(load({"image": str(path)}))
    batch = list_data_collate([item])["image"]
    grid_shape = tuple(batch.shape[2:])
    assert grid_shape[0] < 20 and grid_shape[1] <= 20  # the network's 1 mm grid (about 16 x 20)
    source = reports.image_source(batch[0])
    assert source == {"source": str(path), "spatial_dims": 2, "spacing": [0.25, 0.5], "allow_pixel_units": False}
    image, affine = reports.original_or(source, batch[0, 0].numpy(), batch.affine[0])
    assert tuple(image.shape) == (1, 64, 40)
    np.testing.assert_allclose(np.asarray(affine)[:2, :2], np.diag([0.25, 0.5]))
    grid, grid_affine = reports.original_or(None, batch[0, 0].numpy(), batch.affine[0])
    assert grid.shape == grid_shape
    gone = dict(source, source=str(tmp_path / "moved.png"))
    assert reports.original_or(gone, grid, grid_affine)[0] is grid
