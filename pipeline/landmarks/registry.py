"""The landmark-file format registry: which reader and writer a file name's suffix selects.

A format is one :class:`LandmarkFormat` (name, suffixes, default frame, reader, writers) in the
ordered :data:`FORMATS`; :func:`format_for` picks the format of a path by its longest matching
suffix, so ``a.mrk.json`` is Slicer markups and ``a.json`` heatmark's plain JSON. The readers and
writers of :mod:`heatmark.landmarks.files` look formats up here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from heatmark.landmarks.model import CoordinateSystem, Landmarks, file_error

__all__ = [
    "FORMATS",
    "LandmarkContents",
    "LandmarkFormat",
    "TableLayout",
    "file_stem",
    "format_for",
    "register_format",
    "suffix_list",
    "table_layout_arg",
    "unregister_format",
]

#: Layout of a multi-case table: one row per landmark ("long") or one row per case ("wide").
TableLayout = Literal["long", "wide"]


def table_layout_arg(layout: str) -> TableLayout:
    """Validate a caller's ``layout`` argument: ``"long"`` or ``"wide"``."""
    if layout not in ("long", "wide"):
        raise ValueError(f"layout must be 'long' or 'wide', got {layout!r}")
    return layout


class LandmarkContents(NamedTuple):
    """What a format's reader returns: every case of one file, in world mm, **RAS**."""

    #: ``{case: Landmarks}``; the key ``None`` means the file carries no case id (the caller
    #: then uses the file name without its suffix, see :func:`file_stem`).
    table: dict[str | None, Landmarks]
    #: True where the format stores 3D points only (Slicer): 2D landmarks were written with z = 0
    #: and may be read back as 2D.
    always_3d: bool = False
    #: ``{case: (N,) float64}`` per-landmark confidence where the file stores one (the ``confidence``
    #: column of a long CSV, the ``confidence=`` of a Slicer point's description); NaN where a
    #: point has none; None when the file has no confidence at all.
    confidence: dict[str | None, np.ndarray] | None = None


#: ``read(path) -> LandmarkContents``; problems raise ``LandmarkFileError`` naming the file.
ReadFn = Callable[[Path], LandmarkContents]
#: ``write(path, lm, frame, case)``: write one case (``lm`` in RAS mm) atomically in ``frame``;
#: ``case`` is the caller's case id or None. A format with ``stores_confidence`` also takes the
#: keyword ``confidence=`` (an ``(N,)`` array, or None).
WriteFn = Callable[[Path, Landmarks, CoordinateSystem, str | None], None]
#: ``write_table(path, table, frame, layout, confidence)``: write ``{case: Landmarks}`` (RAS mm)
#: atomically in ``frame``; ``confidence`` is ``{case: (N,) values}`` or None. Raises
#: ``ValueError`` for options the format does not support, before writing anything.
WriteTableFn = Callable[[Path, Mapping[str, Landmarks], CoordinateSystem, TableLayout,
                         Mapping[str, Any] | None], None]


@dataclass(frozen=True)
class LandmarkFormat:
    """One landmark-file format.

    Attributes:
        name: short id (``"csv"``, ``"fcsv"``, ``"mrk.json"``, ``"json"``); unique in the registry.
        suffixes: lowercase file-name endings with their dot (``(".mrk.json",)``); unique in the
            registry. Matching is case-insensitive and the longest matching suffix wins.
        default_frame: the frame ``write_landmarks`` writes when the caller names none.
        read: reads every case of a file (see :data:`ReadFn`).
        write: writes one case (see :data:`WriteFn`).
        write_table: writes several cases to one file (see :data:`WriteTableFn`); None for
            single-case formats.
        description: one line for messages and docs.
        stores_confidence: ``write`` accepts ``confidence=`` (``(N,)`` values) and ``read``
            returns them in :attr:`LandmarkContents.confidence`.
    """

    name: str
    suffixes: tuple[str, ...]
    default_frame: CoordinateSystem
    read: ReadFn
    write: WriteFn
    write_table: WriteTableFn | None = None
    description: str = ""
    stores_confidence: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"format name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.suffixes, tuple) or not self.suffixes:
            raise ValueError(f"format {self.name!r}: suffixes must be a non-empty tuple, got {self.suffixes!r}")
        for s in self.suffixes:
            if not isinstance(s, str) or len(s) < 2 or not s.startswith(".") or s != s.lower():
                raise ValueError(f"format {self.name!r}: suffixes must be lowercase and start with '.', got {s!r}")
        if self.default_frame not in ("RAS", "LPS"):
            raise ValueError(f"format {self.name!r}: default_frame must be 'RAS' or 'LPS', got {self.default_frame!r}")

    @property
    def longest_suffix(self) -> int:
        """Length (characters) of the longest suffix: the registry's sort key."""
        return max(len(s) for s in self.suffixes)


