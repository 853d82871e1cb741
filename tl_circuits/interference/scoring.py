"""The score pass: per-head gradient rows -> the pairwise interference scores of every block (docs/spec.md §3).

For block B ∈ {Q, K, V, O}, layer l, head h, sample i of the left set and j of the right set, with ``N`` the
damped normaliser of the Fisher under the run's normalisation (``"diagonal"``: ``N = F̃``;
:func:`~tl_circuits.interference.fisher.normaliser`, docs/spec.md §3.4)::

    signed   (default; diagonal-Fisher influence)   S_ij = Σ_p  g_i[p] · g_j[p] / N[p]    (negative = conflict)
    unsigned (the original design's formula)        M_ij = Σ_p  C_i[p] / N[p] · |g_j[p]|
    symmetric (pooled Fisher)                        ½ (M_ij + M_ji)

with ``C_i = g_i ⊙ g_i`` and the sum over one head's slice (``"sum"``) or its mean (``"mean"``). There is one
score pass, :func:`score_pass`: :func:`tl_circuits.interference.engine.run_engine` runs it on the gradient factors
of a run, and :func:`pairwise_scores` on per-sample gradient rows already in memory with a given Fisher. It works
one (block, layer group) item at a time: the item's rows are built (:class:`RowBuilder`), its Fisher is summed
from them (unless one is given), and the matrix is filled in tiles that
:func:`~tl_circuits.interference.memory.plan_run` sizes, one batched contraction ``einsum("lhip,lhjp->ijlh")``
per tile over rows laid out ``[layer, head, sample, param]``: no Python loop over pairs, layers or heads.

**Precision** (one rule, docs/spec.md §3.1): rows are float32. The squares that make a Fisher — ``C_i`` in ``F``
and in every leave-one-out ``F_{−i}`` — are float64 squares of the float32 rows (exact), summed and subtracted in
float64, so the ``C_i`` a leave-one-out Fisher removes are exactly those its sum added; ``λ``, ``N`` and ``1/N`` are
float64. An operand is float32: ``g`` or its float32 square times ``1/N`` rounded to float32. The contraction and
the scores are float32. Where ``N`` is 0 (only with ``damping_abs=0``) the normalised value is NaN, and so are the
scores of that head: missing data, never 0.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from typing import Optional, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.buffers import Workspace
from tl_circuits.defaults import MEMORY_BUDGET_GB, NORMALIZATION, REDUCTION, VARIANT
from tl_circuits.interference import memory
from tl_circuits.interference.config import (
    DAMPING_ABS,
    DAMPING_REL,
    GradientConfig,
    InterferenceConfig,
    Normalization,
    Reduction,
    Variant,
)
from tl_circuits.interference.factors import GradientFactors, PerSampleGradients
from tl_circuits.interference.fisher import FISHER_DTYPE, DiagonalFisher, loo_block, normaliser
from tl_circuits.interference.store import SampleSet
from tl_circuits.models.spec import BLOCKS, Block, ModelSpec
from tl_circuits.parallel import scores as parallel_scores
from tl_circuits.parallel.group import World

Side = Union[SampleSet, PerSampleGradients]
"""The samples of one side of the matrix: gradient factors in stores (a run), or gradient rows in memory."""


def inverse_normaliser(d: Tensor, normalization: str, damping_abs: float, damping_rel: float, *,
                       in_place: bool = False) -> Tensor:
    """``1/N`` of an undamped diagonal ``d``, computed in float64 and rounded to float32 (``in_place``: ``d``, a
    float64 temporary, is overwritten on the way), NaN where ``N`` is 0 (no Fisher information: missing, not 0)."""
    n = normaliser(d, normalization, damping_abs, damping_rel, in_place=in_place)
    zero = n <= 0
    n.reciprocal_()
    if bool(zero.any()):
        n.masked_fill_(zero, math.nan)
    return n.to(torch.float32)


class Scorer:
    """Turns raw per-head gradient rows into the two operands of the per-block contraction.

    Operands are ``[L, H, n, P]`` float32 (contiguous, so the contraction is a batched matmul without
    copies); transforms are done in place on buffers the caller owns (leave-one-out normalisers ``step`` samples at
    a time in float64).
    """

    def __init__(self, fisher: DiagonalFisher, variant: str, reduction: str, leave_one_out: bool,
                 damping_abs: float, damping_rel: float, normalization: str = NORMALIZATION, step: int = 8):
        self.fisher, self.variant, self.reduction, self.normalization = fisher, variant, reduction, normalization
        self.loo, self.damping_abs, self.damping_rel = leave_one_out, damping_abs, damping_rel
        self.step = max(1, step)
        if leave_one_out and fisher.n_samples < 2:
            raise ValueError(f"leave-one-out needs a Fisher of at least 2 samples, this one has {fisher.n_samples}")
        self.inverse: Optional[dict[str, Tensor]] = None
        if not leave_one_out:
            self.inverse = {b: inverse_normaliser(f, normalization, damping_abs, damping_rel)[:, :, None, :]
                            for b, f in fisher.per_block.items()}

    def _normalise_(self, block: str, x: Tensor, power: int) -> Tensor:
        """In place: x (raw g, [L, H, n, P] float32) -> g^power · 1/N, with 1/N from float64 and rounded to float32
        (N of each sample's F_{−i} with leave-one-out, from its exact float64 C_i, ``step`` samples at a time)."""
        if not self.loo:
            assert self.inverse is not None  # made in __init__ whenever leave-one-out is off
            return (x.square_() if power == 2 else x).mul_(self.inverse[block])
        f, n = self.fisher.per_block[block][:, :, None, :], self.fisher.n_samples
        for start in range(0, x.shape[2], self.step):
            part = x[:, :, start:start + self.step]
            f_loo = loo_block(f, n, part.to(FISHER_DTYPE).square_(), in_place=True)  # one float64 temporary
            inverse = inverse_normaliser(f_loo, self.normalization, self.damping_abs, self.damping_rel, in_place=True)
            del f_loo
            (part.square_() if power == 2 else part).mul_(inverse)
        return x

    @staticmethod
    def _magnitude(x: Tensor, extra: Optional[Tensor]) -> Tensor:
        return x.abs() if extra is None else torch.abs(x, out=extra)

    def left(self, rows: dict[str, Tensor], extra: Optional[dict[str, Tensor]] = None) -> dict[str, list[Tensor]]:
        """Task-A operand(s) from raw rows (consumed): C/N (unsigned), g/N (signed), [C/N, |g|] (symmetric;
        ``extra`` buffers, if given, receive |g|)."""
        out = {}
        for b, x in rows.items():
            if self.variant == "unsigned":
                out[b] = [self._normalise_(b, x, 2)]
            elif self.variant == "signed":
                out[b] = [self._normalise_(b, x, 1)]
            else:
                magnitude = self._magnitude(x, None if extra is None else extra[b])
                out[b] = [self._normalise_(b, x, 2), magnitude]
        return out

    def right(self, rows: dict[str, Tensor], extra: Optional[dict[str, Tensor]] = None) -> dict[str, list[Tensor]]:
        """Task-B operand(s) from raw rows (consumed): |g| (unsigned), g (signed), [|g|, C/N] (symmetric)."""
        out = {}
        for b, x in rows.items():
            if self.variant == "unsigned":
                out[b] = [x.abs_()]
            elif self.variant == "signed":
                out[b] = [x]
            else:
                magnitude = self._magnitude(x, None if extra is None else extra[b])
                out[b] = [magnitude, self._normalise_(b, x, 2)]
        return out

    def contract(self, left: dict[str, list[Tensor]], right: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        """One batched contraction per block (per operand pair): ``[n_a, n_b, L, H]``."""
        out = {}
        for b in left:
            terms = [torch.einsum("lhip,lhjp->ijlh", lt, rt) for lt, rt in zip(left[b], right[b])]
            score = terms[0] if len(terms) == 1 else 0.5 * (terms[0] + terms[1])
            if self.reduction == "mean":
                score = score / left[b][0].shape[-1]
            out[b] = score
        return out


def rows_into(f: GradientFactors, block: Block, layers: slice, samples: slice, sub: int, out: Tensor,
              ws: Workspace) -> Tensor:
    """Raw per-head rows of some samples and layers of one block, written into ``out`` ([Lg, H, n, P])."""
    spec = f.spec
    n_in = spec.n_heads * spec.d_head if block == "O" else spec.d_model
    n_out = spec.d_model if block == "O" else spec.n_block_heads(block) * spec.d_head
    n_layers = len(range(*layers.indices(spec.n_layers)))
    for start in range(samples.start, samples.stop, sub):
        stop = min(samples.stop, start + sub)
        inputs = (f.z if block == "O" else f.inputs[block])[start:stop, layers]
        scratch = ws.get("scratch", ((stop - start) * n_layers * n_in * n_out,))
        spec.write_rows_from_factors(block, inputs, f.out_grads[block][start:stop, layers],
                                     out[:, :, start - samples.start: stop - samples.start], scratch, f.include_biases)
    return out


class RowBuilder:
    """Builds raw per-head rows ``[Lg, H, n, P]`` of a sample range of one :data:`Side` into reused buffers: from a
    :class:`SampleSet`'s factors, or copied from per-sample gradient rows."""

    def __init__(self, spec: ModelSpec, ws: Workspace, sub_bytes: float, device: torch.device):
        self.spec, self.ws, self.sub_bytes, self.device = spec, ws, sub_bytes, device

    def __call__(self, samples: Side, block: Block, layers: slice, rows: slice, name: str,
                 include_biases: bool) -> Tensor:
        spec = self.spec
        n_layers = len(range(*layers.indices(spec.n_layers)))
        heads = spec.n_block_heads(block)
        width = spec.n_params_per_head(block, include_biases)
        out = self.ws.get(name, (n_layers, heads, rows.stop - rows.start, width))
        if isinstance(samples, PerSampleGradients):
            return out.copy_(einops.rearrange(samples.per_block[block][rows, layers], "n l h p -> l h n p"))
        n_in = spec.n_heads * spec.d_head if block == "O" else spec.d_model
        n_out = spec.d_model if block == "O" else heads * spec.d_head
        sub = max(1, int(self.sub_bytes // (4 * n_layers * n_in * n_out)))
        for store, local, dest in samples.pieces(rows):
            factors = store.get(local, layers, self.device, block=block)
            rows_into(factors, block, slice(None), slice(0, local.stop - local.start), sub, out[:, :, dest], self.ws)
        return out


def sum_squares(rows: Tensor) -> Tensor:
    """Σ over samples (dim 2 of [Lg, H, n, P]) of rows², each float32 value squared exactly in float64 and summed in
    float64, one sample at a time through one float64 buffer (as
    :class:`~tl_circuits.interference.fisher.FisherAccumulator`)."""
    total = torch.zeros(rows.shape[0], rows.shape[1], rows.shape[3], dtype=FISHER_DTYPE, device=rows.device)
    sample = torch.empty_like(total)
    for i in range(rows.shape[2]):
        sample.copy_(rows[:, :, i])
        total.addcmul_(sample, sample)
    return total


def score_pass(spec: ModelSpec, left: Side, right: Side, cfg: InterferenceConfig, plan: memory.MemoryPlan,
               *, fisher_sides: tuple[bool, bool], external: Optional[DiagonalFisher], same_sides: bool,
               device: torch.device, timings: dict, stack: ExitStack, world: Optional[World] = None,
               ) -> tuple[dict[str, Tensor], DiagonalFisher]:
    """Scores ``{block: [n_left, n_right, L, H_B]}`` and the undamped Fisher used (docstring of the module).

    ``fisher_sides``: whether the left / right samples make up the Fisher set (ignored with ``external``).
    ``world``: under a process group each rank runs its share of the (block, layer group) items and every rank
    gets every item's result (:mod:`tl_circuits.parallel.scores`).
    """
    world = world or World()
    n_l, n_r = len(left), len(right)
    ws = Workspace(device)
    rows = RowBuilder(spec, ws, memory.rows_scratch_bytes(cfg.memory_budget_gb), device)
    scores: dict[str, Tensor] = {b: torch.full((n_l, n_r, spec.n_layers, spec.n_block_heads(b)), math.nan)
                                 for b in BLOCKS}
    fisher_full: dict[str, Tensor] = {} if external is not None else {
        b: torch.full((spec.n_layers, spec.n_block_heads(b), spec.n_params_per_head(b, cfg.include_biases)),
                      math.nan, dtype=FISHER_DTYPE) for b in BLOCKS}
    n_fisher = external.n_samples if external is not None else (n_l if fisher_sides[0] else 0) + (
        0 if same_sides else (n_r if fisher_sides[1] else 0))
    items = parallel_scores.my_items(spec.n_layers, plan.layer_group, world)  # this rank's layers
    tiles_l = [slice(a, min(n_l, a + plan.tile_left)) for a in range(0, n_l, plan.tile_left)]
    tiles_r = [slice(b, min(n_r, b + plan.tile_right)) for b in range(0, n_r, plan.tile_right)]
    symmetric, biases = cfg.variant == "symmetric", cfg.include_biases
    whole = len(tiles_l) == 1 and len(tiles_r) == 1
    where = f" ({world.describe()})" if world.active else ""
    bar = stack.enter_context(tqdm(total=len(items) * len(tiles_l) * len(tiles_r), unit="tile",
                                   desc=f"interference: scores{where}", disable=not cfg.progress))
    t0 = time.perf_counter()
    for block, layers in items:
        raw_l = raw_r = None
        n_layers = len(range(*layers.indices(spec.n_layers)))
        step = memory.float64_step(n_layers * memory.layer_row_bytes(spec, block, biases), cfg.memory_budget_gb)
        if external is not None:
            f_group = external.per_block[block][layers].to(device)
        else:
            sides = [(left, "l")] if same_sides else [(s, tag) for s, tag, use in
                                                     ((left, "l", fisher_sides[0]), (right, "r", fisher_sides[1]))
                                                     if use]
            sums: Tensor | float = 0.0
            if whole:  # the group's Fisher from the very rows that are scored
                raw_l = rows(left, block, layers, slice(0, n_l), "l", biases)
                raw_r = raw_l if same_sides else rows(right, block, layers, slice(0, n_r), "r", biases)
                for _side, tag in sides:
                    sums = sums + sum_squares(raw_l if tag == "l" else raw_r)
            else:  # one extra pass over the Fisher set's rows of this group
                for side, _tag in sides:
                    for a in range(0, len(side), plan.tile_left):
                        part = slice(a, min(len(side), a + plan.tile_left))
                        sums = sums + sum_squares(rows(side, block, layers, part, "l", biases))
            f_group = sums / n_fisher  # type: ignore[assignment]
            fisher_full[block][layers] = f_group.cpu()  # type: ignore[union-attr]
        scorer = Scorer(DiagonalFisher({block: f_group}, n_fisher), cfg.variant, cfg.reduction,  # type: ignore
                        cfg.leave_one_out, cfg.damping_abs, cfg.damping_rel, cfg.normalization, step=step)
        right_ops = None
        for ta in tiles_l:
            x = raw_l if raw_l is not None else rows(left, block, layers, ta, "l", biases)
            if same_sides and raw_l is not None:  # both operands come from one buffer: copy the left one
                x = ws.get("l_copy", tuple(raw_l.shape)).copy_(raw_l)
            extra_l: Optional[dict[str, Tensor]] = {block: ws.get("l2", tuple(x.shape))} if symmetric else None
            left_ops = scorer.left({block: x}, extra_l)
            for tb in tiles_r:
                if right_ops is None or len(tiles_r) > 1:
                    y = raw_r if raw_r is not None else rows(right, block, layers, tb, "r", biases)
                    extra_r: Optional[dict[str, Tensor]] = (
                        {block: ws.get("r2", tuple(y.shape))} if symmetric else None)
                    right_ops = scorer.right({block: y}, extra_r)
                out = scorer.contract(left_ops, right_ops)[block]
                scores[block][ta, tb, layers] = out.cpu()
                bar.update(1)
    scores, fisher_full = parallel_scores.merge_items(scores, fisher_full, spec.n_layers, world)
    timings["scoring_s"] += time.perf_counter() - t0
    fisher = external if external is not None else DiagonalFisher(fisher_full, n_fisher, spec, biases, cfg.fisher_source
                                                                  or "")
    return scores, fisher


def check_pair(grads_a: PerSampleGradients, grads_b: PerSampleGradients, fisher: DiagonalFisher) -> None:
    for name, g in (("grads_a", grads_a), ("grads_b", grads_b)):
        if not isinstance(g, PerSampleGradients):
            raise TypeError(f"{name} must be PerSampleGradients, got {type(g).__name__}")
        if g.n_samples == 0:
            raise ValueError(f"{name} is empty: no samples to score")
        for b, t in g.per_block.items():
            finite = torch.isfinite(t.flatten(1).sum(1, dtype=torch.float64))  # no full-size temporary
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                raise ValueError(f"{name} has NaN/inf gradients in block {b} for samples {bad}")
    if grads_a.per_block.keys() != grads_b.per_block.keys():
        raise ValueError("grads_a and grads_b have different blocks")
    if set(grads_a.per_block) != set(BLOCKS):
        raise ValueError(f"the gradients have blocks {sorted(grads_a.per_block)}; every one of {BLOCKS} is scored")
    for b in BLOCKS:
        if grads_a.per_block[b].shape[1:] != grads_b.per_block[b].shape[1:]:
            raise ValueError(f"block {b}: grads_a rows {tuple(grads_a.per_block[b].shape[1:])} do not match "
                             f"grads_b rows {tuple(grads_b.per_block[b].shape[1:])} (different model or biases?)")
        spec = grads_a.spec
        expect = (spec.n_layers, spec.n_block_heads(b), spec.n_params_per_head(b, grads_a.include_biases))
        if tuple(grads_a.per_block[b].shape[1:]) != expect:
            raise ValueError(f"block {b}: the gradients' rows {tuple(grads_a.per_block[b].shape[1:])} do not match "
                             f"their model's per-head rows {expect}")
        if b not in fisher.per_block or fisher.per_block[b].shape != grads_a.per_block[b].shape[1:]:
            raise ValueError(f"block {b}: the Fisher does not match the gradients' rows "
                             f"{tuple(grads_a.per_block[b].shape[1:])}")


def pairwise_scores(
    grads_a: PerSampleGradients,
    grads_b: PerSampleGradients,
    fisher: DiagonalFisher,
    variant: Variant = VARIANT,  # type: ignore[assignment]
    reduction: Reduction = REDUCTION,  # type: ignore[assignment]
    *,
    leave_one_out: bool = False,
    damping_abs: float = DAMPING_ABS,
    damping_rel: float = DAMPING_REL,
    normalization: Normalization = NORMALIZATION,  # type: ignore[assignment]
    memory_budget_gb: float = MEMORY_BUDGET_GB,
    progress: bool = False,
) -> dict[str, Float[Tensor, "n_a n_b n_layers heads"]]:
    """Scores of every pair (i ∈ A, j ∈ B), layer and head, per block: ``{B: [N_A, N_B, L, H_B]}``.

    The engine's score pass (:func:`score_pass`) on gradient rows already in memory, normalised by ``fisher``
    (undamped; damping and the ``normalization`` mode, docs/spec.md §3.4, are applied here), tiled within
    ``memory_budget_gb`` (the gradients themselves are not counted). With ``leave_one_out`` the A samples (and for
    ``symmetric`` also the B samples) must be members of ``fisher``'s sample set. Scores are float32.

    >>> import torch
    >>> from tl_circuits.models.spec import ModelSpec
    >>> from tl_circuits.interference.fisher import fisher_from_gradients
    >>> spec = ModelSpec(1, 2, 2, 2, 1, 5, 4, False, False)
    >>> ga = PerSampleGradients({b: torch.tensor([[[[1., 1.], [0., 2.]]]]) for b in "QKVO"}, spec)
    >>> gb = PerSampleGradients({b: torch.tensor([[[[-1., 0.], [3., 1.]]]]) for b in "QKVO"}, spec)
    >>> s = pairwise_scores(ga, gb, fisher_from_gradients(ga), "unsigned", damping_abs=1.0, damping_rel=0.0)
    >>> s["Q"]  # head 0: 1/(1+1)*1 + 1/(1+1)*0; head 1: 0 + 4/(4+1)*1
    tensor([[[[0.5000, 0.8000]]]])
    >>> pairwise_scores(ga, gb, fisher_from_gradients(ga), "unsigned", damping_abs=1.0, damping_rel=0.0,
    ...                 normalization="head")["Q"]  # head 1: F̄ = (0 + 4)/2, N = 2 + 1: (0 + 4·1)/3
    tensor([[[[0.5000, 1.3333]]]])
    """
    check_pair(grads_a, grads_b, fisher)
    gradients = GradientConfig(include_biases=grads_a.include_biases, memory_budget_gb=memory_budget_gb,
                               progress=progress)
    cfg = InterferenceConfig(gradients, variant, reduction, "external", leave_one_out, damping_abs, damping_rel,
                             normalization=normalization)
    spec, n_a, n_b = grads_a.spec, grads_a.n_samples, grads_b.n_samples
    plan = memory.plan_run(spec, n_left=n_a, n_right=n_b, n_samples=0, factor_bytes=0, engine_per_sample=0,
                           budget_gb=memory_budget_gb, include_biases=grads_a.include_biases,
                           symmetric_variant=variant == "symmetric")
    device = next(iter(grads_a.per_block.values())).device
    with torch.no_grad(), ExitStack() as stack:
        scores, _ = score_pass(spec, grads_a, grads_b, cfg, plan, fisher_sides=(False, False), external=fisher,
                               same_sides=False, device=device, timings={"scoring_s": 0.0}, stack=stack)
    return scores
