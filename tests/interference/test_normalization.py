"""Fisher normalisation modes (docs/spec.md §3.4) against explicit float64 loops (tests/reference.py
``brute_force``) over per-sample gradients from a plain ``loss.backward()`` loop: each mode with damping, an external
Fisher, pairwise_scores, the pooled matrix, the smallest budget (spilled, tiled); properties. Each mode with every
variant, reduction, Fisher source and leave-one-out: ``test_interference.py::test_batched_equals_brute_force``."""

from __future__ import annotations

import pytest
import torch

from tests.interference.tasks import task_a, task_b
from tests.reference import DAMP, assert_scores_close, brute_force, hand_rows, loop_reference
from tl_circuits import defaults
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference, pooled_scores
from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.interference.fisher import EMAFisher, damped, fisher_from_gradients
from tl_circuits.interference.gradients import per_sample_gradients
from tl_circuits.interference.result import InterferenceResult
from tl_circuits.interference.scoring import pairwise_scores
from tl_circuits.models.spec import BLOCKS, ModelSpec, model_spec
from tl_circuits.stats.cosine import fisher_cosines

QUIET = GradientConfig(progress=False)
MODES = ("head", "hybrid")


def run(model, gradients=QUIET, fisher=None, **config):
    tokens_b, mask_b = task_b()
    return compute_interference(model, task_a(), tokens_b, attention_mask_b=mask_b, fisher=fisher,
                                config=InterferenceConfig(gradients=gradients, **config))


# ----- each mode, each composition, against brute force -------------------------------------------------------

