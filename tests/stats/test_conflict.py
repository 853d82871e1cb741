"""The conflict test (tl_circuits.stats.conflict): an independent re-implementation, calibration at the boundary
(orthogonal non-zero task means), heteroscedastic and small unbalanced samples, power, and the model-level form."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from tl_circuits import conflict_test, permutation_test
from tl_circuits.stats.conflict import NULL_HYPOTHESIS

D = 16


def simulated_scores(reps: int, n_a: int, n_b: int, mean_a, mean_b, scale_a=1.0, scale_b=1.0, seed=0):
    """``{"O": [n_a, n_b, reps, 1]}``: s_ij = g_i · g_j with g ~ mean + scale · N(0, I), one repetition per 'layer'."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.as_tensor(mean_a, dtype=torch.float64) + scale_a * torch.randn(reps, n_a, D, generator=gen,
                                                                            dtype=torch.float64)
    b = torch.as_tensor(mean_b, dtype=torch.float64) + scale_b * torch.randn(reps, n_b, D, generator=gen,
                                                                            dtype=torch.float64)
    s = torch.einsum("rid,rjd->ijr", a, b)
    return {"O": s[..., None]}


def unit(k: int) -> np.ndarray:
    e = np.zeros(D)
    e[k] = 1.0
    return e


def reference(s: np.ndarray, alternative: str = "less", confidence: float = 0.95):
    """The documented statistic, re-derived with numpy/scipy for one cell ``s`` [n_a, n_b]."""
    n_a, n_b = s.shape
    estimate = s.mean()
    a = np.var(s.mean(1), ddof=1) / n_a
    b = np.var(s.mean(0), ddof=1) / n_b
    se = math.sqrt(a + b)
    df = (a + b) ** 2 / (a ** 2 / (n_a - 1) + b ** 2 / (n_b - 1))
    t = estimate / se
    p = {"less": stats.t.cdf(t, df), "greater": stats.t.sf(t, df),
         "two-sided": min(1.0, 2 * min(stats.t.cdf(t, df), stats.t.sf(t, df)))}[alternative]
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    return estimate, se, df, p, estimate - half, estimate + half


@pytest.mark.parametrize("alternative", ["less", "greater", "two-sided"])
def test_equals_an_independent_reimplementation(alternative):
    scores = simulated_scores(3, 7, 11, 0.3 * unit(0), -0.2 * unit(0), seed=1)
    res = conflict_test(scores, alternative=alternative, confidence_level=0.9)
    for r in range(3):
        est, se, df, p, lo, hi = reference(scores["O"][:, :, r, 0].numpy(), alternative, 0.9)
        got = [res.estimate["O"][r, 0], res.std_error["O"][r, 0], res.df["O"][r, 0], res.p_value["O"][r, 0],
               res.ci_low["O"][r, 0], res.ci_high["O"][r, 0]]
        np.testing.assert_allclose([float(g) for g in got], [est, se, df, p, lo, hi], rtol=1e-10)
    null = {"less": NULL_HYPOTHESIS, "greater": "E[s_ij] <= 0", "two-sided": "E[s_ij] = 0"}[alternative]
    assert res.null_hypothesis.startswith(f"H0: {null}") and f"H1 ({alternative})" in res.null_hypothesis
    assert res.n_a == 7 and res.n_b == 11


def test_q_values_are_scipy_bh_and_by_of_the_p_values():
    scores = simulated_scores(40, 8, 8, unit(0), -0.3 * unit(0), seed=2)
    res = conflict_test(scores)
    p = res.p_value["O"].flatten().numpy()
    np.testing.assert_allclose(res.q_value_bh["O"].flatten().numpy(), stats.false_discovery_control(p), rtol=1e-12)
    np.testing.assert_allclose(res.q_value_by["O"].flatten().numpy(),
                               stats.false_discovery_control(p, method="by"), rtol=1e-12)
    assert torch.equal(res.significant["O"], res.q_value_bh["O"] <= 0.05)


