"""The per-head Q/K/V/O layout (tl_circuits.models.layout) against hand slicing, HF and TransformerLens parameters.

References: Python loops that slice a parameter head by head as its module's forward pass reads it
(``nn.Linear``: ``y = x @ W.T``; HF ``Conv1D``: ``y = x @ W``); the HookedTransformer TransformerLens converts
from the same HF model (its own weight conversion code); and autograd gradients of hand-written projections.
Everything but the TransformerLens comparisons runs without a HookedTransformer (TransformerLens 4.x).
"""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tl_circuits.models import layout
from tl_circuits.models.layout import BLOCKS, WEIGHT_LAYOUTS
from tl_circuits.models.spec import model_spec

H, G, D, DH = 4, 2, 6, 3  # query heads, KV heads, d_model, d_head


def _heads(block: str) -> int:
    return G if block in ("K", "V") else H


def _param_shape(block: str, layout_name: str, heads: int) -> tuple[int, ...]:
    if layout_name == "hooked":
        return (heads, DH, D) if block == "O" else (heads, D, DH)
    linear_shape = (D, heads * DH) if block == "O" else (heads * DH, D)  # nn.Linear [out, in]
    return linear_shape if layout_name == "linear" else linear_shape[::-1]  # Conv1D [in, out]


def _hand_slice(weight: torch.Tensor, block: str, layout_name: str, head: int) -> torch.Tensor:
    """Head ``head``'s [D, d] (Q/K/V) or [d, D] (O) slice, read the way the module's forward reads it."""
    cols = slice(head * DH, (head + 1) * DH)
    if layout_name == "hooked":
        return weight[head]
    if block == "O":  # out = z_flat @ W_O_flat with W_O_flat [H·d, D]
        w_o_flat = weight.T if layout_name == "linear" else weight
        return w_o_flat[cols]
    w_in_flat = weight.T if layout_name == "linear" else weight  # [D, heads·d]
    return w_in_flat[:, cols]


