"""Diagonal empirical Fisher of the attention parameters, from per-sample gradients (docs/spec.md §2).

Per-sample contribution ``C_i = g_i ⊙ g_i``; the diagonal empirical Fisher of a sample set is the mean
of ``C`` over it (task A — the original's choice —, task B, or both pooled). Everything here is kept
per block as per-head rows ``[n_layers, heads, n_params_per_head]`` (the layout of
:class:`tl_circuits.interference.gradients.PerSampleGradients`) and **accumulated and stored in float64**, whatever
the model's dtype: float32 would already be enough against the original's fp16 underflow, float64
also keeps the leave-one-out subtraction ``(N·F − C_i)`` accurate when one sample dominates.

Estimators:

- :func:`fisher_from_gradients` — batch mean of ``C`` (exact, chunk by chunk with :class:`FisherAccumulator`);
- :class:`EMAFisher` — streaming ``F_t = β·F_{t−1} + (1−β)·c_t`` with ``F_0 = 0``, read out with bias
  correction ``F_t / (1 − β^t)``; a constant stream reads out exactly that constant, and for β → 1 it
  tends to the batch mean;
- :func:`pooled` — the Fisher of A ∪ B from the Fishers of A and B (weighted by sample counts);
- :func:`leave_one_out` — ``F_{−i} = (N·F − C_i)/(N − 1)`` for every sample of the set at once.

Damping (:func:`damped`): ``F̃ = F + λ`` with ``λ = max(λ_abs, λ_rel · mean(F over the slice))`` where the
*slice* is one (block, layer, head) row — the parameters the interference metric sums over. Defaults
``λ_rel = 1e-3`` (a relative floor: parameters with Fisher below a thousandth of their head's mean are
treated as that small, so ``C/F̃`` cannot blow up on a near-zero ``F``, while a head whose Fisher is small
overall, e.g. 1e-12, gets a proportionally small λ instead of the original's absolute 1e-8 ridge) and
``λ_abs = 1e-30`` (only matters when a whole head's Fisher is 0; far below any float32 gradient
square). With ``λ_abs = 0`` the damped Fisher scales exactly with the gradients squared.

>>> import torch
>>> from tl_circuits.models.spec import ModelSpec
>>> spec = ModelSpec(n_layers=1, n_heads=2, n_kv_heads=2, d_model=2, d_head=1, d_vocab=5, n_ctx=4,
...                  grouped=False, rotary=False)
>>> from tl_circuits.interference.factors import PerSampleGradients
>>> g = PerSampleGradients({b: torch.tensor([[[[1., 2.], [0., 0.]]], [[[3., 0.], [0., 0.]]]]) for b in "QKVO"}, spec)
>>> fisher_from_gradients(g).per_block["Q"]
tensor([[[5., 2.],
         [0., 0.]]], dtype=torch.float64)
>>> damped(fisher_from_gradients(g), damping_abs=0.0, damping_rel=0.1)["Q"]
tensor([[[5.3500, 2.3500],
         [0.0000, 0.0000]]], dtype=torch.float64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union, cast

import torch
from jaxtyping import Float
from torch import Tensor

from tl_circuits.defaults import NORMALIZATION
from tl_circuits.interference.config import DAMPING_ABS, DAMPING_REL, NORMALIZATIONS
from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.models.spec import ModelSpec

FISHER_DTYPE = torch.float64

Contributions = Mapping[str, Float[Tensor, "n n_layers heads per_head"]]


@dataclass
class DiagonalFisher:
    """A diagonal Fisher per block, as per-head rows.

    Attributes:
        per_block: ``{"Q"|"K"|"V"|"O": [n_layers, heads, n_params_per_head]}`` in float64.
        n_samples: number of samples it averages (for EMA: number of updates).
        spec: the model's :class:`ModelSpec` (None if built from raw tensors).
        include_biases: whether bias rows are included.
        source: a label, e.g. ``"a"``, ``"b"``, ``"pooled"``, ``"ema"``.
    """

    per_block: dict[str, Float[Tensor, "n_layers heads per_head"]]
    n_samples: int
    spec: Optional[ModelSpec] = None
    include_biases: bool = False
    source: str = ""

    def damped(self, damping_abs: float = DAMPING_ABS, damping_rel: float = DAMPING_REL,
               normalization: str = NORMALIZATION) -> dict[str, Tensor]:
        """The normaliser per block, ``F + λ`` by default (see :func:`damped`)."""
        return damped(self, damping_abs, damping_rel, normalization)

    def to(self, dtype: torch.dtype) -> "DiagonalFisher":
        return DiagonalFisher({b: f.to(dtype) for b, f in self.per_block.items()}, self.n_samples, self.spec,
                              self.include_biases, self.source)


def contributions(grads: PerSampleGradients) -> dict[str, Float[Tensor, "n n_layers heads per_head"]]:
    """``C_i = g_i ⊙ g_i`` per block (float32, like the gradients)."""
    return grads.contributions()


def _as_contributions(x: Union[PerSampleGradients, Contributions]) -> Contributions:
    return x.contributions() if isinstance(x, PerSampleGradients) else x


class FisherAccumulator:
    """Exact streaming batch mean of contributions: ``add`` chunks, then ``result()``.

    >>> acc = FisherAccumulator()
    >>> acc.add({"Q": torch.ones(2, 1, 1, 3)}); acc.add({"Q": 4 * torch.ones(1, 1, 1, 3)})
    >>> acc.result().per_block["Q"]
    tensor([[[2., 2., 2.]]], dtype=torch.float64)
    """

    def __init__(self, spec: Optional[ModelSpec] = None, include_biases: bool = False, source: str = ""):
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.spec, self.include_biases, self.source = spec, include_biases, source

    @property
    def n(self) -> int:
        return max(self.counts.values(), default=0)

    def add(self, x: Union[PerSampleGradients, Contributions]) -> None:
        """Add per-sample gradients (squared here, in float64) or a mapping of per-sample contributions.

        Blocks are counted separately, so a chunk may be added block by block.
        """
        square = isinstance(x, PerSampleGradients)
        blocks: Contributions
        if isinstance(x, PerSampleGradients):
            self.spec, self.include_biases = x.spec, x.include_biases
            blocks = x.per_block
        else:
            blocks = x
        for block, t in blocks.items():
            s = torch.zeros(t.shape[1:], dtype=FISHER_DTYPE, device=t.device)
            scratch = torch.empty_like(s)
            for row in t:  # float64 squares of float32 values are exact; one row at a time, no big temporary
                scratch.copy_(row)
                if square:
                    s.addcmul_(scratch, scratch)
                else:
                    s.add_(scratch)
            self.sums[block] = s if block not in self.sums else self.sums[block] + s
            self.counts[block] = self.counts.get(block, 0) + t.shape[0]

    def result(self) -> DiagonalFisher:
        if self.n == 0:
            raise ValueError("no samples were added: the Fisher of an empty set is undefined")
        if len(set(self.counts.values())) != 1:
            raise ValueError(f"blocks were given different numbers of samples: {self.counts}")
        return DiagonalFisher({b: s / self.n for b, s in self.sums.items()}, self.n, self.spec,
                              self.include_biases, self.source)


def _n_rows(x: Contributions) -> int:
    sizes = {t.shape[0] for t in x.values()}
    if len(sizes) != 1:
        raise ValueError(f"blocks disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def fisher_from_gradients(grads: PerSampleGradients, source: str = "") -> DiagonalFisher:
    """Batch mean of ``g_i ⊙ g_i`` over the samples of ``grads`` (float64)."""
    if grads.n_samples == 0:
        raise ValueError("no samples: the Fisher of an empty set is undefined")
    acc = FisherAccumulator(grads.spec, grads.include_biases, source)
    acc.add(grads)
    return acc.result()


def pooled(*fishers: DiagonalFisher) -> DiagonalFisher:
    """The Fisher of the union of the sample sets: mean weighted by each set's ``n_samples``."""
    if not fishers:
        raise ValueError("nothing to pool")
    n = sum(f.n_samples for f in fishers)
    blocks = fishers[0].per_block.keys()
    for f in fishers[1:]:
        if f.per_block.keys() != blocks or any(f.per_block[b].shape != fishers[0].per_block[b].shape for b in blocks):
            raise ValueError("cannot pool Fishers of different models or bias settings")
    per_block = {b: cast(Tensor, sum(f.per_block[b].to(FISHER_DTYPE) * f.n_samples for f in fishers)) / n
                 for b in blocks}
    return DiagonalFisher(per_block, n, fishers[0].spec, fishers[0].include_biases, "pooled")


