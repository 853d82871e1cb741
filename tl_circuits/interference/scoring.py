"""The scoring stage: per-head gradient rows -> the pairwise interference scores of every block (docs/spec.md §3).

For block B ∈ {Q, K, V, O}, layer l, head h, sample i of the left set and j of the right set::

    signed   (default; diagonal-Fisher influence)   S_ij = Σ_p  g_i[p] · g_j[p] / F̃[p]    (negative = conflict)
    unsigned (the original design's formula)        M_ij = Σ_p  C_i[p] / F̃[p] · |g_j[p]|
    symmetric (pooled Fisher)                        ½ (M_ij + M_ji)

with ``C_i = g_i ⊙ g_i``, ``F̃`` the damped diagonal Fisher and the sum over one head's slice (``"sum"``)
or its mean (``"mean"``). Each (block, layer group) is one batched contraction
``einsum("lhip,lhjp->ijlh")`` over rows laid out ``[layer, head, sample, param]``: no Python loop over
pairs, layers or heads. Where the damped Fisher is 0 (only with ``damping_abs=0``) the normalised
contribution is NaN, and so are the scores of that head: missing data, never 0.
"""

from __future__ import annotations

import math
from typing import Optional

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.buffers import Workspace
from tl_circuits.defaults import MEMORY_BUDGET_GB, REDUCTION, VARIANT
from tl_circuits.interference import memory
from tl_circuits.interference.config import DAMPING_ABS, DAMPING_REL, REDUCTIONS, VARIANTS, Reduction, Variant
from tl_circuits.interference.factors import GradientFactors, PerSampleGradients
from tl_circuits.interference.fisher import FISHER_DTYPE, DiagonalFisher, damping_lambda, loo_block
from tl_circuits.models.spec import Block


