"""The in-memory form of landmarks, the landmark-file error and the RAS/LPS frames.

:class:`Landmarks` holds one case: an ``(N, D)`` float64 array of world coordinates in
**millimetres, RAS** (the frame MONAI's readers report) plus ``N`` unique names; a missing
landmark is a row of NaN. Every format module converts to this form on reading and from it on
writing, so nothing above :mod:`heatmark.landmarks` ever sees LPS or a file's layout.

RAS <-> LPS: LPS = (-x, -y, z) of RAS and back (the same map both ways).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "CoordinateSystem",
    "LandmarkFileError",
    "Landmarks",
    "check_table",
    "convert_frame",
    "coordinate_system_arg",
    "file_error",
    "frame_name",
    "landmarks_in_ras",
    "landmarks_to_tensor",
    "lps_to_ras",
    "ras_to_lps",
]

#: The two world frames a landmark file may use; in memory it is always RAS.
CoordinateSystem = Literal["RAS", "LPS"]


# ----------------------------------------------------------------------------------------------
# errors


class LandmarkFileError(ValueError):
    """A landmark file is missing, malformed or does not fit the request.

    The message reads ``"<file>, line <n>: <problem>"`` (or ``"<file>: <problem>"`` where no line
    applies); ``path``, ``line`` and ``problem`` are also attributes.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 problem: str | None = None):
        super().__init__(message)
        self.path = path
        self.line = line
        self.problem = problem

    def __reduce__(self):  # keep the attributes through pickling (DataLoader workers)
        return (self.__class__, (str(self),), self.__dict__)


def file_error(path: str | Path, line: int | None, problem: str) -> LandmarkFileError:
    """The :class:`LandmarkFileError` for ``problem`` in ``path`` at 1-based ``line`` (or none)."""
    where = f"{path}" if line is None else f"{path}, line {line}"
    return LandmarkFileError(f"{where}: {problem}", path=path, line=line, problem=problem)


# ----------------------------------------------------------------------------------------------
# the in-memory form


