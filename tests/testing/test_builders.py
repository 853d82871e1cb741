"""tl_circuits.testing's builders: every tiny architecture against Hugging Face's own forward (the reference),
deterministic in the seed, its feature tags against the built models, its local folder loaded back, and the
HookedTransformer kind (TransformerLens < 4) against HF."""

from __future__ import annotations

import re

import pytest
import torch

from tl_circuits import model_spec
from tl_circuits.testing import (
    TINY_ARCHITECTURES,
    architecture_names,
    has_hooked_transformer,
    select_architectures,
    tiny_hf_dir,
    tiny_hf_model,
    tiny_model,
    tiny_tokens,
    unsupported_reason,
)

QKV_BIAS = re.compile(r"\.0\.[^.]*(attn|attention)[^.]*\.(q_proj|query_key_value|c_attn|qkv_proj)\.bias$")
POSITION_EMBEDDINGS = re.compile(r"(wpe|embed_positions)\.weight$")


def test_the_tiny_model_is_the_hf_model_bridged(tlc_tiny_model, tlc_architecture, tlc_seed):
    """Every architecture (through the plugin's fixtures): the bridge's logits are HF's own on the same weights."""
    hf = tiny_hf_model(tlc_architecture, tlc_seed)
    tokens = tiny_tokens(2, 8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(tlc_tiny_model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    assert not tlc_tiny_model.training


@pytest.mark.tlc_architectures("GPT2LMHeadModel", "GPTNeoXForCausalLM", "Gemma2ForCausalLM")
def test_same_seed_same_weights_other_seed_other_weights_and_the_global_rng_untouched(tlc_architecture):
    rng = torch.get_rng_state()
    a, b, c = (tiny_hf_model(tlc_architecture, seed).state_dict() for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    matrices = [k for k in a if a[k].ndim == 2]
    assert matrices and not any(torch.equal(a[k], c[k]) for k in matrices)


def test_feature_tags_match_the_models(tlc_architecture):
    """The tags the plugin selects by are facts of the built models: KV heads (tl_circuits' spec), ALiBi (the
    spec's position bias), q/k/v biases and learned positions (HF's parameter names), soft-capping and sliding
    windows (HF's config)."""
    arch = TINY_ARCHITECTURES[tlc_architecture]
    hf = tiny_hf_model(tlc_architecture)
    spec = model_spec(tiny_model(tlc_architecture))
    names = [name for name, _ in hf.named_parameters()]
    assert spec.n_kv_heads == arch.n_kv_heads
    assert ("gqa" in arch.features) == (spec.n_kv_heads < spec.n_heads)
    assert ("mqa" in arch.features) == (spec.n_kv_heads == 1)
    assert ("alibi" in arch.features) == spec.position_bias
    assert ("qkv_bias" in arch.features) == any(QKV_BIAS.search(n) for n in names), names
    assert ("learned_positions" in arch.features) == any(POSITION_EMBEDDINGS.search(n) for n in names)
    assert ("softcap" in arch.features) == (getattr(hf.config, "attn_logit_softcapping", None) is not None)
    sliding = getattr(hf.config, "sliding_window", None) is not None and getattr(hf.config, "use_sliding_window", True)
    assert ("sliding_window" in arch.features) == sliding


@pytest.mark.tlc_architectures("GPT2LMHeadModel", "LlamaForCausalLM")
def test_the_local_folder_loads_back_offline(tlc_tiny_hf_dir, tlc_tiny_model, tlc_architecture):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    tokens = tiny_tokens(2, 8, seed=6)
    with torch.no_grad():
        expected = tlc_tiny_model(tokens)
        loaded = AutoModelForCausalLM.from_pretrained(tlc_tiny_hf_dir).eval()
        torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-4, rtol=1e-4)
        booted = TransformerBridge.boot_transformers(str(tlc_tiny_hf_dir))
        torch.testing.assert_close(booted(tokens), expected, atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tlc_tiny_hf_dir)
    assert tokenizer("3 1 49")["input_ids"] == [0, 3, 1, 49]
    assert type(loaded).__name__ == tlc_architecture


@pytest.mark.needs_hooked_transformer  # the HookedTransformer kind exists on TransformerLens < 4 only
@pytest.mark.parametrize("name", [n for n, a in TINY_ARCHITECTURES.items() if a.hooked])
def test_the_hooked_kind_is_the_hf_model_converted_by_transformer_lens(name):
    model = tiny_model(name, seed=2, kind="hooked")
    hf = tiny_hf_model(name, seed=2)
    tokens = tiny_tokens(2, 8, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    assert type(model).__name__ == "HookedTransformer" and not model.training
    assert model_spec(model).n_kv_heads == TINY_ARCHITECTURES[name].n_kv_heads


def test_what_cannot_be_built_says_why():
    if has_hooked_transformer():
        assert "Gemma2ForCausalLM" in unsupported_reason("Gemma2ForCausalLM", "hooked")
        assert "OLMo-2" not in (unsupported_reason("Olmo2ForCausalLM", "hooked") or "OLMo-2")
    else:
        assert "removed it" in unsupported_reason("GPT2LMHeadModel", "hooked")
        with pytest.raises(NotImplementedError, match="removed it"):
            tiny_model("GPT2LMHeadModel", kind="hooked")
    assert unsupported_reason("GPT2LMHeadModel") is None
    with pytest.raises(ValueError, match="unknown tiny architecture 'Gpt2'.*GPT2LMHeadModel"):
        tiny_model("Gpt2")
    with pytest.raises(ValueError, match="kind must be"):
        tiny_model("GPT2LMHeadModel", kind="native")


def test_layers_can_be_asked_for():
    assert model_spec(tiny_model("GPT2LMHeadModel", n_layers=3)).n_layers == 3
    assert model_spec(tiny_model("BloomForCausalLM", n_layers=1)).n_layers == 1


def test_architecture_selection():
    assert architecture_names(("alibi",)) == ["BloomForCausalLM"]
    assert set(architecture_names(("softcap",))) == {"Gemma2ForCausalLM"}
    assert select_architectures("representative") == [n for n in TINY_ARCHITECTURES
                                                       if n in select_architectures("representative")]
    assert len(select_architectures("all")) == len(TINY_ARCHITECTURES) == 17
    assert select_architectures("all", names=["OPTForCausalLM"]) == ["OPTForCausalLM"]
    assert select_architectures("representative", features=["gqa"]) == ["Gemma2ForCausalLM", "FalconForCausalLM"]
    with pytest.raises(ValueError, match="unknown features"):
        architecture_names(("flash",))
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        select_architectures("GPT2,LlamaForCausalLM")


def test_the_folder_is_made_and_returned(tmp_path):
    folder = tiny_hf_dir("OPTForCausalLM", tmp_path / "a" / "b", seed=1)
    assert folder == tmp_path / "a" / "b"
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
