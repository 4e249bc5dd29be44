"""One matrix of bad inputs and the exact error a user sees for each.

Every case builds its bad input in ``tmp_path`` and checks the exception type and a part of the
message that names the file and the problem. Images go through :class:`LoadLandmarkImage` (and
once, all together, through ``heatmark predict`` next to a good image: the good case is written,
every bad one is listed in ``errors.csv`` with its reason); landmark files through
:func:`read_landmarks` and ``heatmark evaluate``; datalists through :func:`check_datalist`.

Permissions: the tests usually run as root, for whom ``chmod 000`` changes nothing. There the
unreadable file is *simulated*: ``os.access`` is monkeypatched to deny reading that one path (the
loader and ``check_datalist`` both ask ``os.access`` before opening). As a normal user the real
``chmod 000`` is what is tested.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import struct
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import heatmark.evaluation.evaluate as evaluate_module
from heatmark import predict as P
from heatmark.cli import main as cli_main
from heatmark.data import DataCheckError, check_datalist, check_landmarks_in_image
from heatmark.evaluation import DecodeLandmarksd
from heatmark.landmarks import LandmarkFileError, read_landmarks
from heatmark.transforms.io import ImageLoadError, LoadLandmarkImage

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------ builders


def nifti(path: Path, arr: np.ndarray, affine=None, pixdim=None) -> Path:
    """A NIfTI whose sform is ``affine`` exactly as given (no nibabel repairs); with ``affine``
    None, no sform/qform at all and the spacing only in ``pixdim``."""
    arr = np.asarray(arr)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(arr.shape)
    hdr.set_data_dtype(arr.dtype)
    nd = min(arr.ndim, 3)
    if affine is not None:
        a = np.eye(4)
        a[:nd, :nd] = np.asarray(affine)[:nd, :nd]
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = a[0], a[1], a[2]
        hdr["sform_code"], hdr["qform_code"] = 2, 0
        hdr["pixdim"][1:4] = [n if n > 0 else 1.0 for n in np.linalg.norm(a[:3, :3], axis=0)]
    else:
        hdr["sform_code"], hdr["qform_code"] = 0, 0
        hdr["pixdim"][1 : 1 + len(pixdim)] = pixdim
    # write header + data by hand: nibabel would 'fix' negative or zero pixdim on save
    raw = bytearray(hdr.binaryblock)
    struct.pack_into("<f", raw, 108, 352.0)  # vox_offset
    blob = bytes(raw) + b"\0" * 4 + np.asarray(arr, order="F").tobytes(order="F")
    if path.name.endswith(".gz"):
        import gzip

        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def blobs(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    out = sum(np.exp(-((grid - rng.uniform(-0.6, 0.6, (len(shape),) + (1,) * len(shape))) ** 2).sum(0) / 0.05)
              for _ in range(4))
    return (1000 * out + rng.normal(0, 10, shape)).astype(np.float32)


def mk_zero_byte(d, dims):
    p = d / "empty.nii.gz"
    p.write_bytes(b"")
    return p


def mk_truncated(d, dims):
    full = nib.Nifti1Image(np.random.default_rng(0).normal(size=(64,) * dims).astype(np.float32), np.eye(4))
    nib.save(full, str(d / "full.nii.gz"))
    blob = (d / "full.nii.gz").read_bytes()
    (d / "full.nii.gz").unlink()
    p = d / "truncated.nii.gz"
    p.write_bytes(blob[: len(blob) // 2])
    return p


def mk_text(d, dims):
    p = d / "text.nii.gz"
    p.write_text("this is not an image\n")
    return p


def mk_4d(d, dims):
    return nifti(d / "four_d.nii.gz", blobs((8, 8, 8, 3)), np.eye(4))


def mk_wrong_dims(d, dims):  # a 2D image for a 3D loader, a 3D volume for a 2D one
    return nifti(d / "wrong_dims.nii.gz", blobs((20, 20) if dims == 3 else (20, 20, 20)), np.eye(4))


def _with(value):
    def make(d, dims):
        a = blobs((24,) * dims)
        a[(3,) * dims] = value
        return nifti(d / f"{'nan' if np.isnan(value) else 'inf'}.nii.gz", a, np.eye(4))
    return make


def mk_constant(d, dims):
    return nifti(d / "constant.nii.gz", np.full((24,) * dims, 7, np.float32), np.eye(4))


def mk_zero_spacing(d, dims):  # sform with a zero column
    return nifti(d / "zero_spacing.nii.gz", blobs((24,) * dims), np.diag([1.0, 0.0, 1.0, 1.0]))


def mk_zero_pixdim(d, dims):  # no sform/qform, pixdim 0 (nibabel would silently use 1 mm)
    return nifti(d / "zero_pixdim.nii.gz", blobs((24,) * dims), None, [1.0, 0.0, 1.0][:dims])


def mk_negative_spacing(d, dims):  # no sform/qform, negative pixdim (nibabel would silently use abs())
    return nifti(d / "negative_spacing.nii.gz", blobs((24,) * dims), None, [1.0, -2.0, 1.0][:dims])


def mk_negative_spacing_mha(d, dims):
    p = d / "negative_spacing.mha"
    shape = (12,) * dims
    head = (f"ObjectType = Image\nNDims = {dims}\nDimSize = {' '.join(map(str, shape))}\n"
            f"ElementSpacing = {' '.join(['1', '-1', '1'][:dims])}\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    p.write_bytes(head.encode() + blobs(shape).tobytes())
    return p


def mk_singular(d, dims):  # rank-deficient sform: axis 1 parallel to axis 0
    a = np.eye(4)
    a[:3, 1] = a[:3, 0]
    return nifti(d / "singular.nii.gz", blobs((24,) * dims), a)


def mk_huge(d, dims):  # NIfTI-2 header declaring 100000^3 voxels, in a 600-byte file
    hdr = nib.Nifti2Header()
    hdr.set_data_dtype(np.float32)
    hdr["dim"][:4] = [3, 100000, 100000, 100000]
    hdr["pixdim"][1:4] = 1.0
    hdr["vox_offset"] = 544
    p = d / "huge.nii"
    p.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    return p


def mk_png(d, dims):
    from PIL import Image

    p = d / "photo.png"
    Image.fromarray(np.clip(blobs((60, 80)) / 5, 0, 255).astype(np.uint8)).save(p)
    return p


def mk_dicom_zero_spacing(d, dims):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", 60, 80
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0, 0]
    ds.PixelData = np.clip(blobs((60, 80)), 0, 4000).astype(np.uint16).tobytes()
    p = d / "zero_pixel_spacing.dcm"
    ds.save_as(str(p), enforce_file_format=True)
    return p


def mk_unreadable(d, dims):
    p = nifti(d / "unreadable.nii.gz", blobs((24,) * dims), np.eye(4))
    p.chmod(0)
    return p


def mk_symlink_loop(d, dims):
    a, b = d / "loop_a.nii.gz", d / "loop_b.nii.gz"
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    return a


def deny_read(monkeypatch, *paths: Path) -> None:
    """As root ``chmod 000`` is not enforced: make ``os.access`` deny reading these paths."""
    if not IS_ROOT:
        return
    denied = {os.path.abspath(p) for p in paths}
    real = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(os.fspath(path)) in denied and mode & os.R_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


# kind -> (builder, spatial_dims the loader is asked for, substring of the message)
IMAGE_CASES = {
    "zero_byte": (mk_zero_byte, 3, "the file is empty (0 bytes)"),
    "truncated_nii_gz": (mk_truncated, 3, "cannot read it: truncated, damaged or not a NIfTI file (EOFError"),
    "text_named_nii_gz": (mk_text, 3, "not a NIfTI file (ImageFileError"),
    "4d_for_3d": (mk_4d, 3, "it is a 4D image of shape (8, 8, 8, 3); a single 2D image or 3D volume is expected"),
    "2d_for_3d": (mk_wrong_dims, 3, "a 3D volume is expected but this is a 2D image of shape (20, 20)"),
    "nan_voxels": (_with(np.nan), 3, "it contains non-finite voxel values (1 NaN, 0 infinite)"),
    "inf_voxels": (_with(np.inf), 3, "it contains non-finite voxel values (0 NaN, 1 infinite)"),
    "constant": (mk_constant, 3, "all voxels have the same value (7)"),
    "zero_spacing_sform": (mk_zero_spacing, 3, "its voxel spacing is zero along an axis (spacing (1, 0, 1))"),
    "zero_spacing_pixdim": (mk_zero_pixdim, 3, "invalid voxel spacing (pixdim) (1, 0, 1); spacing must be positive"),
    "negative_spacing_pixdim": (mk_negative_spacing, 3,
                                "invalid voxel spacing (pixdim) (1, -2, 1); spacing must be positive"),
    "negative_spacing_mha": (mk_negative_spacing_mha, 3, "the header declares an invalid voxel spacing (1, -1, 1)"),
    "singular_affine": (mk_singular, 3, "its orientation matrix is singular (axes are parallel)"),
    "enormous_dims": (mk_huge, 3, "the header declares an image of size (100000, 100000, 100000)"),
    "png_without_spacing": (mk_png, 2, "the image has no pixel spacing (no spacing in the file); give its spacing"),
    "dicom_zero_pixel_spacing": (mk_dicom_zero_spacing, 2, "the DICOM tag PixelSpacing is 0\\0, which means unknown"),
    "unreadable": (mk_unreadable, 3, "the file is not readable (permission denied)"),
    "symlink_loop": (mk_symlink_loop, 3, "it is a symbolic link loop"),
}


@pytest.mark.parametrize("kind", list(IMAGE_CASES))
def test_bad_image_is_refused_with_a_clear_message(kind, tmp_path, monkeypatch):
    make, dims, expected = IMAGE_CASES[kind]
    path = make(tmp_path, dims)
    if kind == "unreadable":
        deny_read(monkeypatch, path)
    start = time.perf_counter()
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spatial_dims=dims)(path)
    assert time.perf_counter() - start < 5, "refused quickly (header checks, no hang)"
    assert e.value.path == str(path)
    assert str(e.value).startswith(f"cannot load image '{path}': ")
    assert expected in str(e.value), str(e.value)
    assert expected in e.value.problem


def test_enormous_header_refused_without_allocating(tmp_path, monkeypatch):
    """The 100000^3 header is refused from the header alone: reading the voxels is never tried."""
    path = mk_huge(tmp_path, 3)
    assert path.stat().st_size < 1000

    def no_read(*args, **kwargs):
        raise AssertionError("voxels were read")

    monkeypatch.setattr("heatmark.transforms.io.NibabelReader.get_data", no_read)
    with pytest.raises(ImageLoadError, match="size.*more than the limit"):
        LoadLandmarkImage()(path)


def test_constant_image_accepted_on_request(tmp_path):
    img = LoadLandmarkImage(allow_constant=True)(mk_constant(tmp_path, 3))
    assert float(img.min()) == float(img.max()) == 7


def test_png_with_spacing_and_dicom_with_user_spacing_load(tmp_path):
    """The two 'no spacing' cases are fixed by giving the spacing (--spacing)."""
    for make in (mk_png, mk_dicom_zero_spacing):
        img = LoadLandmarkImage(spatial_dims=2, spacing=0.1)(make(tmp_path, 2))
        np.testing.assert_allclose(img.meta["spacing"], [0.1, 0.1])


# ------------------------------------------------------------------------------------ heatmark predict

# bad inputs in ONE folder for one predict run of the tiny 2D ISBI bundle:
# case name -> (builder, substring of its errors.csv reason)
BATCH_CASES = {
    "empty": (mk_zero_byte, "the file is empty (0 bytes)"),
    "truncated": (mk_truncated, "truncated, damaged or not a NIfTI file"),
    "text": (mk_text, "not a NIfTI file"),
    "four_d": (mk_4d, "it is a 4D image"),
    "wrong_dims": (mk_wrong_dims, "a 2D image is expected but this is a 3D volume of shape (20, 20, 20)"),
    "nan": (_with(np.nan), "1 NaN, 0 infinite"),
    "inf": (_with(np.inf), "0 NaN, 1 infinite"),
    "constant": (mk_constant, "all voxels have the same value (7)"),
    "zero_spacing": (mk_zero_spacing, "voxel spacing is zero along an axis"),
    "negative_spacing": (mk_negative_spacing, "invalid voxel spacing (pixdim) (1, -2)"),
    "singular": (mk_singular, "orientation matrix is singular"),
    "huge": (mk_huge, "the header declares an image of size (100000, 100000, 100000)"),
    "photo": (mk_png, "the image has no pixel spacing"),
    "zero_pixel_spacing": (mk_dicom_zero_spacing, "PixelSpacing is 0\\0"),
    "unreadable": (mk_unreadable, "the file is not readable (permission denied)"),
    "loop_a": (mk_symlink_loop, "symbolic link loop"),
    "loop_b": (None, "symbolic link loop"),  # made with loop_a
}


def read_csv(path: Path) -> list[dict]:
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from test_predict import TINY_SCN, make_bundle

    return make_bundle(tmp_path_factory.mktemp("bad_inputs") / "bundle", TINY_SCN)


def test_predict_lists_every_bad_input_and_writes_the_good_one(tiny_bundle, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nifti(inputs / "good.nii.gz", blobs((80, 100), 1), np.diag([2.4, 2.4, 1.0, 1.0]))
    unreadable = None
    for case, (make, _) in BATCH_CASES.items():
        if make is not None:
            p = make(inputs, 2)
            if case == "unreadable":
                unreadable = p
    deny_read(monkeypatch, unreadable)
    out = tmp_path / "out"
    code = P.main([str(tiny_bundle), str(inputs), str(out), "--config", "tiny.yaml", "--batch-size", "4",
                   "--num-workers", "0", "--quiet"])
    assert code == 1, capsys.readouterr()
    assert list(read_csv(out / "landmarks.csv")[0].values())[0] == "good"
    assert {r["case"] for r in read_csv(out / "landmarks.csv")} == {"good"}
    assert (out / "good.mrk.json").is_file()
    rows = {r["case"]: r for r in read_csv(out / "errors.csv")}
    assert sorted(rows) == sorted(BATCH_CASES)
    for case, (_, expected) in BATCH_CASES.items():
        assert expected in rows[case]["error"], f"{case}: {rows[case]['error']!r}"
        assert Path(rows[case]["path"]).name.startswith(case)
        assert "\n" not in rows[case]["error"]


def test_predict_on_a_folder_without_images_is_a_usage_error(tiny_bundle, tmp_path, capsys):
    inputs = tmp_path / "no_images"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("no image here\n")
    code = P.main([str(tiny_bundle), str(inputs), str(tmp_path / "out"), "--config", "tiny.yaml", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"no inputs found in {inputs}" in err and len(err.strip().splitlines()) == 1


def test_predict_input_that_is_a_symlink_loop_is_a_usage_error(tiny_bundle, tmp_path, capsys):
    link = mk_symlink_loop(tmp_path, 2)
    code = P.main([str(tiny_bundle), str(link), str(tmp_path / "out"), "--config", "tiny.yaml", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{link}" in err and "symbolic link loop" in err


# ------------------------------------------------------------------------------------ landmark files

LONG_HEADER = "case,landmark,name,x_mm,y_mm"
FCSV_HEAD = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = {cs}\n"
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
MRK_JSON = ('{{"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/'
            'Schema/markups-schema-v1.0.3.json#", "markups": [{{"type": "Fiducial", "coordinateSystem": "{cs}", '
            '"controlPoints": [{{"label": "A", "position": [1, 2, 3]}}]}}]}}')

# kind -> (file name, content, read_landmarks kwargs, expected substring after "<file>")
LANDMARK_CASES = {
    "missing_columns": ("lm.csv", "case,landmark,name,x_mm\nc1,1,Sella,1\n", {},
                        ", line 1: missing required column(s): y_mm"),
    "non_numeric": ("lm.csv", f"{LONG_HEADER}\nc1,1,Sella,1,abc\n", {}, ", line 2: y_mm is not a number: 'abc'"),
    "duplicate_id": ("lm.csv", f"{LONG_HEADER}\nc1,1,Sella,1,2\nc1,1,Sella,3,4\n", {},
                     ", line 3: duplicate landmark id 1 in case 'c1' (first on line 2)"),
    "3d_for_2d": ("lm.csv", f"{LONG_HEADER},z_mm\nc1,1,Sella,1,2,3\n", {"spatial_dims": 2},
                  ": wrong dimensionality: the file holds 3D landmarks, expected 2D"),
    "fcsv_unknown_frame": ("lm.fcsv", FCSV_HEAD.format(cs="XYZ") + "vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,A,,\n",
                           {}, ", line 2: unknown coordinate system 'XYZ' (expected RAS or LPS)"),
    "mrk_json_unknown_frame": ("lm.mrk.json", MRK_JSON.format(cs="IJK"), {},
                               ": unknown coordinate system 'IJK' (expected RAS or LPS)"),
}


@pytest.mark.parametrize("kind", list(LANDMARK_CASES))
def test_bad_landmark_file_is_refused_with_file_line_and_problem(kind, tmp_path):
    name, content, kwargs, expected = LANDMARK_CASES[kind]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LandmarkFileError) as e:
        read_landmarks(path, **kwargs)
    assert str(e.value) == f"{path}{expected}"
    assert e.value.path is not None and Path(e.value.path) == path


GOOD_TRUTH = f"{LONG_HEADER}\nc1,1,Sella,1,2\nc1,2,Nasion,3,4\n"


@pytest.mark.parametrize("which", ["pred", "truth"])
@pytest.mark.parametrize("kind", ["missing_columns", "non_numeric", "duplicate_id", "missing_file"])
def test_evaluate_with_a_malformed_file_exits_1_naming_it(kind, which, tmp_path, capsys):
    good = tmp_path / "good.csv"
    good.write_text(GOOD_TRUTH)
    bad = tmp_path / "bad.csv"
    if kind == "missing_file":
        expected = f"{bad}: file not found"
    else:
        _, content, _, tail = LANDMARK_CASES[kind]
        bad.write_text(content)
        expected = f"{bad}{tail}"
    files = [bad, good] if which == "pred" else [good, bad]
    code = cli_main(["evaluate", *map(str, files), "--output", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"heatmark evaluate: error: {expected}\n"
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("kind", ["3d_pred_2d_truth", "no_common_names"])
def test_evaluate_with_mismatched_prediction_exits_1_naming_both_files(kind, tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    truth.write_text(GOOD_TRUTH)
    pred = tmp_path / "pred.csv"
    if kind == "3d_pred_2d_truth":
        pred.write_text(f"{LONG_HEADER},z_mm\nc1,1,Sella,1,2,0\nc1,2,Nasion,3,4,0\n")
        expected = f"{pred} holds 3D landmarks but {truth} holds 2D landmarks"
    else:
        pred.write_text(f"{LONG_HEADER}\nc1,1,L1,1,2\nc1,2,L2,3,4\n")
        expected = f"{pred} shares no landmark name with {truth}"
    code = cli_main(["evaluate", str(pred), str(truth), "--output", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 1 and expected in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ datalists


def test_datalist_problems_are_all_reported_at_once(tmp_path, monkeypatch):
    """Missing image and landmark files, an empty image, an unreadable one (simulated as root, see
    the module docstring), 3D landmarks for a 2D task and non-numeric landmarks: one error."""
    empty = mk_zero_byte(tmp_path, 2)
    unreadable = mk_unreadable(tmp_path, 2)
    deny_read(monkeypatch, unreadable)
    good = nifti(tmp_path / "good.nii.gz", blobs((20, 20)), np.eye(4))
    lm2 = [[1.0, 2.0], [3.0, 4.0]]
    datalist = [
        {"case": "a", "image": str(tmp_path / "missing_a.nii.gz"), "landmarks": lm2},
        {"case": "b", "image": str(tmp_path / "missing_b.nii.gz"), "landmarks": str(tmp_path / "missing_b.csv")},
        {"case": "c", "image": str(empty), "landmarks": lm2},
        {"case": "d", "image": str(unreadable), "landmarks": lm2},
        {"case": "e", "image": str(good), "landmarks": [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]},
        {"case": "f", "image": str(good), "landmarks": [["x", "y"], [1.0, 2.0]]},
        {"case": "ok", "image": str(good), "landmarks": lm2},
    ]
    with pytest.raises(DataCheckError) as e:
        check_datalist(datalist, num_landmarks=2, spatial_dims=2, source="train.json")
    assert e.value.problems == [
        f"case 'a': image not found: {tmp_path / 'missing_a.nii.gz'}",
        f"case 'b': image not found: {tmp_path / 'missing_b.nii.gz'}",
        f"case 'b': landmark file not found: {tmp_path / 'missing_b.csv'}",
        f"case 'c': image file is empty (0 bytes): {empty}",
        f"case 'd': image not readable (permissions): {unreadable}",
        "case 'e': 3D landmarks, expected 2D",
        "case 'f': landmarks are not numbers",
    ]
    assert str(e.value).startswith("train.json: 7 problem(s) found before training:\n  - case 'a'")


def test_landmarks_far_outside_the_image(tmp_path):
    """A 3D volume of 40 x 40 x 20 voxels of 2 mm (origin 0): the field of view is [-1, 79] mm
    in x and y, [-1, 39] in z. A landmark 10 mm beyond passes with the default margin of 10 mm."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = nifti(tmp_path / "vol.nii.gz", blobs((40, 40, 20)), affine)
    points = np.array([[10.0, 10, 10], [89.0, 10, 10], [10.0, 10, 450.0], [np.nan] * 3, [-300.0, -1, 39]])
    names = ["in", "edge", "above", "missing", "left"]
    problems = check_landmarks_in_image(points, LoadLandmarkImage()(image), names=names)
    assert problems == ["landmark 3 (above) lies 411 mm outside the image",
                        "landmark 5 (left) lies 299 mm outside the image"]
    assert check_landmarks_in_image(points, ((40, 40, 20), affine), margin_mm=500) == []
    assert check_landmarks_in_image(points[:, :2], ((40, 40, 20), affine)) == ["landmarks are 2D but the image is 3D"]

    datalist = [{"case": "x", "image": str(image), "landmarks": points.tolist(), "names": names},
                {"case": "y", "image": str(image), "landmarks": points[:2].tolist()}]
    check_datalist(datalist, spatial_dims=3)  # geometry is checked only on request
    with pytest.raises(DataCheckError) as e:
        check_datalist(datalist, spatial_dims=3, check_images=True)
    assert e.value.problems == ["case 'x': landmark 3 (above) lies 411 mm outside the image",
                                "case 'x': landmark 5 (left) lies 299 mm outside the image"]