def test_default_is_the_diagonal_mode(setup):
    model, raw_a, raw_b = setup
    assert InterferenceConfig().normalization == defaults.NORMALIZATION == "diagonal"
    result = run(model, variant="signed", leave_one_out=True, **DAMP)
    assert result.settings["normalization"] == "diagonal"
    assert_scores_close(result.scores, brute_force(model_spec(model), raw_a, raw_b, "signed", "sum", "a", True,
                                                   normalization="diagonal"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damping", [dict(damping_abs=1e-3, damping_rel=0.0), dict(damping_abs=0.0, damping_rel=0.3)])
def test_mode_with_absolute_or_relative_damping(setup, mode, damping):
    model, raw_a, raw_b = setup
    result = run(model, variant="signed", fisher_source="pooled", leave_one_out=True, normalization=mode, **damping)
    assert_scores_close(result.scores, brute_force(model_spec(model), raw_a, raw_b, "signed", "sum", "pooled", True,
                                                   normalization=mode, **damping))


@pytest.mark.parametrize("mode", MODES)
def test_mode_with_an_external_fisher(setup, mode):
    """The external (EMA) Fisher is the undamped diagonal D the mode is applied to."""
    model, raw_a, raw_b = setup
    tokens_b, mask_b = task_b()
    ema = EMAFisher(beta=0.8)
    ema.update(per_sample_gradients(model, tokens_b, mask_b, QUIET))
    ema.update(per_sample_gradients(model, task_a(), config=QUIET))
    external = ema.estimate()
    for variant in ("signed", "unsigned"):
        result = run(model, fisher=external, variant=variant, normalization=mode, **DAMP)
        assert result.fisher is external
        expect = brute_force(model_spec(model), raw_a, raw_b, variant, normalization=mode, fisher=external.per_block)
        assert_scores_close(result.scores, expect)


@pytest.mark.parametrize("mode", MODES)
def test_pairwise_scores_takes_the_mode(setup, mode):
    model, raw_a, raw_b = setup
    tokens_b, mask_b = task_b()
    ga, gb = per_sample_gradients(model, task_a(), config=QUIET), per_sample_gradients(model, tokens_b, mask_b, QUIET)
    fisher = fisher_from_gradients(PerSampleGradients.cat([ga, gb]))
    for variant in ("signed", "symmetric"):
        got = pairwise_scores(ga, gb, fisher, variant, leave_one_out=True, normalization=mode, **DAMP)
        assert_scores_close(got, brute_force(model_spec(model), raw_a, raw_b, variant, "sum", "pooled", True,
                                             normalization=mode))


@pytest.mark.parametrize("mode", MODES)
def test_pooled_matrix_takes_the_mode(setup, mode):
    """The statistics' matrix: A ∪ B against itself under the pooled Fisher, leave-one-out on the left."""
    model, raw_a, raw_b = setup
    tokens_b, mask_b = task_b()
    config = InterferenceConfig(gradients=QUIET, variant="signed", leave_one_out=True, normalization=mode, **DAMP)
    pooled = pooled_scores(model, task_a(), tokens_b, attention_mask_b=mask_b, config=config)
    scores, settings = pooled.scores, pooled.settings
    both = {name: torch.cat([raw_a[name], raw_b[name]]) for name in raw_a}
    assert_scores_close(scores, brute_force(model_spec(model), both, both, "signed", "sum", "a", True,
                                            normalization=mode))
    assert settings["normalization"] == mode


# ----- streaming, spilling and small tiles equal brute force --------------------------------------------------

def run_at_smallest_budget(model, **config):
    """``run`` at the smallest budget (on a grid of 5% steps) the memory plan accepts (a smaller one is refused
    before any gradient is taken)."""
    budget = 1e-5
    while True:
        try:
            return run(model, gradients=GradientConfig(memory_budget_gb=budget, chunk_size=2, progress=False),
                       **config)
        except ValueError as error:
            if "is too small" not in str(error):
                raise
            budget *= 1.05


@pytest.mark.parametrize("mode", MODES)
def test_small_budget_spilled_and_tiled_equals_brute_force(setup, mode):
    """A budget so small that the factors spill, the Fisher needs its own pass, tiles hold 1-2 samples and every
    float64 step is one sample (the plan is checked, so this stays the case it claims to be)."""
    model, raw_a, raw_b = setup
    for variant, source, loo in (("symmetric", "pooled", True), ("signed", "a", True), ("unsigned", "b", False)):
        kwargs = dict(variant=variant, fisher_source=source, leave_one_out=loo, normalization=mode, **DAMP)
        result = run_at_smallest_budget(model, **kwargs)
        plan = result.settings["plan"]
        assert plan["spill"] and plan["fisher_pass"] and plan["layer_group"] == 1, plan
        assert max(plan["tile_left"], plan["tile_right"]) <= 2, plan
        assert_scores_close(result.scores, brute_force(model_spec(model), raw_a, raw_b, variant, "sum", source, loo,
                                                       normalization=mode))


# ----- properties ---------------------------------------------------------------------------------------------

def rows(values) -> PerSampleGradients:
    """Hand-made gradient rows of a 1-layer, 2-head model with 2 parameters per head (every block alike)."""
    spec = ModelSpec(1, 2, 2, 2, 1, 5, 4, False, False)
    return PerSampleGradients({b: torch.tensor(values, dtype=torch.float32)[:, None] for b in BLOCKS}, spec)


def test_head_mode_is_not_sensitive_to_a_zero_diagonal_entry():
    """Without damping, a parameter no Fisher sample moves has F = 0: the diagonal and hybrid normalisers are 0 there
    (NaN: missing), the head normaliser is the slice mean (finite: a Fisher-scaled dot product)."""
    ga = rows([[[3.0, 0.0], [1.0, 2.0]], [[1.0, 0.0], [2.0, 1.0]]])   # parameter 1 of head 0: 0 in every sample
    gb = rows([[[1.0, 5.0], [-1.0, 1.0]]])
    fisher = fisher_from_gradients(ga)
    undamped = dict(damping_abs=0.0, damping_rel=0.0)
    for mode in ("diagonal", "hybrid"):
        s = pairwise_scores(ga, gb, fisher, "signed", normalization=mode, **undamped)["Q"]
        assert bool(torch.isnan(s[..., 0]).all()) and bool(torch.isfinite(s[..., 1]).all()), mode
    s = pairwise_scores(ga, gb, fisher, "signed", normalization="head", **undamped)["Q"]
    f_bar = (9.0 + 1.0) / 2 / 2  # mean over samples of g², then over the slice
    torch.testing.assert_close(s[:, 0, 0, 0], torch.tensor([3.0 * 1.0, 1.0 * 1.0]) / f_bar)


def test_scale_law_in_every_mode(mha_model):
    """g -> s·g with λ_abs = 0: signed scores are invariant, unsigned ones scale by |s| (N scales as s²)."""
    tokens_b, mask_b = task_b()
    ga, gb = per_sample_gradients(mha_model, task_a(), config=QUIET), per_sample_gradients(mha_model, tokens_b,
                                                                                           mask_b, QUIET)
    for mode in MODES:
        for variant, factor in (("signed", 1.0), ("unsigned", 3.0)):
            def scores(a, b):
                return pairwise_scores(a, b, fisher_from_gradients(a), variant, damping_abs=0.0, damping_rel=0.05,
                                       normalization=mode, leave_one_out=True)

            base, scaled = scores(ga, gb), scores(ga.scaled(-3.0), gb.scaled(-3.0))
            for b in BLOCKS:
                torch.testing.assert_close(scaled[b], factor * base[b], rtol=1e-4,
                                           atol=1e-6 * float(base[b].abs().max()))


def test_head_mode_cosines_are_plain_cosines(mha_model):
    """Under the head mode (no leave-one-out) the per-head normaliser cancels from the Fisher-metric cosines: they
    are the plain cosines of the head's per-sample gradients (from the backward loop)."""
    tokens_a, (tokens_b, mask_b) = task_a(), task_b()
    config = InterferenceConfig(gradients=QUIET, variant="signed", normalization="head", **DAMP)
    scores = pooled_scores(mha_model, tokens_a, tokens_b, attention_mask_b=mask_b, config=config).scores
    cosines = fisher_cosines(scores, n_a=3)
    raw_a, raw_b = loop_reference(mha_model, tokens_a), loop_reference(mha_model, tokens_b, mask_b)
    spec = model_spec(mha_model)
    for block in BLOCKS:
        for layer in range(spec.n_layers):
            for head in range(spec.n_block_heads(block)):
                ga = hand_rows(spec, raw_a, block, layer, head).double()
                gb = hand_rows(spec, raw_b, block, layer, head).double()
                plain = torch.nn.functional.cosine_similarity(ga[:, None], gb[None], dim=-1)
                assert float(cosines.mean_cosine[block][layer, head]) == pytest.approx(float(plain.mean()), abs=1e-4)


def test_damped_applies_the_mode():
    fisher = fisher_from_gradients(rows([[[3.0, 1.0], [0.0, 2.0]]]))   # head 0: F = [9, 1]; head 1: [0, 4]
    lam = dict(damping_abs=1.0, damping_rel=0.0)
    torch.testing.assert_close(damped(fisher, **lam)["Q"][0], torch.tensor([[10.0, 2.0], [1.0, 5.0]]).double())
    torch.testing.assert_close(fisher.damped(normalization="head", **lam)["Q"][0],
                               torch.tensor([[6.0, 6.0], [3.0, 3.0]]).double())
    torch.testing.assert_close(damped(fisher, normalization="hybrid", **lam)["Q"][0],
                               torch.tensor([[60.0, 12.0], [3.0, 15.0]]).double().sqrt())
    with pytest.raises(ValueError, match="unknown normalization 'block'"):
        damped(fisher, normalization="block")


# ----- settings ------------------------------------------------------------------------------------------------

def test_bad_normalization_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown normalization 'structural'; expected one of \('diagonal', "
                                         r"'head', 'hybrid'\)"):
        InterferenceConfig(normalization="structural")
    ga = rows([[[1.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="unknown normalization"):
        pairwise_scores(ga, ga, fisher_from_gradients(ga), normalization="behavioral")


def test_the_mode_is_saved_and_loaded(mha_model, tmp_path):
    result = run(mha_model, normalization="hybrid")
    loaded = InterferenceResult.load(result.save(tmp_path / "result"))
    assert loaded.config.normalization == "hybrid" and loaded.settings["normalization"] == "hybrid"
    assert InterferenceConfig.from_dict({k: v for k, v in InterferenceConfig().to_dict().items()
                                         if k != "normalization"}).normalization == "diagonal"  # older files
