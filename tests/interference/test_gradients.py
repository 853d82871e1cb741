"""Per-sample gradients (tl_circuits.interference.gradients) against a plain per-sample loss.backward() loop."""

from __future__ import annotations


import pytest
import torch

from tests import builders
from tests.reference import assert_rows_match, hand_rows, loop_reference
from tl_circuits.interference import memory
from tl_circuits.interference.config import GradientConfig
from tl_circuits.interference.factors import GradientFactors, PerSampleGradients
from tl_circuits.interference.gradients import (
    engine_bytes,
    gradient_chunks,
    iter_per_sample_gradients,
    per_sample_gradients,
)
from tl_circuits.interference.memory import gradient_bytes_per_sample
from tl_circuits.models.spec import BLOCKS, model_spec



def engine_bytes_per_sample(model, n_pos, method="factored"):
    """One sample's chunk workspace, without its result (the memory module's rule, on this model)."""
    spec = model_spec(model)
    return engine_bytes(model, spec, n_pos, False, method) - memory.result_bytes_per_sample(spec, n_pos, method=method)


def result_bytes_per_sample(model, n_pos, method="factored"):
    return memory.result_bytes_per_sample(model_spec(model), n_pos, method=method)


def factor_bytes_per_sample(model, n_pos):
    return memory.factor_bytes_per_sample(model_spec(model), n_pos)

QUIET = dict(progress=False)


def padded_tokens():
    tokens = builders.random_tokens(5, 10, seed=3)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    mask[4, :1] = 0
    return tokens, mask


# ----- equality with the loop --------------------------------------------------------------------------

@pytest.mark.parametrize("method", builders.METHODS)
@pytest.mark.parametrize("include_biases", [False, True])
def test_matches_backward_loop(model, include_biases, method):
    """Both engines, MHA and GQA (fixture `model`), padding on both sides, several vmap chunks."""
    if include_biases and not builders.is_hooked(model) and model_spec(model).grouped:
        pytest.skip("the LLaMA bridge has no bias parameters for the backward loop to differentiate")
    tokens, mask = padded_tokens()
    grads = per_sample_gradients(model, tokens, mask,
                                 GradientConfig(include_biases, chunk_size=2, method=method, **QUIET))
    spec = model_spec(model)
    assert grads.n_samples == 5 and grads.include_biases == include_biases
    for block in BLOCKS:
        g = grads.per_block[block]
        assert g.dtype == torch.float32
        assert g.shape == (5, spec.n_layers, spec.n_block_heads(block), spec.n_params_per_head(block, include_biases))
    assert_rows_match(grads, loop_reference(model, tokens, mask, include_biases))
    assert grads.n_targets.tolist() == [9, 6, 5, 9, 8]


def test_gqa_kv_rows_are_the_underscore_parameters(gqa_model):
    """Under GQA K/V rows are per KV head: the gradient of `_W_K`, not of the repeated `W_K`."""
    tokens = builders.random_tokens(2, 8)
    grads = per_sample_gradients(gqa_model, tokens, config=GradientConfig(**QUIET))
    assert grads.per_block["K"].shape[2] == 2 and grads.per_block["Q"].shape[2] == 4
    raw = loop_reference(gqa_model, tokens)
    # HookedTransformer: raw["blocks.1.attn._W_V"][:, 1]; a bridge: KV head 1's rows of v_proj
    torch.testing.assert_close(grads.per_block["V"][:, 1, 1], hand_rows(model_spec(gqa_model), raw, "V", 1, 1),
                               atol=2e-6, rtol=1e-4)


def test_left_padding_equals_unpadded(mha_model):
    """A left-padded sample has the gradient of the same sample without padding (positions are offset)."""
    tokens = builders.random_tokens(1, 8, seed=5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(tokens)], dim=1)
    g_plain = per_sample_gradients(mha_model, tokens, config=GradientConfig(**QUIET))
    g_pad = per_sample_gradients(mha_model, padded, mask, GradientConfig(**QUIET))
    for block in BLOCKS:
        torch.testing.assert_close(g_pad.per_block[block], g_plain.per_block[block], atol=2e-6, rtol=1e-4)
    # and without the mask the pad tokens are read, so the gradient differs
    g_unmasked = per_sample_gradients(mha_model, padded, config=GradientConfig(**QUIET))
    assert not torch.allclose(g_unmasked.per_block["Q"], g_plain.per_block["Q"], atol=1e-4)