@pytest.mark.parametrize("layout_name", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("block", BLOCKS)
def test_weight_to_heads_matches_hand_slicing_and_round_trips(block, layout_name):
    heads = _heads(block)
    weight = torch.randn(_param_shape(block, layout_name, heads))
    per_head = layout.weight_to_heads(weight, block, layout_name, heads)
    assert per_head.shape == ((heads, DH, D) if block == "O" else (heads, D, DH))
    for head in range(heads):
        assert torch.equal(per_head[head], _hand_slice(weight, block, layout_name, head)), head
    assert torch.equal(layout.heads_to_weight(per_head, block, layout_name), weight)
    # leading dims (a sample dim of per-sample gradients) ride along
    stacked = torch.stack([weight, 2 * weight])
    assert torch.equal(layout.weight_to_heads(stacked, block, layout_name, heads)[1], 2 * per_head)
    assert torch.equal(layout.heads_to_weight(layout.weight_to_heads(stacked, block, layout_name, heads),
                                              block, layout_name), stacked)


@pytest.mark.parametrize("layout_name", WEIGHT_LAYOUTS)
def test_bias_and_rows_round_trip(layout_name):
    for block in BLOCKS:
        heads = _heads(block)
        weight = torch.randn(3, *_param_shape(block, layout_name, heads))
        bias = None
        if block != "O":
            bias = torch.randn((3, heads, DH) if layout_name == "hooked" else (3, heads * DH))
            per_head_bias = layout.bias_to_heads(bias, heads, layout_name)
            flat = bias.reshape(3, heads * DH)
            for head in range(heads):
                assert torch.equal(per_head_bias[:, head], flat[:, head * DH:(head + 1) * DH])
            assert torch.equal(layout.heads_to_bias(per_head_bias, layout_name), bias)
        rows = layout.layer_rows(weight, bias, block, layout_name, heads)
        with_bias = bias is not None
        assert rows.shape == (3, heads, layout.n_params_per_head(block, D, DH, with_bias))
        for head in range(heads):
            expect = [_hand_slice(weight[1], block, layout_name, head).reshape(-1)]
            if with_bias:
                expect.append(layout.bias_to_heads(bias, heads, layout_name)[1, head])
            assert torch.equal(rows[1, head], torch.cat(expect))
        weight_back, bias_back = layout.layer_params_from_rows(rows, block, layout_name, D, DH, with_bias)
        assert torch.equal(weight_back, weight)
        assert bias_back is None if bias is None else torch.equal(bias_back, bias)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown weight layout"):
        layout.weight_to_heads(torch.zeros(6, 6), "Q", "fused", 2)
    with pytest.raises(ValueError, match="unknown block"):
        layout.heads_to_weight(torch.zeros(2, 6, 3), "X", "linear")
    with pytest.raises(ValueError, match="does not split into 4 heads"):
        layout.weight_to_heads(torch.zeros(6, 6), "Q", "linear", 4)
    with pytest.raises(ValueError, match="does not split into 4 heads"):
        layout.bias_to_heads(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=r"must be \[\.\.\., 4, a, b\]"):
        layout.weight_to_heads(torch.zeros(2, 6, 3), "Q", "hooked", 4)
    with pytest.raises(ValueError, match="rows must be"):
        layout.layer_params_from_rows(torch.zeros(4, D * DH), "Q", "linear", D, DH, include_biases=True)
    with pytest.raises(ValueError, match="b_O is not per head"):
        layout.layer_rows(torch.zeros(H, DH, D), torch.zeros(D), "O", "hooked", H)


# ----- real parameters: HF GPT-2 (Conv1D) and LLaMA (Linear, GQA), sliced by hand and as TransformerLens reads them

def _hf_gpt2_slices(hf, layer: int):
    """block -> (parameter in its own layout, layout, its per-head slices by hand): GPT-2's fused c_attn is
    [D, 3·D] (Conv1D, x @ W), Q/K/V side by side; c_proj is [H·d, D]."""
    attn = hf.transformer.h[layer].attn
    d_model, d_head, n_heads = hf.config.n_embd, hf.config.n_embd // hf.config.n_head, hf.config.n_head
    c_attn, c_proj = attn.c_attn.weight.detach(), attn.c_proj.weight.detach()
    out = {}
    for index, block in enumerate("QKV"):
        part = c_attn[:, index * d_model:(index + 1) * d_model]
        out[block] = (part, "conv1d", [part[:, h * d_head:(h + 1) * d_head] for h in range(n_heads)])
    out["O"] = (c_proj, "conv1d", [c_proj[h * d_head:(h + 1) * d_head] for h in range(n_heads)])
    return out


def _hf_llama_slices(hf, layer: int):
    """As :func:`_hf_gpt2_slices` for LLaMA's nn.Linear q/k/v_proj [heads·d, D] and o_proj [D, H·d]."""
    attn = hf.model.layers[layer].self_attn
    cfg = hf.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    out = {}
    for block, name, heads in (("Q", "q_proj", cfg.num_attention_heads), ("K", "k_proj", cfg.num_key_value_heads),
                               ("V", "v_proj", cfg.num_key_value_heads)):
        weight = getattr(attn, name).weight.detach()
        out[block] = (weight, "linear", [weight[h * d_head:(h + 1) * d_head].T for h in range(heads)])
    o_proj = attn.o_proj.weight.detach()
    out["O"] = (o_proj, "linear",
                [o_proj[:, h * d_head:(h + 1) * d_head].T for h in range(cfg.num_attention_heads)])
    return out


HF_MODELS = {"gpt2": (builders.hf_gpt2_model, _hf_gpt2_slices), "llama": (builders.hf_llama_model, _hf_llama_slices)}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_parameters_match_hand_slices(name):
    build, slices = HF_MODELS[name]
    hf = build(0)
    for layer in range(2):
        for block, (weight, layout_name, by_hand) in slices(hf, layer).items():
            per_head = layout.weight_to_heads(weight, block, layout_name, len(by_hand))
            for head, expected in enumerate(by_hand):
                assert torch.equal(per_head[head], expected), (layer, block, head)
            assert torch.equal(layout.heads_to_weight(torch.stack(by_hand), block, layout_name), weight)


@pytest.mark.needs_hooked_transformer  # TransformerLens's HF -> HookedTransformer weight conversion
@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_transformer_lens_parameters_are_the_hf_slices(name):
    """TransformerLens's own weight conversion puts each HF head where the layout says it is, and the
    inverse turns TransformerLens's per-head parameter back into the HF one."""
    hf, model = builders.hf_gpt2(0) if name == "gpt2" else builders.hf_llama(0)
    spec = model_spec(model)
    params = dict(model.named_parameters())
    for layer in range(spec.n_layers):
        for block, (weight, layout_name, by_hand) in HF_MODELS[name][1](hf, layer).items():
            tl_param = params[spec.param_name(layer, block)].detach()
            assert spec.weight_layout(block) == "hooked"
            torch.testing.assert_close(layout.weight_to_heads(tl_param, block, "hooked", len(by_hand)),
                                       torch.stack(by_hand), rtol=0, atol=1e-6)
            torch.testing.assert_close(layout.heads_to_weight(tl_param, block, layout_name), weight,
                                       rtol=0, atol=1e-6)


def test_bridge_parameters_round_trip_through_rows():
    """On bridges (Conv1D GPT-2, Linear GQA LLaMA, native), ``params_from_per_head`` inverts ``per_head``."""
    for model in (builders.gpt2_bridge(0), builders.llama_bridge(0), builders.native_bridge(0)):
        spec = model_spec(model)
        params = {name: p.detach() for name, p in model.named_parameters()}
        for block in BLOCKS:
            include_biases = block != "O" and (0, block, True) in dict(spec.param_names)
            rows = spec.per_head(params, block, include_biases)
            n_params = spec.n_params_per_head(block, include_biases)
            assert rows.shape == (spec.n_layers, spec.n_block_heads(block), n_params)
            for name, tensor in spec.params_from_per_head(rows, block, include_biases).items():
                assert torch.equal(tensor, params[name]), name


# ----- rows from gradient factors against autograd ----------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("include_biases", [False, True])
def test_rows_from_factors_equal_autograd_gradient_rows(block, include_biases):
    """x·W + b per head (Q/K/V) and Σ_h z_h·W_O[h] (O), differentiated by autograd, laid out by layer_rows."""
    gen = torch.Generator().manual_seed(0)
    n, n_layers, n_pos, heads = 2, 3, 5, _heads(block)
    with_bias = include_biases and block != "O"
    in_shape, out_shape = layout.factor_shapes(block, heads, D, DH)
    inputs = torch.randn(n, n_layers, n_pos, *in_shape, generator=gen, dtype=torch.float64)
    out_grads = torch.randn(n, n_layers, n_pos, *out_shape, generator=gen, dtype=torch.float64)
    expected = torch.empty(n, n_layers, heads, layout.n_params_per_head(block, D, DH, with_bias), dtype=torch.float64)
    for sample in range(n):
        for layer in range(n_layers):
            weight = torch.zeros(_param_shape(block, "hooked", heads), dtype=torch.float64, requires_grad=True)
            bias = torch.zeros(heads, DH, dtype=torch.float64, requires_grad=True)
            x = inputs[sample, layer]
            if block == "O":
                out = torch.einsum("the,hem->tm", x, weight)
            else:
                out = torch.einsum("tm,hme->the", x, weight) + bias
            (out * out_grads[sample, layer]).sum().backward()
            expected[sample, layer] = layout.layer_rows(weight.grad, bias.grad if with_bias else None, block,
                                                        "hooked", heads)
    rows = layout.rows_from_factors(block, inputs, out_grads, include_biases)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)

    # the strided, sample-minor writer gives the same rows
    out = torch.full((n_layers, heads, n, expected.shape[-1]), float("nan"))
    scratch = torch.empty(n * n_layers * D * heads * DH)
    layout.write_rows_from_factors(block, inputs.float(), out_grads.float(), out, scratch, heads, D, DH,
                                   include_biases)
    torch.testing.assert_close(out.permute(2, 0, 1, 3), expected.float(), rtol=1e-5, atol=1e-5)
