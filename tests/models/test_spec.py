"""ModelSpec (tl_circuits.models.spec) on HookedTransformers, and the local fixtures."""

import pytest
import torch

from tests import builders
from tl_circuits.models.spec import BLOCKS, model_spec


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_spec_mha(mha_model):
    spec = model_spec(mha_model)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head) == (2, 4, 4, 8)
    assert not spec.grouped and not spec.rotary
    assert spec.param_name(1, "K") == "blocks.1.attn.W_K"
    assert spec.query_hook(0) == "blocks.0.attn.hook_q"


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_spec_gqa(gqa_model):
    spec = model_spec(gqa_model)
    assert (spec.n_heads, spec.n_kv_heads, spec.group_size) == (4, 2, 2)
    assert [spec.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert spec.param_name(0, "V") == "blocks.0.attn._W_V"
    assert spec.param_name(0, "Q", bias=True) == "blocks.0.attn.b_Q"
    assert spec.key_hook(1) == "blocks.1.attn.hook_rot_k"
    names = dict(gqa_model.named_parameters())
    for name in spec.attention_param_names(include_biases=True):
        assert name in names, name


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_per_head_matches_parameter_slices(which):
    model = builders.mha() if which == "mha" else builders.gqa()
    spec = model_spec(model)
    params = dict(model.named_parameters())
    for block in BLOCKS:
        rows = spec.per_head(params, block, include_biases=True)
        assert rows.shape == (spec.n_layers, spec.n_block_heads(block), spec.n_params_per_head(block, True))
        for layer in range(spec.n_layers):
            weight = params[spec.param_name(layer, block)]
            for head in range(spec.n_block_heads(block)):
                expect = [weight[head].reshape(-1)]
                if block != "O":
                    expect.append(params[spec.param_name(layer, block, bias=True)][head])
                torch.testing.assert_close(rows[layer, head], torch.cat(expect), rtol=0, atol=0)


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_gqa_repeated_weights_are_copies(gqa_model):
    attn = gqa_model.blocks[0].attn
    torch.testing.assert_close(attn.W_K[1], attn._W_K[0], rtol=0, atol=0)  # heads 0,1 read KV head 0
    torch.testing.assert_close(attn.W_K[2], attn._W_K[1], rtol=0, atol=0)


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_rejects_other_models():
    with pytest.raises(TypeError, match="HookedTransformer"):
        model_spec(torch.nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="ungroup_grouped_query_attention"):
        model_spec(builders.hooked(n_key_value_heads=2, ungroup_grouped_query_attention=True))
    # ALiBi is supported: the position bias is kept by QK freezes (docs/spec.md §1.4)
    assert model_spec(builders.hooked(positional_embedding_type="alibi")).position_bias


def test_bad_layer_head(mha_model):  # the model under test
    spec = model_spec(mha_model)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        spec.check_layer_head(2, 0)
    with pytest.raises(IndexError, match="head -1 out of range"):
        spec.check_layer_head(0, -1)
    with pytest.raises(ValueError, match="unknown block"):
        spec.param_name(0, "X")


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_fixtures_cover_the_configs(attn_only_model, nobias_model):
    assert attn_only_model.cfg.attn_only
    assert all(float(p.abs().sum()) == 0 for n, p in nobias_model.named_parameters() if ".b_" in n)


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_hf_gpt2_logits_match(hf_gpt2):
    hf, model = hf_gpt2
    tokens = builders.random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_hf_llama_logits_match(hf_llama):
    hf, model = hf_llama
    assert model_spec(model).grouped
    tokens = builders.random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


# ----- the size/kind questions callers outside models/ ask instead of model.cfg ----------------------------

@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_spec_answers_what_callers_read_off_cfg(mha_model, gqa_model, attn_only_model):
    for model in (mha_model, gqa_model, attn_only_model):
        spec, cfg = model_spec(model), model.cfg
        assert spec.d_mlp == cfg.d_mlp and spec.attn_only == bool(cfg.attn_only)
        assert spec.shared_qkv_input and not spec.use_attn_result
        assert spec.dtype == cfg.dtype == torch.float32
    assert model_spec(attn_only_model).attn_only and not model_spec(mha_model).attn_only


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_shortformer_inputs_are_not_shared_and_flags_are_read():
    assert not model_spec(builders.hooked(positional_embedding_type="shortformer")).shared_qkv_input
    assert model_spec(builders.hooked(use_attn_result=True)).use_attn_result


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_dtype_is_the_parameters_dtype():
    model = builders.hooked(dtype=torch.float64)
    assert model_spec(model).dtype == torch.float64 == model.blocks[0].attn.W_Q.dtype


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_head_kind_factor_shapes_and_parameter_count(gqa_model):
    spec = model_spec(gqa_model)
    assert [spec.head_kind(b) for b in BLOCKS] == ["query", "kv", "kv", "query"]
    H, G, D, d = spec.n_heads, spec.n_kv_heads, spec.d_model, spec.d_head
    assert spec.factor_shapes("Q") == ((D,), (H, d))
    assert spec.factor_shapes("K") == ((D,), (G, d))
    assert spec.factor_shapes("O") == ((H, d), (D,))
    params = dict(gqa_model.named_parameters())
    for include_biases in (False, True):
        by_hand = sum(params[name].numel() for name in spec.attention_param_names(include_biases))
        assert spec.n_attention_params(include_biases) == by_hand


@pytest.mark.needs_hooked_transformer  # ModelSpec read off a HookedTransformer (its parameter names, hooks, config)
def test_params_from_per_head_round_trips_hooked_parameters(model):
    spec = model_spec(model)
    params = dict(model.named_parameters())
    for block in BLOCKS:
        for include_biases in (False, True):
            back = spec.params_from_per_head(spec.per_head(params, block, include_biases), block, include_biases)
            expected = [spec.param_name(l, block) for l in range(spec.n_layers)]
            if include_biases and block != "O":
                expected += [spec.param_name(l, block, bias=True) for l in range(spec.n_layers)]
            assert sorted(back) == sorted(expected)
            for name, tensor in back.items():
                torch.testing.assert_close(tensor, params[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows must be"):
        spec.params_from_per_head(torch.zeros(spec.n_layers + 1, spec.n_heads, 4), "Q")


def test_bridge_spec_answers_the_same_questions():
    for model in (builders.gpt2_bridge(0), builders.llama_bridge(0), builders.native_bridge(0)):
        spec, cfg = model_spec(model), model.cfg
        assert spec.d_mlp == cfg.d_mlp and spec.attn_only == bool(cfg.attn_only)
        assert spec.shared_qkv_input and not spec.use_attn_result
        assert spec.dtype == next(model.parameters()).dtype == torch.float32
        assert spec.weight_layout("Q") in ("linear", "conv1d")