def test_datalist_image_check_reads_only_the_nifti_header(tmp_path, monkeypatch):
    image = nifti(tmp_path / "vol.nii.gz", blobs((40, 40, 20)), np.diag([2.0, 2.0, 2.0, 1.0]))

    def no_load(*args, **kwargs):
        raise AssertionError("the image was loaded")

    monkeypatch.setattr(LoadLandmarkImage, "__call__", no_load)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_load)
    check_datalist([{"case": "x", "image": str(image), "landmarks": [[10.0, 10, 10]]}], check_images=True)


def test_datalist_image_check_reports_unloadable_images(tmp_path):
    png = mk_png(tmp_path, 2)
    with pytest.raises(DataCheckError) as e:
        check_datalist([{"case": "p", "image": str(png), "landmarks": [[1.0, 2.0]]}], spatial_dims=2, check_images=True)
    assert e.value.problems[0].startswith(f"case 'p': cannot load image '{png}': the image has no pixel spacing")


# ------------------------------------------------------------------------------------ implausible images (issue 15)

# 2D stand-ins of what a red-team pass fed a bundle: case name -> (array, spacing mm, reason words)
_ONE_VOXEL = np.zeros((80, 100), np.float32)
_ONE_VOXEL[40, 50] = 1000.0
DEGENERATE = {
    "tiny": (blobs((3, 3), 2), 2.4, "3 x 3 voxels; at least 8 per axis (predict_min_voxels)"),
    "one_line": (blobs((1, 100), 3)[:1], 2.4, "1 x 100 voxels; at least 8 per axis"),
    "one_voxel": (_ONE_VOXEL, 2.4, "only 2 distinct intensity values; at least 16 (predict_min_distinct_values)"),
    "small_mm": (blobs((80, 100), 4), 0.1, "8 x 10 mm; at least 24 x 30 mm (predict_min_extent_mm)"),
}


