"""Fisher-metric cosines from the pooled matrix, against cosines computed from per-sample gradient rows by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tl_circuits.stats.cosine import fisher_cosines


def test_cosines_equal_a_direct_computation_from_gradients():
    gen = torch.Generator().manual_seed(0)
    n_a, n_b, L, H, P = 5, 7, 2, 3, 11
    g = torch.randn(n_a + n_b, L, H, P, generator=gen, dtype=torch.float64)
    g[n_a:, 0, 1] -= 2.0  # B pulls against nothing in particular; shift one head
    f = torch.rand(L, H, P, generator=gen, dtype=torch.float64) + 0.1  # a damped diagonal Fisher
    pooled = {"O": torch.einsum("ilhp,jlhp->ijlh", g / f, g)}
    res = fisher_cosines(pooled, n_a)
    for layer in range(L):
        for head in range(H):
            w = g[:, layer, head] / f[layer, head].sqrt()  # the Fisher metric as a plain Euclidean one
            a, b = w[:n_a], w[n_a:]
            cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
            assert res.mean_cosine["O"][layer, head].item() == pytest.approx(cos.mean().item(), rel=1e-10)
            assert res.fraction_negative["O"][layer, head].item() == pytest.approx((cos < 0).double().mean().item())
            mean_cos = torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0)
            assert res.task_mean_cosine["O"][layer, head].item() == pytest.approx(mean_cos.item(), rel=1e-10)


def test_a_joint_optimum_gives_opposed_task_means():
    """π_A ḡ_A + π_B ḡ_B = 0 exactly: the task-mean cosine is -1 in every head."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 1, 2, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 1, 2, 8, generator=gen, dtype=torch.float64)
    b = b - b.mean(0) - (6 / 4) * a.mean(0)  # 6·ḡ_A + 4·ḡ_B = 0
    g = torch.cat([a, b])
    res = fisher_cosines({"Q": torch.einsum("ilhp,jlhp->ijlh", g, g)}, 6)
    torch.testing.assert_close(res.task_mean_cosine["Q"], -torch.ones(1, 2, dtype=torch.float64))


def test_zero_norms_and_bad_input():
    g = torch.zeros(4, 1, 1, 3, dtype=torch.float64)
    g[0, 0, 0, 0] = 1.0
    res = fisher_cosines({"O": torch.einsum("ilhp,jlhp->ijlh", g, g)}, 2)
    assert math.isnan(res.mean_cosine["O"][0, 0]) and math.isnan(res.task_mean_cosine["O"][0, 0])
    with pytest.raises(ValueError, match="n_a"):
        fisher_cosines({"O": torch.zeros(4, 4, 1, 1)}, 4)
    with pytest.raises(ValueError, match=r"\[N, N"):
        fisher_cosines({"O": torch.zeros(4, 3, 1, 1)}, 2)
