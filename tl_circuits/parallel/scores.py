"""Score tiles across ranks, and the Fisher all-reduced (the distributed form of
:func:`tl_circuits.interference.engine.score_pass`).

Every rank holds every sample's gradient factors (:mod:`~tl_circuits.parallel.shards`). For each block and
group of layers:

1. **Fisher.** Each rank sums the float64 squares of the rows of its own contiguous share of the Fisher set
   (:func:`~tl_circuits.parallel.group.shard`), and one all-reduce adds the shares. The sums are float64 of
   float32 squares, as in one process; only their order differs (relative differences ~1e-16).
2. **Tiles.** The left samples (task A, or A ∪ B for the pooled matrix) are split into contiguous bands, one
   per rank (each band tiled by the memory plan); a rank scores its band against every right sample, so its left
   rows serve both its share of the Fisher and its tiles. Where the right samples are one tile (their rows held
   through the group), each rank builds the rows of its own share of them and the shares are broadcast
   (:func:`gathered_rows`); for the pooled matrix the band's rows are then copied from those, not built again. The score grids are merged
   exactly at the end (:func:`~tl_circuits.parallel.group.merge_owned`).

Per rank this is ``(n_left + n_right) / size`` samples' rows built (pooled ``n / size``; ``n_left / size +
n_right`` where the right side is tiled) and ``n_left · n_right / size`` pairs contracted (one process: ``n_left + n_right`` and
``n_left · n_right``).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.defaults import GB
from tl_circuits.interference import memory
from tl_circuits.interference.config import InterferenceConfig
from tl_circuits.interference.fisher import FISHER_DTYPE, DiagonalFisher
from tl_circuits.interference.scoring import Scorer, Workspace, sum_squares
from tl_circuits.interference.store import SampleSet
from tl_circuits.models.spec import BLOCKS, Block, ModelSpec
from tl_circuits.parallel.group import World, all_reduce_sum, broadcast_, merge_owned, shard


def pieces(samples: slice, size: int) -> list[slice]:
    """``samples`` cut into consecutive slices of at most ``size``.

    >>> pieces(slice(3, 8), 2)
    [slice(3, 5, None), slice(5, 7, None), slice(7, 8, None)]
    """
    return [slice(a, min(samples.stop, a + size)) for a in range(samples.start, samples.stop, size)]


def gathered_rows(rows, samples: SampleSet, block: Block, layers: slice, include_biases: bool,
                  world: World) -> Tensor:
    """The rows ``[Lg, H, n, P]`` of all ``n`` samples on every rank: each rank builds its contiguous share
    (:func:`~tl_circuits.parallel.group.shard`) and broadcasts it; the result is the one-process buffer ``"r"``."""
    spec, n = rows.spec, len(samples)
    n_layers = len(range(*layers.indices(spec.n_layers)))
    heads, width = spec.n_block_heads(block), spec.n_params_per_head(block, include_biases)
    full = rows.ws.get("r", (n_layers, heads, n, width))
    for source in range(world.size):
        part = shard(n, World(source, world.size))
        if part.stop == part.start:
            continue
        if source == world.rank:
            piece = rows(samples, block, layers, part, "r_share", include_biases)
        else:
            piece = rows.ws.get("r_share", (n_layers, heads, part.stop - part.start, width))
        full[:, :, part] = broadcast_(piece, source, world)
    return full


class _Group:
    """The work of one (block, layer group) on this rank: Fisher share, then its band of tiles."""

    def __init__(self, rows, spec: ModelSpec, cfg: InterferenceConfig, plan: memory.MemoryPlan, world: World,
                 left: SampleSet, right: SampleSet, same_sides: bool):
        self.rows, self.spec, self.cfg, self.plan, self.world = rows, spec, cfg, plan, world
        self.left, self.right, self.same_sides = left, right, same_sides
        self.band = pieces(shard(len(left), world), plan.tile_left)
        self.right_tiles = pieces(slice(0, len(right)), plan.tile_right)

    def fisher(self, block: Block, layers: slice, fisher_sides: tuple[bool, bool], n_fisher: int,
               held_left: Optional[Tensor], held_right: Optional[Tensor]) -> Tensor:
        """The undamped Fisher rows of the group ``[Lg, H, P]`` (float64), the same on every rank."""
        biases = self.cfg.include_biases
        sums: Tensor = torch.zeros(())  # broadcasts against the first real sum
        if fisher_sides[0] or self.same_sides:
            if held_left is not None:
                sums = sums + sum_squares(held_left)
            else:
                for part in self.band:
                    sums = sums + sum_squares(self.rows(self.left, block, layers, part, "l", biases))
        if fisher_sides[1] and not self.same_sides:
            share = shard(len(self.right), self.world)
            if held_right is not None:
                sums = sums + sum_squares(held_right[:, :, share])
            else:
                for part in pieces(share, self.plan.tile_left):
                    sums = sums + sum_squares(self.rows(self.right, block, layers, part, "r", biases))
        if sums.ndim == 0:  # this rank holds no sample of the Fisher set
            heads, width = self.spec.n_block_heads(block), self.spec.n_params_per_head(block, biases)
            n_layers = len(range(*layers.indices(self.spec.n_layers)))
            sums = torch.zeros(n_layers, heads, width, dtype=FISHER_DTYPE, device=self.rows.device)
        return all_reduce_sum(sums, self.world) / n_fisher

    def scores(self, block: Block, layers: slice, scorer: Scorer, held_left: Optional[Tensor],
               held_right: Optional[Tensor], out: Tensor, bar) -> None:
        """Fill this rank's band of ``out[:, :, layers]`` (``[n_left, n_right, L, H]``, on the CPU)."""
        biases, symmetric, ws = self.cfg.include_biases, self.cfg.variant == "symmetric", self.rows.ws
        right_ops = None
        for ta in self.band:
            x = held_left if held_left is not None else self.rows(self.left, block, layers, ta, "l", biases)
            extra_l: Optional[dict[str, Tensor]] = {block: ws.get("l2", tuple(x.shape))} if symmetric else None
            left_ops = scorer.left({block: x}, extra_l)
            for tb in self.right_tiles:
                if right_ops is None or len(self.right_tiles) > 1:
                    y = held_right if held_right is not None else self.rows(self.right, block, layers, tb, "r",
                                                                           biases)
                    extra_r: Optional[dict[str, Tensor]] = (
                        {block: ws.get("r2", tuple(y.shape))} if symmetric else None)
                    right_ops = scorer.right({block: y}, extra_r)
                out[ta, tb, layers] = scorer.contract(left_ops, right_ops)[block].cpu()
                bar.update(1)


