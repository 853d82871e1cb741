"""SweepResult.test: paired sign-flip tests, bootstrap intervals and q-values of per-sample freeze effects,
against scipy on the same data, hand computations from separate sweeps, and simulation."""

import warnings

import numpy as np
import pytest
import scipy.stats as st
import torch

from tests import builders
from tl_circuits import SweepResult, freeze_sweep
from tl_circuits.freezing.sweep_stats import INTERACTION, SWEEP_NULL_HYPOTHESIS

N = 12  # 2^12 sign patterns: the test is exact, so scipy's exact permutation_test is the reference


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


@pytest.fixture(scope="module")
def swept(mha_model):
    tokens = builders.random_tokens(N, 10, seed=31)
    return freeze_sweep(mha_model, tokens, circuits=("qk", "ov", "both"), per_sample=True, progress=False)


@pytest.fixture(scope="module")
def tested(swept):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return swept.test(n_bootstrap=999, seed=5)


def test_p_values_and_intervals_equal_scipy(swept, tested):
    assert tested.exact and tested.n_permutations == 2 ** N
    assert tested.circuits == ["qk", "ov", "both", INTERACTION]
    for circuit, layer, head in [("qk", 0, 1), ("ov", 1, 3), ("both", 1, 0)]:
        x = swept.per_sample_effect[circuit][:, layer, head].numpy()
        perm = st.permutation_test((x,), _mean, permutation_type="samples", vectorized=True, n_resamples=10_000)
        assert tested.p_value[circuit][layer, head].item() == pytest.approx(perm.pvalue, rel=1e-12)
        boot = st.bootstrap((x,), _mean, n_resamples=999, method="bca", vectorized=True,
                            rng=np.random.default_rng(5))
        assert tested.ci_low[circuit][layer, head].item() == pytest.approx(boot.confidence_interval.low, rel=1e-9)
        assert tested.ci_high[circuit][layer, head].item() == pytest.approx(boot.confidence_interval.high, rel=1e-9)
        assert tested.std_between_samples[circuit][layer, head].item() == pytest.approx(np.std(x, ddof=1))
        assert tested.mean_effect[circuit][layer, head].item() == pytest.approx(
            swept.effect[circuit][layer, head].item(), abs=1e-6)


def test_q_values_run_over_every_tested_cell(tested):
    p = np.concatenate([tested.p_value[c].flatten().numpy() for c in tested.circuits])
    for method, q in (("bh", tested.q_value_bh), ("by", tested.q_value_by)):
        expected = st.false_discovery_control(p, method=method)
        np.testing.assert_allclose(np.concatenate([q[c].flatten().numpy() for c in tested.circuits]), expected)
    for c in tested.circuits:
        assert torch.equal(tested.significant[c], tested.q_value_bh[c] <= 0.05)


def test_interaction_is_both_minus_qk_plus_ov_of_three_separate_sweeps(mha_model, swept, tested):
    tokens = builders.random_tokens(N, 10, seed=31)
    separate = {c: freeze_sweep(mha_model, tokens, circuits=(c,), per_sample=True, progress=False)
                .per_sample_effect[c] for c in ("qk", "ov", "both")}
    by_hand = separate["both"] - separate["qk"] - separate["ov"]
    torch.testing.assert_close(tested.mean_effect[INTERACTION], by_hand.mean(0), rtol=0, atol=1e-6)
    x = by_hand[:, 1, 2].numpy()
    perm = st.permutation_test((x,), _mean, permutation_type="samples", vectorized=True, n_resamples=10_000)
    assert tested.p_value[INTERACTION][1, 2].item() == pytest.approx(perm.pvalue, rel=1e-6, abs=1e-9)


def test_dataframe_plot_and_null_hypothesis(tested):
    frame = tested.to_dataframe()
    assert len(frame) == 4 * 2 * 4
    for column in ("circuit", "layer", "head", "mean_effect", "ci_low", "ci_high", "p_value", "q_value_bh",
                   "q_value_by", "significant", "std_between_samples", "std_between_draws", "n_samples", "alpha"):
        assert column in frame.columns
    row = frame[(frame["circuit"] == "ov") & (frame["layer"] == 1) & (frame["head"] == 3)].iloc[0]
    assert row.p_value == pytest.approx(tested.p_value["ov"][1, 3].item())
    assert tested.null_hypothesis.startswith(f"H0: {SWEEP_NULL_HYPOTHESIS}") and "symmetric about 0" in \
        tested.null_hypothesis
    assert "H1 (two-sided): the freeze changes the metric, in either direction" in tested.null_hypothesis
    figure = tested.plot()
    assert len(figure.axes) >= 4
    for ax, circuit in zip(figure.axes, tested.circuits):
        hatched = [p for p in ax.patches if p.get_hatch()]
        assert len(hatched) == int((~tested.significant[circuit]).sum())
        lo, hi = ax.images[0].get_clim()
        assert lo == -hi
        np.testing.assert_allclose(np.ma.filled(ax.images[0].get_array(), np.nan),
                                   tested.mean_effect[circuit].numpy(), rtol=1e-6)


