"""The score pass across ranks: its (block, layer group) items are dealt out round robin.

Every rank holds every sample's gradient factors (:mod:`~tl_circuits.parallel.shards`). The score pass
(:func:`tl_circuits.interference.engine.score_pass`) works one (block, group of layers) item at a time: it builds
the per-head rows of every left and right sample for that item from their factors, sums the item's Fisher from
them, and contracts every pair. Under a process group each rank runs the items ``rank, rank + size, ...`` of
that list, exactly as one process runs them, and one exact merge per block
(:func:`~tl_circuits.parallel.group.merge_owned`) gives every rank every score and every Fisher row.

So each rank builds ``1 / size`` of the rows and contracts ``1 / size`` of the pairs, and nothing is built
twice; the scores and the Fisher are the single-process numbers bit for bit (the same computation per item, and
merges that add zeros). An earlier form split the left samples into bands and rebuilt every right sample's rows
on every rank (1.0–1.4× at 2 ranks, measured); broadcasting the right rows instead was slower still over gloo.

>>> from tl_circuits.parallel.group import World
>>> my_items([("Q", slice(0, 2)), ("Q", slice(2, 4)), ("K", slice(0, 2))], World(1, 2))
[('Q', slice(2, 4, None))]
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch
from torch import Tensor

from tl_circuits.parallel.group import World, merge_owned, owned

Item = TypeVar("Item")


def my_items(items: Sequence[Item], world: World) -> list[Item]:
    """This rank's (block, layer group) items of the score pass (all of them without a process group)."""
    return owned(items, world) if world.active else list(items)


def merge_items(scores: dict[str, Tensor], fisher: dict[str, Tensor], mine: Sequence[tuple[str, slice]],
                n_layers: int, world: World) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every rank's items of ``scores`` (``{block: [n_left, n_right, L, H]}``) and ``fisher`` (``{block: [L, H,
    P]}``: every block, or none with an external Fisher), exactly: the cells of the items in ``mine`` are this
    rank's."""
    if not world.active:
        return scores, fisher
    owned_layers = {block: torch.zeros(n_layers, dtype=torch.bool) for block in scores}
    for block, layers in mine:
        owned_layers[block][layers] = True
    merged_scores = {b: merge_owned(s, owned_layers[b].view(1, 1, -1, 1), world) for b, s in scores.items()}
    merged_fisher = {b: merge_owned(f, owned_layers[b].view(-1, 1, 1), world) for b, f in fisher.items()}
    return merged_scores, merged_fisher


__all__ = ["merge_items", "my_items"]