def distributed_score_pass(spec: ModelSpec, left: SampleSet, right: SampleSet, cfg: InterferenceConfig,
                           plan: memory.MemoryPlan, *, fisher_sides: tuple[bool, bool],
                           external: Optional[DiagonalFisher], same_sides: bool, device: torch.device,
                           timings: dict, stack: ExitStack, world: World,
                           ) -> tuple[dict[str, Tensor], DiagonalFisher]:
    """:func:`~tl_circuits.interference.engine.score_pass` split over ``world`` (module docstring); every rank
    returns the same scores and Fisher."""
    from tl_circuits.interference.engine import _Rows  # the engine's row builder (the engine imports this module)

    n_l, n_r = len(left), len(right)
    rows = _Rows(spec, Workspace(device), memory.SCRATCH_SHARE * cfg.memory_budget_gb * GB, device)
    work = _Group(rows, spec, cfg, plan, world, left, right, same_sides)
    scores: dict[str, Tensor] = {b: torch.full((n_l, n_r, spec.n_layers, spec.n_block_heads(b)), math.nan)
                                 for b in BLOCKS}
    fisher_full: dict[str, Tensor] = {}
    n_fisher = external.n_samples if external is not None else (n_l if fisher_sides[0] else 0) + (
        0 if same_sides else (n_r if fisher_sides[1] else 0))
    groups = [slice(l0, min(spec.n_layers, l0 + plan.layer_group)) for l0 in range(0, spec.n_layers, plan.layer_group)]
    biases = cfg.include_biases
    bar = stack.enter_context(tqdm(total=len(BLOCKS) * len(groups) * len(work.band) * len(work.right_tiles),
                                   unit="tile", desc=f"interference: scores ({world.describe()})",
                                   disable=not cfg.progress))
    t0 = time.perf_counter()
    for block in BLOCKS:
        for layers in groups:
            # rows held through the group when the band (or all right samples) is one tile
            held_r = (gathered_rows(rows, right, block, layers, biases, world) if len(work.right_tiles) == 1
                      else None)
            held_l = None
            if len(work.band) == 1 and same_sides and held_r is not None:  # the band's rows are among the right's
                band = work.band[0]
                held_l = rows.ws.get("l", (*held_r.shape[:2], band.stop - band.start, held_r.shape[3]))
                held_l.copy_(held_r[:, :, band])  # a copy: the scorer works on its left operand in place
            elif len(work.band) == 1:
                held_l = rows(left, block, layers, work.band[0], "l", biases)
            if external is not None:
                f_group = external.per_block[block][layers].to(device)
            else:
                f_group = work.fisher(block, layers, fisher_sides, n_fisher, held_l, held_r)
                if block not in fisher_full:
                    heads, width = spec.n_block_heads(block), spec.n_params_per_head(block, biases)
                    fisher_full[block] = torch.full((spec.n_layers, heads, width), math.nan, dtype=FISHER_DTYPE)
                fisher_full[block][layers] = f_group.cpu()
            scorer = Scorer(DiagonalFisher({block: f_group}, n_fisher), cfg.variant, cfg.reduction,
                            cfg.leave_one_out, cfg.damping_abs, cfg.damping_rel, sub_chunk=4,
                            float32_squares=external is None)
            work.scores(block, layers, scorer, held_l, held_r, scores[block], bar)
    mine = torch.zeros(n_l, dtype=torch.bool)
    mine[shard(n_l, world)] = True
    scores = {b: merge_owned(s, mine, world) for b, s in scores.items()}
    timings["scoring_s"] += time.perf_counter() - t0
    fisher = external if external is not None else DiagonalFisher(fisher_full, n_fisher, spec, biases,
                                                                  cfg.fisher_source or "")
    return scores, fisher


__all__ = ["distributed_score_pass", "pieces"]
