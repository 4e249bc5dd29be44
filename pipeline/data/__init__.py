"""Data sets on disk: datalists from landmark tables and case lists, checks of a datalist against
its images (:mod:`~heatmark.data.datalist`), and the AFIDs download used by the demo
(:mod:`~heatmark.data.fetch`)."""

from heatmark.data.datalist import (
    DataCheckError,
    check_datalist,
    check_landmarks_in_image,
    datalist_from_table,
    deformation_datalist,
    landmark_names,
    load_datalist,
    read_case_list,
    split_datalist,
)

__all__ = [
    "DataCheckError",
    "check_datalist",
    "check_landmarks_in_image",
    "datalist_from_table",
    "deformation_datalist",
    "landmark_names",
    "load_datalist",
    "read_case_list",
    "split_datalist",
]
