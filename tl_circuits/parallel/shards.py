"""Sample shards across ranks: each rank computes the gradients of its own chunks of samples, then every rank
receives every chunk from its owner (one broadcast per chunk, so the memory in flight is one chunk).

A chunk is a slice of :func:`tl_circuits.interference.gradients.sample_chunks`; chunk ``c`` belongs to rank
``c % size`` (:func:`chunk_owner`), so the split of a task with a sample count not divisible by the world size
is as even as the chunks allow.

>>> from tl_circuits.parallel.group import World
>>> [chunk_owner(c, World(0, 2)) for c in range(5)]
[0, 1, 0, 1, 0]
>>> bad_samples([3], 6, World())
[3]
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.interference.store import FactorStore
from tl_circuits.models.spec import BLOCKS, ModelSpec
from tl_circuits.parallel.group import World, all_reduce_sum, broadcast_, owned


def chunk_owner(index: int, world: World) -> int:
    """The rank that computes chunk number ``index``."""
    return index % world.size


def own_chunks(chunks: Sequence[slice], world: World) -> list[slice]:
    """This rank's chunks (round robin over the chunk list)."""
    return owned(list(chunks), world)


def bad_samples(mine: Sequence[int], n: int, world: World) -> list[int]:
    """The union over ranks of the samples with NaN/inf gradients (sorted), ``mine`` being this rank's."""
    if not world.active:
        return sorted(mine)
    flags = torch.zeros(n, dtype=torch.int64)
    flags[list(mine)] = 1
    return all_reduce_sum(flags, world).nonzero().flatten().tolist()


def share_factor_chunks(store: FactorStore, chunks: Sequence[slice], world: World) -> None:
    """Fill ``store`` on every rank: the owner of each chunk (which has stored it) broadcasts its factors."""
    if not world.active:
        return
    for index, sl in enumerate(chunks):
        source = chunk_owner(index, world)
        n = sl.stop - sl.start
        if world.rank == source:
            values = {name: t.contiguous() for name, t in store.read(sl).items()}
        else:
            values = {name: torch.empty(shape, device=world.device) for name, shape in store.shapes(n).items()}
        for t in values.values():
            broadcast_(t, source, world)
        if world.rank != source:
            store.write(sl.start, values)


def gradient_shapes(spec: ModelSpec, n: int, include_biases: bool) -> dict[str, tuple[int, ...]]:
    """``{block: [n, L, heads, P]}`` of ``n`` samples' per-head rows."""
    return {b: (n, spec.n_layers, spec.n_block_heads(b), spec.n_params_per_head(b, include_biases)) for b in BLOCKS}


def gather_gradient_chunks(mine: dict[int, PerSampleGradients], chunks: Sequence[slice], spec: ModelSpec,
                           include_biases: bool, device: torch.device, world: World) -> list[PerSampleGradients]:
    """Every chunk's :class:`PerSampleGradients`, in order, on every rank (``mine``: chunk index -> this rank's;
    the others' are received on ``device``)."""
    out = []
    for index, sl in enumerate(chunks):
        source = chunk_owner(index, world)
        n = sl.stop - sl.start
        if world.rank == source:
            part = mine[index]
        else:
            blocks = {b: torch.empty(shape, device=device) for b, shape in
                      gradient_shapes(spec, n, include_biases).items()}
            part = PerSampleGradients(blocks, spec, include_biases, torch.empty(n), torch.empty(n, dtype=torch.int64))
        tensors: list[Tensor] = [*part.per_block.values()]
        if part.losses is not None and part.n_targets is not None:
            tensors += [part.losses, part.n_targets]
        for t in tensors:
            broadcast_(t, source, world)
        out.append(part)
    return out


__all__ = ["chunk_owner", "own_chunks", "bad_samples", "share_factor_chunks", "gather_gradient_chunks"]
