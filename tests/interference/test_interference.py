"""The QK-OV interference metric (tl_circuits.interference.engine) against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from tests import builders
from tests.interference.tasks import task_a, task_b
from tests.reference import (
    DAMP,
    assert_scores_close,
    brute_force,
    gpt2_rows,
    hf_loop,
    llama_rows,
    loop_reference,
    quiet_config,
    scores_from_rows,
)
from tl_circuits.interference.fisher import EMAFisher, fisher_from_gradients
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference
from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.interference.gradients import per_sample_gradients
from tl_circuits.interference.result import Conflict
from tl_circuits.interference.scoring import pairwise_scores
from tl_circuits.models.spec import BLOCKS, model_spec


QUIET = dict(progress=False)


def Config(**kwargs) -> InterferenceConfig:
    """These tests were written for the unsigned variant (the default until the signed one became it); no progress
    bars, the gradient settings nested (:func:`tests.reference.quiet_config`)."""
    kwargs.setdefault("variant", "unsigned")
    return quiet_config(**kwargs)

# ----- tasks (tests/interference/tasks.py) and the brute-force reference --------------------------------

def run(model, config, **kwargs):
    tokens_b, mask_b = task_b()
    return compute_interference(model, task_a(), tokens_b, attention_mask_b=mask_b, config=config, **kwargs)


# ----- batched == brute force ----------------------------------------------------------------------------

CONFIGS = [
    ("unsigned", "sum", "a", False),
    ("unsigned", "mean", "b", False),
    ("unsigned", "sum", "pooled", True),
    ("unsigned", "sum", "a", True),
    ("signed", "sum", "a", True),
    ("signed", "mean", "pooled", False),
    ("symmetric", "sum", "pooled", False),
    ("symmetric", "mean", "pooled", True),
]


@pytest.mark.parametrize("normalization", ["diagonal", "head", "hybrid"])  # docs/spec.md §3.4
@pytest.mark.parametrize("variant,reduction,source,loo", CONFIGS)
def test_batched_equals_brute_force(setup, variant, reduction, source, loo, normalization):
    model, raw_a, raw_b = setup
    cfg = Config(variant=variant, reduction=reduction, fisher_source=source, leave_one_out=loo,
                 normalization=normalization, **DAMP, **QUIET)
    result = run(model, cfg)
    expect = brute_force(model_spec(model), raw_a, raw_b, variant, reduction, source, loo, normalization=normalization)
    assert_scores_close(result.scores, expect)
    assert result.config.fisher_source == source and result.config.variant == variant
    assert result.config.normalization == result.settings["normalization"] == normalization
    if normalization != "diagonal":  # the modes really differ (else this test could not tell them apart)
        diagonal = brute_force(model_spec(model), raw_a, raw_b, variant, reduction, source, loo)
        assert not torch.allclose(expect["Q"], diagonal["Q"], rtol=1e-2)
    for s in result.scores.values():
        assert s.dtype == torch.float32 and not bool(torch.isnan(s).any())


def test_pairwise_scores_stage_with_tiny_tiles_equals_brute_force(setup, monkeypatch):
    """The engine's score pass on gradient rows, forced to one pair and one layer per contraction by its plan."""
    import dataclasses

    from tl_circuits.interference import memory

    real_plan = memory.plan_run
    monkeypatch.setattr(memory, "plan_run", lambda *args, **kwargs: dataclasses.replace(
        real_plan(*args, **kwargs), layer_group=1, tile_left=1, tile_right=1))
    model, raw_a, raw_b = setup
    tokens_b, mask_b = task_b()
    ga = per_sample_gradients(model, task_a(), config=GradientConfig(**QUIET))
    gb = per_sample_gradients(model, tokens_b, mask_b, GradientConfig(**QUIET))
    fisher = fisher_from_gradients(PerSampleGradients.cat([ga, gb]))
    for variant in ("unsigned", "signed", "symmetric"):
        got = pairwise_scores(ga, gb, fisher, variant, "sum", leave_one_out=True, **DAMP)
        assert_scores_close(got, brute_force(model_spec(model), raw_a, raw_b, variant, "sum", "pooled", True))


