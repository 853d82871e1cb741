"""TransformerBridge support (issue 6): on a bridge every public function gives the numbers of independent
references built from the wrapped model itself, the numbers it gives on a HookedTransformer with the same
weights, and leaves the bridge as it found it.

- References that need no HookedTransformer (they also run under TransformerLens 4.x): the bridge's own
  activations for the per-head parameter layout; a plain per-sample ``loss.backward()`` loop on an unwrapped
  HF model (or the native bridge) with its parameter gradients sliced by hand; hand-edited q/k/v projection
  outputs of an unwrapped HF model for freezing.
- Parity with a HookedTransformer converted from the same weights (TransformerLens 3.x only): patterns, z and
  logits of every circuit × replacement, the sweep, per-sample gradients of both engines, interference scores
  and the permutation test.

Models (``tests/builders.py``): HF GPT-2 (fused Conv1D ``c_attn``, Conv1D ``c_proj``, biases), HF LLaMA (split
Linear q/k/v/o, GQA 4 query heads over 2 KV heads, rotary, no biases), and native bridges (Linear q/k/v/o with
biases; learned positions or rotary). Weights are wide random draws, so heads are distinguishable.
"""

from __future__ import annotations

import einops
import pytest
import torch

from tests import builders
from tests.reference import (
    assert_same_state,
    bridge_reference_gradients,
    capture_module_output,
    head_cols,
    hf_logits_with_edits,
    model_state,
    output_with_edits,
    set_cols,
)
from tl_circuits import (
    GradientConfig,
    InterferenceConfig,
    compute_interference,
    compute_mean_activations,
    fisher_from_gradients,
    freeze,
    freeze_hooks,
    freeze_sweep,
    interference_permutation_test,
    model_spec,
    pairwise_scores,
    per_sample_gradients,
)
from tl_circuits.models import bridge as bridge_module

QUIET = dict(progress=False)
LAYER, D, D_HEAD = 1, 32, 8


def _native_pattern_edits_apply() -> bool:
    """TransformerLens 4.x passes hook_pattern into NativeAttention (pattern_fn); 3.x fires it afterwards."""
    from transformer_lens.model_bridge.sources.native.model import NativeAttention

    return bool(getattr(NativeAttention, "accepts_pattern_fn", False))


NATIVE_QK = _native_pattern_edits_apply()


@pytest.fixture(scope="module")
def bridges():
    return {"gpt2": builders.gpt2_bridge(0), "llama": builders.llama_bridge(0),
            "native": builders.native_bridge(0), "native_rotary": builders.native_bridge(0, rotary=True)}


@pytest.fixture(scope="module")
def hooked_twins(bridges):
    """HookedTransformers with the weights of each bridge (TransformerLens 3.x only)."""
    if not builders.HAS_HOOKED_TRANSFORMER:
        pytest.skip("TransformerLens 4.x has no HookedTransformer")
    return {"gpt2": builders.hf_gpt2(0)[1], "llama": builders.hf_llama(0)[1],
            "native": builders.hooked_from_native(bridges["native"]),
            "native_rotary": builders.hooked_from_native(bridges["native_rotary"])}


def padded_mask(tokens):
    """Sample 0 left-padded by 3, sample 2 right-padded by 2, the rest full."""
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[2, -2:] = 0
    return mask


# ----- the model-facing layer reads the bridge correctly -----------------------------------------------

