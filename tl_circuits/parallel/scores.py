"""The score pass across ranks: each rank scores the (block, layer group) items of its own layers.

Every rank holds its share of the layers' gradient factors, for every sample (:mod:`~tl_circuits.parallel.shards`,
:func:`~tl_circuits.parallel.shards.held_layers`). The score pass (:func:`tl_circuits.interference.scoring.score_pass`)
works one (block, group of layers) item at a time: it builds the per-head rows of every left and right sample for
that item from their factors, sums the item's Fisher from them, and contracts every pair. Under a process group
each rank runs the items of every block over its own layers (:func:`my_items`), exactly as one process runs them,
and each rank's layers of the scores and the Fisher are then copied to every other rank
(:func:`merge_items`, one broadcast per rank and block).

So each rank builds ``1 / size`` of the rows and contracts ``1 / size`` of the pairs (as the layers divide), and
nothing is built twice; the scores and the Fisher are the single-process numbers (the same computation per layer,
and merges that copy). Earlier forms split the left samples into bands and rebuilt every right sample's rows
on every rank (1.0–1.4× at 2 ranks, measured), or dealt the items out round robin over ranks that held every
layer's factors (so every rank received every sample's factors).

>>> from tl_circuits.parallel.group import World
>>> my_items(5, 2, World(1, 2))   # 5 layers over 2 ranks: rank 1 holds layers 3-4
[('Q', slice(3, 5, None)), ('K', slice(3, 5, None)), ('V', slice(3, 5, None)), ('O', slice(3, 5, None))]
>>> [layers for block, layers in my_items(5, 2, World()) if block == "Q"]
[slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
"""

from __future__ import annotations

from torch import Tensor

from tl_circuits.models.spec import BLOCKS, Block
from tl_circuits.parallel.group import World, share_ranges
from tl_circuits.parallel.shards import held_layers


def my_items(n_layers: int, layer_group: int, world: World) -> list[tuple[Block, slice]]:
    """This rank's (block, layer group) items of the score pass: every block over groups of ``layer_group`` of its
    held layers (all layers without a process group; none on a rank that holds no layer)."""
    held = held_layers(n_layers, world)
    groups = [slice(lo, min(held.stop, lo + layer_group)) for lo in range(held.start, held.stop, layer_group)]
    return [(block, layers) for block in BLOCKS for layers in groups]


def merge_items(scores: dict[str, Tensor], fisher: dict[str, Tensor], n_layers: int,
                world: World) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every rank's layers of ``scores`` (``{block: [n_left, n_right, L, H]}``) and ``fisher`` (``{block: [L, H,
    P]}``: every block, or none with an external Fisher), in place and exactly: each rank's held layers are
    copied from it (:func:`~tl_circuits.parallel.group.share_ranges`)."""
    if not world.active:
        return scores, fisher
    ranges = [held_layers(n_layers, World(rank, world.size)) for rank in range(world.size)]
    for block in scores:
        share_ranges(scores[block], 2, ranges, world)
    for block in fisher:
        share_ranges(fisher[block], 0, ranges, world)
    return scores, fisher


__all__ = ["merge_items", "my_items"]