def test_test_needs_per_sample_and_checks_arguments():
    result = SweepResult(clean=1.0, frozen={"qk": torch.zeros(1, 2)}, replacement="zero", metric_name="loss")
    with pytest.raises(ValueError, match="per_sample=True"):
        result.test()
    x = torch.randn(8, 1, 2, generator=torch.Generator().manual_seed(0))
    result = SweepResult(clean=1.0, frozen={"qk": 1 + x.mean(0)}, replacement="zero", metric_name="loss",
                         clean_per_sample=torch.ones(8), per_sample_effect={"qk": x})
    for kwargs, match in [(dict(alternative="up"), "alternative"), (dict(correction="holm"), "correction"),
                          (dict(alpha=1.5), "alpha"), (dict(n_bootstrap=-1), "n_bootstrap")]:
        with pytest.raises(ValueError, match=match):
            result.test(**kwargs)
    with pytest.warns(UserWarning, match="BH cannot flag a lone cell"):
        small = SweepResult(clean=1.0, frozen={"qk": 1 + x[:4].mean(0)}, replacement="zero", metric_name="loss",
                            clean_per_sample=torch.ones(4), per_sample_effect={"qk": x[:4]}).test(n_bootstrap=0)
    assert small.ci_low is None and small.n_bootstrap == 0


def test_monte_carlo_floor_warns_and_one_sided_tests():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, 2, generator=g) * 0.1
    x[:, 0, 0] += 1.0
    result = SweepResult(clean=1.0, frozen={"qk": 1 + x.mean(0)}, replacement="zero", metric_name="loss",
                         clean_per_sample=torch.ones(40), per_sample_effect={"qk": x})
    with pytest.warns(UserWarning, match="at their floor"):
        res = result.test(n_permutations=200, n_bootstrap=0)
    # two-sided Monte Carlo: the smaller tail doubled (the one rule), so the floor is 2 / (1 + B)
    assert not res.exact and res.p_value["qk"][0, 0].item() == pytest.approx(2 / 201)
    greater = result.test(alternative="greater", n_bootstrap=0)
    less = result.test(alternative="less", n_bootstrap=0)
    assert greater.significant["qk"][0, 0] and not less.significant["qk"][0, 0]
    assert greater.n_permutations == 1000  # default_n_permutations(4 cells)
    assert torch.isnan(res.std_between_draws["qk"]).all()  # one draw: no between-draw spread


def test_between_draw_spread_is_the_std_of_the_draws(mha_model):
    tokens = builders.random_tokens(N, 10, seed=32)
    result = freeze_sweep(mha_model, tokens, replacement="noise", n_draws=3, per_sample=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = result.test(n_bootstrap=0)
    assert res.n_draws == 3
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(res.std_between_draws[circuit], result.per_draw_effect[circuit].std(0))


@pytest.mark.slow
def test_noise_seed_difference_null_is_calibrated(mha_model):
    """A freeze 'effect' with no effect: the per-sample difference of two NOISE draws with different seeds is
    symmetric (the seeds are exchangeable), so the p-values are uniform: rejection rate at alpha and KS."""
    p_values = []
    for rep in range(30):
        tokens = builders.random_tokens(16, 10, seed=100 + rep)
        a = freeze_sweep(mha_model, tokens, circuits=("ov",), replacement="noise", seed=2 * rep, per_sample=True,
                         progress=False)
        b = freeze_sweep(mha_model, tokens, circuits=("ov",), replacement="noise", seed=2 * rep + 1,
                         per_sample=True, progress=False)
        diff = a.per_sample_effect["ov"] - b.per_sample_effect["ov"]
        null = SweepResult(clean=0.0, frozen={"ov": diff.mean(0).float()}, replacement="noise", metric_name="loss",
                           clean_per_sample=torch.zeros(16), per_sample_effect={"ov": diff})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            p_values.append(null.test(n_bootstrap=0, n_permutations=999, seed=rep).p_value["ov"].flatten())
    p = torch.cat(p_values).numpy()                                    # 30 x 8 cells
    rate = float(np.mean(p <= 0.05))
    assert abs(rate - 0.05) < 4 * np.sqrt(0.05 * 0.95 / p.size) + 0.02   # cells of a rep share samples
    assert st.kstest(p, "uniform").pvalue > 1e-3
