"""Synthetic pooled score matrices and small helpers shared by the statistics tests (the references they are
compared with, statsmodels' corrections and the statistic handed to scipy, are in ``tests/reference.py``).

Synthetic pooled matrices are built the way the interference metric builds them: per-sample "gradients"
g_i (iid across samples, so task labels are exchangeable) and M_ij = Σ_p g_i[p]² / F[p] · |g_j[p]| per cell
(SPEC §3, unsigned), or the signed variant. A planted effect is a per-sample feature too: pairs with i in
task A and j in task B get an extra δ in chosen cells.
"""

from __future__ import annotations

import torch

import tl_circuits.stats as S


def make_scores(n, blocks=(("Q", 2, 3), ("K", 2, 2)), *, seed=0, signed=False, symmetric=False, d=3,
                nan_diagonal=True):
    """Exchangeable pooled scores {block: [n, n, L, H]} from iid per-sample vectors."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for block, n_layers, n_heads in blocks:
        g = torch.randn(n, n_layers, n_heads, d, generator=gen, dtype=torch.float64)
        fisher = torch.rand(n_layers, n_heads, d, generator=gen, dtype=torch.float64) + 0.5
        if signed:
            m = torch.einsum("ilhp,jlhp->ijlh", g / fisher, g)
        else:
            m = torch.einsum("ilhp,jlhp->ijlh", g.square() / fisher, g.abs())
        if symmetric:
            m = 0.5 * (m + m.transpose(0, 1))
        if nan_diagonal:
            idx = torch.arange(n)
            m[idx, idx] = float("nan")   # the diagonal never enters; prove it
        out[block] = m
    return out


def plant(scores, labels, cells, delta):
    """Add delta to M_ij for i in task A, j in task B, in the given (block, layer, head) cells."""
    labels = torch.as_tensor(labels)
    pair = (labels[:, None] & ~labels[None, :]).double()
    out = {b: m.clone() for b, m in scores.items()}
    for block, layer, head in cells:
        out[block][:, :, layer, head] += delta * pair
    return out


def first(n, n_a):
    labels = torch.zeros(n, dtype=torch.bool)
    labels[:n_a] = True
    return labels


def run(scores, n_a, **kwargs):
    """permutation_test, quiet, without intervals; of unsigned scores (make_scores' default, planted effects
    positive): the default alternative is then "greater"."""
    kwargs.setdefault("progress", False)
    kwargs.setdefault("n_bootstrap", 0)
    kwargs.setdefault("variant", "unsigned")
    return S.permutation_test(scores, n_a, **kwargs)


def flat(grids):
    return torch.cat([g.reshape(-1) for g in grids.values()]).numpy()