def test_pairwise_scores_and_the_engine_are_one_scoring_path(setup):
    """The same gradients and the same Fisher give the same scores through pairwise_scores and
    compute_interference, leave-one-out included (the Fisher's squares and the removed C_i are both exact
    float64 squares: one precision rule, docs/spec.md §3.1)."""
    model, _, _ = setup
    tokens_b, mask_b = task_b()
    ga = per_sample_gradients(model, task_a(), config=GradientConfig(**QUIET))
    gb = per_sample_gradients(model, tokens_b, mask_b, GradientConfig(**QUIET))
    for variant, source, loo in (("signed", "a", True), ("unsigned", "b", False), ("symmetric", "pooled", True)):
        members = {"a": ga, "b": gb, "pooled": PerSampleGradients.cat([ga, gb])}[source]
        expect = pairwise_scores(ga, gb, fisher_from_gradients(members), variant, leave_one_out=loo, **DAMP)
        got = run(model, Config(variant=variant, fisher_source=source, leave_one_out=loo, **DAMP, **QUIET))
        for b in BLOCKS:
            torch.testing.assert_close(got.fisher.per_block[b], fisher_from_gradients(members).per_block[b],
                                       rtol=1e-12, atol=0)
            scale = float(expect[b].abs().max())
            torch.testing.assert_close(got.scores[b], expect[b], rtol=1e-6, atol=1e-7 * scale)


# ----- streaming --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [3, 2])
@pytest.mark.parametrize("variant,source,loo", [("unsigned", "a", False), ("signed", "b", False),
                                                ("unsigned", "pooled", True), ("symmetric", "pooled", True)])
