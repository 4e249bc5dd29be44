"""Landmarks in memory and in files: the layer just above :mod:`heatmark.core` and below
:mod:`heatmark.transforms`. It imports nothing from heatmark but :mod:`heatmark.core`.

In memory, landmarks have one form everywhere: :class:`Landmarks`, an ``(N, D)`` float64 array
of world coordinates in **millimetres, RAS** plus ``N`` unique names; a missing landmark is a row
of NaN (:mod:`~heatmark.landmarks.model`). On disk the format follows the file name's suffix,
looked up in the format registry (:mod:`~heatmark.landmarks.registry`):

- ``.csv``: long or wide landmark tables (:mod:`~heatmark.landmarks.csv_table`);
- ``.fcsv`` and ``.mrk.json``: 3D Slicer files (:mod:`~heatmark.landmarks.slicer`);
- ``.json``: heatmark's plain JSON, one or many cases (:mod:`~heatmark.landmarks.json_format`).

:func:`read_landmarks`, :func:`read_landmark_table`, :func:`write_landmarks` and
:func:`write_landmark_table` (:mod:`~heatmark.landmarks.files`) work for every registered format.
Problems in a file raise :class:`LandmarkFileError` naming the file, the 1-based line (for
line-based formats) and the problem.

Adding a format: write a module defining ``read(path) -> LandmarkContents`` (cases in RAS mm),
``write(path, lm, frame, case)`` (atomic, via :mod:`heatmark.core.fileio`), optionally a table
writer, and a ``LandmarkFormat(name, suffixes, default_frame, read, write, ...)``; then add it to
the ``register_format`` calls below (or call :func:`register_format` from your own code).
``tests/test_landmarks_io.py`` round-trips every registered format automatically.
"""

from heatmark.landmarks.csv_table import (
    CSV_FORMAT,
    CSV_FRAME_COLUMN,
    CSV_FRAME_COMMENT,
    csv_frame_comment,
    landmark_table_text,
)
from heatmark.landmarks.files import (
    read_confidence,
    read_landmark_table,
    read_landmarks,
    write_landmark_table,
    write_landmarks,
)
from heatmark.landmarks.json_format import JSON_FORMAT
from heatmark.landmarks.model import (
    CoordinateSystem,
    LandmarkFileError,
    Landmarks,
    landmarks_to_tensor,
    lps_to_ras,
    ras_to_lps,
)
from heatmark.landmarks.registry import (
    FORMATS,
    LandmarkContents,
    LandmarkFormat,
    TableLayout,
    file_stem,
    format_for,
    register_format,
    unregister_format,
)
from heatmark.landmarks.slicer import (
    CONFIDENCE_DESCRIPTION,
    FCSV_COLUMNS,
    FCSV_FORMAT,
    FCSV_VERSION,
    MRK_JSON_FORMAT,
    SLICER_MARKUPS_SCHEMA,
)

__all__ = [
    "Landmarks",
    "LandmarkFileError",
    "read_landmarks",
    "read_landmark_table",
    "write_landmarks",
    "write_landmark_table",
    "read_confidence",
    "landmarks_to_tensor",
    "ras_to_lps",
    "lps_to_ras",
    "CSV_FRAME_COLUMN",
    "CSV_FRAME_COMMENT",
    "CONFIDENCE_DESCRIPTION",
    "SLICER_MARKUPS_SCHEMA",
    "FCSV_VERSION",
    "FCSV_COLUMNS",
    "CoordinateSystem",
    "TableLayout",
    # CSV tables
    "landmark_table_text",
    "csv_frame_comment",
    # the format registry
    "FORMATS",
    "LandmarkContents",
    "LandmarkFormat",
    "register_format",
    "unregister_format",
    "format_for",
    "file_stem",
]

for _fmt in (CSV_FORMAT, FCSV_FORMAT, MRK_JSON_FORMAT, JSON_FORMAT):
    register_format(_fmt)
del _fmt