@pytest.mark.parametrize("name, n_kv, rotary, layouts", [
    ("gpt2", 4, False, {"Q": "linear", "K": "linear", "V": "linear", "O": "conv1d"}),
    ("llama", 2, True, {"Q": "linear", "K": "linear", "V": "linear", "O": "linear"}),
    ("native", 4, False, {"Q": "linear", "K": "linear", "V": "linear", "O": "linear"}),
])
def test_spec_reads_sizes_and_parameters_of_the_wrapped_model(bridges, name, n_kv, rotary, layouts):
    model = bridges[name]
    spec = model_spec(model)
    assert (spec.kind, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head) == ("bridge", 2, 4, n_kv, 8)
    assert spec.rotary == rotary and dict(spec.weight_layouts) == layouts
    params = dict(model.named_parameters())
    for layer in range(2):
        attn = model.blocks[layer].attn
        for block, proj in zip("QKVO", (attn.q, attn.k, attn.v, attn.o)):
            # the parameter the forward pass uses (GPT-2: the split q/k/v Linears, views of c_attn)
            assert params[spec.param_name(layer, block)] is proj.original_component.weight
    if name == "gpt2":
        c_attn = model.original_model.transformer.h[0].attn.c_attn.original_component
        assert params[spec.param_name(0, "K")].data_ptr() == c_attn.weight[:, D:].data_ptr()


def _head_weights(model, spec, block):
    """[L, heads, D, d] (Q/K/V) or [L, heads, d, D] (O) and biases [L, heads, d] through spec.per_head."""
    params = dict(model.named_parameters())
    with_bias = block != "O" and (0, block, True) in dict(spec.param_names)
    rows = spec.per_head(params, block, include_biases=with_bias).detach()
    n_w = spec.d_model * spec.d_head
    shape = (spec.d_head, spec.d_model) if block == "O" else (spec.d_model, spec.d_head)
    weights = rows[..., :n_w].unflatten(-1, shape)
    biases = rows[..., n_w:] if with_bias else torch.zeros(*rows.shape[:2], spec.d_head)
    return weights, biases


def _reproduces(x, weights, biases, out, block, layer):
    """Whether per-head weights reproduce a projection's hooked output."""
    if block == "O":  # Σ_h z[h] · W_O[h] + b_O, compared without b_O (not per head)
        predicted = einops.einsum(x, weights[layer], "b p h e, h e m -> b p m")
        return torch.allclose(predicted, out, atol=1e-4)
    predicted = einops.einsum(x, weights[layer], "b p m, h m e -> b p h e") + biases[layer]
    return torch.allclose(predicted, out, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "native", "native_rotary"])