class EMAFisher:
    """Streaming EMA Fisher: ``F_t = β·F_{t−1} + (1−β)·c_t``, ``F_0 = 0``, estimate ``F_t / (1 − β^t)``.

    ``update`` takes per-sample gradients (squared here) or a mapping of per-sample contributions
    ``[n, ...]``; the ``n`` samples are applied in order, one step each (so chunking does not matter).

    >>> ema = EMAFisher(beta=0.5)
    >>> ema.update({"Q": torch.tensor([[2.0], [2.0], [2.0]])})
    >>> ema.estimate().per_block["Q"]  # a constant stream reads out as that constant
    tensor([2.], dtype=torch.float64)
    """

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.t = 0
        self.state: dict[str, Tensor] = {}
        self.spec: Optional[ModelSpec] = None
        self.include_biases = False

    def update(self, x: Union[PerSampleGradients, Contributions]) -> None:
        if isinstance(x, PerSampleGradients):
            self.spec, self.include_biases = x.spec, x.include_biases
            x = {b: g.to(FISHER_DTYPE).square() for b, g in x.per_block.items()}
        n = _n_rows(x)
        if n == 0:
            return
        # F_{t+n} = β^n F_t + (1-β) Σ_k β^(n-1-k) c_k
        exponents = torch.arange(n - 1, -1, -1, dtype=FISHER_DTYPE)
        weights = (1.0 - self.beta) * torch.pow(torch.tensor(self.beta, dtype=FISHER_DTYPE), exponents)
        for block, c in x.items():
            w = weights.to(c.device).reshape(-1, *([1] * (c.ndim - 1)))
            new = (w * c.to(FISHER_DTYPE)).sum(0)
            old = self.state.get(block)
            self.state[block] = new if old is None else self.beta**n * old + new
        self.t += n

    def estimate(self) -> DiagonalFisher:
        """The bias-corrected estimate ``F_t / (1 − β^t)``."""
        if self.t == 0:
            raise ValueError("EMAFisher has no updates yet: its estimate is undefined")
        correction = 1.0 - self.beta**self.t
        return DiagonalFisher({b: f / correction for b, f in self.state.items()}, self.t, self.spec,
                              self.include_biases, "ema")


