"""The paired sign-flip test and bootstrap (tl_circuits.stats.paired) against scipy and by simulation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats as st
import torch

from tl_circuits import defaults
from tl_circuits.stats.paired import all_sign_flips, paired_bootstrap_ci, random_sign_flips, sign_flip_test
from tl_circuits.stats.pvalues import p_value_floor


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _data(n: int, cells: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_t(4, size=(n, cells)) + shift * (np.arange(cells) % 2)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_exact_sign_flip_equals_scipy_permutation_test(alternative):
    x = _data(9, 6, seed=1, shift=0.7)
    ours = sign_flip_test(torch.from_numpy(x), alternative=alternative, n_permutations=1000)
    assert ours.exact and ours.n_permutations == 2 ** 9
    for cell in range(x.shape[1]):
        ref = st.permutation_test((x[:, cell],), _mean, permutation_type="samples", alternative=alternative,
                                  n_resamples=10_000, vectorized=True)
        assert ours.p_value[cell].item() == pytest.approx(ref.pvalue, rel=1e-12)
        assert ours.statistic[cell].item() == pytest.approx(ref.statistic, rel=1e-12)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_monte_carlo_sign_flip_equals_a_loop_over_the_same_flips(alternative):
    """(1 + hits) / (1 + B) per tail; two-sided doubles the smaller tail, as scipy.stats.permutation_test does for
    random resamples (the package's one two-sided rule)."""
    x = torch.from_numpy(_data(30, 4, seed=2, shift=0.4))
    x[:, 3] -= 0.6  # a cell whose smaller tail is "less"
    gen_seed = 5
    ours = sign_flip_test(x, alternative=alternative, n_permutations=499, seed=gen_seed, progress=False)
    assert not ours.exact and ours.n_permutations == 499
    flips = random_sign_flips(30, 499, torch.Generator().manual_seed(gen_seed))
    for cell in range(4):
        t = float(x[:, cell].mean())
        null = [float((s * x[:, cell]).mean()) for s in flips]
        p_greater = (1 + sum(v >= t - 1e-12 for v in null)) / 500
        p_less = (1 + sum(v <= t + 1e-12 for v in null)) / 500
        expected = {"greater": p_greater, "less": p_less, "two-sided": min(1.0, 2 * min(p_less, p_greater))}
        assert ours.p_value[cell].item() == pytest.approx(expected[alternative], abs=1e-15)


def test_monte_carlo_p_is_close_to_scipy_and_never_zero():
    x = _data(40, 3, seed=3, shift=0.3)
    ours = sign_flip_test(torch.from_numpy(x), alternative="greater", n_permutations=20_000, seed=1)
    for cell in range(3):
        ref = st.permutation_test((x[:, cell],), _mean, permutation_type="samples", alternative="greater",
                                  n_resamples=20_000, vectorized=True, rng=np.random.default_rng(2))
        assert abs(ours.p_value[cell].item() - ref.pvalue) < 4 * np.sqrt(0.25 / 20_000) + 1e-3
    strong = torch.full((40, 1), 3.0) + torch.randn(40, 1, generator=torch.Generator().manual_seed(0)) * 0.1
    res = sign_flip_test(strong, n_permutations=99)
    assert res.p_value.item() == pytest.approx(p_value_floor(99, "two-sided")) and res.p_value.item() > 0


def test_exact_floor_and_enumeration():
    flips = all_sign_flips(4)
    assert flips.shape == (16, 4) and len({tuple(r) for r in flips.tolist()}) == 16
    assert flips.tolist() == [list(p) for p in itertools.product((1.0, -1.0), repeat=4)]
    res = sign_flip_test(torch.ones(4, 1) + torch.arange(4.0)[:, None] * 0.01, alternative="two-sided")
    assert res.exact and res.p_value.item() == pytest.approx(2 / 16)
    assert p_value_floor(16, "greater", exact=True) == 1 / 16


def test_nan_samples_are_left_out_of_their_cell():
    x = _data(10, 2, seed=4)
    with_nan = x.copy()
    with_nan[[2, 7], 1] = np.nan
    res = sign_flip_test(torch.from_numpy(with_nan), alternative="greater", n_permutations=2000)
    ref = st.permutation_test((with_nan[~np.isnan(with_nan[:, 1]), 1],), _mean, permutation_type="samples",
                              alternative="greater", vectorized=True)
    assert res.exact and res.n_samples.tolist() == [10, 8]
    assert res.p_value[1].item() == pytest.approx(ref.pvalue, rel=1e-12)
    assert res.statistic[1].item() == pytest.approx(np.nanmean(with_nan[:, 1]))
    all_nan = sign_flip_test(torch.full((5, 1), float("nan")))
    assert torch.isnan(all_nan.p_value).all() and torch.isnan(all_nan.statistic).all()


def test_shapes_and_bad_input():
    res = sign_flip_test(torch.randn(6, 2, 3), n_permutations=10, exact=False)
    assert res.p_value.shape == (2, 3) and res.n_permutations == 10
    with pytest.raises(ValueError, match="alternative"):
        sign_flip_test(torch.randn(5, 2), alternative="bigger")
    with pytest.raises(ValueError, match="N >= 1"):
        sign_flip_test(torch.randn(0, 2))
    with pytest.raises(ValueError, match="n_permutations"):
        sign_flip_test(torch.randn(5, 2), n_permutations=0)
    with pytest.raises(ValueError, match="too many"):
        sign_flip_test(torch.randn(25, 2), exact=True)
    with pytest.raises(ValueError, match="at least 2 samples"):
        paired_bootstrap_ci(torch.randn(1, 2))


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_paired_bootstrap_equals_scipy_on_the_same_resamples(method):
    x = _data(25, 5, seed=6, shift=1.0)
    ours = paired_bootstrap_ci(torch.from_numpy(x), n_resamples=999, method=method, seed=11, confidence_level=0.9)
    ref = st.bootstrap((x,), _mean, axis=0, n_resamples=999, method=method, confidence_level=0.9,
                       vectorized=True, rng=np.random.default_rng(11))
    np.testing.assert_allclose(ours.low.numpy(), ref.confidence_interval.low, rtol=1e-10)
    np.testing.assert_allclose(ours.high.numpy(), ref.confidence_interval.high, rtol=1e-10)
    np.testing.assert_allclose(ours.standard_error.numpy(), ref.standard_error, rtol=1e-10)


def test_paired_bootstrap_nan_cell_uses_its_finite_samples():
    x = _data(20, 2, seed=7)
    x[3, 1] = np.nan
    ci = paired_bootstrap_ci(torch.from_numpy(x), n_resamples=2000, method="percentile", seed=0)
    ref = paired_bootstrap_ci(torch.from_numpy(x[:, :1]), n_resamples=2000, method="percentile", seed=0)
    assert ci.low[0].item() == pytest.approx(ref.low.item())        # cell 0 has no NaN: unchanged
    assert np.isfinite(ci.low[1].item()) and ci.low[1] < np.nanmean(x[:, 1]) < ci.high[1]
    with pytest.warns(RuntimeWarning, match="degenerate"):
        constant = paired_bootstrap_ci(torch.ones(10, 1), n_resamples=99)
    assert torch.isnan(constant.low).all()


def test_sign_flip_is_calibrated_on_symmetric_null_data():
    """H0 true (symmetric heavy-tailed differences): rejection rate at alpha and a KS test of uniformity."""
    rng = np.random.default_rng(8)
    x = rng.standard_t(3, size=(24, 3000)) * rng.uniform(0.1, 3, size=3000)
    p = sign_flip_test(torch.from_numpy(x), n_permutations=999, seed=3).p_value.numpy()
    alpha = defaults.ALPHA
    rate = np.mean(p <= alpha)
    assert abs(rate - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / p.size)
    # p is discrete on a 1/1000 grid: jitter within a step before the KS test
    jittered = p - rng.uniform(0, 1 / 1000, size=p.size)
    assert st.kstest(jittered, "uniform").pvalue > 1e-3


def test_sign_flip_has_power_on_a_shifted_mean():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((24, 400)) + 0.8
    p = sign_flip_test(torch.from_numpy(x), n_permutations=999, seed=4).p_value.numpy()
    assert np.mean(p <= 0.05) > 0.9


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_bootstrap_interval_coverage_by_simulation(method):
    """2000 independent cells of 40 mildly skewed samples (gamma, mean 1): the 90% intervals cover the mean
    about 90% of the time. Bootstrap intervals undercover by ~2 points at N = 40 (the plug-in spread is
    ~sqrt((n-1)/n) too small, and skew), and the Monte Carlo error of 2000 cells is ~0.7 points: the band allows
    for both, and still fails an interval of the wrong width (e.g. a 80% or 95% one)."""
    rng = np.random.default_rng(10)
    x = rng.gamma(4.0, 0.25, size=(40, 2000))
    ci = paired_bootstrap_ci(torch.from_numpy(x), n_resamples=999, confidence_level=0.9, method=method, seed=2)
    coverage = float(((ci.low < 1.0) & (1.0 < ci.high)).double().mean())
    assert 0.85 < coverage < 0.93
