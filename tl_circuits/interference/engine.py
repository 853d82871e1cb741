"""The QK-OV interference metric: Fisher-normalised, block-wise, head-resolved, for every sample pair (SPEC §3).

For block B ∈ {Q, K, V, O}, layer l, head h, sample i of task A and sample j of task B::

    unsigned (default, the original's formula)   M_ij = Σ_{p ∈ slice(B,l,h)}  C_i[p] / F̃[p] · |g_j[p]|
    signed   (diagonal-Fisher influence)         S_ij = Σ_p  g_i[p] · g_j[p] / F̃[p]    (negative = conflict)
    symmetric (pooled Fisher)                    ½ (M_ij + M_ji)

with ``C_i = g_i ⊙ g_i``, ``F̃`` the damped diagonal Fisher (:mod:`tl_circuits.interference.fisher`) and the sum over one
head's slice of the block (reduction ``"sum"``) or its mean (``"mean"``: the sum divided by the slice
length). K and V are resolved per KV head (G of them under GQA), Q and O per query head; a sum over the
K/V head axis therefore counts each shared KV head once.

Stages, kept apart (kronfluence style):

1. :func:`tl_circuits.interference.gradients.per_sample_gradients` — per-sample gradients (``torch.func``);
2. :mod:`tl_circuits.interference.fisher` — the Fisher of task A, task B or both pooled, optional leave-one-out, damping;
3. :func:`pairwise_scores` — all pairs × layers × heads of a block in one batched contraction
   (``einsum("lhip,lhjp->ijlh")`` over per-head rows laid out ``[layer, head, sample, param]``), chunked
   over A and B;

and :func:`compute_interference` runs them end to end within a memory budget: it holds the tasks'
*gradient factors* (8× smaller than the rows for GPT-2 small) and builds each (block, layer group)'s rows
right before its contraction, streaming over chunks of A and B when even the factors do not fit (the
cost is in its docstring). Per contraction the work is one batched matmul, no Python loop over pairs,
layers or heads.

Leave-one-out: the sample whose contribution is the numerator is removed from its own normaliser —
``F̃_{−i}`` for ``C_i`` (unsigned, signed), and in the symmetric variant ``F̃_{−i}`` in ``M_ij`` and ``F̃_{−j}``
in ``M_ji``. It needs those samples to be in the Fisher set (source ``"a"`` or ``"pooled"``).

Missing data is NaN, never 0: where the damped Fisher is 0 (only possible with ``damping_abs=0``) the
normalised contribution is NaN, and so are the scores of that head.

>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, n_ctx=8, d_vocab=20,
...                               act_fn="gelu", n_key_value_heads=2, positional_embedding_type="rotary")
>>> model = HookedTransformer(cfg)
>>> gen = torch.Generator().manual_seed(0)
>>> tokens_a = torch.randint(0, 10, (3, 8), generator=gen)    # task A: low token ids
>>> tokens_b = torch.randint(10, 20, (2, 8), generator=gen)   # task B: high token ids
>>> result = compute_interference(model, tokens_a, tokens_b, ids_b=["x", "y"],
...                               config=InterferenceConfig(progress=False))
>>> {block: tuple(s.shape) for block, s in result.scores.items()}
{'Q': (3, 2, 2, 4), 'K': (3, 2, 2, 2), 'V': (3, 2, 2, 2), 'O': (3, 2, 2, 4)}
>>> top = result.top_conflicts(1)[0]
>>> top.id_b in ("x", "y"), top.block in "QKVO"
(True, True)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, NamedTuple, Optional, Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits.interference.fisher import (
    DAMPING_ABS,
    DAMPING_REL,
    FISHER_DTYPE,
    DiagonalFisher,
    FisherAccumulator,
    damping_lambda,
    loo_block,
)
from tl_circuits.interference.gradients import (
    GB,
    GradientConfig,
    GradientFactors,
    PerSampleGradients,
    _chunks,
    _non_finite_error,
    _prepare,
    chunk_size_for_budget,
    engine_bytes_per_sample,
    factor_bytes_per_sample,
    gradient_bytes_per_sample,
)
from tl_circuits.models.spec import BLOCKS, ModelSpec

from tl_circuits.interference.config import (REDUCTIONS, VARIANTS, InterferenceConfig, Reduction, Variant)


# ----- the scoring stage ------------------------------------------------------------------------------

def _safe_reciprocal(f: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """1/F̃ in ``dtype``, NaN where F̃ is 0 (no Fisher information: missing data, not 0)."""
    inverse = f.to(dtype).reciprocal_()
    zero = f <= 0
    if bool(zero.any()):
        inverse.masked_fill_(zero, math.nan)
    return inverse


class _Scorer:
    """Turns per-head gradient rows into the two operands of the per-block contraction.

    Operands are ``[L, H, n, P]`` float32 (contiguous, so the contraction is a batched matmul without
    copies); transforms are done in place on buffers the scorer owns.
    """

    def __init__(self, fisher: DiagonalFisher, variant: str, reduction: str, leave_one_out: bool,
                 damping_abs: float, damping_rel: float, sub_chunk: int = 8):
        self.fisher, self.variant, self.reduction = fisher, variant, reduction
        self.loo, self.damping_abs, self.damping_rel = leave_one_out, damping_abs, damping_rel
        self.sub_chunk = max(1, sub_chunk)
        if leave_one_out and fisher.n_samples < 2:
            raise ValueError(f"leave-one-out needs a Fisher of at least 2 samples, this one has {fisher.n_samples}")
        self.inverse = None
        if not leave_one_out:
            self.inverse = {b: _safe_reciprocal(f + damping_lambda(f, damping_abs, damping_rel))
                            for b, f in fisher.per_block.items()}

    def _normalise_(self, block: str, x: Tensor, power: int) -> Tensor:
        """In place: x (raw g, [L, H, n, P]) -> g^power / F̃ (F̃_{−i} per sample with leave-one-out)."""
        if not self.loo:
            if power == 2:
                x.square_()
            return x.mul_(self.inverse[block][:, :, None, :])
        f, n = self.fisher.per_block[block][:, :, None, :], self.fisher.n_samples
        for start in range(0, x.shape[2], self.sub_chunk):  # float64 temporaries, a few samples at a time
            part = x[:, :, start:start + self.sub_chunk]
            g = part.to(FISHER_DTYPE)
            c = g.square()  # exact: (N·F − C_i) cancels, so C_i must not be rounded to float32 first
            f_loo = loo_block(f.to(c.device), n, c)
            f_loo += damping_lambda(f_loo, self.damping_abs, self.damping_rel)
            part.copy_((c if power == 2 else g).mul_(_safe_reciprocal(f_loo, FISHER_DTYPE)))
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


def _check_pair(grads_a: PerSampleGradients, grads_b: PerSampleGradients, fisher: DiagonalFisher) -> None:
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
    variant: Variant = "unsigned",
    reduction: Reduction = "sum",
    *,
    leave_one_out: bool = False,
    damping_abs: float = DAMPING_ABS,
    damping_rel: float = DAMPING_REL,
    memory_budget_gb: float = 2.0,
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
    >>> s = pairwise_scores(ga, gb, fisher_from_gradients(ga), damping_abs=1.0, damping_rel=0.0)
    >>> s["Q"]  # head 0: 1/(1+1)*1 + 1/(1+1)*0; head 1: 0 + 4/(4+1)*1
    tensor([[[[0.5000, 0.8000]]]])
    """
    _check_pair(grads_a, grads_b, fisher)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    scorer = _Scorer(fisher, variant, reduction, leave_one_out, damping_abs, damping_rel)
    n_a, n_b = grads_a.n_samples, grads_b.n_samples
    per_sample = sum(g[0].numel() * 4 for g in grads_a.per_block.values())
    k = 2 if variant == "symmetric" else 1
    budget = memory_budget_gb * GB
    chunk_a = min(n_a, max(1, int(0.5 * budget // ((k + 0.5) * per_sample))))
    chunk_b = min(n_b, max(1, int((budget - chunk_a * (k + 0.5) * per_sample) // ((k + 0.5) * per_sample))))
    scores = {b: torch.full((n_a, n_b, *g.shape[1:3]), math.nan) for b, g in grads_a.per_block.items()}
    steps = math.ceil(n_a / chunk_a) * math.ceil(n_b / chunk_b)
    ws = _Workspace(next(iter(grads_a.per_block.values())).device)
    symmetric = variant == "symmetric"

    def operands(grads, sl, side):  # [L, H, n, P] copies in reused buffers, one per block
        rows = {b: ws.get(f"{side}{b}", _rows_shape(g, sl)).copy_(einops.rearrange(g[sl], "n l h p -> l h n p"))
                for b, g in grads.per_block.items()}
        extra = {b: ws.get(f"{side}2{b}", _rows_shape(g, sl)) for b, g in grads.per_block.items()} if symmetric else None
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


def _rows_shape(g: Tensor, sl: slice) -> tuple:
    n = len(range(*sl.indices(g.shape[0])))
    return (g.shape[1], g.shape[2], n, g.shape[3])


# ----- the result --------------------------------------------------------------------------------------

class Conflict(NamedTuple):
    """One (pair, block, layer, head) score; ``head`` is a KV head for K/V under GQA."""

    id_a: Hashable
    id_b: Hashable
    block: str
    layer: int
    head: int
    score: float


@dataclass
class InterferenceResult:
    """Pairwise interference scores and what produced them.

    Attributes:
        scores: ``{B: [N_A, N_B, n_layers, heads_B]}`` (heads_B = KV heads for K/V under GQA); NaN where
            data is missing.
        ids_a, ids_b: the caller's sample ids (any hashables, e.g. strings or ints), in row order.
        config: the resolved :class:`InterferenceConfig`.
        settings: everything else that determines the numbers (Fisher sample count, model sizes, the
            memory plan: held samples, gradient evaluations, timings).
        fisher: the undamped diagonal Fisher that normalised the scores (float64).
    """

    scores: dict[str, Float[Tensor, "n_a n_b n_layers heads"]]
    ids_a: list
    ids_b: list
    config: InterferenceConfig
    settings: dict[str, Any] = field(default_factory=dict)
    fisher: Optional[DiagonalFisher] = None

    @property
    def blocks(self) -> list[str]:
        return [b for b in BLOCKS if b in self.scores]

    def layer_head_mean(self, block: str) -> Float[Tensor, "n_layers heads"]:
        """Mean over all pairs of one block's scores, ``[n_layers, heads_B]`` (NaN if any pair is NaN)."""
        if block not in self.scores:
            raise KeyError(f"no scores for block {block!r}; blocks are {self.blocks}")
        return self.scores[block].mean(dim=(0, 1))

    @property
    def mean(self) -> dict[str, Float[Tensor, "n_layers heads"]]:
        """``{block: layer_head_mean(block)}``."""
        return {b: self.layer_head_mean(b) for b in self.blocks}

    def block_means(self) -> dict[str, float]:
        """Mean score per block over pairs, layers and heads (NaN cells ignored; NaN if all are)."""
        return {b: float(torch.nanmean(self.scores[b])) for b in self.blocks}

    @property
    def most_conflicted_block(self) -> str:
        """The block with the largest mean score (the most negative for the signed variant)."""
        means = {b: m for b, m in self.block_means().items() if not math.isnan(m)}
        if not means:
            raise ValueError("every score is NaN: no block can be ranked")
        pick = min if self.config.variant == "signed" else max
        return pick(means, key=means.get)

    def pair(self, id_a: Hashable, id_b: Hashable) -> dict[str, Float[Tensor, "n_layers heads"]]:
        """Scores of one pair by the caller's ids; KeyError for an unknown id (never a silent 0)."""
        try:
            i, j = self.ids_a.index(id_a), self.ids_b.index(id_b)
        except ValueError:
            raise KeyError(f"unknown pair ({id_a!r}, {id_b!r})") from None
        return {b: s[i, j] for b, s in self.scores.items()}

    def top_conflicts(self, k: int = 10) -> list[Conflict]:
        """The ``k`` most conflicted (pair, block, layer, head) cells, most conflicted first.

        Largest scores for unsigned/symmetric, most negative for signed; NaN cells are skipped.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        sign = -1.0 if self.config.variant == "signed" else 1.0
        flat, owners = [], []
        for b in self.blocks:
            v = sign * self.scores[b].flatten()
            flat.append(torch.where(torch.isnan(v), torch.full_like(v, -math.inf), v))
            owners.append(b)
        values = torch.cat(flat)
        top = torch.topk(values, min(k, int((values > -math.inf).sum())))
        offsets = torch.tensor([0] + [t.numel() for t in flat]).cumsum(0)
        out = []
        for idx in top.indices.tolist():
            which = int(torch.searchsorted(offsets, idx, right=True)) - 1
            b = owners[which]
            shape = self.scores[b].shape
            i, j, layer, head = (int(x) for x in torch.unravel_index(torch.tensor(idx - int(offsets[which])), shape))
            out.append(Conflict(self.ids_a[i], self.ids_b[j], b, layer, head, float(self.scores[b][i, j, layer, head])))
        return out

    def to_dataframe(self):
        """Long table: one row per (id_a, id_b, block, layer, head) with its score (NaN kept).

        ``head_kind`` is ``"kv"`` for K/V rows (KV heads; the same as query heads without GQA) and
        ``"query"`` for Q/O rows.
        """
        import numpy as np
        import pandas as pd

        frames = []
        for b in self.blocks:
            s = self.scores[b]
            n_a, n_b, n_layers, n_heads = s.shape
            ia, ib, layer, head = np.meshgrid(np.arange(n_a), np.arange(n_b), np.arange(n_layers),
                                              np.arange(n_heads), indexing="ij")
            frames.append(pd.DataFrame({
                "id_a": np.asarray(self.ids_a, dtype=object)[ia.ravel()],
                "id_b": np.asarray(self.ids_b, dtype=object)[ib.ravel()],
                "block": b,
                "layer": layer.ravel(),
                "head": head.ravel(),
                "head_kind": "kv" if b in ("K", "V") else "query",
                "score": s.detach().float().cpu().numpy().ravel(),
            }))
        return pd.concat(frames, ignore_index=True)

    def plot(self, title: Optional[str] = None, **kwargs):
        """Layer × head heatmap of the mean score per block (:func:`tl_circuits.plotting.plot_blocks`)."""
        from tl_circuits.plotting import plot_blocks

        if title is None:
            title = f"{self.config.variant} interference ({self.config.reduction}, Fisher {self.config.fisher_source})"
        kwargs.setdefault("signed", True if self.config.variant == "signed" else None)
        return plot_blocks(self.mean, title=title, **kwargs)


# ----- end to end ----------------------------------------------------------------------------------------

BACKWARD_PER_MATERIALISATION = 4  # cost of a per-sample backward pass / of building its rows from factors
SCRATCH_SHARE = 0.05  # of the budget: rows built from factors before their copy into operand layout
SLACK_SHARE = 0.10  # of the budget, left unplanned: allocator slack and estimation error


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS tracks what is in use.

    Long runs allocate many mid-sized tensors that glibc keeps in its heap after they are freed; trimming
    after each held block keeps the process under its budget. A no-op where glibc is not available.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class _Plan:
    """How compute_interference uses its memory budget (recorded in ``settings['plan']``)."""

    engine_chunk: int  # samples per vmap call
    block_a: int  # task-A samples whose gradient factors are held at once
    block_b: int  # task-B samples whose gradient factors are held at once
    n_a_blocks: int
    fisher_pass: bool  # a separate pass over the Fisher set (when the tasks' factors do not all fit)
    layer_group: int  # layers per contraction
    chunk_a: int  # A samples per contraction
    chunk_b: int  # B samples per contraction
    sub_chunk: int  # samples per materialisation of rows from factors
    n_gradient_evaluations: int
    streamed: bool  # A in several blocks or B not held whole
    estimated_peak_gb: float


def _plan(model, spec: ModelSpec, n_a: int, n_b: int, pos_a: int, pos_b: int, cfg: InterferenceConfig,
          external: bool) -> _Plan:
    budget = cfg.memory_budget_gb * GB
    k = 2 if cfg.variant == "symmetric" else 1
    s = gradient_bytes_per_sample(spec, cfg.include_biases)  # float32 rows of every block and layer
    s_layer = max(4 * spec.n_block_heads(b) * spec.n_params_per_head(b, cfg.include_biases) for b in BLOCKS)
    n_block_heads = sum(spec.n_block_heads(b) for b in BLOCKS)
    fixed = 4 * s  # float64 Fisher (the result's) + float64 sums of the Fisher pass
    fixed += 2 * n_a * n_b * spec.n_layers * n_block_heads * 4  # scores (+ a temporary)
    pos = max(pos_a, pos_b)
    chunk = cfg.chunk_size or chunk_size_for_budget(model, pos, 0.15 * budget, cfg.include_biases, "factored")
    engine = chunk * (engine_bytes_per_sample(model, pos, cfg.include_biases, "factored")
                      + factor_bytes_per_sample(model, pos) + s // 2)  # vmap workspace, factors, one block's rows
    f_a, f_b = factor_bytes_per_sample(model, pos_a), factor_bytes_per_sample(model, pos_b)
    scratch = SCRATCH_SHARE * budget  # rows built from factors before their strided copy (sub_chunk follows)
    slack = SLACK_SHARE * budget  # the allocator's free-but-not-returned pages over a long run
    avail = budget - fixed - engine - scratch - slack
    per_op = (k + 0.5) * s_layer  # one sample's operand(s) of one block and layer + transients
    min_ops = 2 * per_op
    if avail < f_a + f_b + min_ops:  # one sample of each task
        need = (budget - avail + f_a + f_b + min_ops) / GB
        raise ValueError(f"memory_budget_gb={cfg.memory_budget_gb} is too small for this model and these tasks: "
                         f"at least {need:.3f} GB is needed (gradient chunk, Fisher, scores, one sample of each task)")
    room = avail - min_ops
    source = cfg.fisher_source
    cap = cfg.max_held_samples or max(n_a, n_b)

    def cost(block_a: int, block_b: int) -> tuple[int, bool]:
        """Per-sample gradient evaluations of a plan, and whether it needs a separate Fisher pass."""
        whole_a, whole_b = block_a == n_a, block_b == n_b
        fisher_pass = not external and ((source in ("a", "pooled") and not whole_a)
                                        or (source in ("b", "pooled") and not whole_b))
        a_in_f = fisher_pass and source in ("a", "pooled")
        b_in_f = fisher_pass and source in ("b", "pooled")
        n_blocks = math.ceil(n_a / block_a)
        evals = (n_a if a_in_f else 0) + (n_b if b_in_f else 0) + n_a - (block_a if a_in_f else 0)
        if not (b_in_f and whole_b):  # B kept from the Fisher pass when it is held whole
            evals += n_b if (whole_b or n_blocks == 1) else n_blocks * n_b
        return evals, fisher_pass

    def contraction_plan(block_a: int, block_b: int) -> tuple[int, int, int]:
        """Layers per contraction and samples per operand chunk in the room the held factors leave."""
        ops = avail - block_a * f_a - block_b * f_b
        if (block_a + block_b) * per_op <= ops:
            return min(spec.n_layers, int(ops // ((block_a + block_b) * per_op))), block_a, block_b
        chunk_a = max(1, min(block_a, int(0.7 * ops // per_op)))
        return 1, chunk_a, max(1, min(block_b, int((ops - chunk_a * per_op) // per_op)))

    def materialisations(block_a, block_b, chunk_a, fisher_pass) -> int:
        """Samples whose rows (all blocks and layers) are built from factors, over the whole run."""
        n_b_blocks = math.ceil(n_b / block_b)
        total = n_a * n_b_blocks + n_b * math.ceil(n_a / block_a) * math.ceil(block_a / chunk_a)
        if external:
            return total
        n_f = {"a": n_a, "b": n_b, "pooled": n_a + n_b}[source]
        whole_unchunked = block_a == n_a and block_b == n_b and chunk_a == n_a
        return total + (0 if whole_unchunked else n_f)  # the Fisher: from the scored rows, or built separately

    # A backward pass costs roughly BACKWARD_PER_MATERIALISATION times building one sample's rows from factors.
    candidates = []
    for factor_share in (1.0, 0.85, 0.7, 0.5, 0.3):  # how much of the room goes to held factors
        room_f = factor_share * room
        for share_b in (None, 0.0, 0.25, 0.5, 0.75, 1.0):  # None: hold all of A first
            if share_b is None:
                block_a = min(n_a, cap, int(room_f // f_a))
                block_b = min(n_b, cap, int((room_f - block_a * f_a) // f_b))
            else:
                block_b = min(n_b, cap, int(share_b * room_f // f_b))
                block_a = min(n_a, cap, int((room_f - block_b * f_b) // f_a))
                block_b = min(n_b, cap, max(block_b, int((room_f - block_a * f_a) // f_b)))
            if block_a < 1 or block_b < 1:
                continue
            evals, fisher_pass = cost(block_a, block_b)
            layer_group, chunk_a, chunk_b = contraction_plan(block_a, block_b)
            total = BACKWARD_PER_MATERIALISATION * evals + materialisations(block_a, block_b, chunk_a, fisher_pass)
            candidates.append((total, -layer_group, block_a, block_b))
    _, _, block_a, block_b = min(candidates)
    evals, fisher_pass = cost(block_a, block_b)
    layer_group, chunk_a, chunk_b = contraction_plan(block_a, block_b)
    sub_chunk = max(1, min(max(chunk_a, chunk_b), int(scratch // (layer_group * s_layer))))
    n_a_blocks = math.ceil(n_a / block_a)
    peak = budget - avail - slack + block_a * f_a + block_b * f_b + (chunk_a + chunk_b) * layer_group * per_op
    return _Plan(chunk, block_a, block_b, n_a_blocks, fisher_pass, layer_group, chunk_a, chunk_b, sub_chunk,
                 evals, streamed=n_a_blocks > 1 or block_b < n_b, estimated_peak_gb=peak / GB)


class _FactorBuffer:
    """Preallocated GradientFactors for ``n`` samples, filled chunk by chunk (no concatenation copies).

    Attention inputs shared between Q, K and V in a chunk (one tensor) are stored once.
    """

    def __init__(self, n: int):
        self.n, self.factors = n, None

    def put(self, offset: int, f: GradientFactors) -> None:
        m = min(f.n_samples, self.n - offset)
        if m <= 0:
            return
        if self.factors is None:
            new = lambda t: t.new_empty((self.n, *t.shape[1:]))  # noqa: E731
            shared: dict = {}
            inputs = {b: shared.setdefault(id(t), new(t)) for b, t in f.inputs.items()}
            self.factors = GradientFactors(inputs, {b: new(t) for b, t in f.out_grads.items()}, new(f.z), f.spec,
                                           f.include_biases)
        rows, done = slice(offset, offset + m), set()
        for b, t in f.inputs.items():
            target = self.factors.inputs[b]
            partners = [c for c in f.inputs if c != b and self.factors.inputs[c] is target]
            if any(f.inputs[c] is not t for c in partners):  # shared so far, not in this chunk: unshare
                target = self.factors.inputs[b] = target.clone()
            if id(target) not in done:
                target[rows] = t[:m]
                done.add(id(target))
        for b, t in f.out_grads.items():
            self.factors.out_grads[b][rows] = t[:m]
        self.factors.z[rows] = f.z[:m]


class _Workspace:
    """Reusable float32 buffers, allocated once and viewed per shape.

    On CPU every fresh large tensor is fresh pages from the OS, and faulting them in costs more than the
    arithmetic done on them here; materialised rows and operands therefore live in a few buffers reused
    for every (block, layer group, chunk).
    """

    def __init__(self, device):
        self.device, self.storage = device, {}

    def get(self, name: str, shape: tuple) -> Tensor:
        numel = math.prod(shape)
        buf = self.storage.get(name)
        if buf is None or buf.numel() < numel:
            self.storage[name] = buf = None  # free before growing
            self.storage[name] = buf = torch.empty(numel, device=self.device)
        return buf[:numel].view(shape)


def _rows_into(f: GradientFactors, block: str, layers: slice, samples: slice, sub: int, out: Tensor,
               ws: _Workspace) -> Tensor:
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


def _sum_squares(rows: Tensor) -> Tensor:
    """Σ over samples (dim 2 of [Lg, H, n, P]) of rows², in float64, one sample at a time (no big temporary)."""
    total = torch.zeros(rows.shape[0], rows.shape[1], rows.shape[3], dtype=FISHER_DTYPE, device=rows.device)
    scratch = torch.empty_like(total)
    for i in range(rows.shape[2]):  # float64 squares of float32 values are exact; same-dtype ops are the fast path
        scratch.copy_(rows[:, :, i])
        total.addcmul_(scratch, scratch)
    return total


def _fisher_from_factors(f: GradientFactors, source: str, sub: int) -> DiagonalFisher:
    """Batch-mean Fisher of held factors, materialising rows a few samples and one block at a time."""
    acc = FisherAccumulator(f.spec, f.include_biases, source)
    for start in range(0, f.n_samples, sub):
        part = f.select(slice(start, start + sub))
        for block in BLOCKS:
            acc.add(PerSampleGradients({block: part.rows(block)}, f.spec, f.include_biases))
    return acc.result()


def _check_ids(ids, n: int, what: str) -> list:
    if ids is None:
        return list(range(n))
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{what} has {len(ids)} ids for {n} samples")
    if len(set(ids)) != n:
        raise ValueError(f"{what} has duplicate ids")
    return ids


def compute_interference(
    model,
    tokens_a: Int[Tensor, "n_a pos_a"],
    tokens_b: Int[Tensor, "n_b pos_b"],
    *,
    attention_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    attention_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    ids_a: Optional[Sequence[Hashable]] = None,
    ids_b: Optional[Sequence[Hashable]] = None,
    config: InterferenceConfig = InterferenceConfig(),
    fisher: Optional[DiagonalFisher] = None,
) -> InterferenceResult:
    """QK-OV interference of every pair (i ∈ A, j ∈ B), block, layer and head, end to end.

    Per-sample gradients (the factored engine of :mod:`tl_circuits.interference.gradients`), the Fisher of
    ``config.fisher_source`` (or the given ``fisher``, e.g. an :class:`~tl_circuits.interference.fisher.EMAFisher`
    estimate), damping, and one batched contraction per block and memory chunk (as
    :func:`pairwise_scores`), within ``config.memory_budget_gb``.

    Memory, and what streaming costs (``result.settings['plan']``). What is held are the tasks'
    *gradient factors* (:class:`~tl_circuits.interference.gradients.GradientFactors`, ~14 MB per sample for GPT-2
    small at 64 positions, vs ~113 MB for the gradient rows); rows are materialised from them per
    (block, group of layers, chunk of samples) right before their contraction.

    1. If the Fisher set's factors can be held whole — and B's too, or A is held whole so that B is
       streamed once — every sample's gradient is computed once (``N_A + N_B`` evaluations, no separate
       Fisher pass); the Fisher comes from the held factors (per (block, layers) group from the very
       rows that are scored, when those fit).
    2. Otherwise a Fisher pass over the Fisher set comes first (keeping the first ``block_a`` samples of
       A, and B when it is held whole), then A is processed in blocks of ``block_a`` samples and B is
       held whole or recomputed for every A block. Cost in per-sample gradient evaluations:
       ``N_F + (N_A − block_a) + N_B`` (B held) or ``N_F + (N_A − block_a) + ⌈N_A/block_a⌉·N_B``
       (B streamed), ``N_F`` the Fisher set's size (``block_a`` is not subtracted when A is not in it,
       ``N_B`` not added when B was kept from the Fisher pass). Time grows like ``N_A·N_B / block_a``
       while memory stays within the budget.

    Rows of a sample are materialised once per (block, layer) when each group's operands fit for all
    samples; with smaller budgets B's rows are rebuilt for every chunk of A (``chunk_a``), a cost in
    matrix products (~3.6 GFLOP per sample for GPT-2 small), not in backward passes. Among the plans
    that fit, the one with the least estimated work is chosen (a backward pass counted as 4
    materialisations).

    The budget is split into: the Fisher (float64) and the scores; the ``vmap`` chunk
    (:func:`~tl_circuits.interference.gradients.engine_bytes_per_sample`); 5% scratch for building rows; 10% slack
    for the allocator (glibc keeps freed mid-sized blocks; the heap is trimmed after each held block);
    the rest holds factors and contraction operands. ``settings['plan']['estimated_peak_gb']`` is the
    planned peak without the slack.

    Args:
        model: a HookedTransformer (not modified).
        tokens_a, tokens_b: ``[N, pos]`` token ids of task A and task B (lengths may differ).
        attention_mask_a, attention_mask_b: 0/1 masks (left or right padding); ``None``: all valid.
        ids_a, ids_b: the caller's sample ids (unique); default ``0..N-1``.
        config: :class:`InterferenceConfig`.
        fisher: an external undamped Fisher to normalise with, instead of estimating one.
    Returns:
        :class:`InterferenceResult` (with ``result.fisher``, the undamped Fisher used).
    Raises:
        ValueError: an empty task, ids outside the vocabulary, sequences longer than ``n_ctx``, bad
            masks or ids, NaN/inf gradients (naming the samples), a budget too small for one sample.
    """
    external = fisher is not None
    cfg = config.resolved(external_fisher=external)
    spec, mask_a = _prepare(model, tokens_a, attention_mask_a, "tokens_a")
    _, mask_b = _prepare(model, tokens_b, attention_mask_b, "tokens_b")
    n_a, n_b = tokens_a.shape[0], tokens_b.shape[0]
    ids_a, ids_b = _check_ids(ids_a, n_a, "ids_a"), _check_ids(ids_b, n_b, "ids_b")
    if external:
        for b in BLOCKS:
            expect = (spec.n_layers, spec.n_block_heads(b), spec.n_params_per_head(b, cfg.include_biases))
            if b not in fisher.per_block or tuple(fisher.per_block[b].shape) != expect:
                raise ValueError(f"the Fisher's block {b} does not match this model's per-head rows {expect} "
                                 "(different model or include_biases?)")
    plan = _plan(model, spec, n_a, n_b, tokens_a.shape[1], tokens_b.shape[1], cfg, external)
    source = cfg.fisher_source
    gcfg = GradientConfig(cfg.include_biases, cfg.memory_budget_gb, plan.engine_chunk, progress=False,
                          method="factored")
    timings = {"gradients_s": 0.0, "fisher_s": 0.0, "scoring_s": 0.0}
    bar = tqdm(total=plan.n_gradient_evaluations, desc="interference: per-sample gradients", unit="sample",
               disable=not cfg.progress)

    def chunks(tokens, mask, what, sl=slice(None)):
        """Factor chunks of one task; after the pass, a ValueError naming every NaN/inf sample."""
        offset, bad = sl.start or 0, []
        it = _chunks(model, tokens[sl], mask[sl], gcfg, what, factors=True)
        while True:
            t0 = time.perf_counter()
            part = next(it, None)
            timings["gradients_s"] += time.perf_counter() - t0
            if part is None:
                break
            part_sl, f, bad_ids = part
            bar.update(f.n_samples)
            bad += [i + offset for i in bad_ids]
            if not bad:
                yield slice(part_sl.start + offset, part_sl.stop + offset), f
        if bad:
            raise _non_finite_error(bad, what)

    def factors_of(tokens, mask, what, sl):
        buf = _FactorBuffer(sl.stop - sl.start)
        for part_sl, f in chunks(tokens, mask, what, sl):
            buf.put(part_sl.start - sl.start, f)
        return buf.factors

    fisher_full: dict[str, Tensor] = {}  # filled group by group when the Fisher comes from the scored rows
    n_fisher = {"a": n_a, "b": n_b, "pooled": n_a + n_b}.get(source, 0)
    scores = {b: torch.full((n_a, n_b, spec.n_layers, spec.n_block_heads(b)), math.nan) for b in BLOCKS}
    groups = [slice(l0, min(spec.n_layers, l0 + plan.layer_group)) for l0 in range(0, spec.n_layers, plan.layer_group)]

    device = next(model.parameters()).device
    ws = _Workspace(device)
    symmetric = cfg.variant == "symmetric"

    def score_blocks(fa: GradientFactors, fb: GradientFactors, sa: slice, sb: slice, f: Optional[DiagonalFisher]):
        """Scores of all pairs of two held factor blocks; with f None, each group's Fisher from these rows."""
        t0 = time.perf_counter()
        na, nb = fa.n_samples, fb.n_samples
        whole = plan.chunk_a >= na and plan.chunk_b >= nb
        for block in BLOCKS:
            heads, width = spec.n_block_heads(block), spec.n_params_per_head(block, cfg.include_biases)
            for layers in groups:
                lg = layers.stop - layers.start
                buf = lambda name, n: ws.get(name, (lg, heads, n, width))  # noqa: E731
                rows = lambda fx, name, sl: _rows_into(fx, block, layers, sl, plan.sub_chunk,  # noqa: E731
                                                       buf(name, sl.stop - sl.start), ws)
                raw_a = raw_b = None
                if f is None:  # the blocks are the whole tasks: the Fisher set's rows are all here
                    sums = 0.0
                    if whole:
                        raw_a, raw_b = rows(fa, "a", slice(0, na)), rows(fb, "b", slice(0, nb))
                        for tag, raw in (("a", raw_a), ("b", raw_b)):
                            if source in (tag, "pooled"):
                                sums = sums + _sum_squares(raw)
                    else:
                        for fx, n_x, tag in ((fa, na, "a"), (fb, nb, "b")):
                            if source in (tag, "pooled"):
                                for x0 in range(0, n_x, plan.chunk_a):
                                    sums = sums + _sum_squares(rows(fx, "a", slice(x0, min(n_x, x0 + plan.chunk_a))))
                    f_group = sums / n_fisher
                    if block not in fisher_full:
                        fisher_full[block] = torch.full((spec.n_layers, heads, width), math.nan, dtype=FISHER_DTYPE)
                    fisher_full[block][layers] = f_group.cpu()
                else:
                    f_group = f.per_block[block][layers].to(device)
                group_fisher = DiagonalFisher({block: f_group}, f.n_samples if f is not None else n_fisher)
                scorer = _Scorer(group_fisher, cfg.variant, cfg.reduction, cfg.leave_one_out, cfg.damping_abs,
                                 cfg.damping_rel, sub_chunk=max(1, plan.sub_chunk // 4))  # float64 LOO temporaries
                for a0 in range(0, na, plan.chunk_a):
                    ca = slice(a0, min(na, a0 + plan.chunk_a))
                    x = raw_a if raw_a is not None else rows(fa, "a", ca)
                    left = scorer.left({block: x}, {block: buf("a2", ca.stop - ca.start)} if symmetric else None)
                    for b0 in range(0, nb, plan.chunk_b):
                        cb = slice(b0, min(nb, b0 + plan.chunk_b))
                        y = raw_b if raw_b is not None else rows(fb, "b", cb)
                        right = scorer.right({block: y}, {block: buf("b2", cb.stop - cb.start)} if symmetric else None)
                        out = scorer.contract(left, right)[block]
                        scores[block][sa.start + ca.start: sa.start + ca.stop, sb.start + cb.start: sb.start + cb.stop,
                                      layers] = out.cpu()
        timings["scoring_s"] += time.perf_counter() - t0

    try:
        with torch.no_grad():
            kept_a = kept_b = None
            if external:
                f_used = fisher
            elif plan.fisher_pass:  # 1. the Fisher set's gradients, keeping what will be held anyway
                t0 = time.perf_counter()
                acc = FisherAccumulator(spec, cfg.include_biases, source)
                passes = []
                if source in ("a", "pooled"):
                    passes.append((tokens_a, mask_a, "tokens_a", plan.block_a, "a"))
                if source in ("b", "pooled"):
                    passes.append((tokens_b, mask_b, "tokens_b", n_b if plan.block_b == n_b else 0, "b"))
                for tokens, mask, what, keep, tag in passes:
                    buf = _FactorBuffer(keep) if keep else None
                    for part_sl, part in chunks(tokens, mask, what):
                        t1 = time.perf_counter()
                        for block in BLOCKS:
                            acc.add(PerSampleGradients({block: part.rows(block)}, spec, cfg.include_biases))
                        timings["fisher_s"] += time.perf_counter() - t1
                        if buf is not None:
                            buf.put(part_sl.start, part)
                    if buf is not None:
                        if tag == "a":
                            kept_a = buf.factors
                        else:
                            kept_b = buf.factors
                    buf = part = None  # the kept factors must die with kept_a / kept_b, not linger here
                f_used = acc.result()
                del acc
                _release_free_memory()
            else:
                f_used = None
            held_b = kept_b
            if f_used is None and not (plan.block_a == n_a and plan.block_b == n_b):
                # no Fisher pass was needed because the Fisher set is held whole: estimate it from those factors
                t0 = time.perf_counter()
                if source == "a":
                    kept_a = factors_of(tokens_a, mask_a, "tokens_a", slice(0, n_a))
                    f_used = _fisher_from_factors(kept_a, source, plan.sub_chunk)
                else:
                    held_b = factors_of(tokens_b, mask_b, "tokens_b", slice(0, n_b))
                    f_used = _fisher_from_factors(held_b, source, plan.sub_chunk)
                timings["fisher_s"] += time.perf_counter() - t0
            # 2. A in blocks; B held whole or recomputed per A block
            for i, a0 in enumerate(range(0, n_a, plan.block_a)):
                sa = slice(a0, min(n_a, a0 + plan.block_a))
                fa = kept_a if (i == 0 and kept_a is not None) else factors_of(tokens_a, mask_a, "tokens_a", sa)
                kept_a = None
                if plan.block_b == n_b:
                    if held_b is None:
                        held_b = factors_of(tokens_b, mask_b, "tokens_b", slice(0, n_b))
                    score_blocks(fa, held_b, sa, slice(0, n_b), f_used)
                else:
                    for b0 in range(0, n_b, plan.block_b):
                        sb = slice(b0, min(n_b, b0 + plan.block_b))
                        score_blocks(fa, factors_of(tokens_b, mask_b, "tokens_b", sb), sa, sb, f_used)
                        _release_free_memory()
                del fa
                _release_free_memory()
    finally:
        bar.close()
    if f_used is None:
        f_used = DiagonalFisher(fisher_full, n_fisher, spec, cfg.include_biases, source)
    settings = {
        "n_a": n_a,
        "n_b": n_b,
        "fisher_n_samples": f_used.n_samples,
        "fisher_source": cfg.fisher_source,
        "n_layers": spec.n_layers,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads,
        "grouped": spec.grouped,
        "params_per_head": {b: spec.n_params_per_head(b, cfg.include_biases) for b in BLOCKS},
        "plan": dataclasses.asdict(plan),
        "timings": timings,
    }
    return InterferenceResult(scores, ids_a, ids_b, cfg, settings, fisher=f_used)
