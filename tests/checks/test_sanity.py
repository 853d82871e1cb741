"""tl_circuits.sanity_check: every check passes on every supported model kind, and each check fails — alone, with a
message naming the problem — when the thing it checks is broken on purpose (a wrong slice, a wrong GQA mapping, a
freeze leaking into a sibling, a KV head counted twice, a hook left behind)."""

from __future__ import annotations

import math

import pytest
import torch

from tests import builders
from tests.architectures import zoo
from tl_circuits import CheckOutcome, SanityCheckResult, sanity_check
from tl_circuits.checks import CHECKS
from tl_circuits.models import layout
from tl_circuits.models.spec import ModelSpec


def assert_only_failure(result: SanityCheckResult, name: str, *phrases: str) -> CheckOutcome:
    """``name`` failed (its message containing every phrase), every other check passed."""
    assert result.failed == [name], result.table()
    outcome = result[name]
    for phrase in phrases:
        assert phrase in outcome.message, outcome.message
    assert "FAIL" in result.table() and "FAILED (1 of 6" in result.summary()
    return outcome


def assert_all_pass(result: SanityCheckResult) -> None:
    assert result.passed, result.table()
    assert [c.name for c in result.checks] == list(CHECKS)
    for check in result.checks:
        assert check.tolerance == 0 or check.max_rel_error <= check.tolerance, check
        if check.tolerance == 0:  # bit-identity: nothing differs (model_unchanged lists, and measures nothing)
            assert check.max_abs_error == 0 or (check.name == "model_unchanged" and math.isnan(check.max_abs_error))


# ----- every check passes on what tl_circuits supports ------------------------------------------------------

def test_every_check_passes_on_the_models_under_test(model):
    """HookedTransformers on TL < 4, GPT-2 / LLaMA bridges on TL 4."""
    result = sanity_check(model)
    assert_all_pass(result)
    assert result.settings["n_samples"] == 4 and result.settings["n_positions"] == 8
    assert result["qkv_slicing"].max_rel_error < 1e-5  # float32 rounding, far from the tolerance
    assert "passed (all 6 checks)" in str(result)


@pytest.mark.parametrize("name", zoo.params(pytest))
def test_every_check_passes_on_every_architecture_of_the_zoo(name):
    result = sanity_check(zoo.bridge(name), zoo.tokens(4, 8, seed=3))
    assert_all_pass(result)
    assert result.architecture == name and result.model_kind == "TransformerBridge"
    assert f"g(h) = {[h // (zoo.N_HEADS // zoo.ARCHS[name].n_kv_heads) for h in range(zoo.N_HEADS)]}" in \
        result["gqa_mapping"].message


@pytest.mark.parametrize("rotary", [False, True])
def test_every_check_passes_on_a_native_bridge(rotary):
    """On TL 3.x a native bridge discards hook_pattern edits: the freeze check freezes OV only, and says so."""
    model = builders.native_bridge(rotary=rotary)
    result = sanity_check(model)
    assert_all_pass(result)
    expected = "OV only" if model_spec_of(model).qk_mask_source is None else "freezing BOTH"
    assert expected in result["freeze_isolation"].message


def model_spec_of(model) -> ModelSpec:
    from tl_circuits import model_spec

    return model_spec(model)


@pytest.mark.needs_hooked_transformer  # HookedTransformer-only configurations
@pytest.mark.parametrize("overrides", [dict(attn_only=True, d_mlp=None), dict(positional_embedding_type="shortformer"),
                                       dict(positional_embedding_type="alibi"), dict(n_key_value_heads=1),
                                       dict(positional_embedding_type="rotary", rotary_dim=4)])