def test_per_head_layout_reproduces_the_bridge_activations(bridges, name):
    """x·W_Q[h] + b_Q[h] is hook_q[..., h, :] (K, V likewise), Σ_h z[h]·W_O[h] + b_O the attention output,
    with W read through the SPEC §0 mapping; deliberately wrong mappings do not reproduce them."""
    model = bridges[name]
    spec = model_spec(model)
    tokens = builders.random_tokens(seed=3)
    o_bias = model.blocks[LAYER].attn.o.original_component.bias
    names = [f"blocks.{LAYER}.attn.{n}" for n in ("q.hook_in", "hook_q", "hook_k", "hook_v", "hook_z", "o.hook_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    x = cache[names[0]]
    out = {"Q": cache[names[1]], "K": cache[names[2]], "V": cache[names[3]],
           "O": cache[names[5]] - (0 if o_bias is None else o_bias)}
    heads = {b: _head_weights(model, spec, b) for b in "QKVO"}
    for block in "QKV":
        assert _reproduces(x, *heads[block], out[block], block, LAYER), block
    assert _reproduces(cache[names[4]], *heads["O"], out["O"], "O", LAYER)

    # what a layout mistake would give: transposed o_proj, swapped K/V, heads in reverse order
    o_linear = bridge_module.projection(model, LAYER, "O").weight.detach()
    wrong = "conv1d" if dict(spec.weight_layouts)["O"] == "linear" else "linear"
    transposed = bridge_module.weight_to_heads(o_linear, "O", wrong, spec.n_heads)
    assert not _reproduces(cache[names[4]], transposed[None].expand(2, -1, -1, -1), None, out["O"], "O", 0)
    assert not _reproduces(x, *heads["V"], out["K"], "K", LAYER)
    assert not _reproduces(x, heads["Q"][0].flip(1), heads["Q"][1].flip(1), out["Q"], "Q", LAYER)


# ----- per-sample gradients against a plain backward loop on the unwrapped model -------------------------

@pytest.mark.parametrize("name, include_biases", [("gpt2", True), ("llama", False), ("native", True)])
def test_gradients_equal_a_backward_loop_on_the_wrapped_model(bridges, name, include_biases):
    model = bridges[name]
    tokens = builders.random_tokens(4, 10, seed=4)
    mask = padded_mask(tokens)
    ours = per_sample_gradients(model, tokens, mask, GradientConfig(include_biases=include_biases, **QUIET))
    reference = bridge_reference_gradients(name, tokens, mask, include_biases, model_spec(model))
    for block in "QKVO":
        torch.testing.assert_close(ours.per_block[block], reference.per_block[block], rtol=1e-4, atol=1e-5)
        # heads are distinguishable, so a head mix-up cannot pass unnoticed
        heads = reference.per_block[block]
        assert (heads[:, :, :1] - heads[:, :, 1:]).abs().amax() > 1e-2
    assert (ours.per_block["K"] - ours.per_block["V"]).abs().amax() > 1e-2


def test_padding_gaps_and_missing_biases_are_refused(bridges):
    tokens = builders.random_tokens(2, 8, seed=5)
    gaps = torch.ones_like(tokens)
    gaps[0, 3] = 0
    with pytest.raises(ValueError, match="gaps"):
        per_sample_gradients(bridges["gpt2"], tokens, gaps, GradientConfig(**QUIET))
    # functional_call corrupts a bridge (TransformerLens 4.3's docstring): the direct engine is refused
    with pytest.raises(ValueError, match="functional_call.*LlamaForCausalLM.*factored"):
        per_sample_gradients(bridges["llama"], tokens, config=GradientConfig(method="direct", **QUIET))
    # the factored engine gives LLaMA bias rows anyway: Σ_t dL/dq_t, the gradient of a zero bias
    with_bias = per_sample_gradients(bridges["llama"], tokens, config=GradientConfig(include_biases=True, **QUIET))
    assert with_bias.per_block["Q"].shape[-1] == D * D_HEAD + D_HEAD


# ----- freezing against hand-edited projections of the unwrapped HF model ------------------------------

def _bridge_logits(model, tokens, heads, circuit, replacement, reference=None):
    with torch.no_grad(), freeze(model, heads, circuit, replacement, reference=reference):
        return model(tokens)


@pytest.mark.parametrize("head", [0, 3])
def test_gpt2_bridge_freeze_equals_hand_edited_c_attn(bridges, head):
    model, hf = bridges["gpt2"], builders.hf_gpt2_model(0)
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    c_attn = hf.transformer.h[LAYER].attn.c_attn  # output [batch, pos, 3D] = [Q | K | V]
    ref_qkv = capture_module_output(hf, ref_tokens, c_attn)
    zero = lambda out, cols: 0  # noqa: E731
    from_reference = lambda out, cols: ref_qkv[..., cols]  # noqa: E731
    mean_reference = lambda out, cols: ref_qkv[..., cols].mean(0)  # noqa: E731
    qk = [head_cols(0, head), head_cols(D, head)]
    cases = [("qk", "zero", None, set_cols(zero, qk)),
             ("ov", "zero", None, set_cols(zero, [head_cols(2 * D, head)])),
             ("qk", "resample", ref_tokens, set_cols(from_reference, qk)),
             ("qk", "mean", compute_mean_activations(model, ref_tokens, **QUIET), set_cols(mean_reference, qk))]
    clean = hf_logits_with_edits(hf, tokens, {})
    for circuit, replacement, reference, edit in cases:
        by_hand = hf_logits_with_edits(hf, tokens, {c_attn: edit})
        ours = _bridge_logits(model, tokens, [(LAYER, head)], circuit, replacement, reference)
        torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4, msg=f"{circuit}-{replacement}")
        assert not torch.allclose(by_hand, clean, atol=1e-3), f"{circuit}-{replacement} changed nothing"


@pytest.mark.parametrize("kv_head", [0, 1])
def test_llama_bridge_freeze_equals_hand_edited_projections(bridges, kv_head):
    model, hf = bridges["llama"], builders.hf_llama_model(0)
    spec = model_spec(model)
    group = [h for h in range(spec.n_heads) if spec.kv_head(h) == kv_head]
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    attn = hf.model.layers[LAYER].self_attn
    zero = lambda out, cols: 0  # noqa: E731

    # QK-ZERO of one query head: its q_proj output is zero; OV-ZERO of a KV group: its v_proj output is zero
    by_hand = hf_logits_with_edits(hf, tokens, {attn.q_proj: set_cols(zero, [head_cols(0, group[0])])})
    torch.testing.assert_close(_bridge_logits(model, tokens, [(LAYER, group[0])], "qk", "zero"), by_hand,
                               rtol=1e-4, atol=1e-4)
    by_hand = hf_logits_with_edits(hf, tokens, {attn.v_proj: set_cols(zero, [head_cols(0, kv_head)])})
    torch.testing.assert_close(_bridge_logits(model, tokens, [(LAYER, h) for h in group], "ov", "zero"), by_hand,
                               rtol=1e-4, atol=1e-4)
    # QK-RESAMPLE of a KV group: its queries and its key from the reference run (pre-rotary, same positions)
    ref_q = capture_module_output(hf, ref_tokens, attn.q_proj)
    ref_k = capture_module_output(hf, ref_tokens, attn.k_proj)
    by_hand = hf_logits_with_edits(hf, tokens, {
        attn.q_proj: set_cols(lambda out, cols: ref_q[..., cols], [head_cols(0, h) for h in group]),
        attn.k_proj: set_cols(lambda out, cols: ref_k[..., cols], [head_cols(0, kv_head)])})
    torch.testing.assert_close(_bridge_logits(model, tokens, [(LAYER, h) for h in group], "qk", "resample",
                                              ref_tokens), by_hand, rtol=1e-4, atol=1e-4)


def test_gqa_sibling_is_bit_identical_under_a_freeze(bridges):
    model = bridges["llama"]
    tokens = builders.random_tokens(seed=1)
    names = [f"blocks.{LAYER}.attn.hook_pattern", f"blocks.{LAYER}.attn.hook_z"]
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        for circuit in ("qk", "ov", "both"):
            with freeze(model, [(LAYER, 0)], circuit, "noise", seed=1):  # head 1 shares KV head 0
                _, frozen = model.run_with_cache(tokens, names_filter=lambda n: n in names)
            assert torch.equal(frozen[names[0]][:, 1:], clean[names[0]][:, 1:])
            assert torch.equal(frozen[names[1]][:, :, 1:], clean[names[1]][:, :, 1:])
            assert not torch.equal(frozen[names[1]][:, :, 0], clean[names[1]][:, :, 0])


@pytest.mark.parametrize("rotary", [False, True])
def test_native_bridge_freeze_equals_hand_edited_projections(rotary):
    """QK works where hook_pattern edits reach the output (TransformerLens 4.x); elsewhere it is refused."""
    model, twin = builders.native_bridge(0, rotary=rotary), builders.native_bridge(0, rotary=rotary)
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    raw = twin.blocks[LAYER].attn  # edit the raw nn.Linear outputs, below every TransformerLens hook
    q, k, v = (getattr(raw, n).original_component for n in "qkv")
    zero = lambda out, cols: 0  # noqa: E731
    ov_by_hand = output_with_edits(twin, tokens, {v: set_cols(zero, [head_cols(0, 2)])})
    torch.testing.assert_close(_bridge_logits(model, tokens, [(LAYER, 2)], "ov", "zero"), ov_by_hand,
                               rtol=1e-5, atol=1e-5)
    if not NATIVE_QK:
        with pytest.raises(NotImplementedError, match="hook_pattern"):
            freeze(model, [(LAYER, 2)], "qk", "zero")
        return
    ref_q, ref_k = capture_module_output(twin, ref_tokens, q), capture_module_output(twin, ref_tokens, k)
    cases = [("zero", None, {q: set_cols(zero, [head_cols(0, 2)])}),
             ("resample", ref_tokens, {q: set_cols(lambda out, cols: ref_q[..., cols], [head_cols(0, 2)]),
                                       k: set_cols(lambda out, cols: ref_k[..., cols], [head_cols(0, 2)])})]
    for replacement, reference, edits in cases:
        by_hand = output_with_edits(twin, tokens, edits)
        ours = _bridge_logits(model, tokens, [(LAYER, 2)], "qk", replacement, reference)
        torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5, msg=replacement)
        assert not torch.allclose(ours, output_with_edits(twin, tokens, {}), atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "llama", "native"])