def leave_one_out(fisher: DiagonalFisher, x: Union[PerSampleGradients, Contributions]) -> dict[str, Tensor]:
    """``F_{−i} = (N·F − C_i)/(N − 1)`` for each sample ``i`` of ``x`` (which must belong to ``fisher``'s set).

    Returns ``{block: [n, n_layers, heads, n_params_per_head]}`` in float64, clamped at 0 (rounding).
    """
    n = fisher.n_samples
    if n < 2:
        raise ValueError(f"leave-one-out needs a Fisher of at least 2 samples, this one has {n}")
    c: Contributions
    if isinstance(x, PerSampleGradients):
        c = {b: g.to(FISHER_DTYPE).square() for b, g in x.per_block.items()}
    else:
        c = x
    return {b: loo_block(fisher.per_block[b], n, c[b]) for b in c}


def loo_block(fisher_block: Tensor, n: int, c: Tensor, *, in_place: bool = False) -> Tensor:
    """One block of :func:`leave_one_out`: ``(n·F − C)/(n − 1)``, float64, clamped at 0 (``in_place``: written over
    ``c``, a float64 temporary)."""
    if in_place:
        return c.neg_().add_(n * fisher_block.to(FISHER_DTYPE)).div_(n - 1).clamp_min_(0.0)
    return ((n * fisher_block.to(FISHER_DTYPE) - c.to(FISHER_DTYPE)) / (n - 1)).clamp_min_(0.0)