def test_every_check_passes_on_hooked_transformer_variants(overrides):
    assert_all_pass(sanity_check(builders.hooked(seed=2, **overrides)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_half_precision_models_with_default_init_pass(architecture, dtype):
    """Hugging Face's own std-0.02 init (nearly uniform attention: key noise is scaled to the queries so that it
    still moves the patterns) in half precision (the dtype's tolerance)."""
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    torch.manual_seed(0)
    config = getattr(transformers, zoo.ARCHS[architecture].config_class)(vocab_size=zoo.D_VOCAB,
                                                                         **zoo.ARCHS[architecture].config)
    config._attn_implementation = "eager"
    hf = getattr(transformers, architecture)(config).to(dtype).eval()
    result = sanity_check(build_bridge_from_module(hf, architecture=architecture, hf_config=hf.config).eval())
    assert_all_pass(result)
    assert result["qkv_slicing"].tolerance == (5e-2 if dtype == torch.bfloat16 else 1e-2)
    assert result.settings["dtype"] == str(dtype)


def test_the_bundled_model_passes():
    from tl_circuits import load_bundled_model

    assert_all_pass(sanity_check(load_bundled_model("induction-2l")))


# ----- each check can fail, alone, with a message naming the problem -------------------------------------------

def _wrap_weight_to_heads(monkeypatch, change):
    original = layout.weight_to_heads

    def wrong(weight, block, weight_layout, heads):
        return change(original, weight, block, weight_layout, heads)

    monkeypatch.setattr(layout, "weight_to_heads", wrong)


def test_q_slices_of_the_wrong_heads_fail_qkv_slicing(model, monkeypatch):
    """Head h given head h−1's Q slice (any layout)."""
    _wrap_weight_to_heads(monkeypatch, lambda original, w, block, lay, heads: (
        original(w, block, lay, heads).roll(1, dims=-3) if block == "Q" else original(w, block, lay, heads)))
    outcome = assert_only_failure(sanity_check(model), "qkv_slicing", "Q head", "do not reproduce")
    assert outcome.max_rel_error > 0.1


@pytest.mark.parametrize("which", ["native", pytest.param("gqa", marks=pytest.mark.skipif(
    builders.HAS_HOOKED_TRANSFORMER, reason="a HookedTransformer's W_O is already per head")), "gpt2"])
def test_o_sliced_along_the_other_axis_fails_o_columns(which, monkeypatch):
    """An nn.Linear o_proj [D, H·d] sliced by rows (as GPT-2's Conv1D c_proj is), and a Conv1D c_proj sliced by
    columns (as an o_proj is): the per-head O slices no longer give the attention output."""
    if which == "gpt2" and builders.HAS_HOOKED_TRANSFORMER:
        model = builders.gpt2_bridge()
    else:
        model = {"native": builders.native_bridge, "gqa": builders.gqa_under_test,
                 "gpt2": builders.mha_under_test}[which]()
    other = {"linear": "conv1d", "conv1d": "linear"}
    _wrap_weight_to_heads(monkeypatch, lambda original, w, block, lay, heads: original(
        w, block, other.get(lay, lay) if block == "O" else lay, heads))
    outcome = assert_only_failure(sanity_check(model), "o_columns", "does not equal the attention output",
                                  "wrong axis")
    assert outcome.max_rel_error > 0.1


@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_a_wrong_gqa_mapping_fails_gqa_mapping(which, monkeypatch):
    """Query head h mapped to KV head G−1−g(h): key noise moves other heads' patterns than the mapping says, and
    z_h is no longer pattern_h · v_g(h)."""
    model = builders.under_test(which)
    monkeypatch.setattr(ModelSpec, "kv_head", lambda self, head: self.n_kv_heads - 1 - head // self.group_size)
    outcome = assert_only_failure(sanity_check(model), "gqa_mapping", "is not the model's",
                                  "noise on KV head 0's keys changed the patterns of query heads", "z_h != pattern_h")
    assert outcome.max_rel_error > 0.1


def test_a_freeze_leaking_into_a_sibling_fails_freeze_isolation(gqa_model, monkeypatch):
    """The freeze hooks of a head also nudge the next head's z (in layer 0 its GQA sibling)."""
    import tl_circuits.checks.heads as heads_module

    original = heads_module.freeze_hooks

    def leaky(model, heads, *args, **kwargs):
        out = []
        for name, fn in original(model, heads, *args, **kwargs):
            if name.endswith("hook_z"):
                layer = int(name.split(".")[1])
                sibling = (heads[layer][0] + 1) % model_spec_of(model).n_heads

                def fn(z, hook, fn=fn, sibling=sibling):
                    z = fn(z, hook).clone()
                    z[:, :, sibling] += 1e-3
                    return z
            out.append((name, fn))
        return out

    monkeypatch.setattr(heads_module, "freeze_hooks", leaky)
    outcome = assert_only_failure(sanity_check(gqa_model), "freeze_isolation", "changed other heads",
                                  "layer 0 head 1's z", "layer 1 head 2's z")
    assert outcome.max_abs_error == pytest.approx(1e-3, rel=1e-2)


def test_a_freeze_that_does_nothing_fails_freeze_isolation(mha_model, monkeypatch):
    import tl_circuits.checks.heads as heads_module

    monkeypatch.setattr(heads_module, "freeze_hooks", lambda *args, **kwargs: [])
    assert_only_failure(sanity_check(mha_model), "freeze_isolation", "left the frozen head's z as it was")


def test_overlapping_kv_slices_fail_head_additivity(model, monkeypatch):
    """The gradient engine gives KV head 0 the K rows of KV head 1: one slice counted twice, one missed. (Scaling a
    head's rows would not do: a signed score is invariant to it, the Fisher scaling along.)"""
    import tl_circuits.models.spec as spec_module

    original = spec_module.write_rows_from_factors

    def doubled(block, inputs, out_grads, out, *args, **kwargs):
        original(block, inputs, out_grads, out, *args, **kwargs)
        if block == "K":
            out[:, 0] = out[:, 1]

    monkeypatch.setattr(spec_module, "write_rows_from_factors", doubled)
    outcome = assert_only_failure(sanity_check(model), "head_additivity", " K ", "miss or repeat parameters")
    assert outcome.max_rel_error > 1e-2


def test_a_hook_left_behind_fails_model_unchanged(monkeypatch):
    """The capture leaves one of its torch hooks on the model."""
    import tl_circuits.checks.capture as capture_module

    model, leaked = builders.mha_under_test(), []
    original = capture_module.register_factor_hooks

    def leaking(*args, **kwargs):
        handles = original(*args, **kwargs)
        leaked.append(handles[0])
        return handles[1:]

    monkeypatch.setattr(capture_module, "register_factor_hooks", leaking)
    try:
        outcome = assert_only_failure(sanity_check(model), "model_unchanged", "the checks changed the model",
                                      "hook added")
    finally:
        for handle in leaked:
            handle.remove()
    assert math.isnan(outcome.max_abs_error)  # it lists differences, and measures none


def test_a_check_that_raises_is_a_failed_check_and_the_others_run(mha_model, monkeypatch):
    import tl_circuits.checks.additivity as additivity_module

    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(additivity_module, "compute_interference", broken)
    outcome = assert_only_failure(sanity_check(mha_model), "head_additivity",
                                  "the check raised RuntimeError: engine exploded")
    assert math.isnan(outcome.max_rel_error)


# ----- refusals, arguments, and what a call leaves behind ---------------------------------------------------

def test_a_refused_bridge_gets_the_refusal_reason_not_a_failed_check():
    model = zoo.refused_bridge(pytest)
    result = sanity_check(model)
    assert result.checks == () and result.failed == [] and not result.passed
    assert "CodeGenForCausalLM" in result.refusal and "families" in result.refusal
    assert result.table().startswith("sanity_check(TransformerBridge, TransformerBridge): REFUSED: tl_circuits does")


@pytest.mark.needs_hooked_transformer  # a HookedTransformer-only configuration (use_attn_in)
def test_a_refused_hooked_transformer_gets_the_refusal_reason():
    result = sanity_check(builders.hooked(use_attn_in=True))
    assert result.checks == () and not result.passed
    assert "per-head attention inputs" in result.refusal


def test_bad_arguments_are_errors_naming_the_problem(mha_model):
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        sanity_check(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2 samples and 2 positions"):
        sanity_check(mha_model, builders.random_tokens(batch=1, pos=6))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sanity_check(mha_model, builders.random_tokens(batch=2, pos=6) + 10_000)
    with pytest.raises(TypeError, match="integer token ids"):
        sanity_check(mha_model, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="n_samples=1"):
        sanity_check(mha_model, n_samples=1)


def test_the_users_own_hooks_stay(model):
    """A hook the user added (permanent, so that TransformerLens's own resets keep it) is still there, alone."""
    calls = []
    model.add_hook("blocks.0.attn.hook_z", lambda z, hook: calls.append(1), is_permanent=True)
    hook_point = model.hook_dict["blocks.0.attn.hook_z"]
    try:
        result = sanity_check(model)
        assert result.passed, result.table()
        assert len(hook_point.fwd_hooks) == 1 and calls  # it ran during the checks, and is still registered
    finally:
        model.reset_hooks(including_permanent=True)


def test_seeded_and_leaves_the_global_random_state_alone(mha_model):
    state = torch.random.get_rng_state()
    first, second = sanity_check(mha_model, seed=5), sanity_check(mha_model, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [c.max_abs_error for c in first.checks] == [c.max_abs_error for c in second.checks]
    assert first.settings["seed"] == 5


def test_result_fields_and_lookup(mha_model):
    result = sanity_check(mha_model)
    outcome = result["o_columns"]
    assert (outcome.name, outcome.passed, outcome.tolerance) == ("o_columns", True, 1e-4)
    with pytest.raises(KeyError, match="no check named 'nope'"):
        result["nope"]
    assert repr(result) == str(result) == result.table()
    assert len(result.table().splitlines()) == 2 + len(CHECKS)
