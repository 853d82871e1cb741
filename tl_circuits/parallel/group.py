"""The process group as the heavy calls see it: who this rank is, which share of the work is its own, and the few
collectives that put the shares back together (``torch.distributed``; any backend, gloo on CPU, NCCL on GPUs).

Distribution is opt-in: a heavy call splits its work only when it is given ``world=current_world()`` (every rank
makes the same call); its default, ``world=None``, is the one-rank world even where a process group is
initialised, so a call made on one rank alone never waits for the others. With the one-rank world every helper
here is the identity: nothing changes.

Work is split in two ways, both deterministic, so every rank knows every other rank's share without asking:

- :func:`shard` — a contiguous, balanced range of ``n`` items (the first ``n % size`` ranks get one more);
- :func:`owned` — items ``rank, rank + size, ...`` of a list (round robin), for units of unequal cost.

Results are merged exactly: a rank fills its own cells and zeros elsewhere, and one all-reduce (sum) adds them
(``x + 0 == x`` in floating point, NaN stays NaN), so a merged grid is bit-identical to the one a single
process fills.

>>> world = World(rank=1, size=3)
>>> shard(10, world), [shard(10, World(r, 3)) for r in range(3)]
(slice(4, 7, None), [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)])
>>> owned(list("abcdefg"), world)
['b', 'e']
>>> current_world().active   # no process group here
False
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar

import torch
from jaxtyping import Bool
from torch import Tensor

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""Default timeout of a collective in a process group made by :func:`init_from_environment` (30 minutes)."""


@dataclass(frozen=True)
class World:
    """This process's place in the process group.

    Attributes:
        rank, size: ``torch.distributed``'s rank and world size (0 and 1 without a group).
        device: where tensors of a collective must live: the rank's GPU under NCCL, else the CPU.
    """

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """More than one rank: the work is split."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 (the one that writes files)."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


def current_world() -> World:
    """The world of the initialised default process group, or the one-rank world: pass it as ``world=`` to a heavy
    call (on every rank) to split that call's work over the group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    size = dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return World(dist.get_rank(), size, device)


def resolve_world(world: Optional[World]) -> World:
    """The world a heavy call runs in: ``None`` is the one-rank world (no collective, whatever group exists); a
    world of several ranks must be the initialised default group's (ValueError otherwise, naming the mismatch).

    >>> resolve_world(None).active
    False
    """
    if world is None:
        return World()
    if not isinstance(world, World):
        raise TypeError(f"world must be a tl_circuits World (e.g. current_world()) or None, got {type(world).__name__}")
    if not world.active:
        return world
    group = current_world()
    if (group.rank, group.size) != (world.rank, world.size):
        where = group.describe() if group.active else "no process group initialised"
        raise ValueError(f"world={world.describe()} is not this process's process group ({where}); pass "
                         "world=current_world() on every rank, or None to run in this process alone")
    return world


def launched_by_torchrun() -> bool:
    """``torchrun`` (or another launcher following its convention) started this process with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    ``device``: ``"cuda"`` gives each rank its GPU ``LOCAL_RANK`` and NCCL; anything else gloo. ``timeout_s``
    bounds every collective, so a rank that hangs makes the others fail instead of waiting for ever. Returns
    :func:`current_world` (the existing group's, if one is initialised already).
    """
    import torch.distributed as dist

    if timeout_s <= 0:
        raise ValueError(f"the process group timeout must be positive, got {timeout_s} s")
    if dist.is_initialized():
        return current_world()
    backend = "gloo"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current_world()


def shard(n: int, world: World) -> slice:
    """This rank's contiguous share of ``n`` items (balanced; empty when ``n < size`` leaves none)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def owned(items: Sequence[T], world: World) -> list[T]:
    """Items ``rank, rank + size, ...`` of ``items`` (round robin)."""
    return list(items[world.rank::world.size])


def all_reduce_sum(t: Tensor, world: World) -> Tensor:
    """The element-wise sum over ranks of ``t`` (same shape and dtype on every rank), on ``t``'s device."""
    if not world.active:
        return t
    import torch.distributed as dist

    buffer = t.to(world.device).contiguous()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(t.device)


