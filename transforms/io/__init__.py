"""Image loading with physical spacing: :class:`LoadLandmarkImage` and a registry of readers.

:class:`LoadLandmarkImage` (:mod:`~heatmark.transforms.io.loader`) turns a path into a
channel-first ``MetaTensor`` whose affine maps voxels to world millimetres. The file itself is
read by the reader the registry (:mod:`~heatmark.transforms.io.registry`) picks for it, one
:class:`ImageReader` per format family, each declaring its suffixes once:

* :class:`NiftiReader` (:mod:`~heatmark.transforms.io.nifti`): NIfTI and NIfTI/Analyze pairs;
* :class:`ItkReader` (:mod:`~heatmark.transforms.io.itk`): MetaImage and NRRD;
* :class:`PilReader` (:mod:`~heatmark.transforms.io.pil`): PNG, JPEG, BMP and TIFF;
* :class:`DicomFileReader` and :class:`DicomSeriesReader` (:mod:`~heatmark.transforms.io.dicom`):
  DICOM files (by suffix or by their ``DICM`` marker) and folders holding one series.

The suffixes are declared on each class; :data:`IMAGE_SUFFIXES` lists them all. The table in
:mod:`~heatmark.transforms.io.loader` says which MONAI reader each one uses.

Every reader checks the header (declared size against ``max_voxels``, spacing) before reading
voxels and reports every failure as an :class:`ImageLoadError` naming the file.

For folder scans (``heatmark predict`` input discovery) the registry is the one list of what can
be loaded: :data:`IMAGE_SUFFIXES`, :data:`DICOM_SUFFIXES`, :func:`image_suffix`,
:func:`is_companion_file` and :func:`has_dicom_marker`.
"""

# The NibabelReader name is kept here for code that patches it through this module
# (``monkeypatch.setattr("heatmark.transforms.io.NibabelReader.get_data", ...)``).
from monai.data import NibabelReader  # noqa: F401

from heatmark.transforms.io.base import MAX_VOXELS, ImageData, ImageLoadError, ImageReader
from heatmark.transforms.io.dicom import DicomFileReader, DicomSeriesReader, has_dicom_marker
from heatmark.transforms.io.itk import ItkReader
from heatmark.transforms.io.loader import LoadLandmarkImage, LoadLandmarkImaged
from heatmark.transforms.io.nifti import NiftiReader
from heatmark.transforms.io.pil import PilReader
from heatmark.transforms.io.registry import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    READERS,
    image_suffix,
    is_companion_file,
    reader_for,
    register_reader,
)

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_VOXELS",
    "READERS",
    "DicomFileReader",
    "DicomSeriesReader",
    "ImageData",
    "ImageLoadError",
    "ImageReader",
    "ItkReader",
    "LoadLandmarkImage",
    "LoadLandmarkImaged",
    "NiftiReader",
    "PilReader",
    "has_dicom_marker",
    "image_suffix",
    "is_companion_file",
    "reader_for",
    "register_reader",
]
