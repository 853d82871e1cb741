"""Sample drivers (leave-one-out) and rank stability, against brute-force recomputation and scipy.stats.bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from tests.reference import cell_stat
from tl_circuits.stats.robustness import (
    DOMINANCE_SHARE,
    bootstrap_cell_means,
    cell_drivers,
    rank_stability,
)
from tl_circuits.stats.bootstrap import draw_resamples


def _scores(n_a=9, n_b=7, layers=2, heads=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"Q": torch.randn(n_a, n_b, layers, heads, generator=gen),
            "O": torch.randn(n_a, n_b, layers, heads, generator=gen) - 0.3}


def test_leave_one_out_influence_equals_recomputed_means():
    scores = _scores()
    drivers = cell_drivers(scores, top=2)
    for block, s in scores.items():
        x = s.double()
        full = x.mean((0, 1))
        for i in range(x.shape[0]):
            rest = torch.cat([x[:i], x[i + 1:]]).mean((0, 1))
            torch.testing.assert_close(drivers.influence_a[block][i], full - rest)
        for j in range(x.shape[1]):
            rest = torch.cat([x[:, :j], x[:, j + 1:]], 1).mean((0, 1))
            torch.testing.assert_close(drivers.influence_b[block][j], full - rest)


def test_estimate_without_top_drivers_equals_brute_force_removal():
    scores = _scores(seed=3)
    top = 2
    drivers = cell_drivers(scores, top=top)
    for block, s in scores.items():
        x = s.double().numpy()
        for layer in range(x.shape[2]):
            for head in range(x.shape[3]):
                m = x[:, :, layer, head]
                loo_a = np.array([m.mean() - np.delete(m, i, 0).mean() for i in range(m.shape[0])])
                loo_b = np.array([m.mean() - np.delete(m, j, 1).mean() for j in range(m.shape[1])])
                drop_a, drop_b = np.argsort(loo_a)[:top], np.argsort(loo_b)[:top]
                assert drivers.top_a[block][layer, head].tolist() == drop_a.tolist()
                assert drivers.top_b[block][layer, head].tolist() == drop_b.tolist()
                kept = np.delete(np.delete(m, drop_a, 0), drop_b, 1).mean()
                assert drivers.estimate_without_top[block][layer, head].item() == pytest.approx(kept, rel=1e-12)
                share = kept / m.mean()
                assert drivers.share_left[block][layer, head].item() == pytest.approx(share, rel=1e-12)
                assert bool(drivers.dominated[block][layer, head]) == (share < DOMINANCE_SHARE)


def test_a_cell_made_by_one_sample_is_dominated_and_a_broad_one_is_not():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(20, 20, 1, 2, generator=gen) * 0.1
    s[..., 1] -= 1.0                         # broad conflict: every pair
    s[3, :, 0, 0] -= 40.0                    # head 0: one sample of A
    drivers = cell_drivers({"O": s}, top=1)
    assert bool(drivers.dominated["O"][0, 0]) and not bool(drivers.dominated["O"][0, 1])
    assert drivers.top_a["O"][0, 0, 0].item() == 3


def test_missing_cells_are_nan_not_zero():
    scores = _scores()
    scores["Q"][0, 0, 1, 2] = float("nan")
    drivers = cell_drivers(scores)
    assert torch.isnan(drivers.estimate["Q"][1, 2]) and torch.isnan(drivers.influence_a["Q"][:, 1, 2]).all()
    assert drivers.top_a["Q"][1, 2].eq(-1).all() and not bool(drivers.dominated["Q"][1, 2])
    assert torch.isfinite(drivers.estimate["Q"][0, 0])
    stability = rank_stability(scores, k=2, n_resamples=50)
    assert torch.isnan(stability.rank["Q"][1, 2]) and torch.isnan(stability.top_k_frequency["Q"][1, 2])
    finite_ranks = torch.cat([r.flatten() for r in stability.rank.values()])
    assert sorted(finite_ranks[torch.isfinite(finite_ranks)].tolist()) == list(map(float, range(1, 12)))


def test_bootstrap_cell_means_are_scipy_bootstrap_distributions():
    scores = _scores(seed=5)
    seed, n_resamples = 11, 99
    idx_a, idx_b = draw_resamples(np.random.default_rng(seed), 9, 7, n_resamples)
    boot = bootstrap_cell_means(scores, idx_a, idx_b)
    for block, s in scores.items():
        for layer, head in [(0, 0), (1, 2)]:
            ref = st.bootstrap((np.arange(9), np.arange(7)), cell_stat(s[:, :, layer, head].double().numpy()),
                               n_resamples=n_resamples, method="percentile", vectorized=True,
                               rng=np.random.default_rng(seed))
            ours = boot[block][:, layer * 3 + head].numpy()
            np.testing.assert_allclose(ours, ref.bootstrap_distribution, rtol=1e-12)


def test_rank_stability_equals_a_plain_resampling_loop():
    scores = _scores(seed=7)
    k, n_resamples, seed = 3, 60, 4
    res = rank_stability(scores, k=k, n_resamples=n_resamples, seed=seed, confidence_level=0.8)
    idx_a, idx_b = draw_resamples(np.random.default_rng(seed), 9, 7, n_resamples)
    blocks = list(scores)
    flat = [np.concatenate([scores[b].double().numpy()[ia][:, ib].mean((0, 1)).reshape(-1) for b in blocks])
            for ia, ib in zip(idx_a.numpy(), idx_b.numpy())]
    ranks = np.stack([st.rankdata(v, method="ordinal") for v in flat])
    observed = st.rankdata(np.concatenate([scores[b].double().mean((0, 1)).reshape(-1).numpy() for b in blocks]),
                           method="ordinal")
    got = lambda field: np.concatenate([getattr(res, field)[b].reshape(-1).numpy() for b in blocks])  # noqa: E731
    np.testing.assert_array_equal(got("rank"), observed)
    np.testing.assert_allclose(got("top_k_frequency"), (ranks <= k).mean(0))
    np.testing.assert_allclose(got("rank_low"), np.quantile(ranks, 0.1, axis=0))
    np.testing.assert_allclose(got("rank_high"), np.quantile(ranks, 0.9, axis=0))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same N_A"):
        cell_drivers({"Q": torch.zeros(3, 3, 1, 1), "K": torch.zeros(3, 4, 1, 1)})
    with pytest.raises(ValueError, match="at least 2"):
        rank_stability({"Q": torch.zeros(1, 3, 1, 1)})
    with pytest.raises(TypeError, match="mapping"):
        cell_drivers(torch.zeros(3, 3, 1, 1))  # type: ignore[arg-type]


def test_highest_order_ranks_the_negated_scores():
    scores = _scores(seed=2)
    high = rank_stability(scores, k=2, n_resamples=30, order="highest")
    low = rank_stability({b: -s for b, s in scores.items()}, k=2, n_resamples=30)
    for block in scores:
        torch.testing.assert_close(high.rank[block], low.rank[block])
        torch.testing.assert_close(high.top_k_frequency[block], low.top_k_frequency[block])
    with pytest.raises(ValueError, match="order"):
        rank_stability(scores, order="largest")


def test_a_cell_where_no_sample_moves_the_mean_has_no_drivers():
    s = torch.zeros(5, 4, 1, 2)
    s[..., 1] = torch.randn(5, 4, 1)
    drivers = cell_drivers({"O": s}, top=2)
    assert drivers.top_a["O"][0, 0].eq(-1).all() and drivers.top_b["O"][0, 0].eq(-1).all()
    assert drivers.top_a["O"][0, 1].ge(0).all()