def test_qk_zero_attends_uniformly_to_the_valid_keys_of_a_padded_run(bridges, name):
    """The mask a QK freeze respects comes from the run: HF bridges mask scores with finfo.min (not -inf), the
    native bridge only zeroes the pattern. Left padding: the frozen head attends uniformly to the real keys."""
    model = bridges[name]
    if model_spec(model).qk_mask_source is None:
        pytest.skip("this TransformerLens discards hook_pattern edits on the native bridge")
    tokens = builders.random_tokens(2, 8, seed=1)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    with torch.no_grad(), freeze(model, [(LAYER, 1)], "qk", "zero"):
        _, cache = model.run_with_cache(tokens, attention_mask=mask,
                                        names_filter=lambda n: n == f"blocks.{LAYER}.attn.hook_pattern")
    pattern = cache[f"blocks.{LAYER}.attn.hook_pattern"][:, 1]
    allowed = torch.ones(8, 8).tril()[None] * mask[:, None, :]  # causal and real keys
    expected = allowed / allowed.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(pattern[:, 3:], expected[:, 3:])  # every query from the first real token on


@pytest.mark.skipif(not NATIVE_QK, reason="QK freezes need hook_pattern edits (native bridge, TransformerLens 4.x)")
def test_native_rotary_mean_uses_rotated_queries_and_keys():
    """On a native rotary bridge hook_rot_q/k never fire: MEAN QK reads hook_q/hook_k and rotates them as
    NativeAttention does; the frozen pattern is softmax of the mean rotated q·k (masked, scaled)."""
    model = builders.native_bridge(0, rotary=True)
    spec = model_spec(model)
    assert not spec.rotary_hooked and spec.query_hook(LAYER).endswith("hook_q")
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(5, 12, seed=2)
    names = [f"blocks.{LAYER}.attn.hook_q", f"blocks.{LAYER}.attn.hook_k"]
    with torch.no_grad():
        _, ref_cache = model.run_with_cache(ref_tokens, names_filter=lambda n: n in names)
        rotary = model.blocks[LAYER].attn.original_component.rotary
        rq, rk = rotary.apply_rope(ref_cache[names[0]].transpose(1, 2), ref_cache[names[1]].transpose(1, 2))
        q_mean, k_mean = rq[:, 2].mean(0), rk[:, 2].mean(0)  # [pos, d] of head 2
        scores = q_mean @ k_mean.T / model.blocks[LAYER].attn.original_component.scale
        causal = torch.ones(12, 12, dtype=torch.bool).triu(1)
        expected = scores.masked_fill(causal, float("-inf")).softmax(-1)
        means = compute_mean_activations(model, ref_tokens, **QUIET)
        with freeze(model, [(LAYER, 2)], "qk", "mean", reference=means):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(cache[f"blocks.{LAYER}.attn.hook_pattern"][:, 2], expected.expand(3, -1, -1),
                               rtol=1e-5, atol=1e-6)


