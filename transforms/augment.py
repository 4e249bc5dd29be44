"""Transforms for training from few subjects: fixed ("seeded") random deformations and a memo for a
deterministic preprocessing that many datalist entries share.

With one annotated subject (the AFIDs template), training cases are random deformations of the
same volume and validation cases must be deformations too, but the *same* ones at every
validation, or the validation error would move with the draw rather than with the model:

- :class:`SeededRandomd` applies a random transform with a random state seeded from the data
  (``d["seed"]``), so a datalist entry always gets the same deformation. Its output is a function
  of its input: it is deliberately *not* ``Randomizable``, so MONAI's ``CacheDataset`` caches its
  result (each validation case is computed once, not once per epoch).
- :class:`MemoizeTransformd` runs a deterministic transform once per distinct input and hands out
  copies of the result: loading and resampling a 193 x 229 x 193 volume for each of 64 virtual
  training cases per epoch would dominate the run, and ``CacheDataset`` would keep 64 identical
  copies. The memo keeps ``maxsize`` results per process.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, MapTransform, RandomizableTrait

__all__ = ["SeededRandomd", "MemoizeTransformd"]


class SeededRandomd(MapTransform):
    """Apply a random (dictionary) transform with its random state seeded by ``d[seed_key]``.

    The same entry (same seed) gets the same random draw every time it is loaded, in any process
    or worker and in any order; entries with different seeds get independent draws. For each call
    a private copy of ``transform`` is made and seeded with ``set_random_state(seed=d[seed_key])``
    (a ``Compose`` seeds its members from that), so the instance passed in is never touched:
    the same transform objects may also serve random training augmentation, and concurrent calls
    (``CacheDataset`` fills its cache from threads) do not share state.

    This transform is deterministic given its input and is therefore not ``Randomizable``:
    ``CacheDataset`` caches its output, and ``set_determinism`` / DataLoader worker seeding do not
    change it.

    Args:
        transform: a dictionary transform (or ``Compose``) with ``set_random_state``.
        seed_key: key of the integer seed in the data dictionary.
        allow_missing_keys: with True, an entry without ``seed_key`` passes through unchanged;
            otherwise it is an error.

    Example (validation cases ``{"image": ..., "landmarks": ..., "seed": 1000 + i}``)::

        SeededRandomd(Compose([RandAffined("image", prob=1.0, rotate_range=0.17),
                               RandLandmarkElasticd("image", "landmarks", prob=1.0)]), seed_key="seed")
    """

    def __init__(self, transform: Callable, seed_key: str = "seed", allow_missing_keys: bool = False):
        super().__init__(keys=seed_key, allow_missing_keys=allow_missing_keys)
        if not hasattr(transform, "set_random_state"):
            raise TypeError(f"{type(transform).__name__} has no set_random_state(); a MONAI Randomizable transform "
                            "or Compose is expected")
        self.transform = copy.deepcopy(transform)
        self.seed_key = seed_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        d = dict(data)
        if self.seed_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"SeededRandomd: no {self.seed_key!r} in the data (keys: {sorted(map(str, d))})")
        seed = int(d[self.seed_key])
        if seed < 0:
            raise ValueError(f"SeededRandomd: seed must be >= 0, got {seed}")
        t = copy.deepcopy(self.transform)
        t.set_random_state(seed=seed % (2**32))
        return t(d)


class MemoizeTransformd(MapTransform):
    """Apply a deterministic transform to the ``keys`` of the data only, remembering the result.

    ``transform`` sees ``{k: d[k] for k in keys}``; its output (all keys it returns) is merged
    into ``d``. Results are kept per distinct input (hash of the ``keys`` values, as MONAI's
    ``CacheDataset(hash_as_key=True)`` computes it) for the ``maxsize`` most recent inputs, and a
    deep copy is handed out every time, so later (random, in-place) transforms cannot alter the
    memo. Other keys of ``d`` (case name, seed) pass through: unlike ``hash_as_key``, entries that
    share an image keep their own identity.

    Use it only for transforms whose output depends on the listed keys alone (loading,
    reorientation, resampling, padding, normalisation), never for random ones (a ``Randomizable``
    ``transform`` is refused).

    Memory: ``maxsize`` results per process (each DataLoader worker holds its own memo; with the
    default ``fork`` start, workers inherit what the main process has already memoised).

    Args:
        transform: a deterministic dictionary transform (typically a ``Compose``).
        keys: the data keys the transform reads (e.g. ``["image", "landmarks"]``).
        maxsize: how many distinct inputs to remember.
    """

    def __init__(self, transform: Callable, keys: KeysCollection, maxsize: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        # a Compose is formally Randomizable; what matters is whether any of its members is
        members = list(transform.flatten().transforms) if isinstance(transform, Compose) else [transform]
        random = [type(t).__name__ for t in members if isinstance(t, RandomizableTrait)]
        if random:
            raise TypeError(f"MemoizeTransformd needs a deterministic transform, but it contains random ones: {random}")
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.transform = transform
        self.maxsize = int(maxsize)
        self._memo: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:  # picklable for spawned DataLoader workers (the memo travels along)
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def cache_clear(self) -> None:
        with self._lock:
            self._memo.clear()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        sub = {k: d[k] for k in self.key_iterator(d)}
        key = pickle_hashing(sub)
        with self._lock:  # one computation per input even when CacheDataset fills from threads
            if key in self._memo:
                self._memo.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
                self._memo[key] = self.transform(sub)
                while len(self._memo) > self.maxsize:
                    self._memo.popitem(last=False)
            out = self._memo[key]
        d.update(copy.deepcopy(out))
        return d
