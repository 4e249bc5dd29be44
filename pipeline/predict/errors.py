"""What can go wrong in ``heatmark predict``, in words.

Three kinds: a usage mistake stops the run before any case (:class:`PredictUsageError`, one line,
exit status 2; symbolic links in OUTPUT are one); a failure to write OUTPUT (disk full, read-only,
no permission: any ``OSError`` of a write, :func:`writing`) stops the run at once
(:class:`PredictOutputError`, one line, exit status 1; what was written stays intact and a rerun
resumes); anything wrong with one case (reading it included) becomes that case's row in
``errors.csv``, its reason given by :func:`describe`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from heatmark.transforms.io import ImageLoadError

__all__ = ["PredictUsageError", "PredictOutputError", "CaseError", "describe", "writing"]


class PredictUsageError(Exception):
    """A usage mistake (missing bundle or model, no inputs, bad option): one line, exit status 2."""


class PredictOutputError(OSError):
    """Writing to OUTPUT failed: one line naming what, where and the system's reason; exit status 1.
    An ``OSError`` (with the ``errno`` of the original), so callers that catch those catch it.

    Attributes:
        path: the file or folder heatmark tried to write.
        error: the original ``OSError``.
    """

    def __init__(self, path: str | os.PathLike, error: OSError, what: str = "write"):
        self.path = os.fspath(path)
        self.error = error
        reason = error.strerror or str(error) or type(error).__name__
        code = errno.errorcode.get(error.errno) if isinstance(error.errno, int) else None
        self.message = (f"cannot {what} {self.path}: {reason}" + (f" ({code})" if code else "")
                        + "; the files written so far are intact: free some space or fix the permissions, "
                          "then rerun the same command to resume")
        super().__init__(self.message)
        self.errno, self.strerror = error.errno, error.strerror

    def __str__(self) -> str:
        return self.message


class CaseError(Exception):
    """A problem of one input, already one clear line (:func:`describe` gives it as it is)."""


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` of the block into a :class:`PredictOutputError` naming ``path``."""
    try:
        yield
    except PredictOutputError:
        raise
    except OSError as e:
        raise PredictOutputError(path, e, what) from e


# messages of MONAI's wrappers around the real error
_WRAPPERS = ("applying transform", "Failed to instantiate", "Component to instantiate")


def describe(exc: BaseException) -> str:
    """A one-line reason: the innermost cause of MONAI's "applying transform" wrappers."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__
    for e in chain:
        if isinstance(e, ImageLoadError):
            return e.problem
        if isinstance(e, CaseError):
            return " ".join(str(e).split())
    # skip MONAI's wrappers ("applying transform ...", "Failed to instantiate ...")
    inner = next((e for e in chain if not str(e).startswith(_WRAPPERS)), chain[-1])
    msg = " ".join(str(inner).split())
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{type(inner).__name__}: {msg}" if msg else type(inner).__name__


def config_value(parser: Any, bundle: Any, key: str, default: Any = ..., what: str = "") -> Any:
    """``key`` of the bundle's parsed configs, or ``default`` (when given) where the configs lack it.

    Raises:
        PredictUsageError: the key cannot be built, naming the bundle, the key and ``what`` it is for.
    """
    if default is not ... and key not in parser:
        return default
    try:
        return parser.get_parsed_content(key)
    except Exception as e:  # noqa: BLE001
        raise PredictUsageError(f"bundle {bundle}: cannot build {key!r}{what}: {describe(e)}") from None