@pytest.mark.parametrize("method", builders.METHODS)
def test_forward_hooks_take_part(mha_model, method):
    """Forward hooks on the model (e.g. a freeze) are part of the differentiated forward pass: here head 1's
    z is zeroed in layer 0 and head 2's queries in layer 1 (their W_O / W_Q get no gradient)."""
    def zero_head(head, in_place):
        def hook(x, hook):
            if not in_place:  # a new tensor: what is read before and after this hook differs
                x = x.clone()
            x[:, :, head] = 0.0
            return x
        return hook

    tokens = builders.random_tokens(3, 8)
    hooks = [("blocks.0.attn.hook_z", zero_head(1, in_place=False)), ("blocks.1.attn.hook_q", zero_head(2, True))]
    with mha_model.hooks(fwd_hooks=hooks):
        grads = per_sample_gradients(mha_model, tokens, config=GradientConfig(method=method, **QUIET))
        raw = loop_reference(mha_model, tokens)
    assert_rows_match(grads, raw)
    assert float(grads.per_block["O"][:, 0, 1].abs().max()) == 0.0
    assert float(grads.per_block["Q"][:, 1, 2].abs().max()) == 0.0
    assert float(grads.per_block["O"][:, 0, 0].abs().max()) > 0.0
    assert float(grads.per_block["Q"][:, 1, 1].abs().max()) > 0.0


# ----- the model is left as it was --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_unchanged(mode):
    model = builders.gqa_under_test()
    model.train(mode == "train")
    builders.attention_param(model, 0, "Q").requires_grad_(False)  # a flag the caller chose
    next(p for n, p in model.named_parameters() if "mlp" in n).requires_grad_(False)
    hook = lambda x, hook: x  # noqa: E731
    model.hook_dict["blocks.1.attn.hook_z"].add_hook(hook)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    n_hooks = {n: len(h.fwd_hooks) + len(h.bwd_hooks) for n, h in model.hook_dict.items()}
    per_sample_gradients(model, builders.random_tokens(3, 8), config=GradientConfig(include_biases=True, **QUIET))
    assert model.training == (mode == "train")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n], n
        assert p.grad is None, n
    assert {n: len(h.fwd_hooks) + len(h.bwd_hooks) for n, h in model.hook_dict.items()} == n_hooks
    model.reset_hooks(including_permanent=True)


def test_frozen_parameter_still_gets_its_gradient():
    """requires_grad=False on W_Q (the caller's flag) does not stop its per-sample gradient."""
    model = builders.mha_under_test()
    builders.attention_param(model, 0, "Q").requires_grad_(False)
    grads = per_sample_gradients(model, builders.random_tokens(2, 8), config=GradientConfig(**QUIET))
    assert float(grads.per_block["Q"][:, 0].abs().max()) > 0


# ----- memory -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", builders.METHODS)
def test_chunks_follow_the_budget(mha_model, method):
    tokens = builders.random_tokens(7, 10)
    per_sample = engine_bytes_per_sample(mha_model, 10, method=method) + result_bytes_per_sample(mha_model, 10,
                                                                                               method=method)
    budget_gb = 3.5 * per_sample / 2**30
    assert memory.chunk_size_for_budget(per_sample, budget_gb * 2**30) == 3
    cfg = GradientConfig(memory_budget_gb=budget_gb, method=method, **QUIET)
    assert [sl.stop - sl.start for sl, _ in iter_per_sample_gradients(mha_model, tokens, config=cfg)] == [3, 3, 1]
    # chunking does not change the result
    whole = per_sample_gradients(mha_model, tokens, config=GradientConfig(chunk_size=7, method=method, **QUIET))
    one = per_sample_gradients(mha_model, tokens, config=GradientConfig(chunk_size=1, method=method, **QUIET))
    for block in BLOCKS:
        torch.testing.assert_close(whole.per_block[block], one.per_block[block], atol=1e-6, rtol=1e-5)


