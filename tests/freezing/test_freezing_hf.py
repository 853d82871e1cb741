"""Fused-QKV (GPT-2) and split-QKV (LLaMA, GQA) equivalence: a freeze through tl_circuits on the
converted HookedTransformer gives the same logits as the same freeze done by hand on the HF model."""

import pytest
import torch

from tests import builders
from tests.reference import capture_module_output, head_cols, hf_logits_with_edits, replace_cols
from tl_circuits import freeze
from tl_circuits.models import model_spec

pytestmark = pytest.mark.needs_hooked_transformer  # compares with the HF model converted to a HookedTransformer

LAYER, D, N_HEADS, D_HEAD = 1, 32, 4, 8


@pytest.mark.parametrize("head", [0, 3])
def test_gpt2_fused_c_attn(hf_gpt2, head):
    hf, model = hf_gpt2
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    c_attn = hf.transformer.h[LAYER].attn.c_attn  # output [batch, pos, 3 * d_model] = [Q | K | V]

    def zero(offset):
        def edit(out):
            out[..., head_cols(offset, head)] = 0
            return out
        return edit

    ref_qkv = capture_module_output(hf, ref_tokens, c_attn)

    def resample_qk(out):
        for offset in (0, D):
            out[..., head_cols(offset, head)] = ref_qkv[..., head_cols(offset, head)]
        return out

    cases = [("qk", "zero", None, zero(0)), ("ov", "zero", None, zero(2 * D)),
             ("qk", "resample", ref_tokens, resample_qk)]
    for circuit, replacement, reference, edit in cases:
        by_hand = hf_logits_with_edits(hf, tokens, {c_attn: edit})
        with torch.no_grad(), freeze(model, [(LAYER, head)], circuit, replacement, reference=reference):
            ours = model(tokens)
        torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4, msg=f"{circuit}-{replacement}")
        assert not torch.allclose(by_hand, hf(tokens).logits, atol=1e-4)


@pytest.mark.parametrize("kv_head", [0, 1])
def test_llama_split_projections_gqa(hf_llama, kv_head):
    hf, model = hf_llama
    spec = model_spec(model)
    group = [h for h in range(spec.n_heads) if spec.kv_head(h) == kv_head]
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    attn = hf.model.layers[LAYER].self_attn

    def zero_cols(heads):
        def edit(out):
            for h in heads:
                out[..., head_cols(0, h)] = 0
            return out
        return edit

    # QK-ZERO of one query head: its q_proj rows' output is zero
    by_hand = hf_logits_with_edits(hf, tokens, {attn.q_proj: zero_cols([group[0]])})
    with torch.no_grad(), freeze(model, [(LAYER, group[0])], "qk", "zero"):
        torch.testing.assert_close(model(tokens), by_hand, rtol=1e-4, atol=1e-4)

    # OV-ZERO of a whole KV group: that KV head's v_proj output is zero
    by_hand = hf_logits_with_edits(hf, tokens, {attn.v_proj: zero_cols([kv_head])})
    with torch.no_grad(), freeze(model, [(LAYER, h) for h in group], "ov", "zero"):
        torch.testing.assert_close(model(tokens), by_hand, rtol=1e-4, atol=1e-4)

    # QK-RESAMPLE of a KV group: its queries and its key from the reference run (pre-rotary, same positions)
    ref_q = capture_module_output(hf, ref_tokens, attn.q_proj)
    ref_k = capture_module_output(hf, ref_tokens, attn.k_proj)
    q_handle = attn.q_proj.register_forward_hook(lambda m, a, out: replace_cols(out, ref_q, group))
    k_handle = attn.k_proj.register_forward_hook(lambda m, a, out: replace_cols(out, ref_k, [kv_head]))
    try:
        with torch.no_grad():
            by_hand = hf(tokens).logits
    finally:
        q_handle.remove()
        k_handle.remove()
    with torch.no_grad(), freeze(model, [(LAYER, h) for h in group], "qk", "resample", reference=ref_tokens):
        torch.testing.assert_close(model(tokens), by_hand, rtol=1e-4, atol=1e-4)


