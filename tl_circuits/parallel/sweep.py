"""The freeze sweep's variants across ranks: its (layer, stacked pass) items are dealt out round robin, each rank
fills the grid cells of its items, and one exact merge gives every rank the whole grid.

A NOISE sweep is divided too: each item draws from its own generator
(:func:`tl_circuits.freezing.stacked.item_noise_seed`), so the rank that runs it draws the single-process noise.

>>> from tl_circuits.parallel.group import World
>>> share = SweepShare(4, world=World(1, 2))
>>> [share.take(layer, [("qk", 0)]) for layer in range(4)], share.n_mine
([False, True, False, True], 2)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from tl_circuits.parallel.group import World, merge_owned


class SweepShare:
    """Which of ``n_items`` sweep items (taken in the sweep's own order) this rank runs, and the merge of the grids."""

    def __init__(self, n_items: int, world: World):
        self.world = world
        self.divided = self.world.active
        self.n_items, self.next_item = n_items, 0
        self.taken: list[tuple[int, Sequence[tuple[Any, int]]]] = []

    @property
    def n_mine(self) -> int:
        """Items this rank runs."""
        if not self.divided:
            return self.n_items
        return len(range(self.world.rank, self.n_items, self.world.size))

    def take(self, layer: int, chunk: Sequence[tuple[Any, int]]) -> bool:
        """Whether this rank runs the next item, ``layer`` with the stacked ``(circuit, head)`` copies ``chunk``."""
        index, self.next_item = self.next_item, self.next_item + 1
        mine = not self.divided or index % self.world.size == self.world.rank
        if mine:
            self.taken.append((layer, chunk))
        return mine

    def merge(self, frozen: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{circuit: [n_layers, n_heads]}`` (or ``[N, n_layers, n_heads]`` per sample) with every rank's cells
        (the grids as one process fills them)."""
        if not self.divided:
            return frozen
        out = {}
        for name, grid in frozen.items():
            mine = torch.zeros(grid.shape, dtype=torch.bool)
            for layer, chunk in self.taken:
                for circuit, head in chunk:
                    if getattr(circuit, "value", circuit) == name:
                        mine[..., layer, head] = True   # per-sample grids have a leading [N] axis
            out[name] = merge_owned(grid, mine, self.world)
        return out


__all__ = ["SweepShare"]