#: The registered formats, longest suffix first (ties: in registration order). Change it only
#: through :func:`register_format` and :func:`unregister_format`.
FORMATS: list[LandmarkFormat] = []


def register_format(fmt: LandmarkFormat) -> LandmarkFormat:
    """Add ``fmt`` to :data:`FORMATS` (kept longest suffix first) and return it.

    Registering the very same object again does nothing.

    Raises:
        ValueError: another registered format has the same name or one of the suffixes.
    """
    if not isinstance(fmt, LandmarkFormat):
        raise TypeError(f"expected a LandmarkFormat, got {type(fmt).__name__}")
    if any(f is fmt for f in FORMATS):
        return fmt
    for other in FORMATS:
        if other.name == fmt.name:
            raise ValueError(f"a landmark format named {fmt.name!r} is already registered")
        shared = sorted(set(other.suffixes) & set(fmt.suffixes))
        if shared:
            raise ValueError(f"format {fmt.name!r}: suffix(es) {shared} already belong to format {other.name!r}")
    FORMATS.append(fmt)
    FORMATS.sort(key=lambda f: -f.longest_suffix)  # stable: ties keep registration order
    return fmt


def unregister_format(name: str) -> LandmarkFormat:
    """Remove the format called ``name`` from :data:`FORMATS` and return it (``KeyError`` if absent)."""
    for i, fmt in enumerate(FORMATS):
        if fmt.name == name:
            return FORMATS.pop(i)
    raise KeyError(f"no landmark format named {name!r}")


def _match(path: Path) -> tuple[LandmarkFormat, str] | None:
    """The format and the suffix of the longest registered suffix ending ``path`` (any case)."""
    name = path.name.lower()
    best: tuple[LandmarkFormat, str] | None = None
    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            if name.endswith(suffix) and (best is None or len(suffix) > len(best[1])):
                best = (fmt, suffix)
    return best


def suffix_list(formats: Sequence[LandmarkFormat] | None = None) -> str:
    """The suffixes of ``formats`` (default: all registered) for messages: ``".mrk.json, .json,
    .fcsv or .csv"``."""
    suffixes = [s for fmt in (FORMATS if formats is None else formats) for s in fmt.suffixes]
    return " or ".join([", ".join(suffixes[:-1]), suffixes[-1]]) if len(suffixes) > 1 else "".join(suffixes)


def format_for(path: str | Path) -> LandmarkFormat:
    """The registered format of ``path``, by its longest matching suffix (case-insensitive).

    Raises:
        LandmarkFileError: no registered suffix matches; the message names the file and the
            supported suffixes.
    """
    path = Path(path)
    found = _match(path)
    if found is None:
        expected = f"expected {suffix_list()}" if FORMATS else "no landmark format is registered"
        raise file_error(path, None, f"unsupported landmark file type; {expected}")
    return found[0]


def file_stem(path: str | Path) -> str:
    """File name without its landmark suffix (``001.mrk.json`` -> ``001``): the case id of a
    file that carries none. Unregistered suffixes lose only the last one (``Path.stem``)."""
    path = Path(path)
    found = _match(path)
    return path.name[: -len(found[1])] if found else path.stem