def test_streaming_equals_holding(mha_model, cap, variant, source, loo):
    tokens_a = builders.random_tokens(5, 9, seed=21)
    tokens_b = builders.random_tokens(3, 9, seed=22)
    common = dict(variant=variant, fisher_source=source, leave_one_out=loo, chunk_size=2, **DAMP, **QUIET)
    held = compute_interference(mha_model, tokens_a, tokens_b, config=Config(**common))
    streamed = compute_interference(mha_model, tokens_a, tokens_b,
                                    config=Config(max_held_samples=cap, **common))
    plan, held_plan = streamed.settings["plan"], held.settings["plan"]
    # every sample's gradient is computed once, held or spilled: nothing is recomputed because of the budget
    assert not held_plan["spill"] and not held_plan["fisher_pass"] and held_plan["n_gradient_evaluations"] == 8
    assert plan["spill"] and plan["n_gradient_evaluations"] == 8
    for block in BLOCKS:
        scale = float(held.scores[block].abs().max())
        torch.testing.assert_close(streamed.scores[block], held.scores[block], rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(streamed.fisher.per_block[block], held.fisher.per_block[block], rtol=1e-6, atol=0)


@pytest.mark.parametrize("cap", [None, 2])
def test_chunked_contractions_equal_brute_force(setup, monkeypatch, cap):
    """Force one layer per contraction, one or two samples per operand chunk and per materialisation."""
    import dataclasses

    from tl_circuits.interference import memory

    real_plan = memory.plan_run

    def small_plan(*args, **kwargs):
        return dataclasses.replace(real_plan(*args, **kwargs), layer_group=1, tile_left=2, tile_right=1)

    monkeypatch.setattr(memory, "plan_run", small_plan)
    monkeypatch.setattr(memory, "SCRATCH_SHARE", 1e-12)  # one sample per materialisation
    model, raw_a, raw_b = setup
    for variant, source, loo in (("unsigned", "pooled", True), ("symmetric", "pooled", False), ("signed", "b", False)):
        cfg = Config(variant=variant, fisher_source=source, leave_one_out=loo, max_held_samples=cap,
                                 **DAMP, **QUIET)
        result = run(model, cfg)
        assert result.settings["plan"]["layer_group"] == 1
        assert_scores_close(result.scores, brute_force(model_spec(model), raw_a, raw_b, variant, "sum", source, loo))


def test_budget_too_small_is_a_clear_error(mha_model):
    with pytest.raises(ValueError, match=r"memory_budget_gb=1e-06 is too small .* at least"):
        run(mha_model, Config(memory_budget_gb=1e-6, **QUIET))


# ----- sanity properties (SPEC §3) --------------------------------------------------------------------------

def test_head_additivity(setup):
    """Σ over heads equals the score on the whole, unsliced layer tensor (K/V: the G-head `_W_K`/`_W_V`,
    so a shared KV head is counted once)."""
    model, raw_a, raw_b = setup
    spec = model_spec(model)
    lam = 1e-3
    result = run(model, Config(damping_abs=lam, damping_rel=0.0, **QUIET))
    for block in BLOCKS:
        for layer in range(spec.n_layers):
            name = spec.param_name(layer, block)
            wa, wb = raw_a[name].double().flatten(1), raw_b[name].double().flatten(1)  # whole layer tensor
            fisher = (wa**2).mean(0) + lam
            whole = (wa[:, None, :] ** 2 / fisher * wb[None].abs()).sum(-1)  # [N_A, N_B]
            per_head_sum = result.scores[block][:, :, layer].double().sum(-1)
            torch.testing.assert_close(per_head_sum, whole, rtol=1e-4, atol=0)


def test_scale_law(mha_model):
    """g -> s·g: unsigned and symmetric scores scale by |s|, signed ones are invariant (λ_abs = 0)."""
    tokens_b, mask_b = task_b()
    ga = per_sample_gradients(mha_model, task_a(), config=GradientConfig(**QUIET))
    gb = per_sample_gradients(mha_model, tokens_b, mask_b, GradientConfig(**QUIET))
    for s in (-3.0, 0.25):
        for variant, factor in (("unsigned", abs(s)), ("symmetric", abs(s)), ("signed", 1.0)):
            def scores(a, b):
                f = fisher_from_gradients(PerSampleGradients.cat([a, b]) if variant == "symmetric" else a)
                return pairwise_scores(a, b, f, variant, damping_abs=0.0, damping_rel=0.05)

            base, scaled = scores(ga, gb), scores(ga.scaled(s), gb.scaled(s))
            for block in BLOCKS:
                torch.testing.assert_close(scaled[block], factor * base[block], rtol=1e-4,
                                           atol=1e-6 * float(base[block].abs().max()))
    # an absolute ridge breaks the law (the law is a property of relative damping)
    f_small = fisher_from_gradients(ga.scaled(1e-3))
    broken = pairwise_scores(ga.scaled(1e-3), gb.scaled(1e-3), f_small, "unsigned", damping_abs=1.0, damping_rel=0.0)
    ref = pairwise_scores(ga, gb, fisher_from_gradients(ga), "unsigned", damping_abs=1.0, damping_rel=0.0)
    assert not torch.allclose(broken["Q"], 1e-3 * ref["Q"], rtol=1e-2)


# ----- layout against HF's own parameter gradients ----------------------------------------------------------

@pytest.mark.needs_hooked_transformer  # HF models converted to HookedTransformers by TL's weight conversion
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_layout_against_hf_parameter_gradients(which, hf_gpt2, hf_llama):
    hf, model = hf_gpt2 if which == "gpt2" else hf_llama
    spec = model_spec(model)
    biases = which == "gpt2"
    tokens_a, tokens_b = builders.random_tokens(3, 10, seed=31), builders.random_tokens(2, 10, seed=32)
    if which == "gpt2":
        make = lambda raw: gpt2_rows(raw, spec.n_layers, spec.n_heads, spec.d_head)  # noqa: E731
    else:
        make = lambda raw: llama_rows(raw, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head)  # noqa: E731
    rows_a, rows_b = make(hf_loop(hf, tokens_a)), make(hf_loop(hf, tokens_b))
    # the per-sample gradients themselves
    ours = per_sample_gradients(model, tokens_a, config=GradientConfig(include_biases=biases, **QUIET))
    for b in BLOCKS:
        assert ours.per_block[b].shape == rows_a[b].shape, b
        torch.testing.assert_close(ours.per_block[b], rows_a[b], rtol=1e-3, atol=1e-5, msg=lambda m: f"{b}: {m}")
    # and the scores
    result = compute_interference(model, tokens_a, tokens_b,
                                  config=Config(include_biases=biases, **DAMP, **QUIET))
    assert_scores_close(result.scores, scores_from_rows(rows_a, rows_b, **DAMP), rtol=1e-3)


# ----- a planted case ---------------------------------------------------------------------------------------

def planted_model(gqa: bool):
    """Attention-only model where only `alive` query heads write (W_O ≠ 0) and only their KV heads read
    values (W_V ≠ 0); every other head gets exactly zero gradient from any task."""
    model = builders.hooked(seed=3, biases=False, attn_only=True, d_mlp=None,
                            **(dict(n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
                               if gqa else {}))
    spec = model_spec(model)
    alive = {0: [3], 1: [0]}  # layer -> query heads
    with torch.no_grad():
        for layer, heads in alive.items():
            attn = model.blocks[layer].attn
            for h in range(spec.n_heads):
                if h not in heads:
                    attn.W_O[h] = 0.0
            w_v = attn._W_V if gqa else attn.W_V
            for g in range(spec.n_kv_heads):
                if g not in {spec.kv_head(h) for h in heads}:
                    w_v[g] = 0.0
    return model, alive


@pytest.mark.needs_hooked_transformer  # the planted model is an attention-only HookedTransformer
@pytest.mark.parametrize("gqa", [False, True])
def test_planted_heads(gqa):
    """Task B (2-token sequences: one key per query, so softmax has no Q/K gradient) reaches only the
    planted heads' V/O; task A reaches their Q/K/V/O. Interference is > 0 exactly there, 0 elsewhere."""
    model, alive = planted_model(gqa)
    spec = model_spec(model)
    tokens_a = builders.random_tokens(4, 10, seed=41)
    tokens_b = builders.random_tokens(3, 2, seed=42)
    result = compute_interference(model, tokens_a, tokens_b, config=Config(**QUIET))
    expected = {b: torch.zeros(spec.n_layers, spec.n_block_heads(b), dtype=torch.bool) for b in BLOCKS}
    for layer, heads in alive.items():
        for h in heads:
            g = spec.kv_head(h)
            expected["V"][layer, g] = True
            expected["O"][layer, h] = True
            if gqa:  # a sibling of an alive head reads the same non-zero values: its z, so W_O's gradient, is non-zero
                for sibling in range(spec.n_heads):
                    if spec.kv_head(sibling) == g:
                        expected["O"][layer, sibling] = True
    for block in BLOCKS:
        s = result.scores[block]
        assert not bool(torch.isnan(s).any())
        hit = expected[block][None, None].expand_as(s)
        assert bool((s[hit] > 0).all()), block
        assert bool((s[~hit] == 0).all()), block  # exactly zero: Q/K everywhere, V/O off the planted heads
    assert result.most_conflicted_block in ("V", "O")
    top = result.top_conflicts(5)
    assert all(expected[c.block][c.layer, c.head] for c in top)


# ----- the result object -----------------------------------------------------------------------------------

def test_result_object(mha_model):
    tokens_b, mask_b = task_b()
    ids_a, ids_b = ["a0", "a1", "a2"], [100, 200]
    result = compute_interference(mha_model, task_a(), tokens_b, attention_mask_b=mask_b, ids_a=ids_a, ids_b=ids_b,
                                  config=Config(**QUIET))
    # layer x head means
    for b in BLOCKS:
        torch.testing.assert_close(result.layer_head_mean(b), result.scores[b].mean((0, 1)))
        assert torch.equal(result.mean[b], result.layer_head_mean(b))
    # top conflicts: the k largest cells over all blocks, with the caller's ids
    cells = [(float(s[i, j, l, h]), ids_a[i], ids_b[j], b, l, h) for b, s in result.scores.items()
             for i in range(3) for j in range(2) for l in range(2) for h in range(s.shape[3])]
    cells.sort(reverse=True)
    top = result.top_conflicts(4)
    assert [(c.id_a, c.id_b, c.block, c.layer, c.head) for c in top] == [c[1:] for c in cells[:4]]
    assert [c.score for c in top] == pytest.approx([c[0] for c in cells[:4]])
    assert isinstance(top[0], Conflict)
    # most conflicted block: the largest mean
    means = {b: float(s.mean()) for b, s in result.scores.items()}
    assert result.most_conflicted_block == max(means, key=means.get)
    # data frame
    df = result.to_dataframe()
    assert len(df) == sum(s.numel() for s in result.scores.values())
    row = df[(df.id_a == "a2") & (df.id_b == 200) & (df.block == "K") & (df.layer == 1) & (df["head"] == 3)]
    assert float(row.score.iloc[0]) == pytest.approx(float(result.scores["K"][2, 1, 1, 3]))
    assert set(df.head_kind[df.block == "V"]) == {"kv"}
    # pair lookup by id; unknown ids are errors, not zeros
    torch.testing.assert_close(result.pair("a1", 100)["O"], result.scores["O"][1, 0])
    with pytest.raises(KeyError, match="unknown pair"):
        result.pair("nope", 100)
    # settings
    assert result.settings["fisher_n_samples"] == 3 and result.settings["n_a"] == 3
    assert result.config.fisher_source == "a" and result.config.damping_rel == 1e-3
    # plot
    fig = result.plot()
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == list("QKVO")
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_signed_conventions(mha_model):
    """Signed: negative = conflict, so top conflicts are the most negative cells."""
    tokens_b, mask_b = task_b()
    result = compute_interference(mha_model, task_a(), tokens_b, attention_mask_b=mask_b,
                                  config=Config(variant="signed", **QUIET))
    lowest = min(float(s.min()) for s in result.scores.values())
    assert lowest < 0
    assert result.top_conflicts(1)[0].score == pytest.approx(lowest)
    means = {b: float(s.mean()) for b, s in result.scores.items()}
    assert result.most_conflicted_block == min(means, key=means.get)


@pytest.mark.needs_hooked_transformer  # the planted model is an attention-only HookedTransformer
def test_missing_data_is_nan_not_zero():
    """With no damping floor, a head with zero Fisher has no normaliser: its scores are NaN, not 0."""
    model, _ = planted_model(gqa=False)
    tokens_a = builders.random_tokens(3, 10, seed=51)
    result = compute_interference(model, tokens_a, builders.random_tokens(2, 10, seed=52),
                                  config=Config(damping_abs=0.0, damping_rel=0.0, **QUIET))
    s = result.scores["Q"]
    assert bool(torch.isnan(s[:, :, 0, 0]).all())  # dead head: F = 0
    assert bool(torch.isfinite(s[:, :, 0, 3]).all()) and float(s[:, :, 0, 3].min()) > 0  # the planted head
    mean = result.layer_head_mean("Q")
    assert math.isnan(float(mean[0, 0])) and math.isfinite(float(mean[0, 3]))
    assert all(math.isfinite(c.score) for c in result.top_conflicts(1000))
    df = result.to_dataframe()
    assert df.score.isna().sum() == sum(int(torch.isnan(t).sum()) for t in result.scores.values()) > 0
    assert math.isfinite(result.block_means()["Q"])


# ----- dtypes ------------------------------------------------------------------------------------------------

def test_bf16_model_is_scored_in_high_precision():
    """Scores of a bf16 model equal a float64 computation on its own per-sample gradients (no bf16 accumulation)."""
    model = builders.gqa_under_test().to(torch.bfloat16)
    tokens_a, tokens_b = task_a(), builders.random_tokens(2, 8, seed=12)
    result = compute_interference(model, tokens_a, tokens_b, config=Config(**DAMP, **QUIET))
    grads_a = per_sample_gradients(model, tokens_a, config=GradientConfig(**QUIET))
    grads_b = per_sample_gradients(model, tokens_b, config=GradientConfig(**QUIET))
    assert fisher_from_gradients(grads_a).per_block["Q"].dtype == torch.float64
    expect = scores_from_rows(grads_a.per_block, grads_b.per_block, **DAMP)
    for b in BLOCKS:
        assert result.scores[b].dtype == torch.float32
    assert_scores_close(result.scores, expect, rtol=1e-5)


# ----- an external Fisher --------------------------------------------------------------------------------------

def test_external_fisher(mha_model):
    tokens_b, mask_b = task_b()
    ga = per_sample_gradients(mha_model, task_a(), config=GradientConfig(**QUIET))
    gb = per_sample_gradients(mha_model, tokens_b, mask_b, GradientConfig(**QUIET))
    ema = EMAFisher(beta=0.9)
    ema.update(gb)
    ema.update(ga)
    result = run(mha_model, Config(**QUIET), fisher=ema.estimate())
    assert result.config.fisher_source == "external" and result.settings["plan"]["n_gradient_evaluations"] == 5
    expect = pairwise_scores(ga, gb, ema.estimate(), "unsigned")
    for b in BLOCKS:
        torch.testing.assert_close(result.scores[b], expect[b], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="leave_one_out"):
        run(mha_model, Config(leave_one_out=True, **QUIET), fisher=ema.estimate())


# ----- bad input ---------------------------------------------------------------------------------------------

def test_bad_tasks(mha_model):
    cfg = Config(**QUIET)
    good = builders.random_tokens(2, 8)
    with pytest.raises(ValueError, match="tokens_a is empty"):
        compute_interference(mha_model, torch.zeros(0, 8, dtype=torch.long), good, config=cfg)
    with pytest.raises(ValueError, match="tokens_b is empty"):
        compute_interference(mha_model, good, torch.zeros(2, 0, dtype=torch.long), config=cfg)
    with pytest.raises(ValueError, match=r"tokens_b has ids in \[.*\] outside the vocabulary"):
        compute_interference(mha_model, good, good + builders.D_VOCAB, config=cfg)
    with pytest.raises(ValueError, match=r"tokens_a has 17 positions but the model's n_ctx is 16"):
        compute_interference(mha_model, builders.random_tokens(2, builders.N_CTX + 1), good, config=cfg)
    with pytest.raises(ValueError, match="attention mask of tokens_a"):
        compute_interference(mha_model, good, good, attention_mask_a=torch.ones(2, 3, dtype=torch.long), config=cfg)
    with pytest.raises(ValueError, match="ids_b has 3 ids for 2 samples"):
        compute_interference(mha_model, good, good, ids_b=[1, 2, 3], config=cfg)
    with pytest.raises(ValueError, match="ids_a has duplicate ids"):
        compute_interference(mha_model, good, good, ids_a=["x", "x"], config=cfg)


def test_non_finite_gradients_name_the_samples():
    model = builders.gqa_under_test()  # untied embeddings: a NaN row of W_E reaches only samples holding token 7
    with torch.no_grad():
        builders.embedding_weight(model)[7] = float("nan")
    tokens_a = torch.randint(8, builders.D_VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    tokens_b = torch.randint(8, builders.D_VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    tokens_b[0, 3] = 7
    tokens_b[2, 1] = 7
    with pytest.raises(ValueError, match=r"samples \[0, 2\] of tokens_b are not finite"):
        compute_interference(model, tokens_a, tokens_b, config=Config(chunk_size=1, **QUIET))
    ga = per_sample_gradients(model, tokens_a, config=GradientConfig(**QUIET))
    bad = ga.scaled(1.0)
    bad.per_block["V"][1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"grads_b has NaN/inf gradients in block V for samples \[1\]"):
        pairwise_scores(ga, bad, fisher_from_gradients(ga))


@pytest.mark.parametrize("kwargs,message", [
    (dict(variant="cosine"), "unknown variant"),
    (dict(reduction="max"), "unknown reduction"),
    (dict(fisher_source="c"), "unknown fisher_source"),
    (dict(variant="symmetric", fisher_source="a"), "pooled Fisher"),
    (dict(leave_one_out=True, fisher_source="b"), "needs fisher_source 'a' or 'pooled'"),
    (dict(damping_rel=-1.0), "non-negative"),
    (dict(max_held_samples=0), "max_held_samples"),
])
def test_bad_config(mha_model, kwargs, message):
    good = builders.random_tokens(2, 8)
    with pytest.raises(ValueError, match=message):
        compute_interference(mha_model, good, good, config=Config(**kwargs, **QUIET))


def test_mismatched_stages_are_errors(mha_model, gqa_model):
    tokens = builders.random_tokens(2, 8)
    ga = per_sample_gradients(mha_model, tokens, config=GradientConfig(**QUIET))
    gq = per_sample_gradients(gqa_model, tokens, config=GradientConfig(**QUIET))
    with pytest.raises(ValueError, match="do not match"):
        pairwise_scores(ga, gq, fisher_from_gradients(ga))
    with pytest.raises(ValueError, match="Fisher does not match"):
        pairwise_scores(ga, ga, fisher_from_gradients(gq))
    with pytest.raises(ValueError, match="grads_a is empty"):
        pairwise_scores(ga.select(slice(0, 0)), ga, fisher_from_gradients(ga))


def test_progress_bar_can_be_silenced(mha_model, capfd):
    good = builders.random_tokens(2, 8)
    compute_interference(mha_model, good, good, config=Config(progress=False))
    assert capfd.readouterr().err == ""
    compute_interference(mha_model, good, good, config=Config(progress=True))
    assert "interference" in capfd.readouterr().err


def test_whole_fisher_set_with_streamed_other_task(mha_model):
    """A (the Fisher set) and B spilled (cap 3 < 8 samples): each gradient computed once, scores as when held."""
    tokens_a, tokens_b = builders.random_tokens(3, 9, seed=23), builders.random_tokens(5, 9, seed=24)
    common = dict(leave_one_out=True, chunk_size=2, **DAMP, **QUIET)
    held = compute_interference(mha_model, tokens_a, tokens_b, config=Config(**common))
    streamed = compute_interference(mha_model, tokens_a, tokens_b, config=Config(max_held_samples=3,
                                                                                            **common))
    plan = streamed.settings["plan"]
    assert plan["spill"] and plan["n_gradient_evaluations"] == 8
    for block in BLOCKS:
        scale = float(held.scores[block].abs().max())
        torch.testing.assert_close(streamed.scores[block], held.scores[block], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.needs_hooked_transformer  # a shortformer HookedTransformer
def test_shortformer_model_equals_brute_force():
    """Unshared attention inputs (shortformer: positions on queries and keys only), factors held in chunks."""
    model = builders.hooked(positional_embedding_type="shortformer")
    tokens_b, mask_b = task_b()
    raw_a, raw_b = loop_reference(model, task_a()), loop_reference(model, tokens_b, mask_b)
    result = run(model, Config(chunk_size=2, max_held_samples=2, **DAMP, **QUIET))
    assert_scores_close(result.scores, brute_force(model_spec(model), raw_a, raw_b))
