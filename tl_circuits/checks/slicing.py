"""Sanity checks of the per-head layout against the model's own activations (docs/spec.md §0.2, §0.6).

- :func:`check_qkv_slicing`: each head's Q/K/V weight and bias slice, as tl_circuits cuts it
  (:meth:`ModelSpec.per_head`, i.e. :mod:`tl_circuits.models.layout`), applied to what the projection reads,
  reproduces that head's slice of ``hook_q``/``hook_k``/``hook_v`` — fused or split projections alike;
- :func:`check_o_columns`: ``Σ_h z_h · W_O[h] + b_O`` over tl_circuits' O slices reproduces the attention
  output (``b_O`` read off the model by zeroing every z).

Both recompute in float64 (:func:`~tl_circuits.checks.measure.exact_dtype`) from the model's parameters and the
activations of one clean forward (:mod:`tl_circuits.checks.capture`).
"""

from __future__ import annotations

from typing import Optional

import einops
import torch
from torch import Tensor

from tl_circuits.checks.capture import Activations
from tl_circuits.checks.measure import Worst, exact_dtype, measured_outcome, tolerance
from tl_circuits.checks.result import CheckOutcome
from tl_circuits.models.spec import Block, ModelSpec
from tl_circuits.models.types import Model


def has_bias(spec: ModelSpec, block: Block) -> bool:
    """Whether the model has a per-head bias for ``block`` (a HookedTransformer always has b_Q/b_K/b_V)."""
    if block == "O":
        return False
    try:
        spec.param_name(0, block, bias=True)
    except ValueError:
        return False
    return True


def head_slices(model: Model, spec: ModelSpec, block: Block, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """tl_circuits' per-head slices of ``block`` in every layer: weights ``[L, heads, a, b]`` (``a, b`` = D, d for
    Q/K/V and d, D for O, as a row of :meth:`ModelSpec.per_head` is laid out) and biases ``[L, heads, d]`` or None."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    with_bias = has_bias(spec, block)
    rows = spec.per_head(params, block, include_biases=with_bias).to(dtype)
    n_weights = spec.d_model * spec.d_head
    shape = (spec.d_head, spec.d_model) if block == "O" else (spec.d_model, spec.d_head)
    weights = rows[..., :n_weights].unflatten(-1, shape)
    return weights, (rows[..., n_weights:] if with_bias else None)


def _shape_problem(name: str, tensor: Tensor, expected: tuple[int, ...]) -> str:
    return f"{name} has shape {tuple(tensor.shape)}, expected {expected} (docs/spec.md §0.3)"


def check_qkv_slicing(model: Model, spec: ModelSpec, clean: Activations) -> CheckOutcome:
    """Check (1): per-head Q/K/V slices reproduce ``hook_q``/``hook_k``/``hook_v`` head by head."""
    dtype = exact_dtype(clean.resid_pre[0].device)
    worst, problems = Worst(), []
    projections: tuple[tuple[Block, str], ...] = (("Q", "q"), ("K", "k"), ("V", "v"))
    biases = [block for block, _ in projections if has_bias(spec, block)]
    for block, name in projections:
        weights, bias = head_slices(model, spec, block, dtype)
        heads = spec.n_block_heads(block)
        for layer in range(spec.n_layers):
            hooked, x = clean.hooked[(layer, name)], clean.x[(layer, block)]
            expected_shape = (*x.shape[:2], heads, spec.d_head)
            if tuple(hooked.shape) != expected_shape:
                problems.append(_shape_problem(spec.hook_name(layer, name), hooked, expected_shape))
                continue
            got = einops.einsum(x.to(dtype), weights[layer], "b t m, h m e -> b t h e")
            if bias is not None:
                got = got + bias[layer]
            for head in range(heads):
                worst.add(got[..., head, :], hooked[..., head, :].to(dtype), f"layer {layer} {block} head {head}")
    tol = tolerance(spec.dtype)
    layouts = ", ".join(f"{block} {spec.weight_layout(block)}" for block, _ in projections)
    what = (f"per-head Q/K/V slices ({layouts}; biases: {', '.join(biases) or 'none'}) applied to the projection "
            f"inputs, {spec.n_heads} query and {spec.n_kv_heads} KV heads per layer")
    return measured_outcome("qkv_slicing", worst, tol, f"{what} reproduce hook_q/hook_k/hook_v",
                            f"{what} do not reproduce the model's hooks (tl_circuits slices these heads wrongly)",
                            problems)


def check_o_columns(model: Model, spec: ModelSpec, clean: Activations, bias_out: dict[int, Tensor]) -> CheckOutcome:
    """Check (2): ``Σ_h z_h · W_O[h] + b_O`` over tl_circuits' O slices equals the attention output."""
    dtype = exact_dtype(clean.resid_pre[0].device)
    weights, _ = head_slices(model, spec, "O", dtype)
    worst, problems = Worst(), []
    for layer in range(spec.n_layers):
        z, out = clean.hooked[(layer, "z")], clean.attn_out[layer]
        expected_shape = (*out.shape[:2], spec.n_heads, spec.d_head)
        if tuple(z.shape) != expected_shape:
            problems.append(_shape_problem(spec.hook_name(layer, "z"), z, expected_shape))
            continue
        got = einops.einsum(z.to(dtype), weights[layer], "b t h e, h e m -> b t m") + bias_out[layer].to(dtype)
        worst.add(got, out.to(dtype), f"layer {layer}")
    tol = tolerance(spec.dtype)
    what = f"Σ_h z_h·W_O[h] + b_O over tl_circuits' O slices ({spec.weight_layout('O')} layout)"
    return measured_outcome("o_columns", worst, tol, f"{what} equals the attention output in every layer",
                            f"{what} does not equal the attention output (O sliced along the wrong axis or in the "
                            "wrong order)", problems)