def test_orthogonal_task_means_are_not_conflict():
    """The case the label-permutation test gets wrong: non-zero task means, orthogonal, true E[s_ij] = 0.
    The permutation test (tasks differ) rejects nearly always; the conflict test stays at its level."""
    reps = 400
    scores = simulated_scores(reps, 20, 20, 1.5 * unit(0), 1.5 * unit(1), seed=3)
    conflict = conflict_test(scores).p_value["O"].flatten().numpy()
    assert stats.kstest(conflict, "uniform").pvalue > 0.001
    assert np.mean(conflict <= 0.05) < 0.05 + 3 * math.sqrt(0.05 * 0.95 / reps)
    # the same scores under the label-permutation null, as a pooled matrix (A then B): it flags the difference
    few = simulated_scores(20, 20, 20, 1.5 * unit(0), 1.5 * unit(1), seed=4)["O"]
    gen = torch.Generator().manual_seed(5)
    rejected = 0
    for r in range(few.shape[2]):
        a = 1.5 * torch.as_tensor(unit(0)) + torch.randn(20, D, generator=gen, dtype=torch.float64)
        b = 1.5 * torch.as_tensor(unit(1)) + torch.randn(20, D, generator=gen, dtype=torch.float64)
        g = torch.cat([a, b])
        pooled = (g @ g.T)[:, :, None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the p-value floor warning: strongly different tasks sit at the floor
            res = permutation_test({"O": pooled}, 20, n_permutations=199, alternative="less", n_bootstrap=0,
                                   progress=False, seed=r)
        rejected += int(res.p_value["O"][0, 0] <= 0.05)
    assert rejected / few.shape[2] > 0.5


@pytest.mark.parametrize("n_a,n_b,scale_a,scale_b", [(6, 15, 1.0, 1.0), (30, 8, 3.0, 0.5), (10, 10, 0.3, 2.0)])
def test_calibrated_with_small_unbalanced_heteroscedastic_samples(n_a, n_b, scale_a, scale_b):
    reps = 2000
    scores = simulated_scores(reps, n_a, n_b, unit(0), unit(1), scale_a, scale_b, seed=6)
    p = conflict_test(scores).p_value["O"].flatten().numpy()
    # size at alpha = 0.05 within Monte-Carlo error (3 SE), erring on the conservative side is allowed
    assert np.mean(p <= 0.05) < 0.05 + 3 * math.sqrt(0.05 * 0.95 / reps)
    assert np.mean(p <= 0.10) < 0.10 + 3 * math.sqrt(0.10 * 0.90 / reps)


def test_inside_the_null_rejects_less_than_alpha():
    """E[s_ij] > 0 (aligned task means): inside H0, the rejection rate is below alpha."""
    scores = simulated_scores(1000, 12, 12, 0.5 * unit(0), 0.5 * unit(0), seed=7)
    p = conflict_test(scores).p_value["O"].flatten().numpy()
    assert np.mean(p <= 0.05) < 0.05


def test_power_against_planted_conflict():
    scores = simulated_scores(300, 20, 20, 1.5 * unit(0), -1.5 * unit(0), seed=8)  # E[s_ij] = -2.25
    res = conflict_test(scores)
    assert np.mean(res.p_value["O"].flatten().numpy() <= 0.05) > 0.9
    covered = (res.ci_low["O"] <= -2.25) & (res.ci_high["O"] >= -2.25)
    assert 0.9 < float(covered.double().mean()) <= 1.0  # the 95% interval covers the true mean


def test_missing_and_degenerate_cells_are_nan():
    s = simulated_scores(3, 5, 5, unit(0), unit(1), seed=9)["O"].clone()
    s[0, 0, 1, 0] = math.nan
    s[:, :, 2, 0] = 1.0  # no spread
    with pytest.warns(RuntimeWarning, match="2 of 3 cells"):
        res = conflict_test({"O": s})
    assert math.isnan(res.p_value["O"][1, 0]) and math.isnan(res.p_value["O"][2, 0])
    assert math.isnan(res.estimate["O"][1, 0]) and res.estimate["O"][2, 0] == 1.0
    assert not bool(res.significant["O"][1:].any())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2 samples"):
        conflict_test({"O": torch.zeros(1, 5, 1, 1)})
    with pytest.raises(ValueError, match="same N_A, N_B"):
        conflict_test({"O": torch.zeros(3, 5, 1, 1), "Q": torch.zeros(3, 4, 1, 1)})
    with pytest.raises(ValueError, match="alternative"):
        conflict_test({"O": torch.zeros(3, 5, 1, 1)}, alternative="smaller")
    with pytest.raises(TypeError, match="mapping"):
        conflict_test(torch.zeros(3, 5, 1, 1))


def test_model_level_form_streams_through_the_engine(mha_model):
    from tests import builders
    from tl_circuits import GradientConfig, InterferenceConfig, compute_interference, interference_conflict_test

    a, b = builders.random_tokens(4, 8, seed=10), builders.random_tokens(5, 8, seed=11)
    quiet = InterferenceConfig(gradients=GradientConfig(progress=False), variant="unsigned")
    res = interference_conflict_test(mha_model, a, b, config=quiet)
    direct = compute_interference(mha_model, a, b, config=quiet.replace(variant="signed", fisher_source="pooled"))
    expect = conflict_test(direct)
    for block in res.blocks:
        torch.testing.assert_close(res.p_value[block], expect.p_value[block], equal_nan=True)
    with pytest.raises(ValueError, match="signed"):
        conflict_test(compute_interference(mha_model, a, b, config=quiet))