# ----- sweep and interference on a bridge --------------------------------------------------------------

@pytest.mark.parametrize("replacement", ["zero", "resample"])
def test_sweep_on_a_bridge_equals_single_freezes(bridges, replacement):
    model = bridges["llama"]
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    reference = ref_tokens if replacement == "resample" else None
    result = freeze_sweep(model, tokens, replacement=replacement, reference=reference, **QUIET)
    with torch.no_grad():
        for circuit in ("qk", "ov"):
            for layer, head in [(0, 1), (1, 2)]:
                with freeze(model, [(layer, head)], circuit, replacement, reference=reference):
                    loss = model(tokens, return_type="loss")
                torch.testing.assert_close(result.frozen[circuit][layer, head], loss, rtol=1e-5, atol=1e-5)
    assert result.effect["qk"].abs().amax() > 1e-3 and result.effect["ov"].abs().amax() > 1e-3


def test_interference_on_a_bridge_equals_scores_of_reference_gradients(bridges):
    model = bridges["gpt2"]
    tokens_a, tokens_b = builders.random_tokens(3, 10, seed=6), builders.random_tokens(4, 10, seed=7)
    spec = model_spec(model)
    full = torch.ones_like(tokens_a), torch.ones_like(tokens_b)
    ref_a = bridge_reference_gradients("gpt2", tokens_a, full[0], False, spec)
    ref_b = bridge_reference_gradients("gpt2", tokens_b, full[1], False, spec)
    expected = pairwise_scores(ref_a, ref_b, fisher_from_gradients(ref_a), variant="signed")
    result = compute_interference(model, tokens_a, tokens_b,
                                  config=InterferenceConfig(variant="signed", fisher_source="a"), **QUIET)
    for block in "QKVO":  # signed sums cancel: tolerance relative to the block's scale
        scale = float(expected[block].abs().max())
        torch.testing.assert_close(result.scores[block], expected[block], rtol=1e-3, atol=1e-4 * scale)