@pytest.mark.needs_hooked_transformer  # a GPT-2-small-shaped HookedTransformer on the meta device
def test_factors_are_much_smaller_than_rows():
    """What lets compute_interference hold whole tasks: ~8x less than the rows for GPT-2 small at 64 positions."""
    model = gpt2_small_on_meta()
    rows = gradient_bytes_per_sample(model_spec(model))
    assert rows == 4 * 12 * 4 * 768 * 768
    assert factor_bytes_per_sample(model, 64) == 4 * 12 * 64 * (2 * 768 + 4 * 12 * 64)
    assert rows / factor_bytes_per_sample(model, 64) > 7


def test_factors_give_the_rows(gqa_model):
    tokens = builders.random_tokens(3, 8)
    (_, factors, bad), = list(gradient_chunks(gqa_model, tokens, torch.ones_like(tokens), GradientConfig(**QUIET), "t",
                                      factors=True))
    assert not bad and isinstance(factors, GradientFactors)
    assert factors.inputs["K"] is factors.inputs["Q"]  # one shared attention input per layer
    spec, raw = model_spec(gqa_model), loop_reference(gqa_model, tokens)
    direct = {block: torch.stack([torch.stack([hand_rows(spec, raw, block, layer, head)
                                               for head in range(spec.n_block_heads(block))], 1)
                                  for layer in range(spec.n_layers)], 1) for block in BLOCKS}  # [N, L, H, P]
    for block in BLOCKS:
        torch.testing.assert_close(factors.rows(block), direct[block], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(factors.rows(block, slice(1, 2)), direct[block][:, 1:2],
                                   atol=2e-6, rtol=1e-4)


@pytest.mark.needs_hooked_transformer  # use_attn_result is a HookedTransformerConfig flag
def test_use_attn_result_works_with_the_factored_engine():
    model = builders.hooked(use_attn_result=True)
    tokens = builders.random_tokens(2, 8)
    grads = per_sample_gradients(model, tokens, config=GradientConfig(**QUIET))
    assert_rows_match(grads, loop_reference(model, tokens))


def test_result_over_budget_is_a_clear_error(mha_model):
    tokens = builders.random_tokens(50, 10)
    with pytest.raises(ValueError, match=r"50 per-sample gradients need .* over memory_budget_gb"):
        per_sample_gradients(mha_model, tokens, config=GradientConfig(memory_budget_gb=1e-4, **QUIET))


def gpt2_small_on_meta():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=64,
                                  d_vocab=1000, act_fn="gelu", normalization_type="LN", device="meta")
    return HookedTransformer(cfg, move_to_device=False)


@pytest.mark.needs_hooked_transformer  # a GPT-2-small-shaped HookedTransformer on the meta device
def test_engine_estimate_matches_the_gpt2_small_calibration():
    """Measured peak RSS per sample of a vmap chunk, GPT-2-small shape, 64 positions: ~0.2 GB factored,
    ~0.3 GB direct (+ its 0.11 GB float32 result)."""
    model = gpt2_small_on_meta()
    assert 0.18 * 2**30 < engine_bytes_per_sample(model, 64) < 0.3 * 2**30
    assert 0.3 * 2**30 < engine_bytes_per_sample(model, 64, method="direct") < 0.6 * 2**30


# ----- dtypes -----------------------------------------------------------------------------------------

def test_bf16_model_gives_float32_gradients():
    model = builders.mha_under_test().to(torch.bfloat16)
    tokens = builders.random_tokens(3, 8)
    grads = per_sample_gradients(model, tokens, config=GradientConfig(**QUIET))
    raw, spec = loop_reference(model, tokens), model_spec(model)
    for block in BLOCKS:
        g = grads.per_block[block]
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    for layer in range(2):
        ref = torch.stack([hand_rows(spec, raw, "Q", layer, h) for h in range(spec.n_heads)], 1).float()
        got = grads.per_block["Q"][:, layer]
        assert float((got - ref).norm() / ref.norm()) < 0.05  # bf16 rounding, not a layout error


# ----- bad input ---------------------------------------------------------------------------------------

