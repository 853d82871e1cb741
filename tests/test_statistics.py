"""Statistics for interference maps (tl_circuits.stats.permutation).

Synthetic pooled matrices are built the way the interference metric builds them: per-sample "gradients"
g_i (iid across samples, so task labels are exchangeable) and M_ij = Σ_p g_i[p]² / F[p] · |g_j[p]| per cell
(SPEC §3, unsigned), or the signed variant. A planted effect is a per-sample feature too: pairs with i in
task A and j in task B get an extra δ in chosen cells.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import scipy.stats as st
import torch
from scipy import ndimage

from tl_circuits.stats import permutation as S


def multipletests(p, method):
    """statsmodels (a test-only dependency) as the reference for BH/BY; skips only the tests that use it."""
    return pytest.importorskip("statsmodels.stats.multitest").multipletests(p, method=method)


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny products; on a busy 2-core machine, thread hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



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


def cell_stat(m_cell):
    """scipy-style vectorised statistic of index samples: mean of m over x-rows, y-columns."""
    def statistic(x, y, axis=-1):
        x = np.asarray(x).astype(int)
        y = np.asarray(y).astype(int)
        x, y = np.broadcast_arrays(x[..., :, None], y[..., None, :])
        return m_cell[x, y].mean(axis=(-2, -1))
    return statistic


def run(scores, n_a, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("n_bootstrap", 0)
    return S.permutation_test(scores, n_a, **kwargs)


def flat(grids):
    return torch.cat([g.reshape(-1) for g in grids.values()]).numpy()


# ----------------------------------------------------------------------------------- the statistic itself


def test_observed_is_the_mean_over_task_pairs_and_labels_equal_n_a():
    scores = make_scores(11, seed=1)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    res = run(scores, labels, n_permutations=9)
    for block, m in scores.items():
        expected = m[labels][:, ~labels].mean((0, 1))
        torch.testing.assert_close(res.observed[block], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(S.observed_statistic(scores, labels)[block], expected, rtol=1e-12, atol=0)
    # an int n_a means "the first n_a samples": same as the equivalent bool vector, bit for bit
    a = run(scores, 4, n_permutations=50, seed=3)
    b = run(scores, first(11, 4), n_permutations=50, seed=3)
    for block in scores:
        assert torch.equal(a.p_value[block], b.p_value[block])
        assert torch.equal(a.observed[block], b.observed[block])


@pytest.mark.parametrize("n, n_a", [(9, 4), (8, 2), (7, 1)])
def test_null_moments_equal_full_enumeration(n, n_a):
    scores = make_scores(n, seed=n + n_a)
    labels = first(n, n_a)
    every = torch.cat([labels[None], S.all_relabelings(labels)])   # all C(n, n_a) splits
    assert every.shape[0] == math.comb(n, n_a)
    null = S.permutation_null(scores, every)
    mean, sd = S.null_moments(scores, labels)
    res = run(scores, labels, n_permutations=5)
    for block, m in scores.items():
        # brute force: one statistic per split, no shared code with the library
        brute = torch.stack([m[row][:, ~row].mean((0, 1)) for row in every])
        torch.testing.assert_close(null[block], brute, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(mean[block], brute.mean(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sd[block], brute.std(0, unbiased=False), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(res.null_mean[block], brute.mean(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(res.null_std[block], brute.std(0, unbiased=False), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(res.z[block], (res.observed[block] - brute.mean(0)) / brute.std(0, unbiased=False),
                                   rtol=1e-8, atol=1e-12)


def test_effect_size_is_the_standardised_mean_difference_on_the_pair_scale():
    n = 12
    scores = make_scores(n, seed=5)
    res = run(scores, 5, n_permutations=5)
    off = ~torch.eye(n, dtype=torch.bool)
    for block, m in scores.items():
        pairs = m[off]                                   # [n(n-1), L, H] ordered off-diagonal pairs
        d = (m[:5, 5:].mean((0, 1)) - pairs.mean(0)) / pairs.std(0, unbiased=False)
        torch.testing.assert_close(res.effect_size[block], d, rtol=1e-10, atol=1e-12)
    # it does not grow with n: same population, 4x the samples -> same order of magnitude, unlike z
    big = plant(make_scores(160, seed=6), first(160, 80), [("Q", 0, 0)], 1.0)
    small = plant(make_scores(40, seed=7), first(40, 20), [("Q", 0, 0)], 1.0)
    rb, rs = run(big, 80, n_permutations=5), run(small, 20, n_permutations=5)
    eb, es = float(rb.effect_size["Q"][0, 0]), float(rs.effect_size["Q"][0, 0])
    assert 0.5 < eb / es < 2.0
    assert float(rb.z["Q"][0, 0]) / float(rs.z["Q"][0, 0]) > 1.4   # ~sqrt(4) = 2


# ---------------------------------------------------------------------------------- p-values against scipy


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_exact_p_values_equal_scipy_permutation_test(alternative, symmetric):
    # n_a == n_b with a symmetric M makes every split tie with its mirror: exercises the tie tolerance
    n, labels = 10, torch.tensor([1, 0, 1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    scores = make_scores(n, seed=2, symmetric=symmetric)
    res = run(scores, labels, permutations=S.all_relabelings(labels), alternative=alternative)
    assert res.n_permutations == math.comb(10, 5) - 1
    ia, ib = np.flatnonzero(labels.numpy()), np.flatnonzero(~labels.numpy())
    for block, m in scores.items():
        for layer, head in [(0, 0), (1, 1), (0, m.shape[3] - 1)]:
            ref = st.permutation_test((ia, ib), cell_stat(m[:, :, layer, head].numpy()),
                                      permutation_type="independent", vectorized=True, n_resamples=np.inf,
                                      alternative=alternative)
            assert res.p_value[block][layer, head].item() == pytest.approx(ref.pvalue, rel=1e-12)
            # same null distribution: ours is every split but the observed one
            ours = np.sort(np.append(res.null_distribution[block][:, layer, head].numpy(),
                                     res.observed[block][layer, head].item()))
            np.testing.assert_allclose(ours, np.sort(ref.null_distribution), rtol=1e-12)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_random_permutation_p_values_follow_the_definition(alternative):
    n, n_a = 14, 6
    scores = make_scores(n, seed=4)
    res = run(scores, n_a, n_permutations=300, alternative=alternative, seed=11)
    perms = res.permutations
    assert perms.shape == (300, n) and bool((perms.sum(1) == n_a).all())
    for block, m in scores.items():
        brute = torch.stack([m[row][:, ~row].mean((0, 1)) for row in perms])
        torch.testing.assert_close(res.null_distribution[block], brute, rtol=1e-12, atol=1e-14)
        obs = res.observed[block]
        greater = (1 + (brute >= obs).sum(0).double()) / 301
        less = (1 + (brute <= obs).sum(0).double()) / 301
        expected = {"greater": greater, "less": less,
                    "two-sided": torch.clamp(2 * torch.minimum(greater, less), max=1)}[alternative]
        torch.testing.assert_close(res.p_value[block], expected.double(), rtol=1e-12, atol=0)


def test_seeded_and_reproducible():
    scores = make_scores(12, seed=8)
    a = run(scores, 6, n_permutations=100, seed=5, n_bootstrap=200)
    b = run(scores, 6, n_permutations=100, seed=5, n_bootstrap=200)
    c = run(scores, 6, n_permutations=100, seed=6, n_bootstrap=200)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d = run(scores, 6, n_permutations=100, seed=g1)
    e = run(scores, 6, n_permutations=100, seed=g2)
    assert torch.equal(a.permutations, b.permutations) and not torch.equal(a.permutations, c.permutations)
    assert torch.equal(d.permutations, e.permutations)
    for block in scores:
        for name in ("p_value", "q_value_bh", "p_maxstat", "p_cluster", "ci_low", "ci_high"):
            assert torch.equal(getattr(a, name)[block], getattr(b, name)[block]), name
        assert not torch.equal(a.ci_low[block], c.ci_low[block])


def test_dtype_and_chunking_do_not_change_results():
    scores = make_scores(16, seed=9)
    ref = run(scores, 7, n_permutations=200, seed=1)
    tiny = run(scores, 7, n_permutations=200, seed=1, memory_budget=1)            # one permutation per chunk
    single = run(scores, 7, n_permutations=200, seed=1, dtype=torch.float32)
    for block in scores:
        torch.testing.assert_close(tiny.null_distribution[block], ref.null_distribution[block],
                                   rtol=1e-12, atol=1e-13)
        assert torch.equal(tiny.p_value[block], ref.p_value[block])
        assert torch.equal(single.p_value[block], ref.p_value[block])
        torch.testing.assert_close(single.observed[block], ref.observed[block], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ multiple comparisons


@pytest.mark.parametrize("method", ["bh", "by"])
def test_q_values_equal_statsmodels(method):
    scores = plant(make_scores(20, seed=10), first(20, 10), [("Q", 0, 1), ("K", 1, 0)], 0.8)
    res = run(scores, 10, n_permutations=400, seed=2)
    p = flat(res.p_value)
    expected = multipletests(p, method=f"fdr_{method}")[1]
    got = flat(res.q_value_bh if method == "bh" else res.q_value_by)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert len(np.unique(got)) > 1                  # not all equal to the smallest p (the original's bug)
    # direct call, with ties and across blocks of different shapes
    rng = np.random.default_rng(0)
    ps = {"Q": torch.tensor(rng.choice([0.001, 0.01, 0.02, 0.3, 0.9], size=(3, 4))),
          "K": torch.tensor(rng.uniform(size=(3, 2)))}
    np.testing.assert_allclose(flat(S.fdr_correction(ps, method)),
                               multipletests(flat(ps), method=f"fdr_{method}")[1],
                               rtol=1e-12)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_maxstat_follows_the_definition(alternative):
    scores = plant(make_scores(18, seed=12), first(18, 9), [("Q", 1, 2)], 3.0)
    res = run(scores, 9, n_permutations=300, alternative=alternative, seed=4)
    z_null = {b: (res.null_distribution[b] - res.null_mean[b]) / res.null_std[b] for b in scores}
    side = {"greater": lambda z: z, "less": lambda z: -z, "two-sided": torch.abs}[alternative]
    max_null = torch.stack([side(z).reshape(300, -1).amax(1) for z in z_null.values()]).amax(0)
    for block in scores:
        s = side(res.z[block])
        expected = (1 + (max_null[:, None, None] >= s - 1e-9).sum(0).double()) / 301
        expected = torch.maximum(expected.double(), res.p_value[block])
        torch.testing.assert_close(res.p_maxstat[block], expected, rtol=1e-12, atol=0)
        assert bool((res.p_maxstat[block] >= res.p_value[block]).all())


def test_find_clusters_connectivity():
    z = torch.tensor([[3.0, 0.0, 0.0, 2.5],
                      [0.0, 2.0, 0.0, 2.5],
                      [0.0, 0.0, 0.0, 0.0]])
    labels4, masses4 = S.find_clusters(z, 1.5, connectivity=4)
    labels8, masses8 = S.find_clusters(z, 1.5, connectivity=8)
    assert sorted(masses4.tolist()) == [2.0, 3.0, 5.0]          # (0,0), (1,1) separate; right column joined
    assert sorted(masses8.tolist()) == [5.0, 5.0]               # diagonal (0,0)-(1,1) joins under 8
    assert labels8[0, 0] == labels8[1, 1] != labels8[0, 3]
    # a batch of grids is never linked across the batch
    labels, masses = S.find_clusters(torch.stack([z, z]), 1.5, connectivity=4)
    assert masses.size == 6 and labels[0, 0, 0] != labels[1, 0, 0]
    with pytest.raises(ValueError, match="connectivity"):
        S.find_clusters(z, 1.0, connectivity=6)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_cluster_mass_follows_the_definition(alternative):
    # a planted 2-cell cluster (adjacent heads of one layer) and a planted single cell in another block
    scores = plant(make_scores(24, (("Q", 3, 4), ("K", 3, 2)), seed=13), first(24, 12),
                   [("Q", 1, 1), ("Q", 1, 2), ("K", 0, 1)], 4.0)
    thr = 1.7
    res = run(scores, 12, n_permutations=250, alternative=alternative, seed=8, cluster_threshold=thr)
    z_null = {b: ((res.null_distribution[b] - res.null_mean[b]) / res.null_std[b]).numpy() for b in scores}
    structure = ndimage.generate_binary_structure(2, 1)
    signs = {"greater": (1.0,), "less": (-1.0,), "two-sided": (1.0, -1.0)}[alternative]

    def masses(grid):  # plain loop over ndimage.label, one grid at a time
        out = []
        for sign in signs:
            labels, k = ndimage.label(sign * grid >= thr, structure=structure)
            out += [(sign * grid)[labels == i].sum() for i in range(1, k + 1)]
        return out

    max_null = np.array([max([0.0] + [m for b in scores for m in masses(z_null[b][p])]) for p in range(250)])
    for block in scores:
        z = res.z[block].numpy()
        expected = np.ones_like(z)
        for sign in signs:
            labels, k = ndimage.label(sign * z >= thr, structure=structure)
            for i in range(1, k + 1):
                mass = (sign * z)[labels == i].sum()
                expected[labels == i] = (1 + np.sum(max_null >= mass - 1e-9)) / 251
        np.testing.assert_allclose(res.p_cluster[block].numpy(), expected, rtol=1e-12)
    if alternative != "less":
        assert res.p_cluster["Q"][1, 1] == res.p_cluster["Q"][1, 2] < 0.05   # one cluster, one p, found
        assert res.p_cluster["K"][0, 1] < 0.05


# ------------------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_bootstrap_intervals_equal_scipy(method):
    n = 26
    labels = torch.zeros(n, dtype=torch.bool)
    labels[::3] = True                                        # 9 in A, 17 in B, interleaved
    scores = plant(make_scores(n, seed=14), labels, [("K", 0, 0)], 0.5)
    ci = S.bootstrap_ci(scores, labels, n_resamples=999, method=method, seed=21, confidence_level=0.9)
    ia, ib = np.flatnonzero(labels.numpy()), np.flatnonzero(~labels.numpy())
    for block, m in scores.items():
        for layer, head in [(0, 0), (1, 1)]:
            ref = st.bootstrap((ia, ib), cell_stat(m[:, :, layer, head].numpy()), n_resamples=999,
                               method=method, confidence_level=0.9, vectorized=True,
                               rng=np.random.default_rng(21))
            assert ci.low[block][layer, head].item() == pytest.approx(ref.confidence_interval.low, rel=1e-10)
            assert ci.high[block][layer, head].item() == pytest.approx(ref.confidence_interval.high, rel=1e-10)
            assert ci.standard_error[block][layer, head].item() == pytest.approx(ref.standard_error, rel=1e-10)
    # permutation_test's intervals are bootstrap_ci's with the same seed
    res = run(scores, labels, n_permutations=10, n_bootstrap=999, ci_method=method, seed=21,
              confidence_level=0.9)
    for block in scores:
        torch.testing.assert_close(res.ci_low[block], ci.low[block], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(res.ci_high[block], ci.high[block], rtol=1e-12, atol=1e-14)


def test_bootstrap_interval_covers_planted_effect_and_excludes_null():
    labels = first(40, 20)
    scores = plant(make_scores(40, seed=15), labels, [("Q", 0, 0)], 3.0)
    res = run(scores, labels, n_permutations=200, n_bootstrap=1000)
    assert res.ci_low["Q"][0, 0] > res.null_mean["Q"][0, 0]
    for block in scores:
        assert bool((res.ci_low[block] <= res.observed[block]).all())
        assert bool((res.observed[block] <= res.ci_high[block]).all())


# -------------------------------------------------------------------------------------- calibration / power


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
        fwer["maxstat"].append(any(bool(((res.p_maxstat[b] <= alpha) & true_null[b]).any()) for b in rejected))
        fwer["cluster"].append(any(bool(((res.p_cluster[b] <= alpha) & true_null[b]).any()) for b in rejected))
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


# ---------------------------------------------------------------------------------------- missing data (NaN)


def test_nan_cells_propagate_and_leave_the_families():
    scores = plant(make_scores(20, seed=18), first(20, 10), [("Q", 0, 0)], 4.0)
    scores["Q"][3, 7, 1, 2] = float("nan")         # one off-diagonal entry -> cell (Q, 1, 2) missing
    scores["K"][5, 5, 0, 0] = float("inf")         # diagonal: ignored
    scores["K"][2, 9, 1, 1] = float("inf")         # inf off the diagonal counts as missing too
    with pytest.warns(RuntimeWarning, match="2 of 10 cells"):
        res = run(scores, 10, n_permutations=200, n_bootstrap=200)
    for name in ("observed", "null_mean", "null_std", "z", "effect_size", "p_value", "q_value_bh", "q_value_by",
                 "p_maxstat", "p_cluster", "ci_low", "ci_high"):
        grid_q, grid_k = getattr(res, name)["Q"], getattr(res, name)["K"]
        assert math.isnan(grid_q[1, 2]) and math.isnan(grid_k[1, 1]), name
        assert int(torch.isnan(grid_q).sum()) == 1 and int(torch.isnan(grid_k).sum()) == 1, name
    assert not bool(res.significant["Q"][1, 2]) and bool(res.significant["Q"][0, 0])
    # the BH family is the 8 finite cells
    p = flat(res.p_value)
    keep = np.isfinite(p)
    np.testing.assert_allclose(flat(res.q_value_bh)[keep],
                               multipletests(p[keep], method="fdr_bh")[1], rtol=1e-12)
    df = res.to_dataframe()
    assert df["p_value"].isna().sum() == 2 and not df.loc[df["p_value"].isna(), "significant"].any()


def test_constant_cells_are_degenerate_not_significant():
    scores = make_scores(12, (("V", 1, 3),), seed=22)
    scores["V"][:, :, 0, 1] = 2.5                      # constant cell: every split gives the same mean
    scores["V"][:, :, 0, 2] = 0.0                      # e.g. a head without gradient
    with pytest.warns(RuntimeWarning, match="could not be computed for 2 cells"):
        res = run(scores, 6, n_permutations=99, n_bootstrap=200, progress=True)
    for h in (1, 2):
        assert res.null_std["V"][0, h] == 0 and res.z["V"][0, h] == 0 and res.effect_size["V"][0, h] == 0
        assert res.p_value["V"][0, h] == 1 and not res.significant["V"][0, h]
        assert math.isnan(res.ci_low["V"][0, h]) and math.isnan(res.ci_high["V"][0, h])   # BCa: as scipy
    assert math.isfinite(res.ci_low["V"][0, 0])
    ci = S.bootstrap_ci(scores, 6, n_resamples=200, method="percentile")
    assert ci.low["V"][0, 1] == ci.high["V"][0, 1] == 2.5


def test_all_cells_missing_is_an_error():
    scores = make_scores(8, (("Q", 1, 2),))
    scores["Q"][0, 1] = float("nan")
    with pytest.raises(ValueError, match="every one of the 2 cells"):
        run(scores, 4, n_permutations=10)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_permutations=0), "n_permutations"),
    (dict(n_permutations=-5), "n_permutations"),
    (dict(n_permutations=2.5), "n_permutations"),
    (dict(n_permutations=True), "n_permutations"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.0), "alpha"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(alpha="0.05x"), "alpha"),
    (dict(confidence_level=1.0), "confidence_level"),
    (dict(alternative="bigger"), "alternative"),
    (dict(correction="bonferroni"), "correction"),
    (dict(ci_method="basic"), "ci_method"),
    (dict(connectivity=6), "connectivity"),
    (dict(n_bootstrap=-1), "n_bootstrap"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(make_scores(8), 4, **kwargs)


@pytest.mark.parametrize("n_a, match", [
    (0, r"n_a must be in \[1, N-1\]"),
    (8, r"n_a must be in \[1, N-1\]"),
    (-1, r"n_a must be in \[1, N-1\]"),
    (2.0, "n_a must be an int"),
    (torch.ones(8, dtype=torch.bool), "between 1 and N-1"),
    (torch.ones(7, dtype=torch.bool), "length N=8"),
    (torch.tensor([0, 1, 2, 0, 1, 0, 1, 0]), "boolean"),
])
def test_bad_labels_raise(n_a, match):
    with pytest.raises(ValueError, match=match):
        run(make_scores(8), n_a, n_permutations=5)


def test_bad_scores_raise():
    good = make_scores(8)
    with pytest.raises(ValueError, match="square"):
        run({"Q": torch.rand(8, 7, 2, 2)}, 4)
    with pytest.raises(ValueError, match=r"\[N, N, n_layers, n_heads\]"):
        run({"Q": torch.rand(8, 8, 4)}, 4)
    with pytest.raises(ValueError, match="pooled samples, other blocks"):
        run({"Q": good["Q"], "K": torch.rand(9, 9, 2, 2)}, 4)
    with pytest.raises(ValueError, match="non-empty mapping"):
        run({}, 4)
    with pytest.raises(ValueError, match="empty layer x head"):
        run({"Q": torch.rand(8, 8, 0, 2)}, 4)
    with pytest.raises(ValueError, match="keep the group sizes"):
        run(good, 4, permutations=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 samples per task"):
        run(good, 1, n_bootstrap=10)
    with pytest.raises(ValueError, match="at least 2 samples per task"):
        S.bootstrap_ci(good, 7)
    with pytest.raises(ValueError, match="max_count"):
        S.all_relabelings(20, 40)


def test_single_permutation_and_unbalanced_groups_work():
    res = run(make_scores(8), 1, n_permutations=1)
    assert res.n_permutations == 1
    assert set(np.unique(flat(res.p_value)).tolist()) <= {0.5, 1.0}


# ---------------------------------------------------------------------------------------- result / plotting


def test_result_dataframe_is_tidy_and_matches_fields():
    scores = make_scores(12, seed=19)
    res = run(scores, 6, n_permutations=99, n_bootstrap=100)
    df = res.to_dataframe()
    assert len(df) == 2 * 3 + 2 * 2
    assert not df.duplicated(["block", "layer", "head"]).any()
    for name in ("observed", "p_value", "q_value_bh", "q_value_by", "p_maxstat", "p_cluster", "ci_low",
                 "ci_high", "effect_size", "z", "null_mean", "null_std", "significant"):
        assert name in df.columns
    row = df[(df["block"] == "K") & (df["layer"] == 1) & (df["head"] == 0)].iloc[0]
    assert row.observed == res.observed["K"][1, 0].item()
    assert row.q_value_bh == res.q_value_bh["K"][1, 0].item()
    assert res.settings["n_permutations"] == 99 and res.settings["alternative"] == "greater"
    assert "InterferenceTestResult" in repr(res) and len(repr(res)) < 400
    no_ci = run(scores, 6, n_permutations=9)
    assert no_ci.ci_low is None and "ci_low" not in no_ci.to_dataframe().columns


def test_plot_masks_the_non_significant_cells():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = first(30, 15)
    scores = plant(make_scores(30, (("Q", 3, 4), ("K", 3, 2)), seed=20), labels, [("Q", 0, 1), ("K", 2, 1)], 4.0)
    res = run(scores, labels, n_permutations=499, correction="maxstat")

    def hatched(fig):
        heatmaps = [ax for ax in fig.axes if ax.get_title() in ("Q", "K")]
        return {ax.get_title(): sum(1 for p in ax.patches if p.get_hatch()) for ax in heatmaps}

    fig = res.plot("observed")
    expected = {b: int((~res.significant[b]).sum()) for b in ("Q", "K")}
    assert hatched(fig) == expected and expected == {"Q": 11, "K": 5}
    plt.close(fig)
    fig = res.plot("effect_size", mask_with="p_value")
    assert hatched(fig) == {b: int((res.p_value[b] > res.alpha).sum()) for b in ("Q", "K")}
    plt.close(fig)
    fig = res.plot("z", mask_with=False)
    assert hatched(fig) == {"Q": 0, "K": 0}
    plt.close(fig)
    with pytest.raises(ValueError, match="field"):
        res.plot("ci_low")          # no intervals were computed
    with pytest.raises(ValueError, match="mask_with"):
        res.plot("observed", mask_with="observed")


def test_docstring_examples_run():
    failures, tried = doctest.testmod(S, verbose=False)
    assert tried > 10 and failures == 0