# ----- the bridge is left as it was --------------------------------------------------------------------

def test_every_call_leaves_the_bridge_unchanged():
    model = builders.gpt2_bridge(0)  # fused c_attn: the split q/k/v parameters are views of its storage
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    a, b = builders.random_tokens(3, 8, seed=3), builders.random_tokens(3, 8, seed=4)
    calls = {
        "freeze": lambda: _bridge_logits(model, tokens, [(0, 1), (1, 3)], "both", "resample", ref_tokens),
        "freeze_hooks": lambda: model.run_with_hooks(tokens, fwd_hooks=freeze_hooks(model, {1: [0]}, "qk", "noise")),
        "mean activations": lambda: compute_mean_activations(model, ref_tokens, **QUIET),
        "sweep": lambda: freeze_sweep(model, tokens, **QUIET),
        "gradients (factored)": lambda: per_sample_gradients(model, a, padded_mask(a), GradientConfig(**QUIET)),
        "gradients (direct, refused)": lambda: pytest.raises(ValueError, per_sample_gradients, model, a,
                                                             config=GradientConfig(method="direct", **QUIET)),
        "interference": lambda: compute_interference(model, a, b, **QUIET),
        "permutation test": lambda: interference_permutation_test(
            model, a, b, n_permutations=9, n_bootstrap=5, seed=0, **QUIET),
    }
    model.run_with_cache(tokens)  # the bridge installs its own torch hooks lazily, on first use; count after that
    for what, call in calls.items():
        before = model_state(model, tokens)
        call()
        assert_same_state(before, model_state(model, tokens), what)
    # gradients still reach the attention parameters through an ordinary backward pass
    spec = model_spec(model)
    params = dict(model.named_parameters())
    model(tokens, return_type="loss").backward()
    for layer in range(spec.n_layers):
        for block in "QKVO":
            grad = params[spec.param_name(layer, block)].grad
            assert grad is not None and grad.abs().sum() > 0, (layer, block)
    model.zero_grad(set_to_none=True)


