"""Tests for heatmark.transforms.io: image loading with a world (mm, RAS) affine, and the
reader registry it goes through.

Every image is tiny and written into tmp_path with nibabel / ITK / pydicom / PIL.
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor, PydicomReader, list_data_collate
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from heatmark.core.geometry import voxel_to_world
from heatmark.transforms.io import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    MAX_VOXELS,
    READERS,
    ImageData,
    ImageLoadError,
    ImageReader,
    LoadLandmarkImage,
    LoadLandmarkImaged,
    has_dicom_marker,
    image_suffix,
    is_companion_file,
    reader_for,
    register_reader,
)

itk = pytest.importorskip("itk")


# ------------------------------------------------------------------------------------ writers


def write_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), str(path))
    return path


def write_nifti_raw_sform(path, data, sform):
    """A NIfTI whose sform is stored as given (nibabel refuses to build one from a singular affine)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(np.shape(data))
    hdr.set_data_dtype(np.asarray(data).dtype)
    sform = np.asarray(sform, dtype=np.float64)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
    hdr["sform_code"], hdr["qform_code"] = 2, 0
    nib.save(nib.Nifti1Image(np.asarray(data), None, hdr), str(path))
    return path


def write_itk(path, array_zyx, spacing, origin, direction=None):
    """Write with ITK (LPS on disk); ``array_zyx`` is numpy (z,) y, x order as ITK expects."""
    im = itk.image_from_array(np.ascontiguousarray(array_zyx))
    im.SetSpacing([float(s) for s in spacing])
    im.SetOrigin([float(o) for o in origin])
    if direction is not None:
        im.SetDirection(itk.matrix_from_array(np.asarray(direction, dtype=np.float64)))
    itk.imwrite(im, str(path))
    return im


