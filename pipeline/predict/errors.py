"""What can go wrong in ``heatmark predict``, in words.

Two kinds: a usage mistake stops the run before any case (:class:`PredictUsageError`, one line,
exit status 2); anything wrong with one case becomes that case's row in ``errors.csv``, its reason
given by :func:`describe`.
"""

from __future__ import annotations

from heatmark.transforms.io import ImageLoadError

__all__ = ["PredictUsageError", "describe"]


class PredictUsageError(Exception):
    """A usage mistake (missing bundle or model, no inputs, bad option): one line, exit status 2."""


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
    # skip MONAI's wrappers ("applying transform ...", "Failed to instantiate ...")
    inner = next((e for e in chain if not str(e).startswith(_WRAPPERS)), chain[-1])
    msg = " ".join(str(inner).split())
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{type(inner).__name__}: {msg}" if msg else type(inner).__name__