def test_bad_tokens(mha_model):
    cfg = GradientConfig(**QUIET)
    with pytest.raises(ValueError, match="empty"):
        per_sample_gradients(mha_model, torch.zeros(0, 8, dtype=torch.long), config=cfg)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        per_sample_gradients(mha_model, torch.full((2, 8), builders.D_VOCAB), config=cfg)
    with pytest.raises(ValueError, match="n_ctx"):
        per_sample_gradients(mha_model, builders.random_tokens(2, builders.N_CTX + 1), config=cfg)
    with pytest.raises(ValueError, match="at least 2 positions"):
        per_sample_gradients(mha_model, builders.random_tokens(2, 1), config=cfg)
    with pytest.raises(TypeError, match="integer token ids"):
        per_sample_gradients(mha_model, torch.zeros(2, 8), config=cfg)


def test_bad_masks(mha_model):
    tokens = builders.random_tokens(3, 8)
    cfg = GradientConfig(**QUIET)
    with pytest.raises(ValueError, match="shape"):
        per_sample_gradients(mha_model, tokens, torch.ones(3, 7, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="only 0 and 1"):
        per_sample_gradients(mha_model, tokens, 2 * torch.ones_like(tokens), cfg)
    mask = torch.ones_like(tokens)
    mask[1, 1:] = 0
    mask[2] = 0
    with pytest.raises(ValueError, match=r"samples \[1, 2\] .* no valid target"):
        per_sample_gradients(mha_model, tokens, mask, cfg)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gradients_name_the_samples(value):
    model = builders.gqa_under_test()  # untied embeddings: a NaN row of W_E reaches only samples holding token 7
    with torch.no_grad():
        builders.embedding_weight(model)[7] = value  # only samples containing token 7 are affected
    tokens = torch.randint(8, builders.D_VOCAB, (5, 6), generator=torch.Generator().manual_seed(0))
    tokens[1, 2] = 7
    tokens[3, 0] = 7
    with pytest.raises(ValueError, match=r"samples \[1, 3\] of tokens are not finite"):
        per_sample_gradients(model, tokens, config=GradientConfig(chunk_size=2, **QUIET))


def test_backward_hooks_are_refused(mha_model):
    mha_model.blocks[0].attn.hook_q.add_hook(lambda g, hook: None, dir="bwd")
    try:
        with pytest.raises(ValueError, match="backward hook"):
            per_sample_gradients(mha_model, builders.random_tokens(2, 8), config=GradientConfig(**QUIET))
    finally:
        mha_model.reset_hooks()


def test_progress_bar_can_be_silenced(mha_model, capfd):
    tokens = builders.random_tokens(2, 8)
    per_sample_gradients(mha_model, tokens, config=GradientConfig(progress=False))
    assert capfd.readouterr().err == ""
    per_sample_gradients(mha_model, tokens, config=GradientConfig(progress=True))
    assert "per-sample gradients" in capfd.readouterr().err


def test_select_and_cat_round_trip(mha_model):
    grads = per_sample_gradients(mha_model, builders.random_tokens(4, 8), config=GradientConfig(**QUIET))
    again = PerSampleGradients.cat([grads.select(slice(0, 1)), grads.select([1, 2]), grads.select(3)])
    for block in BLOCKS:
        assert torch.equal(again.per_block[block], grads.per_block[block])
    assert torch.equal(again.losses, grads.losses)


@pytest.mark.needs_hooked_transformer  # a shortformer HookedTransformer
def test_shortformer_inputs_are_not_shared():
    """Shortformer adds positions to queries and keys only: K and V read different inputs."""
    model = builders.hooked(positional_embedding_type="shortformer")
    tokens = builders.random_tokens(3, 8)
    (_, factors, _), = list(gradient_chunks(model, tokens, torch.ones_like(tokens), GradientConfig(**QUIET), "t",
                                    factors=True))
    assert factors.inputs["K"] is factors.inputs["Q"] and factors.inputs["V"] is not factors.inputs["Q"]
    assert_rows_match(per_sample_gradients(model, tokens, config=GradientConfig(chunk_size=2, **QUIET)),
                      loop_reference(model, tokens))
