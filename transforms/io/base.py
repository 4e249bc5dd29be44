"""What every image reader shares: the :class:`ImageReader` base, the :class:`ImageData` it
returns, :class:`ImageLoadError` and the header checks all readers make.

A reader turns one file (or one DICOM folder) into the raw voxel array and, where the file has
one, its voxel-to-world affine. Everything after that (channel first, 2D/3D, colour, the 2D
world frame, spacing fallbacks, value checks) is done once, by
:class:`~heatmark.transforms.io.loader.LoadLandmarkImage`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "LUMA",
    "MAX_VOXELS",
    "ImageData",
    "ImageLoadError",
    "ImageReader",
    "check_size",
    "describe",
    "fmt",
    "read_failed",
]

#: Default ceiling on ``channels * voxels`` of one image; larger declared sizes are refused
#: from the header, before any allocation.
MAX_VOXELS = 2**31

#: Luminance weights of R, G and B (ITU-R BT.601, the Y of JPEG's and DICOM's YBR_FULL): colour
#: images are made grey with them.
LUMA = np.array([0.299, 0.587, 0.114])


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the file and says what is wrong.

    Attributes:
        path: the file or folder that failed.
        problem: the problem in words, without the file name.
    """

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot load image '{self.path}': {problem}")

    def __reduce__(self):  # picklable (worker processes), although __init__ takes two arguments
        return type(self), (self.path, self.problem)


@dataclass
class ImageData:
    """What a reader hands to the loader.

    Attributes:
        array: the voxels, spatial axes in world-axis order (axis 0 = x), channels at
            ``channel_dim``.
        affine: the voxel-to-world (RAS mm) affine from the file's header, ``(D+1, D+1)`` or
            4x4 for a 2D image stored as a volume; ``None`` when the file has no geometry header
            (PNG & co., single-frame DICOM): the loader then builds a 2D affine from
            ``spacing`` / ``patient_plane`` or from the user's spacing.
        channel_dim: the channel axis of ``array`` as MONAI reports ``original_channel_dim``
            (an int; ``None``, NaN or ``"no_channel"``: no channel axis).
        world_frame: ``"RAS"`` (patient frame) or ``"image"`` (pixel grid of a picture).
        header_spacing: the affine's spacing comes from the file (``False``: the header has
            none, use the user's).
        spacing: ``(sx, sy)`` mm from the file's tags, for ``affine=None`` images.
        spacing_source: the tag ``spacing`` came from (named in warnings).
        zero_spacing_tag: a spacing tag present but ``0\\0`` (meaning unknown), named in errors.
        patient_plane: ``(position, row direction, column direction)`` in LPS for a 2D image
            placed in the patient frame (DICOM ImagePositionPatient/ImageOrientationPatient).
        intensity_inverted: values were inverted (DICOM MONOCHROME1).
        colour: the channel axis holds the R, G, B samples of one colour image (DICOM
            SamplesPerPixel 3), so the loader makes it grey (or keeps it with ``keep_color``)
            for a volume as for a 2D image, instead of refusing several channels.
    """

    array: np.ndarray
    affine: np.ndarray | None
    channel_dim: Any = None
    world_frame: str = "RAS"
    header_spacing: bool = True
    spacing: tuple[float, float] | None = None
    spacing_source: str | None = None
    zero_spacing_tag: str | None = None
    patient_plane: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    intensity_inverted: bool = False
    colour: bool = False


class ImageReader:
    """One image format family: the suffixes it reads, declared once, and how to read them.

    Subclasses set the class attributes and implement :meth:`read`; an instance is registered
    with :func:`~heatmark.transforms.io.registry.register_reader`.

    Attributes:
        name: short unique key (``"nifti"``).
        format: name in words, stored in ``meta["format"]`` and used in messages (``"NIfTI"``).
        suffixes: lowercase file name endings it reads, with the dot (``".nii.gz"``).
        reads_folders: it reads a folder (a DICOM series); :func:`reader_for` gives a folder to
            the first such reader.
        colour_2d: a 2D image may come with colour channels (otherwise several channels are
            refused as a 4D image).
        inputs_hint: other inputs it reads, in words, for the list of supported inputs in
            messages (``"a folder holding one series"``).
        companions: ``{suffix: sibling suffixes}``: a file with ``suffix`` is read through a
            sibling of the same name with one of those endings when it exists (NIfTI pair
            ``.img`` -> ``.hdr``), so a folder scan must not count it as a second image.
    """

    name: ClassVar[str] = ""
    format: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    reads_folders: ClassVar[bool] = False
    colour_2d: ClassVar[bool] = True
    inputs_hint: ClassVar[str] = ""
    companions: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def sniff(self, path: Path) -> bool:
        """True when the file, whose name has no registered suffix, is in this format."""
        return False

    def read(self, path: Path, *, max_voxels: int = MAX_VOXELS) -> ImageData:
        """Read ``path``, refusing declared sizes above ``max_voxels`` before reading voxels.

        Raises:
            ImageLoadError: naming the file, for every failure.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, suffixes={self.suffixes!r})"


# --------------------------------------------------------------------------------------------
# checks and messages shared by the readers


def check_size(path: Path, shape: Sequence[int], components: int = 1, max_voxels: int = MAX_VOXELS) -> None:
    """Refuse an empty/invalid declared size or one above ``max_voxels`` values."""
    dims = [int(s) for s in shape]
    if any(s <= 0 for s in dims):
        raise ImageLoadError(path, f"the header declares an empty or invalid size {tuple(dims)}")
    total = math.prod(dims) * max(int(components), 1)
    if total > max_voxels:
        raise ImageLoadError(
            path,
            f"the header declares an image of size {tuple(dims)} ({total:,} values), more than the "
            f"limit of {max_voxels:,}; the header is probably damaged",
        )


def read_failed(path: Path, what: str, exc: BaseException) -> ImageLoadError:
    """The :class:`ImageLoadError` for an exception raised while reading a ``what`` (format) file."""
    if isinstance(exc, ImageLoadError):
        return exc
    if isinstance(exc, MemoryError):
        return ImageLoadError(path, "not enough memory to read the image")
    return ImageLoadError(path, f"cannot read it: truncated, damaged or not a {what} file ({describe(exc)})")


def describe(exc: BaseException) -> str:
    """An exception in one line, without ITK's source location prefix."""
    msg = " ".join(str(exc).split())
    # ITK: "/path/itkMetaImageIO.cxx:490: ITK ERROR: MetaImageIO(0x55..): <text>" -> "<text>"
    msg = re.sub(r"^\S+\.(?:cxx|hxx|h):\d+:\s*ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", msg)
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def fmt(values: Any) -> str:
    """``(0.4, 0.5)`` for a sequence of numbers (no numpy reprs in messages)."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in np.ravel(np.asarray(values, dtype=np.float64))) + ")"
