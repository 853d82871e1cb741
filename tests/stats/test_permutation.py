"""The statistic, its exact null, permutation p-values (against scipy and brute force), missing data, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st
import torch

import tl_circuits.stats as S
from tl_circuits.stats.null import random_relabelings
from tests.reference import cell_stat, multipletests
from tests.stats.synthetic import first, flat, make_scores, plant, run


# ------------------------------------------------------------------------------------------ the statistic itself


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


# ---------------------------------------------------------------------------------------- p-values against scipy


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
        for name in ("p_value", "q_value_bh", "p_value_maxstat", "p_value_cluster", "ci_low", "ci_high"):
            assert torch.equal(getattr(a, name)[block], getattr(b, name)[block]), name
        assert not torch.equal(a.ci_low[block], c.ci_low[block])


def test_dtype_and_chunking_do_not_change_results(monkeypatch):
    from tl_circuits.interference import memory

    scores = make_scores(16, seed=9)
    ref = run(scores, 7, n_permutations=200, seed=1)
    monkeypatch.setattr(memory, "STATS_SCRATCH_CAP_GB", 1e-12)
    tiny = run(scores, 7, n_permutations=200, seed=1)   # one permutation per chunk
    monkeypatch.undo()
    single = run(scores, 7, n_permutations=200, seed=1, dtype=torch.float32)
    for block in scores:
        torch.testing.assert_close(tiny.null_distribution[block], ref.null_distribution[block],
                                   rtol=1e-12, atol=1e-13)
        assert torch.equal(tiny.p_value[block], ref.p_value[block])
        assert torch.equal(single.p_value[block], ref.p_value[block])
        torch.testing.assert_close(single.observed[block], ref.observed[block], rtol=1e-5, atol=1e-6)


def test_deprecated_memory_budget_in_bytes_still_works():
    from tl_circuits.deprecation import TLCircuitsDeprecationWarning

    scores = make_scores(16, seed=9)
    ref = run(scores, 7, n_permutations=50, seed=1, memory_budget_gb=0.5)
    with pytest.warns(TLCircuitsDeprecationWarning, match="memory_budget_gb"):
        old = run(scores, 7, n_permutations=50, seed=1, memory_budget=2**29)
    for block in scores:
        assert torch.equal(old.p_value[block], ref.p_value[block])
    perms = S.all_relabelings(3, 6)
    with pytest.warns(TLCircuitsDeprecationWarning, match="memory_budget_gb"):
        null = S.permutation_null(make_scores(6), perms, memory_budget=2**29, progress=False)
    for block, grid in S.permutation_null(make_scores(6), perms, progress=False).items():
        torch.testing.assert_close(null[block], grid, rtol=1e-12, atol=1e-14)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        run(scores, 7, n_permutations=5, memory_budget=2**29, memory_budget_gb=1.0)


def test_memory_budget_is_what_the_call_may_allocate():
    """The budget covers what the test holds (the prepared block, the null it returns), not only the scratch of a
    chunk: a budget below that is an error naming it; any budget that fits gives the same numbers."""
    from tl_circuits.interference import memory

    scores = make_scores(16, seed=9)
    held = memory.statistics_held_bytes(16, [6, 4], 8, n_relabelings=200)
    with pytest.raises(ValueError, match=r"memory_budget_gb=1e-06 is below what this call must hold"):
        run(scores, 7, n_permutations=200, seed=1, memory_budget_gb=1e-6)
    just = run(scores, 7, n_permutations=200, seed=1, memory_budget_gb=(held + 16 * 6 * 8 * 3) / 2**30)
    ref = run(scores, 7, n_permutations=200, seed=1)
    for block in scores:
        assert torch.equal(just.p_value[block], ref.p_value[block])
        torch.testing.assert_close(just.null_distribution[block], ref.null_distribution[block], rtol=1e-12,
                                   atol=1e-13)
    with pytest.raises(ValueError, match="memory_budget_gb"):
        S.bootstrap_ci(scores, 7, n_resamples=99, memory_budget_gb=1e-6, progress=False)
    for bad in (0, -1.0, float("nan"), float("inf"), "lots"):
        with pytest.raises(ValueError, match="memory_budget_gb"):
            run(scores, 7, n_permutations=5, memory_budget_gb=bad)


def test_defaults_come_from_tl_circuits_defaults():
    import inspect

    from tl_circuits import defaults

    for function in (S.permutation_test, S.bootstrap_ci, S.permutation_null):
        params = inspect.signature(function).parameters
        assert params["memory_budget_gb"].default == defaults.MEMORY_BUDGET_GB   # what the call may allocate
        assert params["progress"].default is True
    test = inspect.signature(S.permutation_test).parameters
    assert test["n_permutations"].default is None
    assert test["n_bootstrap"].default == defaults.N_BOOTSTRAP
    assert (test["alpha"].default, test["confidence_level"].default, test["seed"].default) == (
        defaults.ALPHA, defaults.CONFIDENCE_LEVEL, defaults.SEED)
    boot = inspect.signature(S.bootstrap_ci).parameters
    assert boot["n_resamples"].default == defaults.N_BOOTSTRAP
    assert (boot["confidence_level"].default, boot["seed"].default) == (defaults.CONFIDENCE_LEVEL, defaults.SEED)


def test_default_permutations_let_bh_flag_a_lone_cell_on_a_576_cell_grid():
    # 4 blocks x 12 layers x 12 heads, one strongly planted cell. With N = 20 there are C(20, 10) = 184756
    # splits: only the observed one reaches the planted cell's statistic, and P = 2m/alpha random draws redraw
    # it at most once or twice, so its p is 1/(1 + P) or 2/(1 + P), and BH's q = p·m <= alpha either way.
    import warnings

    from tl_circuits import defaults

    n, alpha = 20, 0.05
    blocks = tuple((b, 12, 12) for b in "QKVO")
    scores = plant(make_scores(n, blocks, seed=23, d=1), first(n, 10), [("V", 7, 4)], 50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # the planted cell may sit at its floor
        res = run(scores, 10, alpha=alpha, correction="bh")
    m = 4 * 12 * 12
    assert res.n_permutations == defaults.default_n_permutations(m, alpha) == 23040
    assert res.settings["n_permutations"] == res.n_permutations
    assert S.p_value_floor(res.n_permutations) == 1 / (1 + res.n_permutations) <= alpha / m
    # the screened default continues this cell on all P relabelings: the same stream as an explicit P
    every = random_relabelings(n, 10, res.n_permutations, torch.Generator().manual_seed(0))
    hits = int((every == first(n, 10)).all(1).sum())                 # redraws of the observed split
    assert res.p_value["V"][7, 4] == (1 + hits) / (1 + res.n_permutations)
    assert res.permutations_used["V"][7, 4] == res.n_permutations and res.n_permutations_screen == 1000
    assert res.q_value_bh["V"][7, 4] <= alpha
    assert [(b, *map(int, c)) for b in res.blocks for c in res.significant[b].nonzero()] == [("V", 7, 4)]
    # BH cannot flag it with the old fixed 1000 permutations: the floor 1/1001 is above alpha/m
    old = run(scores, 10, alpha=alpha, correction="bh", n_permutations=1000)
    assert not any(bool(old.significant[b].any()) for b in old.blocks)


def test_floor_warning_counts_the_cells_at_the_floor():
    scores = plant(make_scores(20, seed=24), first(20, 10), [("Q", 0, 0), ("K", 1, 1)], 20.0)
    with pytest.warns(UserWarning, match=r"2 of 10 cells have p-values at their floor 0.0099"):
        res = run(scores, 10, n_permutations=100, seed=2)
    floor = 1 / 101
    assert sum(int((res.p_value[b] == floor).sum()) for b in res.blocks) == 2
    with pytest.warns(UserWarning, match=r"floor 0.0198 \(= 2/\(1 \+ n_permutations=100\)\)"):
        run(scores, 10, n_permutations=100, seed=2, alternative="two-sided")
    assert S.p_value_floor(1, "two-sided") == 1.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)     # no cell at the floor: no warning
        run(make_scores(20, seed=25), 10, n_permutations=100, seed=2)


# -------------------------------------------------------------------------------------------- missing data (NaN)


def test_nan_cells_propagate_and_leave_the_families():
    scores = plant(make_scores(20, seed=18), first(20, 10), [("Q", 0, 0)], 4.0)
    scores["Q"][3, 7, 1, 2] = float("nan")         # one off-diagonal entry -> cell (Q, 1, 2) missing
    scores["K"][5, 5, 0, 0] = float("inf")         # diagonal: ignored
    scores["K"][2, 9, 1, 1] = float("inf")         # inf off the diagonal counts as missing too
    with pytest.warns(RuntimeWarning, match="2 of 10 cells"):
        res = run(scores, 10, n_permutations=200, n_bootstrap=200)
    for name in ("observed", "null_mean", "null_std", "z", "effect_size", "p_value", "q_value_bh", "q_value_by",
                 "p_value_maxstat", "p_value_cluster", "ci_low", "ci_high"):
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


# ----------------------------------------------------------------------------------------------------- bad input


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