@dataclass(eq=False)
class Landmarks:
    """Landmarks of one case in world coordinates: millimetres, RAS.

    Attributes:
        coords: ``(N, D)`` float64, ``D`` in (2, 3); a row of NaN is a missing landmark. Finite
            or NaN only, and a row is either complete or entirely NaN.
        names: ``N`` unique, non-empty names without surrounding white space.
    """

    coords: np.ndarray
    names: list[str]

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] not in (2, 3):
            raise ValueError(f"coords must have shape (N, 2) or (N, 3), got {coords.shape}")
        names = list(self.names)
        if len(names) != coords.shape[0]:
            raise ValueError(f"{len(names)} names for {coords.shape[0]} landmarks")
        for name in names:
            if not isinstance(name, str) or not name or name != name.strip():
                raise ValueError(f"landmark names must be non-empty strings without surrounding spaces, got {name!r}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate landmark names: {dup}")
        if np.isinf(coords).any():
            raise ValueError("landmark coordinates must be finite (or NaN for a missing landmark)")
        nan = np.isnan(coords)
        partial = nan.any(axis=1) & ~nan.all(axis=1)
        if partial.any():
            bad = [names[i] for i in np.flatnonzero(partial)]
            raise ValueError(f"landmarks {bad} are partly NaN; a missing landmark is NaN in every coordinate")
        self.coords = coords
        self.names = names

    @property
    def spatial_dims(self) -> int:
        return int(self.coords.shape[1])

    @property
    def num_landmarks(self) -> int:
        return int(self.coords.shape[0])

    def __len__(self) -> int:
        return self.num_landmarks

    @property
    def missing(self) -> np.ndarray:
        """``(N,)`` bool, True where the landmark is missing (NaN)."""
        return np.isnan(self.coords).any(axis=1)

    def index(self, name: str) -> int:
        """Position of landmark ``name`` (``KeyError`` if absent)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no landmark named {name!r}") from None

    def copy(self) -> Landmarks:
        return Landmarks(self.coords.copy(), list(self.names))

    def select(self, names: Sequence[str], missing_ok: bool = True) -> Landmarks:
        """Landmarks ``names`` in that order; names not present become NaN rows
        (``KeyError`` instead when ``missing_ok`` is False)."""
        position = {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in names if n not in position]
        if unknown and not missing_ok:
            raise KeyError(f"no landmarks named {unknown}")
        out = np.full((len(names), self.spatial_dims), np.nan)
        for row, name in enumerate(names):
            if name in position:
                out[row] = self.coords[position[name]]
        return Landmarks(out, list(names))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Landmarks):
            return NotImplemented
        return self.names == other.names and np.array_equal(self.coords, other.coords, equal_nan=True)

    __hash__ = None  # mutable


def landmarks_to_tensor(lm: Landmarks) -> torch.Tensor:
    """``(N, D)`` float64 tensor (a copy) of the world coordinates (mm, RAS); NaN = missing."""
    return torch.tensor(lm.coords, dtype=torch.float64)


def check_table(table: Mapping[str, Landmarks], names: Sequence[str] | None = None,
                spatial_dims: int | None = None) -> tuple[list[str], int]:
    """Common names and dimensionality of all cases of a multi-case table.

    ``names`` / ``spatial_dims``, when given, must match every case's; they also describe an
    empty table (defaults: no names, 3D).

    Raises:
        ValueError: a case id is empty, padded or starts with ``#``, or the cases (or the given
            ``names`` / ``spatial_dims``) differ in names, order or dimensionality.
    """
    if spatial_dims is not None and spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    first: tuple[list[str], int] | None = None
    for case, lm in table.items():
        if not isinstance(case, str) or not case or case != case.strip() or case.startswith("#"):
            raise ValueError(f"case ids must be non-empty strings without surrounding spaces or a leading '#', "
                             f"got {case!r}")
        if first is None:
            first = (lm.names, lm.spatial_dims)
        elif (lm.names, lm.spatial_dims) != first:
            raise ValueError(f"case {case!r} has other landmarks or dimensionality than the first case; "
                             "all cases must share names, order and spatial_dims (see Landmarks.select)")
    if first is None:
        return list(names or []), spatial_dims or 3
    if names is not None and list(names) != first[0]:
        raise ValueError(f"the cases' landmark names {first[0]} differ from names={list(names)}")
    if spatial_dims is not None and spatial_dims != first[1]:
        raise ValueError(f"the cases are {first[1]}D but spatial_dims={spatial_dims}")
    return list(first[0]), first[1]


# ----------------------------------------------------------------------------------------------
# frames


def ras_to_lps(coords: np.ndarray) -> np.ndarray:
    """Convert ``(..., D)`` points between RAS and LPS (negate x and y); returns a new array.

    The map is its own inverse, so :func:`lps_to_ras` is the same operation.
    """
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., :2] *= -1.0
    return out


def lps_to_ras(coords: np.ndarray) -> np.ndarray:
    """Convert ``(..., D)`` points from LPS to RAS (negate x and y); see :func:`ras_to_lps`."""
    return ras_to_lps(coords)


def convert_frame(coords: np.ndarray, src: CoordinateSystem, dst: CoordinateSystem) -> np.ndarray:
    """``(..., D)`` points (mm) given in frame ``src`` expressed in frame ``dst``; a new array."""
    return np.array(coords, dtype=np.float64) if src == dst else ras_to_lps(coords)


def landmarks_in_ras(lm: Landmarks, frame: CoordinateSystem) -> Landmarks:
    """``lm`` whose coordinates were read in ``frame`` (mm), converted to RAS."""
    return Landmarks(convert_frame(lm.coords, frame, "RAS"), lm.names)


def frame_name(value: object) -> CoordinateSystem | None:
    """``"RAS"`` or ``"LPS"`` from a frame name in any case with surrounding spaces; None otherwise."""
    name = value.strip().upper() if isinstance(value, str) else None
    return name if name in ("RAS", "LPS") else None


def coordinate_system_arg(value: str) -> CoordinateSystem:
    """Validate a caller's ``coordinate_system`` argument (case-insensitive): ``"RAS"`` or ``"LPS"``."""
    name = frame_name(value)
    if name is None:
        raise ValueError(f"coordinate_system must be 'RAS' or 'LPS', got {value!r}")
    return name
