"""Sample shards across ranks: each rank computes the gradients of its own chunks of samples, and every rank
holds the factors of its own share of the layers, for every sample.

A chunk is a slice of :func:`tl_circuits.interference.chunk_engines.sample_chunks`; chunk ``c`` belongs to rank
``c % size`` (:func:`chunk_owner`), so the split of a task with a sample count not divisible by the world size
is as even as the chunks allow. The layers are shared out as contiguous balanced ranges (:func:`held_layers`):
a rank holds, and later scores (:mod:`tl_circuits.parallel.scores`), only its layers, so the factors held per
rank fall as ``1 / size`` and so does what is sent (:class:`FactorExchange`: the owner of a chunk sends each
other rank that rank's layers of it, point to point).

>>> from tl_circuits.parallel.group import World
>>> [chunk_owner(c, World(0, 2)) for c in range(5)]
[0, 1, 0, 1, 0]
>>> [held_layers(12, World(r, 2)) for r in range(2)], held_layers(1, World(1, 2))
([slice(0, 6, None), slice(6, 12, None)], slice(1, 1, None))
>>> bad_samples([3], 6, World())
[3]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.interference.store import FactorStore
from tl_circuits.models.spec import BLOCKS, ModelSpec
from tl_circuits.parallel.group import World, all_reduce_sum, broadcast_, owned, shard


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


def held_layers(n_layers: int, world: World) -> slice:
    """The layers whose factors this rank holds and scores: a contiguous balanced share (all without a group;
    empty on the ranks past ``n_layers``)."""
    return shard(n_layers, world)


class FactorExchange:
    """Fills a rank's :class:`FactorStore` (its held layers, every sample) from the chunks the ranks compute.

    :meth:`deliver` takes each of this rank's chunks in order (its arrays over every layer,
    :func:`~tl_circuits.interference.store.factor_arrays`, and its NaN/inf samples), keeps the held layers and
    sends each other rank that rank's layers and the chunk's NaN/inf flags. The chunks go in rounds (round
    ``k``: chunks ``k·size .. k·size + size - 1``, one per rank); a round's transfers are posted as soon as this
    rank's chunk of that round is ready and waited for after its next chunk, so communication overlaps the next
    chunk's gradients, and at most two rounds are in flight. :meth:`finish` waits for the rest and returns the
    NaN/inf samples of every chunk. Without a process group it only stores.
    """

    def __init__(self, store: FactorStore, chunks: Sequence[slice], world: World):
        self.store, self.chunks, self.world = store, list(chunks), world
        self.n_rounds = -(-len(self.chunks) // world.size)
        self.posted = self.delivered = 0  # rounds whose transfers are posted; chunks delivered
        # per posted round: its transfers, the tensors it sends (alive until they are sent), what it receives
        self.pending: list[tuple[list, list[Tensor], list[tuple[slice, dict[str, Tensor], Tensor]]]] = []
        self.bad: list[int] = []

    def deliver(self, index: int, arrays: dict[str, Tensor], bad: Sequence[int]) -> None:
        """This rank's chunk number ``index`` (its own chunks, in order)."""
        if index != self.world.rank + self.delivered * self.world.size:
            raise RuntimeError(f"chunk {index} delivered out of turn on {self.world.describe()}")
        sl = self.chunks[index]
        self.store.write(sl.start, self.store.held(arrays))
        self.bad += list(bad)
        self.delivered += 1
        if self.world.active:
            self._post(index, arrays, bad)
            while len(self.pending) > 1:
                self._complete()

    def finish(self) -> list[int]:
        """Wait for every transfer (posting this rank's receives of rounds it had no chunk in): the sorted
        NaN/inf samples of every chunk."""
        while self.world.active and self.posted < self.n_rounds:
            self._post(None, None, [])
        while self.pending:
            self._complete()
        return sorted(self.bad)

    def _post(self, mine: Optional[int], arrays: Optional[dict[str, Tensor]], bad: Sequence[int]) -> None:
        import torch.distributed as dist

        world, device, size = self.world, self.world.device, self.world.size
        ops, keep, received = [], [], []
        first = self.posted * size
        for index in range(first, min(first + size, len(self.chunks))):
            sl, owner = self.chunks[index], chunk_owner(index, world)
            n = sl.stop - sl.start
            if index == mine:
                flags = torch.zeros(n, dtype=torch.int64)
                flags[[i - sl.start for i in bad]] = 1
                flags = flags.to(device)
                for rank in range(size):
                    if rank == world.rank:
                        continue
                    layers = held_layers(self.store.spec.n_layers, World(rank, size))
                    parts = [flags] + ([t[:, layers].contiguous().to(device) for t in
                                        (arrays[name] for name in self.store.arrays)]  # type: ignore[index]
                                       if layers.stop > layers.start else [])
                    ops += [dist.P2POp(dist.isend, t, rank) for t in parts]
                    keep += parts
            else:
                flags = torch.empty(n, dtype=torch.int64, device=device)
                values = ({name: torch.empty(shape, device=device) for name, shape in self.store.shapes(n).items()}
                          if self.store.layers.stop > self.store.layers.start else {})
                ops += [dist.P2POp(dist.irecv, t, owner) for t in [flags, *values.values()]]
                received.append((sl, values, flags))
        works = dist.batch_isend_irecv(ops) if ops else []
        self.pending.append((works, keep, received))
        self.posted += 1

    def _complete(self) -> None:
        works, _sent, received = self.pending.pop(0)
        for work in works:
            work.wait()
        for sl, values, flags in received:
            if values:
                self.store.write(sl.start, values)
            self.bad += (flags.cpu().nonzero().flatten() + sl.start).tolist()


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


__all__ = ["chunk_owner", "own_chunks", "bad_samples", "held_layers", "FactorExchange", "gather_gradient_chunks"]