def write_dcm(
    path,
    pixels_rc,
    pixel_spacing=None,
    imager_spacing=None,
    position=None,
    orientation=None,
    modality="DX",
    series_uid=None,
    instance=1,
    photometric="MONOCHROME2",
):
    """Write a single-frame uint16 DICOM; ``pixels_rc`` is (Rows, Columns)."""
    pixels_rc = np.asarray(pixels_rc, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "test"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels_rc.shape
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [float(v) for v in imager_spacing]
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.PixelData = pixels_rc.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def bright_index(img: torch.Tensor) -> tuple[int, ...]:
    """Index (spatial) of the single brightest voxel of channel 0."""
    a = img[0].numpy()
    idx = np.argwhere(a == a.max())
    assert len(idx) == 1, idx
    return tuple(int(v) for v in idx[0])


def world_of(img: MetaTensor, index) -> np.ndarray:
    return voxel_to_world(np.asarray([index], dtype=np.float64), img.affine)[0]


def assert_file_error(excinfo, path, *words):
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg


# ------------------------------------------------------------------------------------ NIfTI


def test_nifti_3d_affine_and_bright_voxel(tmp_path):
    affine = np.diag([0.4, 0.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    data = np.zeros((6, 5, 4), np.int16)
    data[3, 1, 2] = 100
    f = write_nifti(tmp_path / "vol.nii.gz", data, affine)

    img = LoadLandmarkImage()(f)
    assert isinstance(img, MetaTensor)
    assert img.shape == (1, 6, 5, 4) and img.dtype == torch.float32
    np.testing.assert_allclose(img.affine.numpy(), affine)
    assert img.affine.dtype == torch.float64
    assert bright_index(img) == (3, 1, 2)
    np.testing.assert_allclose(world_of(img, (3, 1, 2)), [10 + 3 * 0.4, -20 + 0.5, 30 + 4.0])
    m = img.meta
    assert m["filename_or_obj"] == str(f)
    np.testing.assert_allclose(m["spacing"], [0.4, 0.5, 2.0])
    assert m["spatial_dims"] == 3 and m["spacing_units"] == "mm" and m["space"] == "RAS"
    np.testing.assert_allclose(m["original_affine"], affine)


def test_nifti_uncompressed_and_rotated_affine(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.8, 1.5])
    affine[:3, 3] = [-5, 6, 7]
    data = np.zeros((4, 5, 3), np.float32)
    data[1, 3, 2] = 1
    img = LoadLandmarkImage(spatial_dims=3)(write_nifti(tmp_path / "rot.nii", data, affine))
    np.testing.assert_allclose(img.affine.numpy(), affine, atol=1e-6)
    np.testing.assert_allclose(world_of(img, bright_index(img)), (affine @ [1, 3, 2, 1])[:3], atol=1e-6)
    np.testing.assert_allclose(img.meta["spacing"], [0.7, 0.8, 1.5], rtol=1e-6)


def test_nifti_2d(tmp_path):
    affine = np.diag([0.4, 0.5, 1.0, 1.0])
    affine[:2, 3] = [10.0, 20.0]
    data = np.zeros((7, 3), np.float32)  # (x, y): 7 columns, 3 rows
    data[5, 1] = 1
    img = LoadLandmarkImage()(write_nifti(tmp_path / "xray.nii.gz", data, affine))
    assert img.shape == (1, 7, 3)
    assert img.affine.shape == (3, 3)
    np.testing.assert_allclose(img.affine.numpy(), [[0.4, 0, 10], [0, 0.5, 20], [0, 0, 1]])
    assert bright_index(img) == (5, 1)
    np.testing.assert_allclose(world_of(img, (5, 1)), [12.0, 20.5])
    assert img.meta["spatial_dims"] == 2 and img.meta["world_axes"] == "RA"


def test_nifti_singleton_axis_squeezed_when_2d_expected(tmp_path):
    affine = np.diag([0.4, 0.5, 3.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    data = np.zeros((6, 4, 1), np.float32)
    data[2, 3, 0] = 1
    f = write_nifti(tmp_path / "slice.nii.gz", data, affine)
    assert LoadLandmarkImage()(f).shape == (1, 6, 4, 1)  # kept as read without spatial_dims
    img = LoadLandmarkImage(spatial_dims=2)(f)
    assert img.shape == (1, 6, 4)
    np.testing.assert_allclose(img.affine.numpy(), [[0.4, 0, 1], [0, 0.5, 2], [0, 0, 1]])
    assert bright_index(img) == (2, 3)


def test_nifti_coronal_singleton_uses_rs_plane(tmp_path):
    affine = np.diag([0.4, 3.0, 0.5, 1.0])
    affine[:3, 3] = [1, 2, 3]
    data = np.arange(24, dtype=np.float32).reshape(6, 1, 4)  # not constant: constant images are refused
    img = LoadLandmarkImage(spatial_dims=2)(write_nifti(tmp_path / "cor.nii.gz", data, affine))
    assert img.shape == (1, 6, 4)
    assert img.meta["world_axes"] == "RS"
    np.testing.assert_allclose(img.affine.numpy(), [[0.4, 0, 1], [0, 0.5, 3], [0, 0, 1]])


def test_nifti_trailing_singleton_4d_is_3d_but_real_4d_refused(tmp_path):
    ok = LoadLandmarkImage(spatial_dims=3)(write_nifti(tmp_path / "t1.nii.gz", np.arange(64, dtype=np.float32).reshape(4, 4, 4, 1), np.eye(4)))
    assert ok.shape == (1, 4, 4, 4)
    f = write_nifti(tmp_path / "fmri.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spatial_dims=3)(f)
    assert_file_error(e, f, "4D")


# ------------------------------------------------------------------------------------ ITK


@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_itk_3d_lps_on_disk_loads_as_ras(tmp_path, ext):
    arr = np.zeros((4, 3, 5), np.float32)  # ITK numpy order z, y, x
    arr[2, 1, 4] = 1  # x=4, y=1, z=2
    im = write_itk(tmp_path / f"vol{ext}", arr, spacing=(0.4, 0.5, 2.0), origin=(10, 20, 30))
    img = LoadLandmarkImage()(tmp_path / f"vol{ext}")
    assert img.shape == (1, 5, 3, 4)
    expected = np.array([[-0.4, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2.0, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.affine.numpy(), expected)
    assert bright_index(img) == (4, 1, 2)
    lps = np.array(im.TransformIndexToPhysicalPoint([4, 1, 2]))
    np.testing.assert_allclose(world_of(img, (4, 1, 2)), lps * [-1, -1, 1])


def test_itk_3d_oblique_direction_matches_itk_physical_points(tmp_path):
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    arr = np.zeros((3, 4, 5), np.int16)
    arr[1, 2, 3] = 7
    im = write_itk(tmp_path / "obl.mha", arr, spacing=(0.6, 0.7, 1.1), origin=(-3, 4, 5), direction=direction)
    img = LoadLandmarkImage(spatial_dims=3)(tmp_path / "obl.mha")
    assert bright_index(img) == (3, 2, 1)
    for index in [(0, 0, 0), (3, 2, 1), (4, 3, 2)]:
        lps = np.array(im.TransformIndexToPhysicalPoint([int(v) for v in index]))
        np.testing.assert_allclose(world_of(img, index), lps * [-1, -1, 1], atol=1e-9)


def test_mha_2d_axis0_is_x_and_ras(tmp_path):
    arr = np.zeros((3, 7), np.float32)  # rows (y) x columns (x)
    arr[1, 5] = 1
    im = write_itk(tmp_path / "xray.mha", arr, spacing=(0.4, 0.5), origin=(10, 20))
    img = LoadLandmarkImage(spatial_dims=2)(tmp_path / "xray.mha")
    assert img.shape == (1, 7, 3)
    assert img.affine.shape == (3, 3)
    np.testing.assert_allclose(img.affine.numpy(), [[-0.4, 0, -10], [0, -0.5, -20], [0, 0, 1]])
    assert bright_index(img) == (5, 1)
    lps = np.array(im.TransformIndexToPhysicalPoint([5, 1]))
    np.testing.assert_allclose(world_of(img, (5, 1)), -lps)
    assert img.meta["world_frame"] == "RAS"


def test_mha_3d_with_single_slice_squeezed(tmp_path):
    arr = np.zeros((1, 3, 5), np.float32)
    arr[0, 2, 1] = 1
    write_itk(tmp_path / "one.mha", arr, spacing=(0.4, 0.5, 1.0), origin=(0, 0, 0))
    img = LoadLandmarkImage(spatial_dims=2)(tmp_path / "one.mha")
    assert img.shape == (1, 5, 3) and bright_index(img) == (1, 2)
    np.testing.assert_allclose(img.meta["spacing"], [0.4, 0.5])


# ------------------------------------------------------------------------------------ DICOM 2D


def radiograph():
    px = np.zeros((3, 7), np.uint16)  # Rows=3, Columns=7
    px[1, 5] = 1000  # row 1 (y), column 5 (x)
    return px


def test_dicom_2d_pixel_spacing(tmp_path):
    # PixelSpacing is (row spacing = sy, column spacing = sx)
    f = write_dcm(tmp_path / "ps.dcm", radiograph(), pixel_spacing=(0.5, 0.4))
    img = LoadLandmarkImage(spatial_dims=2)(f)
    assert img.shape == (1, 7, 3)
    assert bright_index(img) == (5, 1)
    np.testing.assert_allclose(img.affine.numpy(), [[0.4, 0, 0], [0, 0.5, 0], [0, 0, 1]])
    np.testing.assert_allclose(img.meta["spacing"], [0.4, 0.5])
    np.testing.assert_allclose(world_of(img, (5, 1)), [2.0, 0.5])
    assert img.meta["world_frame"] == "image" and img.meta["spacing_units"] == "mm"
    assert float(img.max()) == 1000.0


def test_dicom_2d_imager_pixel_spacing_only(tmp_path):
    f = write_dcm(tmp_path / "ips.dcm", radiograph(), imager_spacing=(0.15, 0.14))
    img = LoadLandmarkImage()(f)
    np.testing.assert_allclose(img.meta["spacing"], [0.14, 0.15])
    np.testing.assert_allclose(img.affine.numpy(), np.diag([0.14, 0.15, 1.0]))
    # MONAI's own reader ignores ImagerPixelSpacing (this is the gap being filled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = PydicomReader()
        _, meta = r.get_data(r.read(str(f)))
    np.testing.assert_allclose(meta["spacing"], [1.0, 1.0])


def test_dicom_2d_pixel_spacing_wins_over_imager(tmp_path):
    f = write_dcm(tmp_path / "both.dcm", radiograph(), pixel_spacing=(0.2, 0.2), imager_spacing=(0.25, 0.25))
    np.testing.assert_allclose(LoadLandmarkImage()(f).meta["spacing"], [0.2, 0.2])


def test_dicom_2d_without_spacing(tmp_path):
    f = write_dcm(tmp_path / "nospacing.dcm", radiograph())
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "spacing", "allow_pixel_units")
    img = LoadLandmarkImage(allow_pixel_units=True)(f)
    assert img.meta["spacing_units"] == "pixel"
    np.testing.assert_allclose(img.affine.numpy(), np.eye(3))
    img = LoadLandmarkImage(spacing=0.3)(f)
    assert img.meta["spacing_units"] == "mm"
    np.testing.assert_allclose(img.meta["spacing"], [0.3, 0.3])


def test_dicom_2d_zero_spacing_counts_as_none(tmp_path):
    f = write_dcm(tmp_path / "zero.dcm", radiograph(), pixel_spacing=(0, 0))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "no pixel spacing")
    assert LoadLandmarkImage(allow_pixel_units=True)(f).meta["spacing_units"] == "pixel"


def test_dicom_2d_negative_spacing_refused(tmp_path):
    f = write_dcm(tmp_path / "neg.dcm", radiograph(), pixel_spacing=(-0.2, 0.2))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "PixelSpacing")


def test_dicom_2d_with_position_and_orientation(tmp_path):
    f = write_dcm(tmp_path / "pos.dcm", radiograph(), pixel_spacing=(0.5, 0.4), position=(10, 20, 30), orientation=(1, 0, 0, 0, 1, 0))
    img = LoadLandmarkImage()(f)
    np.testing.assert_allclose(img.affine.numpy(), [[-0.4, 0, -10], [0, -0.5, -20], [0, 0, 1]])
    assert img.meta["world_frame"] == "RAS" and img.meta["world_axes"] == "RA"
    # agrees with MONAI's PydicomReader (RAS) where that one has what it needs
    r = PydicomReader()
    _, meta = r.get_data(r.read(str(f)))
    a4 = np.asarray(meta["affine"])
    np.testing.assert_allclose(img.affine.numpy()[:2, :2], a4[:2, :2])
    np.testing.assert_allclose(img.affine.numpy()[:2, 2], a4[:2, 3])


def test_dicom_2d_coronal_plane(tmp_path):
    f = write_dcm(tmp_path / "cor.dcm", radiograph(), pixel_spacing=(0.5, 0.4), position=(10, 20, 30), orientation=(1, 0, 0, 0, 0, -1))
    img = LoadLandmarkImage()(f)
    assert img.meta["world_axes"] == "RS"
    # column direction (0, 0, -1) LPS is inferior: S decreases down the rows
    np.testing.assert_allclose(img.affine.numpy(), [[-0.4, 0, -10], [0, -0.5, 30], [0, 0, 1]])


def test_dicom_monochrome1_inverted(tmp_path):
    px = np.full((3, 7), 100, np.uint16)
    px[1, 5] = 60000
    f = write_dcm(tmp_path / "m1.dcm", px, pixel_spacing=(0.2, 0.2), photometric="MONOCHROME1")
    img = LoadLandmarkImage()(f)
    assert img.meta["intensity_inverted"] is True
    a = img[0].numpy()
    assert a[5, 1] == 65535 - 60000 and a[0, 0] == 65535 - 100


def test_dicom_without_suffix_is_sniffed(tmp_path):
    f = write_dcm(tmp_path / "IM0001", radiograph(), pixel_spacing=(0.2, 0.2))
    assert LoadLandmarkImage()(f).shape == (1, 7, 3)


# ------------------------------------------------------------------------------------ DICOM series


def write_series(folder, n=4, dz=2.5, bright_slice=2, z_positions=None, uid=None):
    folder.mkdir(exist_ok=True)
    uid = uid or generate_uid()
    z_positions = [30 + dz * k for k in range(n)] if z_positions is None else z_positions
    order = list(range(len(z_positions)))[::-1]  # written in reverse: the reader must sort
    for k in order:
        px = np.zeros((3, 5), np.uint16)
        if k == bright_slice:
            px[1, 4] = 1000
        write_dcm(folder / f"slice_{len(z_positions) - k:03d}.dcm", px, pixel_spacing=(0.5, 0.4),
                  position=(10, 20, z_positions[k]), orientation=(1, 0, 0, 0, 1, 0), modality="CT",
                  series_uid=uid, instance=k + 1)
    return folder


def test_dicom_series_folder_loads_3d(tmp_path):
    folder = write_series(tmp_path / "ct")
    img = LoadLandmarkImage(spatial_dims=3)(folder)
    assert img.shape == (1, 5, 3, 4)
    np.testing.assert_allclose(img.meta["spacing"], [0.4, 0.5, 2.5])
    np.testing.assert_allclose(img.affine.numpy(), [[-0.4, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    assert bright_index(img) == (4, 1, 2)
    np.testing.assert_allclose(world_of(img, (4, 1, 2)), [-11.6, -20.5, 35.0])


def test_dicom_series_uneven_slices_refused(tmp_path):
    folder = write_series(tmp_path / "gap", z_positions=[0, 2, 4, 8])
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(folder)
    assert_file_error(e, folder, "uneven slice spacing")


def test_dicom_folder_with_two_series_refused(tmp_path):
    folder = write_series(tmp_path / "mixed", n=3)
    px = np.zeros((3, 5), np.uint16)
    write_dcm(folder / "other.dcm", px, pixel_spacing=(1, 1), position=(0, 0, 0), orientation=(1, 0, 0, 0, 1, 0),
              modality="CT")
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(folder)
    assert_file_error(e, folder, "2 DICOM series")


def test_empty_folder_refused(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(folder)
    assert_file_error(e, folder, "no readable DICOM")


# ------------------------------------------------------------------------------------ PNG & co.


def test_png_with_spacing_axis0_is_x(tmp_path):
    px = np.zeros((3, 7), np.uint8)  # 7 wide, 3 tall
    px[1, 5] = 255
    f = tmp_path / "hand.png"
    Image.fromarray(px).save(f)
    img = LoadLandmarkImage(spacing=(0.1, 0.2))(f)
    assert img.shape == (1, 7, 3)
    assert bright_index(img) == (5, 1)
    np.testing.assert_allclose(img.affine.numpy(), np.diag([0.1, 0.2, 1.0]))
    np.testing.assert_allclose(world_of(img, (5, 1)), [0.5, 0.2])
    assert img.meta["world_frame"] == "image" and img.meta["spacing_units"] == "mm"
    np.testing.assert_allclose(LoadLandmarkImage(spacing=0.25)(f).meta["spacing"], [0.25, 0.25])


def test_png_without_spacing(tmp_path):
    f = tmp_path / "nospacing.png"
    Image.fromarray(np.arange(21, dtype=np.uint8).reshape(3, 7)).save(f)
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "spacing")
    with pytest.raises(ImageLoadError):
        LoadLandmarkImage(spacing=0)(f)
    img = LoadLandmarkImage(allow_pixel_units=True)(f)
    assert img.meta["spacing_units"] == "pixel"
    np.testing.assert_allclose(img.affine.numpy(), np.eye(3))


def test_png_16bit_values_kept(tmp_path):
    px = (np.arange(21).reshape(3, 7) * 1000).astype(np.uint16)
    f = tmp_path / "deep.png"
    Image.fromarray(px).save(f)
    img = LoadLandmarkImage(spacing=1)(f)
    np.testing.assert_array_equal(img[0].numpy(), px.T.astype(np.float32))


@pytest.mark.parametrize("ext", [".jpg", ".bmp", ".tif"])
def test_other_2d_formats(tmp_path, ext):
    px = np.zeros((6, 10), np.uint8)
    px[2:4, 7:9] = 255
    f = tmp_path / f"img{ext}"
    Image.fromarray(px).save(f)
    img = LoadLandmarkImage(spacing=0.5, spatial_dims=2)(f)
    assert img.shape == (1, 10, 6)
    assert float(img[0, 7, 2]) > 200 and float(img[0, 2, 2]) < 50


def test_rgb_identical_channels_become_one(tmp_path):
    px = np.zeros((3, 7), np.uint8)
    px[1, 5] = 200
    f = tmp_path / "rgb.png"
    Image.fromarray(np.stack([px] * 3, -1)).save(f)
    img = LoadLandmarkImage(spacing=1)(f)
    assert img.shape == (1, 7, 3) and bright_index(img) == (5, 1)
    f4 = tmp_path / "rgba.png"
    Image.fromarray(np.stack([px] * 3 + [np.full_like(px, 255)], -1)).save(f4)
    assert LoadLandmarkImage(spacing=1)(f4).shape == (1, 7, 3)


def test_colour_image_luminance_or_kept(tmp_path):
    rgb = np.zeros((3, 7, 3), np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 50
    rgb[2, 6] = 0  # not constant: constant images are refused
    f = tmp_path / "colour.png"
    Image.fromarray(rgb).save(f)
    with pytest.warns(UserWarning, match="colour image"):
        img = LoadLandmarkImage(spacing=1)(f)
    assert img.shape == (1, 7, 3)
    np.testing.assert_allclose(float(img[0, 0, 0]), 0.299 * 100 + 0.587 * 50, rtol=1e-5)
    img = LoadLandmarkImage(spacing=1, keep_color=True)(f)
    assert img.shape == (3, 7, 3)
    assert float(img[0, 0, 0]) == 100 and float(img[1, 0, 0]) == 50


def test_palette_png(tmp_path):
    px = np.zeros((3, 7), np.uint8)
    px[1, 5] = 255
    f = tmp_path / "pal.png"
    Image.fromarray(px).convert("P").save(f)
    img = LoadLandmarkImage(spacing=1)(f)
    assert img.shape == (1, 7, 3) and bright_index(img) == (5, 1)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz", "a.mha", "a.nrrd", "a.dcm", "a.png", "a.jpg"])
def test_zero_byte_file(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"")
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "empty")


def test_missing_file(tmp_path):
    f = tmp_path / "nope.nii.gz"
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "does not exist")
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz", "a.mha", "a.nrrd", "a.dcm", "a.png", "a.jpg"])
def test_text_file_with_image_suffix(tmp_path, name):
    f = tmp_path / name
    f.write_text("patient_id,x,y,z\n1,2,3,4\n" * 5)
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spacing=1)(f)
    assert_file_error(e, f, "cannot read")


def test_unsupported_suffix(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "unsupported file type")


@pytest.mark.parametrize("name", ["t.nii", "t.nii.gz", "t.mha", "t.png"])
def test_truncated_file(tmp_path, name):
    full = tmp_path / f"full_{name}"
    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    if name.endswith(".png"):
        Image.fromarray((data[0] * 255).astype(np.uint8)).save(full)
    elif name.endswith(".mha"):
        write_itk(full, data, (1, 1, 1), (0, 0, 0))
    else:
        write_nifti(full, data, np.eye(4))
    raw = full.read_bytes()
    f = tmp_path / name
    f.write_bytes(raw[: len(raw) * 6 // 10])
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spacing=1)(f)
    assert_file_error(e, f, "cannot read", "truncated")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = bad
    f = write_nifti(tmp_path / "bad.nii.gz", data, np.eye(4))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "non-finite")


def test_zero_spacing_3d(tmp_path):
    f = write_nifti_raw_sform(tmp_path / "flat.nii.gz", np.zeros((4, 4, 4), np.float32), np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "spacing is zero")


def test_singular_affine(tmp_path):
    affine = np.eye(4)
    affine[:3, 1] = [1, 0, 0]  # axis 1 parallel to axis 0
    f = write_nifti(tmp_path / "sing.nii.gz", np.zeros((4, 4, 4), np.float32), affine)
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "singular")


def test_non_finite_affine(tmp_path):
    sform = np.eye(4)
    sform[0, 0] = np.nan
    f = write_nifti_raw_sform(tmp_path / "nanaff.nii.gz", np.zeros((4, 4, 4), np.float32), sform)
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "non-finite")


def test_zero_spacing_2d_nifti_needs_user_spacing(tmp_path):
    f = write_nifti_raw_sform(tmp_path / "nopix.nii.gz", np.arange(15, dtype=np.float32).reshape(5, 3), np.diag([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "no pixel spacing")
    np.testing.assert_allclose(LoadLandmarkImage(spacing=(0.3, 0.4))(f).meta["spacing"], [0.3, 0.4])


def test_absurd_nifti_header_refused_before_reading(tmp_path):
    f = write_nifti(tmp_path / "small.nii", np.zeros((1, 1, 1), np.float32), np.eye(4))
    raw = bytearray(f.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[] of the NIfTI-1 header
    big = tmp_path / "big.nii"
    big.write_bytes(bytes(raw))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(big)
    assert_file_error(e, big, "header declares", "limit")


def test_absurd_mha_header_refused(tmp_path):
    f = tmp_path / "big.mha"
    f.write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
                 "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "header declares")


def test_mha_negative_spacing_refused(tmp_path):
    f = tmp_path / "neg.mha"
    f.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementSpacing = 1 -1 1\n"
                  b"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n" + bytes(8))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "spacing")


def test_dimension_mismatch(tmp_path):
    vol = write_nifti(tmp_path / "vol.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spatial_dims=2)(vol)
    assert_file_error(e, vol, "2D image is expected", "3D volume")
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((3, 7), np.uint8)).save(png)
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spatial_dims=3, spacing=1)(png)
    assert_file_error(e, png, "3D volume is expected")


def test_bad_options():
    with pytest.raises(ValueError):
        LoadLandmarkImage(spacing=(-1, 1))
    with pytest.raises(ValueError):
        LoadLandmarkImage(spacing=(np.nan, 1))
    with pytest.raises(ValueError):
        LoadLandmarkImage(spacing=(1, 2, 3))
    with pytest.raises(ValueError):
        LoadLandmarkImage(spatial_dims=4)


# ------------------------------------------------------------------------------------ dict


def test_dictionary_wrapper(tmp_path):
    affine = np.diag([0.4, 0.5, 2.0, 1.0])
    f = write_nifti(tmp_path / "vol.nii.gz", np.arange(64, dtype=np.float32).reshape(4, 4, 4), affine)
    out = LoadLandmarkImaged(keys=["image", "label"], allow_missing_keys=True)({"image": str(f), "other": 1})
    assert isinstance(out["image"], MetaTensor) and out["other"] == 1 and "label" not in out
    np.testing.assert_allclose(out["image"].affine.numpy(), affine)

    out = LoadLandmarkImaged(keys="image", image_only=False)({"image": f})
    assert out["image_meta_dict"]["spatial_dims"] == 3
    with pytest.raises(KeyError):
        LoadLandmarkImaged(keys="image", image_only=False)({"image": f, "image_meta_dict": {}})
    with pytest.raises(KeyError):
        LoadLandmarkImaged(keys="image")({"x": f})

    png = tmp_path / "x.png"
    Image.fromarray(np.arange(21, dtype=np.uint8).reshape(3, 7)).save(png)
    out = LoadLandmarkImaged(keys="image", spacing=(0.1, 0.1))({"image": png})
    np.testing.assert_allclose(out["image"].meta["spacing"], [0.1, 0.1])
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImaged(keys="image")({"image": png})
    assert str(png) in str(e.value)


def test_mixed_formats_collate(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.arange(21, dtype=np.uint8).reshape(3, 7)).save(png)  # not constant: those are refused
    mha = tmp_path / "b.mha"
    write_itk(mha, np.arange(21, dtype=np.float32).reshape(3, 7), (0.1, 0.1), (0, 0))
    nii = write_nifti(tmp_path / "c.nii.gz", np.arange(21, dtype=np.float32).reshape(7, 3), np.diag([0.1, 0.1, 1, 1]))
    imgs = [LoadLandmarkImage(spacing=0.1)(p) for p in (png, mha, nii)]
    assert {tuple(i.meta) == tuple(imgs[0].meta) for i in imgs} == {True}
    batch = list_data_collate(imgs)
    assert batch.shape == (3, 1, 7, 3) and batch.affine.shape == (3, 3, 3)


def test_dtype_option(tmp_path):
    f = write_nifti(tmp_path / "v.nii.gz", np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
    assert LoadLandmarkImage(dtype=torch.float64)(f).dtype == torch.float64
    assert LoadLandmarkImage(dtype=np.float16)(f).dtype == torch.float16


# ------------------------------------------------------------------------------------ more DICOM


def test_dicom_multiframe_is_3d(tmp_path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    f = tmp_path / "multi.dcm"
    ds = FileDataset(str(f), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 5, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing = [0.5, 0.4]
    px = np.zeros((4, 3, 5), np.uint16)
    px[2, 1, 4] = 9
    ds.PixelData = px.tobytes()
    ds.save_as(str(f), enforce_file_format=True)
    img = LoadLandmarkImage()(f)
    assert img.shape == (1, 5, 3, 4) and bright_index(img) == (4, 1, 2)
    np.testing.assert_allclose(img.meta["spacing"][:2], [0.4, 0.5])
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spatial_dims=2)(f)
    assert_file_error(e, f, "3D volume")


def test_dicom_pixels_fall_back_to_gdcm(tmp_path, monkeypatch):
    """When pydicom cannot decode the pixels (e.g. JPEG without a plugin), ITK/GDCM reads them."""
    f = write_dcm(tmp_path / "fallback.dcm", radiograph(), imager_spacing=(0.5, 0.4))
    expected = LoadLandmarkImage()(f)

    def fail(self, img):
        raise RuntimeError("unable to decode pixel data")

    monkeypatch.setattr(PydicomReader, "get_data", fail)
    img = LoadLandmarkImage()(f)
    assert img.shape == expected.shape == (1, 7, 3)
    np.testing.assert_array_equal(img.numpy(), expected.numpy())
    np.testing.assert_allclose(img.affine.numpy(), expected.affine.numpy())


# ------------------------------------------------------------------------------------ DICOM colour


def write_colour_dcm(path, samples, photometric="RGB", planar=0, pixel_spacing=(0.5, 0.4), position=None,
                     orientation=None, series_uid=None, instance=1, modality="OT"):
    """Write an 8-bit colour DICOM; ``samples`` is (Rows, Columns, 3) or (Frames, Rows, Columns, 3)
    in the order the photometric interpretation names them (R, G, B or Y, Cb, Cr), stored as they
    are (``YBR_FULL_422``: subsampled here, the chroma of each pixel pair must be equal)."""
    samples = np.asarray(samples, dtype=np.uint8)
    frames = samples[None] if samples.ndim == 3 else samples
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = modality, "test", "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID, ds.InstanceNumber = series_uid or generate_uid(), instance
    ds.Rows, ds.Columns = frames.shape[1:3]
    if samples.ndim == 4:
        ds.NumberOfFrames = frames.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, planar
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if photometric == "YBR_FULL_422":  # Y1 Y2 Cb Cr per pair of pixels along a row
        assert planar == 0 and np.array_equal(frames[:, :, 0::2, 1:], frames[:, :, 1::2, 1:])
        pairs = np.concatenate([frames[:, :, 0::2, :1], frames[:, :, 1::2, :1], frames[:, :, 0::2, 1:]], axis=-1)
        data = pairs.tobytes()
    else:
        data = (np.moveaxis(frames, -1, 1) if planar == 1 else frames).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds.save_as(str(path), enforce_file_format=True)
    return path


LUMA = np.array([0.299, 0.587, 0.114])


def colour_picture():
    """(Rows=3, Columns=7, 3) RGB: a bluish background and one pure red pixel at row 1, column 5."""
    rgb = np.empty((3, 7, 3), np.uint8)
    rgb[...] = (100, 50, 200)
    rgb[1, 5] = (255, 0, 0)
    return rgb


@pytest.mark.parametrize("planar", [0, 1])
def test_dicom_rgb_becomes_luminance_with_its_spacing(tmp_path, planar):
    f = write_colour_dcm(tmp_path / f"rgb{planar}.dcm", colour_picture(), planar=planar, pixel_spacing=(0.5, 0.4))
    with pytest.warns(UserWarning, match="colour image converted to grayscale"):
        img = LoadLandmarkImage()(f)
    assert img.shape == (1, 7, 3) and img.meta["spatial_dims"] == 2
    expected = np.tensordot(colour_picture().astype(np.float64), LUMA, axes=(-1, 0)).T  # (Columns, Rows)
    np.testing.assert_allclose(img[0].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(img[0, 5, 1].item(), 0.299 * 255, rtol=1e-6)
    np.testing.assert_allclose(img[0, 0, 0].item(), 0.299 * 100 + 0.587 * 50 + 0.114 * 200, rtol=1e-6)
    np.testing.assert_allclose(img.meta["spacing"], [0.4, 0.5])
    np.testing.assert_allclose(img.affine.numpy(), np.diag([0.4, 0.5, 1.0]))
    assert img.meta["world_frame"] == "image"
    kept = LoadLandmarkImage(keep_color=True)(f)
    assert kept.shape == (3, 7, 3)
    np.testing.assert_array_equal(kept[:, 5, 1].numpy(), [255, 0, 0])
    np.testing.assert_array_equal(kept[:, 0, 0].numpy(), [100, 50, 200])


def test_dicom_rgb_with_position_keeps_the_patient_geometry(tmp_path):
    f = write_colour_dcm(tmp_path / "pos.dcm", colour_picture(), pixel_spacing=(0.5, 0.4), position=(10, 20, 30),
                         orientation=(1, 0, 0, 0, 1, 0))
    with pytest.warns(UserWarning, match="colour"):
        img = LoadLandmarkImage(spatial_dims=2)(f)
    assert img.shape == (1, 7, 3)
    np.testing.assert_allclose(img.affine.numpy(), [[-0.4, 0, -10], [0, -0.5, -20], [0, 0, 1]])
    assert img.meta["world_frame"] == "RAS"


def test_dicom_rgb_with_equal_channels_is_grey_without_warning(tmp_path):
    grey = np.repeat(radiograph().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    grey[1, 5] = 200
    f = write_colour_dcm(tmp_path / "grey_rgb.dcm", grey)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        img = LoadLandmarkImage()(f)
    assert img.shape == (1, 7, 3) and bright_index(img) == (5, 1) and float(img.max()) == 200


def ybr_picture():
    """(Rows=3, Columns=8, 3) Y, Cb, Cr with known Y; each pair of pixels along a row shares its chroma."""
    rng = np.random.default_rng(7)
    ybr = np.empty((3, 8, 3), np.uint8)
    ybr[..., 0] = rng.integers(16, 240, size=(3, 8))
    ybr[..., 1:] = np.repeat(rng.integers(60, 200, size=(3, 4, 2)), 2, axis=1)
    return ybr


@pytest.mark.parametrize("photometric,planar", [("YBR_FULL", 0), ("YBR_FULL", 1), ("YBR_FULL_422", 0)])
def test_dicom_ybr_gives_its_y_channel(tmp_path, photometric, planar):
    ybr = ybr_picture()
    f = write_colour_dcm(tmp_path / f"{photometric}_{planar}.dcm", ybr, photometric=photometric, planar=planar,
                         pixel_spacing=(0.3, 0.2))
    with pytest.warns(UserWarning, match="colour"):
        img = LoadLandmarkImage()(f)
    assert img.shape == (1, 8, 3)
    np.testing.assert_allclose(img[0].numpy(), ybr[..., 0].T.astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(img.meta["spacing"], [0.2, 0.3])


def test_dicom_ybr_without_chroma_is_grey_without_warning(tmp_path):
    ybr = ybr_picture()
    ybr[..., 1:] = 128
    f = write_colour_dcm(tmp_path / "ybr_grey.dcm", ybr, photometric="YBR_FULL")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        img = LoadLandmarkImage()(f)
    np.testing.assert_array_equal(img[0].numpy(), ybr[..., 0].T)


def test_dicom_jpeg_baseline_ybr_full_422_secondary_capture(tmp_path):
    """The usual secondary capture: JPEG baseline, YBR_FULL_422; the grey image is the JPEG's Y."""
    yy, xx = np.mgrid[0:16, 0:24]
    rgb = np.stack([8 * xx + 40, 10 * yy + 30, 200 - 5 * xx], axis=-1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling=1)  # 4:2:2
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    f = tmp_path / "sc_jpeg.dcm"
    ds = FileDataset(str(f), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns = 16, 24
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.PixelSpacing = [0.25, 0.25]
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(f), enforce_file_format=True)
    with pytest.warns(UserWarning, match="colour"):
        img = LoadLandmarkImage(spatial_dims=2)(f)
    assert img.shape == (1, 24, 16)
    np.testing.assert_allclose(img.meta["spacing"], [0.25, 0.25])
    luma = np.tensordot(rgb.astype(np.float64), LUMA, axes=(-1, 0)).T
    assert np.abs(img[0].numpy() - luma).max() < 4  # lossy JPEG, but the luma of the picture


def test_dicom_colour_bundle_style_2d_load(tmp_path):
    """What a 2D bundle does: LoadLandmarkImaged(spatial_dims=2) gives a 2D image, not a 3D volume."""
    f = write_colour_dcm(tmp_path / "sc.dcm", colour_picture(), pixel_spacing=(0.5, 0.4))
    load = LoadLandmarkImaged(keys="image", spatial_dims=2)
    with pytest.warns(UserWarning, match="colour"):
        img = load({"image": str(f)})["image"]
    assert img.shape == (1, 7, 3) and img.meta["spatial_dims"] == 2
    assert img.affine.shape == (3, 3)
    np.testing.assert_allclose(img.meta["spacing"], [0.4, 0.5])


@pytest.mark.parametrize("photometric,planar", [("RGB", 0), ("RGB", 1), ("YBR_FULL", 0)])
def test_dicom_multiframe_colour_is_a_grey_volume(tmp_path, photometric, planar):
    if photometric == "RGB":
        frames = np.stack([colour_picture(), colour_picture() // 2, colour_picture() // 3])
        expected = np.tensordot(frames.astype(np.float64), LUMA, axes=(-1, 0)).transpose(2, 1, 0)  # (x, y, frame)
    else:
        frames = np.stack([ybr_picture()[:, :7], ybr_picture()[::-1, 1:], ybr_picture()[:, :7] // 2])
        expected = frames[..., 0].transpose(2, 1, 0)
    f = write_colour_dcm(tmp_path / f"mf{planar}.dcm", frames, photometric=photometric, planar=planar,
                         pixel_spacing=(0.5, 0.4))
    with pytest.warns(UserWarning, match="colour"):
        img = LoadLandmarkImage(spatial_dims=3)(f)
    assert img.shape == (1, 7, 3, 3)
    np.testing.assert_allclose(img[0].numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(img.meta["spacing"][:2], [0.4, 0.5])
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spatial_dims=2)(f)
    assert_file_error(e, f, "3D volume")


def test_dicom_colour_series_folder_is_a_grey_volume(tmp_path):
    folder = tmp_path / "colour_series"
    folder.mkdir()
    uid = generate_uid()
    for k in range(3):
        write_colour_dcm(folder / f"slice_{3 - k:03d}.dcm", colour_picture() // (k + 1), pixel_spacing=(0.5, 0.4),
                         position=(10, 20, 30 + 2.5 * k), orientation=(1, 0, 0, 0, 1, 0), series_uid=uid,
                         instance=k + 1)
    with pytest.warns(UserWarning, match="colour"):
        img = LoadLandmarkImage(spatial_dims=3)(folder)
    assert img.shape == (1, 7, 3, 3)
    np.testing.assert_allclose(img.affine.numpy(), [[-0.4, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    expected = np.stack([np.tensordot((colour_picture() // (k + 1)).astype(np.float64), LUMA, axes=(-1, 0)).T
                         for k in range(3)], axis=-1)
    np.testing.assert_allclose(img[0].numpy(), expected, atol=1e-3)


def test_dicom_unsupported_compression_is_one_line_naming_the_file(tmp_path):
    """Compressed pixel data no installed decoder reads (HTJ2K here): one clear line, not a traceback."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K lossless
    f = tmp_path / "htj2k.dcm"
    ds = FileDataset(str(f), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing = [0.2, 0.2]
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(f), enforce_file_format=True)
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "compressed", "High-Throughput JPEG 2000", "1.2.840.10008.1.2.4.201", "decode")
    assert "\n" not in str(e.value) and e.value.path == str(f)


# ------------------------------------------------------------------------------------ DICOM values


def set_raw_dicom_value(path, keyword, raw: str):
    """Store ``raw`` as the value of ``keyword`` byte for byte (pydicom refuses to write it)."""
    raw_b = raw.encode("ascii")
    raw_b += b" " * (len(raw_b) % 2)
    placeholder = "\\".join("7" * len(part) for part in raw_b.decode().split("\\"))
    ds = pydicom.dcmread(str(path))
    setattr(ds, keyword, placeholder.split("\\") if "\\" in placeholder else placeholder)
    ds.save_as(str(path))
    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = pydicom.datadict.dictionary_VR(tag)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode() + struct.pack("<H", len(raw_b))
    data = path.read_bytes()
    assert data.count(head + placeholder.encode()) == 1
    path.write_bytes(data.replace(head + placeholder.encode(), head + raw_b))
    return path


# keyword -> (bad value, its tag number, write_dcm keyword arguments)
BAD_DICOM_VALUES = {
    "NumberOfFrames": ("1A", "(0028,0008)", {"pixel_spacing": (0.5, 0.4)}),
    "PixelSpacing": ("0.5\\abc", "(0028,0030)", {"pixel_spacing": (0.5, 0.4)}),
    "ImagerPixelSpacing": ("x\\y", "(0018,1164)", {"imager_spacing": (0.5, 0.4)}),
    "SliceThickness": ("thick", "(0018,0050)", {"pixel_spacing": (0.5, 0.4)}),
    "ImagePositionPatient": ("1\\2\\zz", "(0020,0032)",
                             {"pixel_spacing": (0.5, 0.4), "position": (1, 2, 3), "orientation": (1, 0, 0, 0, 1, 0)}),
    "ImageOrientationPatient": ("1\\0\\0\\0\\1\\O", "(0020,0037)",
                                {"pixel_spacing": (0.5, 0.4), "position": (1, 2, 3), "orientation": (1, 0, 0, 0, 1, 0)}),
    "RescaleSlope": ("one", "(0028,1053)", {"pixel_spacing": (0.5, 0.4)}),
}


@pytest.mark.parametrize("keyword", list(BAD_DICOM_VALUES))
def test_dicom_malformed_value_names_file_tag_and_value(tmp_path, keyword):
    bad, number, kwargs = BAD_DICOM_VALUES[keyword]
    f = write_dcm(tmp_path / f"bad_{keyword}.dcm", radiograph(), **kwargs)
    set_raw_dicom_value(f, keyword, bad)
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(spatial_dims=2)(f)
    msg = str(e.value)
    assert e.value.path == str(f)
    assert_file_error(e, f, keyword, number, bad)
    assert "\n" not in msg and "invalid literal" not in msg and "could not convert" not in msg, msg


def test_dicom_malformed_value_in_pydicom_strict_mode(tmp_path, monkeypatch):
    """pydicom's strict reading mode raises on the value itself: the same message."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    f = set_raw_dicom_value(write_dcm(tmp_path / "strict.dcm", radiograph(), pixel_spacing=(0.5, 0.4)),
                            "NumberOfFrames", "1A")
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(f)
    assert_file_error(e, f, "NumberOfFrames (0028,0008) holds an invalid value '1A'")


def test_dicom_series_malformed_value_names_the_slice(tmp_path):
    folder = write_series(tmp_path / "ct", n=3)
    bad_slice = sorted(folder.iterdir())[1]
    set_raw_dicom_value(bad_slice, "SliceThickness", "2,5")
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage()(folder)
    assert_file_error(e, folder, bad_slice.name, "SliceThickness", "(0018,0050)", "2,5")
    assert "\n" not in str(e.value)


def test_mha_2d_zero_spacing_refused(tmp_path):
    f = tmp_path / "zero.mha"
    f.write_bytes(b"ObjectType = Image\nNDims = 2\nDimSize = 3 2\nElementSpacing = 0 0\n"
                  b"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n" + bytes(6))
    with pytest.raises(ImageLoadError) as e:
        LoadLandmarkImage(allow_pixel_units=True)(f)
    assert_file_error(e, f, "spacing must be positive")


# ------------------------------------------------------------------------------------ reader registry


def test_every_image_suffix_resolves_to_a_reader_that_declares_it():
    assert IMAGE_SUFFIXES, "no reader registered"
    assert len(set(IMAGE_SUFFIXES)) == len(IMAGE_SUFFIXES), "a suffix is claimed twice"
    assert set(IMAGE_SUFFIXES) == {s for r in READERS for s in r.suffixes}
    assert [len(s) for s in IMAGE_SUFFIXES] == sorted((len(s) for s in IMAGE_SUFFIXES), reverse=True)
    assert set(DICOM_SUFFIXES) <= set(IMAGE_SUFFIXES)
    for s in IMAGE_SUFFIXES:
        assert s == s.lower() and s.startswith(".")
        for name in (f"case{s}", f"dir.d/CASE{s.upper()}", f"case.1{s}"):
            reader = reader_for(name)
            assert s in reader.suffixes, (name, reader)
            assert image_suffix(name) == s, name
    for s in DICOM_SUFFIXES:
        assert reader_for(f"x{s}").format == "DICOM"


def test_image_suffix_longest_match_and_no_match():
    assert image_suffix("brain.nii.gz") == ".nii.gz"
    assert image_suffix("Brain.NII.GZ") == ".nii.gz"
    assert image_suffix("pair.img.gz") == ".img.gz"
    assert image_suffix("/data/x.v2.nrrd") == ".nrrd"
    for name in ("notes.txt", "archive.tar.gz", "IM0001", "x.nii.gz.bak", ".png"):
        assert image_suffix(name) is None, name


def test_reader_for_folders_and_suffix_less_dicom(tmp_path):
    assert reader_for(tmp_path).reads_folders
    assert reader_for(tmp_path).format == "DICOM series"
    f = write_dcm(tmp_path / "IM0001", radiograph(), pixel_spacing=(0.2, 0.2))
    assert reader_for(f).format == "DICOM" and has_dicom_marker(f)
    g = tmp_path / "IM0002"
    g.write_bytes(b"\0" * 200)
    assert not has_dicom_marker(g)
    with pytest.raises(ImageLoadError) as e:
        reader_for(g)
    assert_file_error(e, g, "unsupported file type")


def test_unknown_suffix_error_names_the_file_and_lists_the_suffixes(tmp_path):
    f = tmp_path / "scan.xyz"
    f.write_bytes(b"\0" * 300)
    for load in (reader_for, LoadLandmarkImage()):
        with pytest.raises(ImageLoadError) as e:
            load(f)
        assert_file_error(e, f, "unsupported file type '.xyz'", "folder")
        assert e.value.path == str(f)
        for s in IMAGE_SUFFIXES:
            assert s in e.value.problem, s


def test_image_load_error_pickles():
    e = pickle.loads(pickle.dumps(ImageLoadError("/data/a.nii.gz", "the file is empty (0 bytes)")))
    assert isinstance(e, ImageLoadError) and isinstance(e, ValueError)
    assert (e.path, e.problem) == ("/data/a.nii.gz", "the file is empty (0 bytes)")
    assert str(e) == "cannot load image '/data/a.nii.gz': the file is empty (0 bytes)"


def test_is_companion_file(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Pair(data, np.eye(4)), str(tmp_path / "a.img"))  # writes a.hdr + a.img
    assert (tmp_path / "a.hdr").is_file()
    assert is_companion_file(tmp_path / "a.img")
    assert not is_companion_file(tmp_path / "a.hdr")
    lone = tmp_path / "lone.img"
    lone.write_bytes(b"\0" * 10)
    assert not is_companion_file(lone)
    nib.save(nib.Nifti1Pair(data, np.eye(4)), str(tmp_path / "c.img.gz"))  # nibabel pairs it with c.hdr.gz
    assert is_companion_file(tmp_path / "c.img.gz") and not is_companion_file(tmp_path / "c.hdr.gz")
    (tmp_path / "UP.IMG").write_bytes(b"\0")
    (tmp_path / "UP.HDR").write_bytes(b"\0")
    assert is_companion_file(tmp_path / "UP.IMG")
    write_nifti(tmp_path / "v.nii.gz", data, np.eye(4))
    assert not is_companion_file(tmp_path / "v.nii.gz")
    assert not is_companion_file(tmp_path / "notes.txt")


def _round_trip_cases(tmp_path):
    """One small file per reader family: (path, LoadLandmarkImage kwargs, expected affine)."""
    cases = []
    a3 = np.diag([0.4, 0.5, 2.0, 1.0])
    a3[:3, 3] = [10.0, -20.0, 30.0]
    vol = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    cases.append((write_nifti(tmp_path / "vol.nii.gz", vol, a3), {}, a3))
    nib.save(nib.Nifti1Pair(vol, a3), str(tmp_path / "pair.img"))
    cases.append((tmp_path / "pair.hdr", {}, a3))
    nib.save(nib.Nifti1Pair(vol, a3), str(tmp_path / "cpair.img.gz"))
    cases.append((tmp_path / "cpair.hdr.gz", {}, a3))
    write_itk(tmp_path / "vol.nrrd", np.arange(60, dtype=np.float32).reshape(3, 4, 5), (0.4, 0.5, 2.0), (10, 20, 30))
    cases.append((tmp_path / "vol.nrrd", {}, [[-0.4, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2, 30], [0, 0, 0, 1]]))
    Image.fromarray(np.arange(21, dtype=np.uint8).reshape(3, 7)).save(tmp_path / "pic.png")
    cases.append((tmp_path / "pic.png", {"spacing": (0.1, 0.2)}, np.diag([0.1, 0.2, 1.0])))
    cases.append((write_dcm(tmp_path / "xray.dcm", radiograph(), pixel_spacing=(0.5, 0.4)), {}, np.diag([0.4, 0.5, 1.0])))
    cases.append((write_series(tmp_path / "ct"), {},
                  [[-0.4, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]]))
    return cases


def test_round_trip_through_every_reader_family(tmp_path):
    cases = _round_trip_cases(tmp_path)
    assert {reader_for(p).name for p, _, _ in cases} == {r.name for r in READERS}, "a reader has no round trip"
    for path, kwargs, affine in cases:
        reader = reader_for(path)
        img = LoadLandmarkImage(**kwargs)(path)
        affine = np.asarray(affine, dtype=np.float64)
        nd = affine.shape[0] - 1
        np.testing.assert_allclose(img.affine.numpy(), affine, atol=1e-6, err_msg=str(path))
        np.testing.assert_allclose(img.meta["spacing"], np.linalg.norm(affine[:nd, :nd], axis=0), rtol=1e-6)
        assert img.meta["format"] == reader.format and img.meta["spatial_dims"] == nd, path
        assert img.meta["filename_or_obj"] == str(path)
    # both halves of a NIfTI pair read the same image
    np.testing.assert_array_equal(LoadLandmarkImage()(tmp_path / "pair.img").numpy(),
                                  LoadLandmarkImage()(tmp_path / "pair.hdr").numpy())


class ToyReader(ImageReader):
    """``.toy`` (and any other ``.gz``): a .npy array with 0.25 mm voxels."""

    name = "toy"
    format = "Toy"
    suffixes = (".toy", ".gz")

    def read(self, path, *, max_voxels=MAX_VOXELS):
        with open(path, "rb") as f:
            arr = np.load(f)
        return ImageData(array=arr, affine=np.diag([0.25] * arr.ndim + [1.0]))


@pytest.fixture
def toy_reader():
    reader = register_reader(ToyReader())
    try:
        yield reader
    finally:
        READERS.remove(reader)


def test_registered_reader_is_used_by_the_loader(tmp_path, toy_reader):
    f = tmp_path / "Case.TOY"
    with open(f, "wb") as fh:
        np.save(fh, np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert reader_for(f) is toy_reader and image_suffix(f.name) == ".toy"
    assert reader_for("x.gz") is toy_reader  # longest suffix wins: .nii.gz stays NIfTI
    assert reader_for("x.nii.gz").name == reader_for("x.IMG.GZ").name == "nifti"
    img = LoadLandmarkImage(spatial_dims=3)(f)
    assert img.shape == (1, 2, 3, 4) and img.meta["format"] == "Toy"
    np.testing.assert_allclose(img.meta["spacing"], [0.25] * 3)
    img = LoadLandmarkImaged(keys="image")({"image": str(f)})["image"]
    np.testing.assert_allclose(img.affine.numpy(), np.diag([0.25, 0.25, 0.25, 1.0]))
    empty = tmp_path / "bad.gz"
    empty.write_bytes(b"not npy")
    with pytest.raises(ImageLoadError) as e:  # a reader's own exception still names the file
        LoadLandmarkImage()(empty)
    assert_file_error(e, empty, "not a Toy file")


def test_toy_reader_is_gone_after_the_test(tmp_path):
    assert all(r.name != "toy" for r in READERS)
    f = tmp_path / "x.toy"
    f.write_bytes(b"\0" * 200)
    with pytest.raises(ImageLoadError, match="unsupported file type"):
        LoadLandmarkImage()(f)


def test_register_reader_refuses_clashes():
    class Clash(ToyReader):
        name = "clash"
        suffixes = (".png",)

    class Upper(ToyReader):
        name = "upper"
        suffixes = (".TOY",)

    before = list(READERS)
    with pytest.raises(ValueError, match="already read by"):
        register_reader(Clash())
    with pytest.raises(ValueError, match="lowercase"):
        register_reader(Upper())
    with pytest.raises(ValueError, match="already registered"):
        register_reader(type("Nifti2", (ToyReader,), {"name": "nifti", "suffixes": (".n2",)})())
    with pytest.raises(TypeError):
        register_reader(ToyReader)
    assert READERS == before