def damping_lambda(
    fisher_block: Float[Tensor, "... per_head"], damping_abs: float = DAMPING_ABS, damping_rel: float = DAMPING_REL
) -> Float[Tensor, "... 1"]:
    """``λ = max(λ_abs, λ_rel · mean(F over each head's row))``, shaped to broadcast over the row."""
    if damping_abs < 0 or damping_rel < 0:
        raise ValueError(f"damping must be non-negative, got damping_abs={damping_abs}, damping_rel={damping_rel}")
    mean = fisher_block.mean(-1, keepdim=True)
    return torch.clamp(damping_rel * mean, min=damping_abs)


def normaliser(
    fisher_block: Float[Tensor, "... per_head"],
    normalization: str = NORMALIZATION,
    damping_abs: float = DAMPING_ABS,
    damping_rel: float = DAMPING_REL,
    *,
    in_place: bool = False,
) -> Float[Tensor, "... per_head"]:
    """The damped normaliser ``N`` of an undamped diagonal ``D`` whose last dim is one (block, layer, head) slice
    (docs/spec.md §3.4): a new float64 tensor of ``D``'s shape, or ``D`` itself overwritten with ``in_place`` (a
    float64 temporary). With ``λ = max(λ_abs, λ_rel · mean_slice D)``:

    - ``"diagonal"``: ``N[p] = D[p] + λ`` (:func:`damped`);
    - ``"head"``: ``N[p] = mean_slice D + λ``, one value per slice (the mean of the damped diagonal);
    - ``"hybrid"``: ``N[p] = √((D[p] + λ) · (mean_slice D + λ))``, the geometric mean of the two.

    ``D`` may be a Fisher or a leave-one-out Fisher (any leading dims, e.g. per sample): the mode is the same
    function of it.

    >>> d = torch.tensor([[4.0, 0.0]], dtype=torch.float64)   # one slice of two parameters, mean 2
    >>> [normaliser(d, mode, damping_abs=1.0, damping_rel=0.0).tolist() for mode in ("diagonal", "head", "hybrid")]
    [[[5.0, 1.0]], [[3.0, 3.0]], [[3.872983346207417, 1.7320508075688772]]]
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    d = fisher_block.to(FISHER_DTYPE)
    lam = damping_lambda(d, damping_abs, damping_rel)
    if not in_place:
        d = d.clone() if d is fisher_block else d
    if normalization == "diagonal":
        return d.add_(lam)
    head = d.mean(-1, keepdim=True) + lam
    if normalization == "head":
        return d.copy_(head.expand_as(d))
    return d.add_(lam).mul_(head).sqrt_()


def damped(
    fisher: Union[DiagonalFisher, Mapping[str, Tensor]],
    damping_abs: float = DAMPING_ABS,
    damping_rel: float = DAMPING_REL,
    normalization: str = NORMALIZATION,
) -> dict[str, Float[Tensor, "... n_layers heads per_head"]]:
    """The normaliser of every block (:func:`normaliser`); with the default ``"diagonal"``: ``F̃ = F + λ``, λ per
    (block, layer, head) slice (:func:`damping_lambda`).

    Works on a :class:`DiagonalFisher` or on a mapping of tensors with any leading dims (e.g. the
    per-sample output of :func:`leave_one_out`, damped sample by sample).
    """
    per_block = fisher.per_block if isinstance(fisher, DiagonalFisher) else fisher
    return {b: normaliser(f, normalization, damping_abs, damping_rel) for b, f in per_block.items()}