def merge_owned(values: Tensor, mine: Bool[Tensor, "..."], world: World) -> Tensor:
    """Every rank's own cells of ``values`` (``mine``: this rank's cells, disjoint across ranks, covering all).

    Exact: the cells of other ranks are zeroed and one all-reduce adds the shares.

    >>> merge_owned(torch.tensor([1.0, float("nan")]), torch.tensor([True, True]), World())
    tensor([1., nan])
    """
    if not world.active:
        return values
    mask = mine.to(values.device)
    while mask.ndim < values.ndim:
        mask = mask.unsqueeze(-1)
    return all_reduce_sum(values.masked_fill(~mask, 0), world)


def share_ranges(values: Tensor, dim: int, ranges: Sequence[slice], world: World) -> Tensor:
    """``values`` with each rank's range along ``dim`` (``ranges[r]``: rank r's, disjoint) copied from that rank,
    in place: one broadcast per rank of just its range, so each rank receives what the others computed and no
    more (an all-reduce of the whole tensor moves twice as much at two ranks). Exact (a copy).

    >>> share_ranges(torch.arange(4.0), 0, [slice(0, 4)], World())
    tensor([0., 1., 2., 3.])
    """
    if not world.active:
        return values
    for source, part in enumerate(ranges):
        if part.stop <= part.start:
            continue
        target = values.narrow(dim, part.start, part.stop - part.start)
        buffer = target.contiguous()  # a copy unless the range is contiguous already
        broadcast_(buffer, source, world)
        if world.rank != source and buffer.data_ptr() != target.data_ptr():
            target.copy_(buffer)
    return values


def split_rows(n_rows: int, tail: tuple[int, ...], dtype: torch.dtype, compute: Callable[[slice], Tensor],
               world: World) -> Tensor:
    """``[n_rows, *tail]``, each share of rows computed by ``compute(rows)`` on its rank (:func:`shard`), on every rank.

    ``compute(slice)`` returns those rows (e.g. the permutation null of some relabelings); one process computes
    them all at once, exactly as before.

    >>> split_rows(3, (2,), torch.float64, lambda rows: torch.ones(rows.stop - rows.start, 2), World()).shape
    torch.Size([3, 2])
    """
    if not world.active:
        return compute(slice(0, n_rows))
    mine = shard(n_rows, world)
    full = torch.zeros((n_rows, *tail), dtype=dtype)
    if mine.stop > mine.start:
        part = compute(mine)
        full = full.to(part.device)
        full[mine] = part
    mask = torch.zeros(n_rows, dtype=torch.bool)
    mask[mine] = True
    return merge_owned(full, mask, world)


def broadcast_(t: Tensor, source: int, world: World) -> Tensor:
    """``t`` filled in place with rank ``source``'s ``t`` (same shape and dtype on every rank)."""
    if not world.active:
        return t
    import torch.distributed as dist

    buffer = t.to(world.device).contiguous()
    dist.broadcast(buffer, src=source)
    if buffer.data_ptr() != t.data_ptr():
        t.copy_(buffer)
    return t


def agreed_int(value: Optional[int], world: World) -> Optional[int]:
    """Rank 0's ``value`` on every rank (e.g. a seed drawn from fresh entropy on rank 0)."""
    if not world.active:
        return value
    box = torch.tensor([-1 if value is None else value], dtype=torch.int64)
    broadcast_(box, 0, world)
    return None if int(box) == -1 else int(box)


def all_succeeded(ok: bool, world: World) -> bool:
    """Whether every rank reports ``ok`` (one all-reduce of each rank's flag; a rank that died fails it)."""
    if not world.active:
        return ok
    flags = all_reduce_sum(torch.tensor([1 if ok else 0], dtype=torch.int64), world)
    return int(flags) == world.size


def barrier(world: World) -> None:
    """Wait for every rank."""
    if world.active:
        import torch.distributed as dist

        dist.barrier()


__all__ = ["World", "current_world", "resolve_world", "launched_by_torchrun", "init_from_environment", "shard", "owned",
           "all_reduce_sum", "merge_owned", "share_ranges", "split_rows", "broadcast_", "agreed_int", "all_succeeded",
           "barrier", "DEFAULT_TIMEOUT_S"]