def safe_reciprocal(f: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """1/F̃ in ``dtype``, NaN where F̃ is 0 (no Fisher information: missing data, not 0)."""
    inverse = f.to(dtype).reciprocal_()
    zero = f <= 0
    if bool(zero.any()):
        inverse.masked_fill_(zero, math.nan)
    return inverse


class Scorer:
    """Turns per-head gradient rows into the two operands of the per-block contraction.

    Operands are ``[L, H, n, P]`` float32 (contiguous, so the contraction is a batched matmul without
    copies); transforms are done in place on buffers the scorer owns.
    """

    def __init__(self, fisher: DiagonalFisher, variant: str, reduction: str, leave_one_out: bool,
                 damping_abs: float, damping_rel: float, sub_chunk: int = 8, float32_squares: bool = False):
        # float32_squares: the Fisher summed float32 squares (sum_squares), not exact float64 ones
        self.fisher, self.variant, self.reduction = fisher, variant, reduction
        self.float32_squares = float32_squares
        self.loo, self.damping_abs, self.damping_rel = leave_one_out, damping_abs, damping_rel
        self.sub_chunk = max(1, sub_chunk)
        if leave_one_out and fisher.n_samples < 2:
            raise ValueError(f"leave-one-out needs a Fisher of at least 2 samples, this one has {fisher.n_samples}")
        self.inverse: Optional[dict[str, Tensor]] = None
        if not leave_one_out:
            self.inverse = {b: safe_reciprocal(f + damping_lambda(f, damping_abs, damping_rel))
                            for b, f in fisher.per_block.items()}

    def _normalise_(self, block: str, x: Tensor, power: int) -> Tensor:
        """In place: x (raw g, [L, H, n, P]) -> g^power / F̃ (F̃_{−i} per sample with leave-one-out)."""
        if not self.loo:
            assert self.inverse is not None  # made in __init__ whenever leave-one-out is off
            if power == 2:
                x.square_()
            return x.mul_(self.inverse[block][:, :, None, :])
        f, n = self.fisher.per_block[block][:, :, None, :], self.fisher.n_samples
        for start in range(0, x.shape[2], self.sub_chunk):  # float64 temporaries, a few samples at a time
            part = x[:, :, start:start + self.sub_chunk]
            g = part.to(FISHER_DTYPE)
            # squared as the Fisher was (N·F − C_i must cancel exactly): float32 squares for the engine's Fisher
            c = part.square().to(FISHER_DTYPE) if self.float32_squares else g.square()
            f_loo = loo_block(f.to(c.device), n, c)
            f_loo += damping_lambda(f_loo, self.damping_abs, self.damping_rel)
            part.copy_((c if power == 2 else g).mul_(safe_reciprocal(f_loo, FISHER_DTYPE)))
        return x

    @staticmethod
    def _magnitude(x: Tensor, extra: Optional[Tensor]) -> Tensor:
        return x.abs() if extra is None else torch.abs(x, out=extra)

    def left(self, rows: dict[str, Tensor], extra: Optional[dict[str, Tensor]] = None) -> dict[str, list[Tensor]]:
        """Task-A operand(s) from raw rows (consumed): C/F̃ (unsigned), g/F̃ (signed), [C/F̃, |g|] (symmetric;
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
        """Task-B operand(s) from raw rows (consumed): |g| (unsigned), g (signed), [|g|, C/F̃] (symmetric)."""
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
    for b in grads_a.per_block:
        if grads_a.per_block[b].shape[1:] != grads_b.per_block[b].shape[1:]:
            raise ValueError(f"block {b}: grads_a rows {tuple(grads_a.per_block[b].shape[1:])} do not match "
                             f"grads_b rows {tuple(grads_b.per_block[b].shape[1:])} (different model or biases?)")
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
    memory_budget_gb: float = MEMORY_BUDGET_GB,
    progress: bool = False,
) -> dict[str, Float[Tensor, "n_a n_b n_layers heads"]]:
    """Scores of every pair (i ∈ A, j ∈ B), layer and head, per block: ``{B: [N_A, N_B, L, H_B]}``.

    The pure scoring stage: one ``einsum`` per block over per-head rows (two for ``symmetric``),
    chunked over A and B so the transformed operands stay within ``memory_budget_gb`` (the inputs
    themselves are not counted). ``fisher`` is undamped; damping is applied here. With
    ``leave_one_out`` the A samples (and for ``symmetric`` also the B samples) must be members of
    ``fisher``'s sample set. Scores are float32.

    >>> import torch
    >>> from tl_circuits.models.spec import ModelSpec
    >>> from tl_circuits.interference.fisher import fisher_from_gradients
    >>> spec = ModelSpec(1, 2, 2, 2, 1, 5, 4, False, False)
    >>> ga = PerSampleGradients({b: torch.tensor([[[[1., 1.], [0., 2.]]]]) for b in "QKVO"}, spec)
    >>> gb = PerSampleGradients({b: torch.tensor([[[[-1., 0.], [3., 1.]]]]) for b in "QKVO"}, spec)
    >>> s = pairwise_scores(ga, gb, fisher_from_gradients(ga), "unsigned", damping_abs=1.0, damping_rel=0.0)
    >>> s["Q"]  # head 0: 1/(1+1)*1 + 1/(1+1)*0; head 1: 0 + 4/(4+1)*1
    tensor([[[[0.5000, 0.8000]]]])
    """
    check_pair(grads_a, grads_b, fisher)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    scorer = Scorer(fisher, variant, reduction, leave_one_out, damping_abs, damping_rel)
    n_a, n_b = grads_a.n_samples, grads_b.n_samples
    row_bytes = sum(g[0].numel() * 4 for g in grads_a.per_block.values())
    chunk_a, chunk_b = memory.pairwise_chunks(row_bytes, n_a, n_b, memory_budget_gb, variant == "symmetric")
    scores = {b: torch.full((n_a, n_b, *g.shape[1:3]), math.nan) for b, g in grads_a.per_block.items()}
    steps = math.ceil(n_a / chunk_a) * math.ceil(n_b / chunk_b)
    ws = Workspace(next(iter(grads_a.per_block.values())).device)
    symmetric = variant == "symmetric"

    def operands(grads, sl, side):  # [L, H, n, P] copies in reused buffers, one per block
        rows = {b: ws.get(f"{side}{b}", rows_shape(g, sl)).copy_(einops.rearrange(g[sl], "n l h p -> l h n p"))
                for b, g in grads.per_block.items()}
        extra = {b: ws.get(f"{side}2{b}", rows_shape(g, sl)) for b, g in grads.per_block.items()} if symmetric else None
        return (scorer.left if side == "a" else scorer.right)(rows, extra)

    with torch.no_grad(), tqdm(total=steps, desc="pairwise scores", disable=not progress, leave=False) as bar:
        for a0 in range(0, n_a, chunk_a):
            sa = slice(a0, min(n_a, a0 + chunk_a))
            left = operands(grads_a, sa, "a")
            for b0 in range(0, n_b, chunk_b):
                sb = slice(b0, min(n_b, b0 + chunk_b))
                for b, s in scorer.contract(left, operands(grads_b, sb, "b")).items():
                    scores[b][sa, sb] = s.to(scores[b].device)
                bar.update(1)
    return scores


def rows_shape(g: Tensor, sl: slice) -> tuple:
    n = len(range(*sl.indices(g.shape[0])))
    return (g.shape[1], g.shape[2], n, g.shape[3])



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



def sum_squares(rows: Tensor) -> Tensor:
    """Σ over samples (dim 2 of [Lg, H, n, P]) of rows², float32 squares summed in float64 (as
    :class:`~tl_circuits.interference.fisher.FisherAccumulator` does), a few samples at a time."""
    total = torch.zeros(rows.shape[0], rows.shape[1], rows.shape[3], dtype=FISHER_DTYPE, device=rows.device)
    per_sample = rows.shape[0] * rows.shape[1] * rows.shape[3] * 4
    step = max(1, (64 * 2**20) // max(1, per_sample))
    for start in range(0, rows.shape[2], step):
        total += rows[:, :, start:start + step].square().sum(2, dtype=FISHER_DTYPE)
    return total
