"""assert_freeze_effect: what it measures against the sweep and TransformerLens hooks by hand, its p-values against
scipy, its verdicts on the bundled model's known heads, its messages, and (slow) its false-pass rate by simulation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from tests import builders
from tl_circuits import bundled_model_info, bundled_tasks, freeze_sweep, load_bundled_model
from tl_circuits.testing import assert_freeze_effect, freeze_effect_per_sample

TOKENS = builders.random_tokens(10, 8, seed=11)


def _per_sample_loss(model, tokens, hooks=()):
    """Each sample's mean next-token cross-entropy, by hand, under TransformerLens hooks."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks)).double()
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return nll.mean(1)


@pytest.mark.parametrize("circuit", ["qk", "ov"])
def test_the_effect_is_the_sweeps_per_sample_effect_and_p_is_scipys(model, circuit):
    """One head: the sweep (stacked passes from cached layer inputs, an independent code path) gives the same
    per-sample effect; the bound's p-value is scipy's exact paired permutation test of effect - bound."""
    result = assert_freeze_effect(model, [(1, 2)], TOKENS, circuit=circuit, at_least=-10.0, n_bootstrap=0)
    sweep = freeze_sweep(model, TOKENS, circuits=(circuit,), per_sample=True, progress=False)
    torch.testing.assert_close(result.per_sample_effect, sweep.per_sample_effect[circuit][:, 1, 2].double(),
                               atol=1e-5, rtol=1e-5)
    x = (result.per_sample_effect + 10.0).numpy()
    ref = st.permutation_test((x,), np.mean, permutation_type="samples", alternative="greater", vectorized=True)
    assert result.exact and result.n_permutations == 2 ** 10
    assert result.p_at_least == pytest.approx(ref.pvalue, rel=1e-12)
    assert result.p_at_most is None and result.passed and result.n_samples == 10


def test_the_default_metric_of_tokens_is_the_per_sample_loss_as_by_hand(mha_model):
    """OV zero of L1H2 against a TransformerLens hook zeroing hook_z[..., 2, :] by hand, per-sample loss by hand."""
    effect, name = freeze_effect_per_sample(mha_model, [(1, 2)], TOKENS, circuit="ov")

    def zero_head(z, hook):
        z[:, :, 2] = 0.0
        return z

    by_hand = (_per_sample_loss(mha_model, TOKENS, [("blocks.1.attn.hook_z", zero_head)])
               - _per_sample_loss(mha_model, TOKENS))
    torch.testing.assert_close(effect, by_hand, atol=1e-5, rtol=1e-5)
    assert name == "loss"


@pytest.fixture(scope="module")
def induction():
    model = load_bundled_model("induction-2l")
    return model, bundled_model_info("induction-2l"), bundled_tasks("induction-2l")["induction"](16, seed=0)


def test_true_claims_about_the_bundled_model_pass(induction):
    model, info, batch = induction
    heads = info.known_heads["induction"]
    strong = assert_freeze_effect(model, heads, batch, circuit="qk", at_least=1.0)
    assert strong.passed and strong.ci_low > 1.0 and strong.p_at_least == 2.0 ** -16
    weak = assert_freeze_effect(model, info.control_heads[:1], batch, at_least=-0.5, at_most=0.5)
    assert weak.passed and -0.5 < weak.ci_low <= weak.mean_effect <= weak.ci_high < 0.5
    assert weak.metric_name == "in_context_loss"


def test_a_false_claim_fails_saying_what_was_measured(induction):
    model, info, batch = induction
    with pytest.raises(AssertionError) as failed:
        assert_freeze_effect(model, [(0, 1)], batch, at_least=1.0)
    lines = str(failed.value).splitlines()
    assert lines[0] == ("freeze effect claim failed: freezing the QK circuit (zero) of L0H1 changes in_context_loss "
                        "by at least +1")
    assert lines[1].startswith("  measured over 16 samples: mean effect +0.1") and "95% bca interval [" in lines[1]
    assert lines[2] == ("  bound at least +1: H0 \"mean effect <= +1\" not rejected, one-sided sign-flip p = 1 (exact, "
                        "65536 sign patterns)")
    assert lines[3] == "  the claim needs p <= 0.05 for every bound"


def test_both_bounds_must_hold(induction):
    """An effect of about 4 nats is at least 1, but not at most 2: the upper bound's test fails alone."""
    model, info, batch = induction
    with pytest.raises(AssertionError, match=r"(?s)between \+1 and \+2.*bound at least \+1: .* rejected, .*"
                                             r"bound at most \+2: H0 \"mean effect >= \+2\" not rejected, "):
        assert_freeze_effect(model, info.known_heads["induction"], batch, at_least=1.0, at_most=2.0)


def test_claims_that_cannot_be_judged_are_errors(induction):
    model, _, batch = induction
    with pytest.raises(ValueError, match="give at_least and/or at_most"):
        assert_freeze_effect(model, [(0, 1)], batch)
    with pytest.raises(ValueError, match="no effect satisfies both"):
        assert_freeze_effect(model, [(0, 1)], batch, at_least=1.0, at_most=0.0)
    with pytest.raises(ValueError, match="with 4 samples .* smallest p-value is 0.0625.*never pass"):
        assert_freeze_effect(model, [(0, 1)], batch[:4], at_least=0.0)
    with pytest.raises(TypeError, match="TaskBatch or integer tokens"):
        assert_freeze_effect(model, [(0, 1)], batch.tokens.float(), at_least=0.0)


@pytest.mark.slow
def test_false_pass_rate_at_the_bound_is_at_most_alpha_and_power_grows_with_distance():
    """Per-sample effects drawn symmetric about the bound (the least favourable null): the claim passes in at most
    alpha of the draws (+ Monte Carlo slack); a true effect one spread above the bound passes almost always."""
    model, tokens = builders.mha_under_test(), builders.random_tokens(12, 6, seed=3)
    rng = np.random.default_rng(0)

    def run(shift: float) -> bool:
        effect = torch.from_numpy(0.5 + shift + rng.standard_t(3, size=12))
        calls = iter([torch.zeros(12, dtype=torch.float64), effect])

        def metric(logits):  # clean first, frozen second: the effect is exactly the draw
            return next(calls)

        try:
            assert_freeze_effect(model, [(0, 0)], tokens, metric, at_least=0.5, n_bootstrap=0)
        except AssertionError:
            return False
        return True

    draws = 300
    null_rate = np.mean([run(0.0) for _ in range(draws)])
    assert null_rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / draws)
    assert np.mean([run(2.0) for _ in range(50)]) > 0.8
