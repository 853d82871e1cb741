"""Tiny Hugging Face models of every architecture in the support table, built locally from their config
classes with wide random weights (no hub), and bridged by TransformerLens itself.

Every model: 2 layers, d_model 32, 4 query heads of d_head 8 (KV heads as the architecture groups them),
vocabulary 50, eager attention (so HF's own attention code is the reference). ``build(name, seed)`` returns a
fresh HF model; the same seed gives the same weights, so a test can bridge one copy and keep a pristine twin
as the reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tests import builders

D_VOCAB, N_CTX, D_MODEL, N_HEADS, D_HEAD = 50, 16, 32, 4, 8
_SPLIT = dict(hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=2, num_attention_heads=N_HEADS,
              max_position_embeddings=N_CTX)


@dataclass(frozen=True)
class Arch:
    """One architecture of the table: its HF classes, config, and how its attention is laid out."""

    name: str  # the HF *ForCausalLM class, which is also TransformerLens's architecture name
    config_class: str
    config: dict = field(hash=False)
    n_kv_heads: int = N_HEADS
    fused: str = ""  # how the HF model fuses q/k/v ("" = split q/k/v/o), for the hand-sliced references
    notes: str = ""


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("LlamaForCausalLM", "LlamaConfig", dict(**_SPLIT, num_key_value_heads=2), 2, notes="GQA, rotary"),
    Arch("MistralForCausalLM", "MistralConfig", dict(**_SPLIT, num_key_value_heads=2, sliding_window=4), 2,
         notes="GQA, sliding window 4"),
    Arch("MixtralForCausalLM", "MixtralConfig", dict(**_SPLIT, num_key_value_heads=2, num_local_experts=4,
                                                      num_experts_per_tok=2), 2, notes="GQA, MoE MLP"),
    Arch("Qwen2ForCausalLM", "Qwen2Config", dict(**_SPLIT, num_key_value_heads=2), 2, notes="q/k/v biases"),
    Arch("Qwen3ForCausalLM", "Qwen3Config", dict(**_SPLIT, num_key_value_heads=2, head_dim=D_HEAD), 2,
         notes="per-head q/k RMSNorm"),
    Arch("Gemma2ForCausalLM", "Gemma2Config", dict(**_SPLIT, num_key_value_heads=2, head_dim=D_HEAD, sliding_window=4,
                                                    query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                                    final_logit_softcapping=10.0), 2,
         notes="soft-capping, query_pre_attn_scalar, sliding window"),
    Arch("Gemma3ForCausalLM", "Gemma3TextConfig", dict(**_SPLIT, num_key_value_heads=2, head_dim=D_HEAD,
                                                        sliding_window=4, query_pre_attn_scalar=16), 2,
         notes="q/k norm, query_pre_attn_scalar, sliding window"),
    Arch("Phi3ForCausalLM", "Phi3Config", dict(**_SPLIT, num_key_value_heads=2, pad_token_id=0), 2, "phi3",
         notes="fused qkv_proj [Q|K|V]"),
    Arch("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(**_SPLIT, rotary_pct=0.5), N_HEADS, "neox",
         notes="per-head interleaved query_key_value, partial rotary, parallel residual"),
    Arch("GPTJForCausalLM", "GPTJConfig", dict(n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, n_positions=N_CTX,
                                               rotary_dim=4), N_HEADS, notes="interleaved partial rotary, parallel"),
    Arch("FalconForCausalLM", "FalconConfig", dict(hidden_size=D_MODEL, num_hidden_layers=2,
                                                   num_attention_heads=N_HEADS, multi_query=True,
                                                   new_decoder_architecture=False, alibi=False, bias=True),
         1, "falcon_mqa",
         notes="fused multi-query query_key_value, rotary, parallel"),
    Arch("BloomForCausalLM", "BloomConfig", dict(hidden_size=D_MODEL, n_layer=2, n_head=N_HEADS), N_HEADS, "neox",
         notes="per-head interleaved query_key_value, ALiBi"),
    Arch("OPTForCausalLM", "OPTConfig", dict(hidden_size=D_MODEL, ffn_dim=64, num_hidden_layers=2,
                                             num_attention_heads=N_HEADS, max_position_embeddings=N_CTX,
                                             word_embed_proj_dim=D_MODEL), N_HEADS, notes="learned positions"),
    Arch("Olmo2ForCausalLM", "Olmo2Config", dict(**_SPLIT, num_key_value_heads=2), 2,
         notes="q/k RMSNorm over the whole projection"),
    Arch("StableLmForCausalLM", "StableLmConfig", dict(**_SPLIT, num_key_value_heads=2, partial_rotary_factor=0.5,
                                                       use_qkv_bias=True), 2, notes="partial rotary, q/k/v biases"),
    Arch("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(n_embd=D_MODEL, n_layer=2, n_head=N_HEADS,
                                                           n_positions=N_CTX, multi_query=True), 1, "bigcode",
         notes="fused multi-query c_attn [Q|K|V]"),
    Arch("GPT2LMHeadModel", "GPT2Config", dict(n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, n_positions=N_CTX),
         N_HEADS, "gpt2", notes="fused Conv1D c_attn, Conv1D c_proj"),
]}


def build(name: str, seed: int = 0):
    """A fresh HF model of architecture ``name``: eager attention, no dropout, wide weights, non-zero biases."""
    import transformers

    arch = ARCHS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, arch.config_class)(vocab_size=D_VOCAB, **arch.config)
    for dropout in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                    "attention_dropout", "dropout", "activation_dropout"):
        if hasattr(config, dropout):
            setattr(config, dropout, 0.0)
    config._attn_implementation = "eager"
    hf = getattr(transformers, name)(config).eval()
    builders.widen(hf, seed + 1)
    return hf


def bridge(name: str, seed: int = 0):
    """A TransformerBridge (built by TransformerLens, offline) around a fresh :func:`build` model."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf = build(name, seed)
    return build_bridge_from_module(hf, architecture=name, hf_config=hf.config).eval()


def tokens(batch: int = 3, pos: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


# One architecture per attention family and per special feature, for the default (fast) suite; every
# architecture runs under `pytest -m slow` (and in scripts/support_matrix.py).
# (LLaMA and GPT-2 bridges are also in tests/models/test_bridge.py's default tests.)
REPRESENTATIVES = ("Gemma2ForCausalLM", "GPTNeoXForCausalLM", "FalconForCausalLM", "BloomForCausalLM",
                   "GPTJForCausalLM")


def params(pytest):
    """Every architecture as pytest params: the representatives in the default suite, the rest marked slow."""
    return [name if name in REPRESENTATIVES else pytest.param(name, marks=pytest.mark.slow) for name in ARCHS]


def refused_bridge(pytest):
    """A TransformerBridge tl_circuits refuses: CodeGen's, whose attention bridge is in none of the families of
    docs/spec.md §0.1 (its scores have not been checked). Skips the test where TransformerLens cannot bridge it."""
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    config = transformers.CodeGenConfig(vocab_size=D_VOCAB, n_embd=D_MODEL, n_layer=2, n_head=N_HEADS,
                                        n_positions=N_CTX, rotary_dim=4)
    config._attn_implementation = "eager"
    hf = transformers.CodeGenForCausalLM(config).eval()
    try:
        return build_bridge_from_module(hf, architecture="CodeGenForCausalLM", hf_config=hf.config)
    except Exception as error:  # noqa: BLE001 - a TransformerLens without this adapter
        pytest.skip(f"TransformerLens cannot bridge CodeGen here: {error}")
