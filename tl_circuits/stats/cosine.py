"""Scale-free measures from the pooled signed matrix: Fisher-metric cosines (docs/spec.md §4.1).

The signed score ``S_ij = Σ_p g_i g_j / F̃`` is an inner product in the Fisher metric, so the pooled matrix
(A ∪ B scored against itself under one Fisher, :func:`tl_circuits.interference.engine.pooled_scores`) holds
every norm as well:

- the per-pair cosine ``cos_ij = S_ij / sqrt(S_ii · S_jj)`` for i ∈ A, j ∈ B, summarised per head by its mean
  and the fraction of pairs below 0 — comparable across heads, unlike S, whose scale is the head's gradient
  norm;
- the cosine of the two task-mean gradients, ``cos(ḡ_A, ḡ_B) = mean_{A×B} S / sqrt(mean_{A×A} S · mean_{B×B} S)``
  (each mean over all pairs, a sample with itself included: ``ḡ_A·ḡ_A = mean_{i,i'} g_i·g_i'``). At a joint optimum
  of both tasks it is ≈ −1 in every head by construction (π_A ḡ_A + π_B ḡ_B ≈ 0), which is why a mean signed map
  of a jointly trained model is negative everywhere.

The metric is the pooled matrix's normalisation (``InterferenceConfig.normalization``, docs/spec.md §3.4): under
``"head"`` without leave-one-out the head's one normaliser cancels, and the cosines are the plain cosines of the
head's gradients.

>>> import torch
>>> g = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])   # A = rows 0, 1; B = rows 2, 3
>>> pooled = {"O": (g @ g.T)[:, :, None, None]}
>>> res = fisher_cosines(pooled, n_a=2)
>>> res.mean_cosine["O"].item(), res.fraction_negative["O"].item(), round(res.task_mean_cosine["O"].item(), 4)
(-0.5, 0.5, -0.7071)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

Grid = dict[str, Float[Tensor, "n_layers heads"]]


@dataclass(frozen=True)
class FisherCosines:
    """Per (block, layer, head): ``mean_cosine`` and ``fraction_negative`` of the A × B pair cosines, and
    ``task_mean_cosine``, the cosine of ḡ_A and ḡ_B (≈ −1: exactly opposed, as a joint optimum forces).
    NaN where a norm is 0 or a score is not finite."""

    mean_cosine: Grid
    fraction_negative: Grid
    task_mean_cosine: Grid
    n_a: int
    n_b: int


def fisher_cosines(pooled_scores: Mapping[str, Float[Tensor, "n n n_layers heads"]], n_a: int) -> FisherCosines:
    """Fisher-metric cosines from the pooled signed matrix ``{block: [N, N, L, H]}`` (A's samples first).

    Raises ValueError unless every block is square in its sample dimensions and ``0 < n_a < N``.
    """
    out: dict[str, Grid] = {"mean_cosine": {}, "fraction_negative": {}, "task_mean_cosine": {}}
    n = None
    for block, s in pooled_scores.items():
        if s.ndim != 4 or s.shape[0] != s.shape[1]:
            raise ValueError(f"block {block}: the pooled matrix must be [N, N, n_layers, heads], got {tuple(s.shape)}")
        n = s.shape[0]
        if not 0 < n_a < n:
            raise ValueError(f"n_a must be between 1 and N - 1 = {n - 1}, got {n_a}")
        x = s.detach().double().cpu()
        finite = torch.isfinite(x).all(0).all(0)
        diag = torch.diagonal(x, dim1=0, dim2=1).movedim(-1, 0)  # [N, L, H]: S_ii = ‖g_i‖²
        norms = diag.clamp_min(0).sqrt()
        cross = x[:n_a, n_a:]
        denominator = norms[:n_a, None] * norms[None, n_a:]
        cos = torch.where(denominator > 0, cross / denominator, torch.nan)
        valid = torch.isfinite(cos).all(0).all(0) & finite
        out["mean_cosine"][block] = cos.mean((0, 1)).masked_fill(~valid, torch.nan)
        out["fraction_negative"][block] = (cos < 0).double().mean((0, 1)).masked_fill(~valid, torch.nan)
        aa, bb, ab = x[:n_a, :n_a].mean((0, 1)), x[n_a:, n_a:].mean((0, 1)), cross.mean((0, 1))
        scale = (aa * bb).clamp_min(0).sqrt()
        out["task_mean_cosine"][block] = torch.where(scale > 0, ab / scale, torch.nan).masked_fill(~finite, torch.nan)
    if n is None:
        raise ValueError("pooled_scores is empty")
    return FisherCosines(out["mean_cosine"], out["fraction_negative"], out["task_mean_cosine"], n_a, n - n_a)