def test_predict_refuses_implausible_images(tiny_bundle, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nifti(inputs / "good.nii.gz", blobs((80, 100), 1), np.diag([2.4, 2.4, 1.0, 1.0]))
    for case, (arr, spacing, _) in DEGENERATE.items():
        nifti(inputs / f"{case}.nii.gz", arr, np.diag([spacing, spacing, 1.0, 1.0]))
    out = tmp_path / "out"
    code = P.main([str(tiny_bundle), str(inputs), str(out), "--config", "tiny.yaml", "--num-workers", "0", "--quiet"])
    assert code == 1, capsys.readouterr()
    assert {r["case"] for r in read_csv(out / "landmarks.csv")} == {"good"}
    rows = {r["case"]: r["error"] for r in read_csv(out / "errors.csv")}
    assert sorted(rows) == sorted(DEGENERATE)
    for case, (_, _, expected) in DEGENERATE.items():
        assert expected in rows[case], f"{case}: {rows[case]!r}"
        assert "\n" not in rows[case]


def test_implausibility_limits_come_from_the_bundle(tiny_bundle, tmp_path, capsys):
    """Defaults: 8 voxels and 1/8 of the network input's field of view (input_size x spacing_mm,
    64 x 80 x 3 mm here) per axis, 16 distinct values, landmarks at most 1/8 of the shortest axis
    of that field of view (24 mm) outside the image; a bundle or --config overlay changes them."""
    checks = P.load_bundle(P.PredictOptions(tiny_bundle, tmp_path, tmp_path / "o", configs=["tiny.yaml"])).checks
    assert checks.min_voxels == 8 and checks.min_distinct_values == 16
    assert checks.min_extent_mm == pytest.approx((24.0, 30.0)) and checks.max_outside_mm == pytest.approx(24.0)
    (tiny_bundle / "configs" / "strict.yaml").write_text("predict_min_voxels: 200\npredict_min_extent_mm: 5\n")
    checks = P.load_bundle(P.PredictOptions(tiny_bundle, tmp_path, tmp_path / "o",
                                            configs=["tiny.yaml", "strict.yaml"])).checks
    assert checks.min_voxels == 200 and checks.min_extent_mm == pytest.approx((5.0, 5.0))
    image = nifti(tmp_path / "good.nii.gz", blobs((80, 100), 1), np.diag([2.4, 2.4, 1.0, 1.0]))
    out = tmp_path / "out"
    code = P.main([str(tiny_bundle), str(image), str(out), "--config", "tiny.yaml", "--config", "strict.yaml",
                   "--num-workers", "0", "--quiet"])
    assert code == 1
    (row,) = read_csv(out / "errors.csv")
    assert "80 x 100 voxels; at least 200 per axis (predict_min_voxels)" in row["error"]
    (tiny_bundle / "configs" / "bad.yaml").write_text("predict_min_distinct_values: -3\n")
    capsys.readouterr()
    code = P.main([str(tiny_bundle), str(image), str(tmp_path / "o2"), "--config", "tiny.yaml", "--config",
                   "bad.yaml", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "predict_min_distinct_values" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["3x3x3", "one_voxel", "one_slice", "thin_mm", "good"])
def test_implausibility_checks_in_3d(kind):
    """The checks of the shipped defaults on the 3D cases of the red-team pass (AFIDs-like grid:
    96 x 112 x 96 voxels of 2 mm -> at least 24 x 28 x 24 mm)."""
    checks = P.ImageChecks(min_voxels=8, min_extent_mm=(24.0, 28.0, 24.0), min_distinct_values=16)
    one = np.zeros((40, 40, 40), np.float32)
    one[20, 20, 20] = 1.0
    arrays = {"3x3x3": (blobs((3, 3, 3)), 1.0, "3 x 3 x 3 voxels"), "one_voxel": (one, 1.0, "only 2 distinct"),
              "one_slice": (blobs((64, 64, 1)), 1.0, "64 x 64 x 1 voxels"),
              "thin_mm": (blobs((40, 40, 40)), 0.5, "20 x 20 x 20 mm; at least 24 x 28 x 24 mm"),
              "good": (blobs((40, 40, 40)), 1.0, None)}
    arr, spacing, expected = arrays[kind]
    image = MetaTensor(torch.as_tensor(arr)[None], affine=torch.diag(torch.tensor([spacing] * 3 + [1.0])))
    problem = checks.problem(image)
    assert (problem is None) if expected is None else (expected in problem), problem


def test_landmarks_predicted_outside_the_image_are_set_missing_and_listed(tiny_bundle, tmp_path, monkeypatch,
                                                                          capsys):
    """A landmark predicted farther than predict_max_outside_mm (24 mm here) outside the image's field
    of view is missing (empty cells, NaN) in every output, and listed in warnings.csv and on stderr."""
    real = DecodeLandmarksd.__call__

    def far(self, d):
        out = real(self, d)
        out["pred_world"] = out["pred_world"].clone()
        out["pred_world"][:, 2, 0] += 500.0  # landmark 3, 500 mm to the right
        return out

    monkeypatch.setattr(DecodeLandmarksd, "__call__", far)
    image = nifti(tmp_path / "good.nii.gz", blobs((80, 100), 1), np.diag([2.4, 2.4, 1.0, 1.0]))
    out = tmp_path / "out"
    argv = [str(tiny_bundle), str(image), str(out), "--config", "tiny.yaml", "--num-workers", "0", "--quiet",
            "--format", "csv,mrk.json,json"]
    capsys.readouterr()
    assert P.main(argv) == 0
    captured = capsys.readouterr()
    rows = read_csv(out / "landmarks.csv")
    assert [(r["x_mm"], r["y_mm"]) for r in rows if r["landmark"] == "3"] == [("", "")]
    assert all(r["x_mm"] != "" for r in rows if r["landmark"] != "3")
    assert np.isnan(read_landmarks(out / "good.mrk.json", spatial_dims=2).coords[2]).all()
    assert np.isnan(read_landmarks(out / "good.json").coords[2]).all()
    (warning,) = read_csv(out / "warnings.csv")
    assert warning["case"] == "good" and warning["path"] == str(image)
    assert re.fullmatch(r"landmark 3 \([^)]+\) predicted \d+ mm outside the image; set missing", warning["warning"])
    assert "good" in captured.err and "outside the image" in captured.err
    assert "1 landmark set missing" in captured.out
    assert read_csv(out / "errors.csv") == []
    monkeypatch.setattr(DecodeLandmarksd, "__call__", real)
    assert P.main(argv) == 0  # done before: skipped, and its warning stays listed
    assert read_csv(out / "warnings.csv") == [warning]


# ------------------------------------------------------------------------------------ OS errors (issue 15)


def test_an_os_error_reading_an_input_is_a_case_error(tiny_bundle, tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nifti(inputs / "good.nii.gz", blobs((80, 100), 1), np.diag([2.4, 2.4, 1.0, 1.0]))
    bad = nifti(inputs / "bad_disk.nii.gz", blobs((80, 100), 2), np.diag([2.4, 2.4, 1.0, 1.0]))
    real = nib.load

    def load(path, *args, **kwargs):
        if Path(path).name == bad.name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", load)
    out = tmp_path / "out"
    code = P.main([str(tiny_bundle), str(inputs), str(out), "--config", "tiny.yaml", "--num-workers", "0", "--quiet"])
    assert code == 1
    (row,) = read_csv(out / "errors.csv")
    assert row["case"] == "bad_disk" and "Input/output error" in row["error"], row
    assert {r["case"] for r in read_csv(out / "landmarks.csv")} == {"good"}


def test_cli_reports_an_os_error_in_one_line(tmp_path, monkeypatch, capsys):
    """`heatmark evaluate` on a full disk: one line and exit status 1, no traceback."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "ev" / "errors.csv"))

    monkeypatch.setattr(evaluate_module, "evaluate_tables", full)
    good = tmp_path / "good.csv"
    good.write_text(GOOD_TRUTH)
    code = cli_main(["evaluate", str(good), str(good), "--output", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("heatmark evaluate: error: ") and "No space left on device" in err