# ----- parity with a HookedTransformer on the same weights (TransformerLens 3.x) ------------------------

REPLACEMENTS = ["zero", "mean", "noise", "resample", "identity"]


def _freeze_run(model, tokens, circuit, replacement, reference):
    heads = [(0, 1), (1, 2), (1, 3)]
    with torch.no_grad(), freeze(model, heads, circuit, replacement, reference=reference, seed=3):
        return model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_z")))


@pytest.mark.needs_hooked_transformer  # parity with the HookedTransformer twin
@pytest.mark.parametrize("name", ["gpt2", "llama", "native", "native_rotary"])
def test_parity_freeze_every_circuit_and_replacement(bridges, hooked_twins, name):
    model, twin = bridges[name], hooked_twins[name]
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    qk_ok = model_spec(model).qk_mask_source is not None
    references = {"mean": (compute_mean_activations(model, ref_tokens, **QUIET),
                           compute_mean_activations(twin, ref_tokens, **QUIET)),
                  "resample": (ref_tokens, ref_tokens)}
    for circuit in ("qk", "ov", "both"):
        for replacement in REPLACEMENTS:
            if replacement == "identity" and circuit != "qk":
                continue
            refs = references.get(replacement, (None, None))
            if circuit != "ov" and not qk_ok:
                with pytest.raises(NotImplementedError):
                    freeze(model, [(1, 2)], circuit, replacement, reference=refs[0])
                continue
            ours, ours_cache = _freeze_run(model, tokens, circuit, replacement, refs[0])
            theirs, theirs_cache = _freeze_run(twin, tokens, circuit, replacement, refs[1])
            what = f"{name} {circuit}-{replacement}"
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=what)
            for layer in range(2):
                for act in ("hook_pattern", "hook_z"):
                    key = f"blocks.{layer}.attn.{act}"
                    torch.testing.assert_close(ours_cache[key], theirs_cache[key], rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.needs_hooked_transformer  # parity with the HookedTransformer twin
@pytest.mark.parametrize("name", ["gpt2", "llama", "native"])
def test_parity_sweep(bridges, hooked_twins, name):
    model, twin = bridges[name], hooked_twins[name]
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    circuits = ("qk", "ov") if model_spec(model).qk_mask_source is not None else ("ov",)
    for replacement, reference in (("zero", None), ("resample", ref_tokens)):
        ours = freeze_sweep(model, tokens, circuits=circuits, replacement=replacement, reference=reference, **QUIET)
        theirs = freeze_sweep(twin, tokens, circuits=circuits, replacement=replacement, reference=reference, **QUIET)
        assert ours.clean == pytest.approx(theirs.clean, rel=1e-5)
        for circuit in circuits:
            torch.testing.assert_close(ours.frozen[circuit], theirs.frozen[circuit], rtol=1e-4, atol=1e-5)


@pytest.mark.needs_hooked_transformer  # parity with the HookedTransformer twin (method='direct' included)
@pytest.mark.parametrize("name, include_biases", [("gpt2", True), ("llama", True), ("native_rotary", True)])
@pytest.mark.parametrize("method", ["factored", "direct"])
def test_parity_gradients(bridges, hooked_twins, name, include_biases, method):
    model, twin = bridges[name], hooked_twins[name]
    if method == "direct" and name == "llama":
        include_biases = False  # the HF LLaMA projections have no bias parameters
    tokens = builders.random_tokens(4, 10, seed=4)
    mask = padded_mask(tokens)
    config = GradientConfig(include_biases=include_biases, method=method, **QUIET)
    # the bridge always takes the factored engine (functional_call is refused there)
    ours = per_sample_gradients(model, tokens, mask, config.replace(method="factored"))
    theirs = per_sample_gradients(twin, tokens, mask, config)
    for block in "QKVO":
        torch.testing.assert_close(ours.per_block[block], theirs.per_block[block], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.losses, theirs.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.needs_hooked_transformer  # parity with the HookedTransformer twin
def test_parity_gradients_under_a_straight_through_freeze(bridges, hooked_twins):
    model, twin = bridges["llama"], hooked_twins["llama"]
    tokens = builders.random_tokens(3, 10, seed=4)
    grads = {}
    for key, m in (("ours", model), ("theirs", twin)):
        with freeze(m, [(1, 0), (0, 3)], "both", "zero", preserve_gradients=True):
            grads[key] = per_sample_gradients(m, tokens, config=GradientConfig(**QUIET))
    for block in "QKVO":
        torch.testing.assert_close(grads["ours"].per_block[block], grads["theirs"].per_block[block],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.needs_hooked_transformer  # parity with the HookedTransformer twin
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_parity_interference_and_permutation_test(bridges, hooked_twins, name):
    model, twin = bridges[name], hooked_twins[name]
    a, b = builders.random_tokens(4, 10, seed=6), builders.random_tokens(3, 10, seed=7)
    config = InterferenceConfig(variant="unsigned", fisher_source="pooled")
    ours = compute_interference(model, a, b, config=config, **QUIET)
    theirs = compute_interference(twin, a, b, config=config, **QUIET)
    for block in "QKVO":
        scale = float(theirs.scores[block].abs().max())
        torch.testing.assert_close(ours.scores[block], theirs.scores[block], rtol=1e-3, atol=1e-4 * scale)
    test_kwargs = dict(config=InterferenceConfig(variant="signed"), n_permutations=49, n_bootstrap=20, seed=0, **QUIET)
    ours_test = interference_permutation_test(model, a, b, **test_kwargs)
    theirs_test = interference_permutation_test(twin, a, b, **test_kwargs)
    for block in "QKVO":
        scale = float(theirs_test.observed[block].abs().max())
        torch.testing.assert_close(ours_test.observed[block], theirs_test.observed[block], rtol=1e-3,
                                   atol=1e-4 * scale)
        torch.testing.assert_close(ours_test.p_value[block], theirs_test.p_value[block])


@pytest.mark.needs_hooked_transformer  # compatibility mode against the processed HookedTransformer
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_parity_compatibility_mode(name):
    """enable_compatibility_mode() folds LayerNorm, centres weights and renames what hook functions see: the
    bridge then matches a HookedTransformer loaded with TransformerLens's default weight processing."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    model = builders.gpt2_bridge(0) if name == "gpt2" else builders.llama_bridge(0)
    model.enable_compatibility_mode()
    hf, unprocessed = builders.hf_gpt2(0) if name == "gpt2" else builders.hf_llama(0)
    twin = HookedTransformer(unprocessed.cfg)
    convert = convert_gpt2_weights if name == "gpt2" else convert_llama_weights
    twin.load_and_process_state_dict(convert(hf, unprocessed.cfg), fold_ln=True, center_writing_weights=True,
                                     center_unembed=True, fold_value_biases=True)
    twin.eval()
    tokens, ref_tokens = builders.random_tokens(seed=1), builders.random_tokens(seed=2)
    for circuit, replacement in (("qk", "noise"), ("both", "resample")):
        reference = ref_tokens if replacement == "resample" else None
        ours, _ = _freeze_run(model, tokens, circuit, replacement, reference)
        theirs, _ = _freeze_run(twin, tokens, circuit, replacement, reference)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=f"{circuit}-{replacement}")
    ours = per_sample_gradients(model, tokens, config=GradientConfig(**QUIET))
    theirs = per_sample_gradients(twin, tokens, config=GradientConfig(method="direct", **QUIET))
    for block in "QKVO":
        torch.testing.assert_close(ours.per_block[block], theirs.per_block[block], rtol=1e-4, atol=1e-5)
