"""Tiny Hugging Face models of every architecture in the support table: the names the architecture tests use,
over the public builders of :mod:`tl_circuits.testing` (built locally from their config classes with wide random
weights, no hub; bridged by TransformerLens itself).

Every model: 2 layers, d_model 32, 4 query heads of d_head 8 (KV heads as the architecture groups them),
vocabulary 50, eager attention (so HF's own attention code is the reference). ``build(name, seed)`` returns a
fresh HF model; the same seed gives the same weights, so a test can bridge one copy and keep a pristine twin
as the reference."""

from __future__ import annotations

from tl_circuits.testing import (
    REPRESENTATIVE_ARCHITECTURES,
    TINY_ARCHITECTURES,
    TINY_D_HEAD,
    TINY_D_MODEL,
    TINY_D_VOCAB,
    TINY_N_CTX,
    TINY_N_HEADS,
    TinyArchitecture,
    tiny_hf_model,
    tiny_model,
    tiny_tokens,
)

D_VOCAB, N_CTX, D_MODEL, N_HEADS, D_HEAD = TINY_D_VOCAB, TINY_N_CTX, TINY_D_MODEL, TINY_N_HEADS, TINY_D_HEAD
Arch = TinyArchitecture
ARCHS: dict[str, TinyArchitecture] = TINY_ARCHITECTURES


def build(name: str, seed: int = 0):
    """A fresh HF model of architecture ``name``: eager attention, no dropout, wide weights, non-zero biases."""
    return tiny_hf_model(name, seed)


def bridge(name: str, seed: int = 0):
    """A TransformerBridge (built by TransformerLens, offline) around a fresh :func:`build` model."""
    return tiny_model(name, seed)


def tokens(batch: int = 3, pos: int = 8, seed: int = 0):
    return tiny_tokens(batch, pos, seed)


# One architecture per attention family and per special feature, for the default (fast) suite; every
# architecture runs under `pytest -m slow` (and in scripts/support_matrix.py).
# (LLaMA and GPT-2 bridges are also in tests/models/test_bridge.py's default tests.)
REPRESENTATIVES = REPRESENTATIVE_ARCHITECTURES


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
