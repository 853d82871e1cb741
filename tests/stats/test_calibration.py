"""Calibration under exchangeability (uniform p, FDR, FWER) and power with planted effects (SPEC §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st
import torch

import tl_circuits.stats as S
from tests.stats.synthetic import first, make_scores, plant, run


def _null_simulation(n_sims, *, n=16, blocks=(("Q", 4, 6),), n_permutations=199, alternative="greater",
                     planted=(), delta=0.0, alpha=0.1, seed0=0, signed=False):
    """Exchangeable data (optionally with planted non-null cells); returns per-sim outcomes."""
    p_first, fdp, fwer = [], [], {"maxstat": [], "cluster": [], "uncorrected": []}
    labels = first(n, n // 2)
    for sim in range(n_sims):
        scores = make_scores(n, blocks, seed=seed0 + sim, signed=signed)
        if planted:
            scores = plant(scores, labels, planted, delta)
        res = run(scores, labels, n_permutations=n_permutations, alternative=alternative, alpha=alpha,
                  seed=10_000 + seed0 + sim)
        planted_cells = {(b, l, h) for b, l, h in planted}
        true_null = {b: torch.ones_like(res.p_value[b], dtype=torch.bool) for b in res.p_value}
        for b, l, h in planted_cells:
            true_null[b][l, h] = False
        free = next((b, l, h) for b, nl, nh in blocks for l in range(nl) for h in range(nh)
                    if (b, l, h) not in planted_cells)
        p_first.append(res.p_value[free[0]][free[1], free[2]].item())
        rejected = {b: res.q_value_bh[b] <= alpha for b in res.p_value}
        n_rej = sum(int(r.sum()) for r in rejected.values())
        n_false = sum(int((rejected[b] & true_null[b]).sum()) for b in rejected)
        fdp.append(n_false / max(n_rej, 1))
        fwer["maxstat"].append(any(bool(((res.p_value_maxstat[b] <= alpha) & true_null[b]).any()) for b in rejected))
        fwer["cluster"].append(any(bool(((res.p_value_cluster[b] <= alpha) & true_null[b]).any()) for b in rejected))
        fwer["uncorrected"].append(any(bool(((res.p_value[b] <= alpha) & true_null[b]).any()) for b in rejected))
    return np.array(p_first), np.array(fdp), {k: np.array(v) for k, v in fwer.items()}


# Simulation checks reject at level 0.001, so a correct procedure fails one of them with probability <= 0.1%
# (seeds are fixed, so a run is deterministic; the seeds were not chosen to pass).
SIM_LEVEL = 0.001


def _rate_not_above(events, alpha):
    """One-sided binomial test of H0: rate <= alpha is not rejected at SIM_LEVEL."""
    return st.binomtest(int(np.sum(events)), len(events), alpha, alternative="greater").pvalue > SIM_LEVEL


def test_calibration_under_exchangeability():
    alpha = 0.1
    p, fdp, fwer = _null_simulation(300, alpha=alpha)
    # p-values of a fixed cell over independent simulations are uniform (discrete on k/200: KS is fine)
    assert st.kstest(p, "uniform").pvalue > SIM_LEVEL
    # complete null: every BH discovery is false, so FDR = P(any discovery); max-stat and cluster keep FWER
    assert fdp.mean() <= alpha or _rate_not_above(fdp > 0, alpha)
    assert _rate_not_above(fwer["maxstat"], alpha)
    assert _rate_not_above(fwer["cluster"], alpha)
    # the check has teeth: testing 24 cells without correction blows the family-wise error
    assert not _rate_not_above(fwer["uncorrected"], alpha)


def test_bh_false_discovery_proportion_with_real_effects():
    alpha = 0.1
    planted = [("Q", 0, 0), ("Q", 1, 3), ("Q", 3, 5)]
    _, fdp, fwer = _null_simulation(200, planted=planted, delta=4.0, alpha=alpha, seed0=500)
    # FDR <= alpha * m0 / m; allow two standard errors of the simulation mean above alpha
    assert fdp.mean() <= alpha + 2 * fdp.std(ddof=1) / math.sqrt(len(fdp))
    assert _rate_not_above(fwer["maxstat"], alpha)


@pytest.mark.slow
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_calibration_under_exchangeability_many_simulations(alternative):
    alpha = 0.05
    blocks = (("Q", 3, 4), ("K", 3, 2))
    p, fdp, fwer = _null_simulation(1000, n=20, blocks=blocks, alternative=alternative, alpha=alpha,
                                    n_permutations=299, seed0=20_000)
    if alternative == "two-sided":   # 2·min(p_less, p_greater) is conservative: super-uniform, never anti
        assert st.kstest(p, "uniform", alternative="greater").pvalue > SIM_LEVEL
    else:
        assert st.kstest(p, "uniform").pvalue > SIM_LEVEL
    assert _rate_not_above(fdp > 0, alpha)
    assert _rate_not_above(fwer["maxstat"], alpha)
    assert _rate_not_above(fwer["cluster"], alpha)


@pytest.mark.slow
def test_signed_scores_calibration():
    p, _, fwer = _null_simulation(500, n=18, alternative="two-sided", alpha=0.05, seed0=40_000, signed=True)
    assert st.kstest(p, "uniform", alternative="greater").pvalue > SIM_LEVEL
    assert _rate_not_above(fwer["maxstat"], 0.05)


def test_power_planted_effect_is_found_only_where_planted():
    n = 40
    labels = torch.zeros(n, dtype=torch.bool)
    labels[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:20]] = True
    planted = [("Q", 1, 2), ("Q", 1, 3), ("K", 2, 0)]
    scores = plant(make_scores(n, (("Q", 4, 6), ("K", 4, 2)), seed=16), labels, planted, 3.0)
    expected = {"Q": torch.zeros(4, 6, dtype=torch.bool), "K": torch.zeros(4, 2, dtype=torch.bool)}
    for b, l, h in planted:
        expected[b][l, h] = True
    for correction in ("bh", "by", "maxstat"):
        res = run(scores, labels, n_permutations=999, correction=correction, alpha=0.05, seed=3)
        for block in expected:
            assert torch.equal(res.significant[block], expected[block]), (correction, block)
    # uncorrected p <= alpha finds the effect too, but 32 tests at 5% may add false positives
    uncorrected = run(scores, labels, n_permutations=999, correction="none", alpha=0.05, seed=3)
    assert all(bool((uncorrected.significant[b] | ~expected[b]).all()) for b in expected)
    # cluster inference makes claims about clusters, not cells: every significant cell lies in a
    # supra-threshold cluster that contains a planted cell, and the planted cells are found
    res = run(scores, labels, n_permutations=999, correction="cluster", alpha=0.05, seed=3)
    assert bool(res.significant["Q"][1, 2]) and bool(res.significant["Q"][1, 3])
    for block in expected:
        labels_b, _ = S.find_clusters(res.z[block], res.cluster_threshold)
        planted_clusters = set(labels_b[expected[block].numpy()].tolist()) - {0}
        assert set(labels_b[res.significant[block].numpy()].tolist()) <= planted_clusters
    assert float(res.effect_size["Q"][1, 2]) > 0.3
    assert abs(float(res.effect_size["Q"][0, 0])) < 0.1


def test_power_negative_effect_needs_less_or_two_sided():
    n = 30
    labels = first(n, 15)
    scores = plant(make_scores(n, (("O", 2, 3),), seed=17, signed=True), labels, [("O", 0, 1)], -1.0)
    found = {alt: run(scores, labels, n_permutations=499, alternative=alt, correction="maxstat").significant["O"]
             for alt in ("greater", "less", "two-sided")}
    assert not bool(found["greater"].any())
    for alt in ("less", "two-sided"):
        assert found[alt].nonzero().tolist() == [[0, 1]]
