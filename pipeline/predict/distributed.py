"""Prediction over several processes (``torchrun --nproc_per_node N -m heatmark predict ...``).

torchrun starts N copies of the command and tells each its place through the environment: ``RANK``
(0 .. WORLD_SIZE-1 over all nodes), ``WORLD_SIZE`` and ``LOCAL_RANK`` (the index on its node, used to
pick ``cuda:LOCAL_RANK``). :func:`ranks_from_env` reads them; without them (a plain run) the run is
rank 0 of 1 and nothing here talks to another process.

With ``WORLD_SIZE > 1``, :class:`Ranks` opens a gloo process group (``MASTER_ADDR``/``MASTER_PORT``
from torchrun) for the few control messages of a run: a barrier, one broadcast of rank 0's set-up
error (so that every rank stops with it instead of waiting), and the gathering of the per-rank
counts. Gloo also serves CUDA runs: only small Python objects travel, never tensors of the model.
A group someone else opened (an ``nccl`` one in a training script, say) is reused through a gloo
subgroup and left open.

:func:`shard` deals the cases round-robin: rank r takes cases r, r + N, r + 2N ... of the sorted
list of cases still to do, which every rank computes alike from the same OUTPUT state.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from heatmark.predict.errors import PredictUsageError

__all__ = ["BARRIER_TIMEOUT_S", "Ranks", "ranks_from_env", "shard"]

#: How long a rank waits at a barrier for the others (seconds): the slowest rank's lead at the end
#: of its shard must fit. torchrun ends every rank as soon as one fails, so a crash does not wait.
BARRIER_TIMEOUT_S = 6 * 3600

T = TypeVar("T")


def _env_int(env: dict, name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise PredictUsageError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


@dataclass
class Ranks:
    """This process's place among the prediction processes, and their process group.

    Attributes:
        rank: 0 .. ``world_size - 1``; rank 0 prepares OUTPUT and writes the tables.
        world_size: the number of processes (1: a plain run, no process group).
        local_rank: the index on this node (``cuda:local_rank``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _group: Any = field(default=None, repr=False)
    _owned: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def start(self) -> Ranks:
        """Join the process group (``WORLD_SIZE > 1`` only); returns self."""
        if not self.active or self._group is not None:
            return self
        timeout = datetime.timedelta(seconds=BARRIER_TIMEOUT_S)
        if dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if not os.environ.get(name):
                    raise PredictUsageError(f"WORLD_SIZE={self.world_size} but {name} is not set: start several "
                                            "processes with torchrun (torchrun --nproc_per_node N -m heatmark "
                                            "predict ...)")
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=timeout)
            self._group = dist.group.WORLD
            self._owned = True
        return self

    def stop(self) -> None:
        """Leave the process group if :meth:`start` opened it."""
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
        self._group, self._owned = None, False

    def barrier(self) -> None:
        """Wait for every rank (nothing with one process)."""
        if self.active:
            dist.barrier(group=self._group)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self._group)
        return out

    def device(self, name: str) -> str:
        """The ``--device`` of this rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when there are
        several processes and CUDA is available; anything else is kept."""
        if self.active and name in (None, "", "auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return name


def ranks_from_env(env: dict | None = None) -> Ranks:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from the environment (as torchrun sets them); absent:
    rank 0 of 1.

    Raises:
        PredictUsageError: a value that is not an integer or out of range.
    """
    env = dict(os.environ if env is None else env)
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise PredictUsageError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                                "(need 0 <= RANK < WORLD_SIZE)")
    return Ranks(rank=rank, world_size=world, local_rank=local)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item from index ``rank``."""
    return list(items[rank::world_size])
