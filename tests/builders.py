"""Locally built models for the tests (no hub): HookedTransformerConfig models with random weights,
and HF GPT-2 / LLaMA models built from their config classes and converted into HookedTransformers
with TransformerLens's own weight-conversion functions (no weight processing)."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

D_VOCAB = 50
N_CTX = 16


def _randomise_biases(model: HookedTransformer, seed: int) -> None:
    """TransformerLens initialises biases to zero; give them values so bias paths are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1].lstrip("_").startswith("b_"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def hooked(seed: int = 0, biases: bool = True, **overrides) -> HookedTransformer:
    """A small random HookedTransformer; ``overrides`` go into HookedTransformerConfig."""
    cfg = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=N_CTX, d_vocab=D_VOCAB,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=seed,
        device="cpu",
    )
    cfg.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    if biases:
        _randomise_biases(model, seed + 1)
    model.eval()
    return model


def mha(seed: int = 0, biases: bool = True) -> HookedTransformer:
    """MHA, LayerNorm, learned positions, GELU MLP."""
    return hooked(seed, biases)


def gqa(seed: int = 0, biases: bool = False) -> HookedTransformer:
    """GQA (4 query heads over 2 KV heads), rotary, RMSNorm, gated SiLU MLP (LLaMA-like)."""
    return hooked(
        seed, biases, n_key_value_heads=2, positional_embedding_type="rotary",
        normalization_type="RMS", act_fn="silu", gated_mlp=True, final_rms=True,
        rotary_dim=8, rotary_adjacent_pairs=False,
    )


def attn_only(seed: int = 0, biases: bool = True) -> HookedTransformer:
    """Attention-only, LayerNorm, learned positions."""
    return hooked(seed, biases, attn_only=True, d_mlp=None)


def _spread_weights(hf, std: float = 0.3) -> None:
    """HF initialises matrices with std 0.02, which leaves attention almost uniform and heads almost
    inert; wider weights make every head matter, so equivalence tests can tell heads apart."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim == 2:
                param.normal_(0, std)


# ----- HF models converted by TransformerLens's own functions -----------------------------------

def hf_gpt2(seed: int = 0):
    """(HF GPT2LMHeadModel with random weights, the same model as a HookedTransformer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(vocab_size=D_VOCAB, n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_cfg._attn_implementation = "eager"
    hf = GPT2LMHeadModel(hf_cfg).eval()
    _spread_weights(hf)
    with torch.no_grad():  # HF initialises biases to zero too; make the fused QKV bias layout matter
        for block in hf.transformer.h:
            block.attn.c_attn.bias.normal_(0, 0.1)
            block.attn.c_proj.bias.normal_(0, 0.1)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, n_ctx=N_CTX, d_vocab=D_VOCAB,
        act_fn="gelu_new", normalization_type="LN", eps=hf_cfg.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel", device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )
    return hf, model.eval()


def hf_llama(seed: int = 0):
    """(HF LlamaForCausalLM with GQA and random weights, the same model as a HookedTransformer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(vocab_size=D_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).eval()
    _spread_weights(hf)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=N_CTX, d_vocab=D_VOCAB,
        act_fn="silu", normalization_type="RMS", eps=1e-6, n_key_value_heads=2,
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=8,
        rotary_base=10000, final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM",
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )
    return hf, model.eval()


def random_tokens(batch: int = 3, pos: int = 12, seed: int = 0, d_vocab: int = D_VOCAB) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))
