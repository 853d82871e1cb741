"""The per-head Q/K/V/O layout of attention parameters (docs/spec.md §0): the one module that knows it.

A head's *row* is its weight slice flattened (then its bias slice, when biases are asked for):

======  ==================  ============  ===========================================
block   weight per head     head kind     row length
======  ==================  ============  ===========================================
Q       ``[D, d]``          query (H)     ``D·d`` (+ ``d`` with the bias)
K, V    ``[D, d]``          kv (G)        ``D·d`` (+ ``d`` with the bias)
O       ``[d, D]``          query (H)     ``D·d`` (``b_O`` is shared, never per head)
======  ==================  ============  ===========================================

Parameter tensors come in three layouts (:data:`WeightLayout`), each with any leading dims (e.g. a sample dim):

- ``"hooked"``: a HookedTransformer parameter, already per head (``W_Q`` ``[H, D, d]``, ``W_O`` ``[H, d, D]``,
  ``b_Q`` ``[H, d]``; under GQA the underscore ``_W_K``/``_W_V`` ``[G, D, d]``).
- ``"linear"``: an ``nn.Linear`` weight ``[out, in]``: Q/K/V ``[heads·d, D]`` with ``W[h] = weight[h·d:(h+1)·d].T``;
  an o_proj ``[D, H·d]`` with ``W_O[h] = weight[:, h·d:(h+1)·d].T`` (per-head *columns*).
- ``"conv1d"``: Hugging Face's ``Conv1D`` weight ``[in, out]``: Q/K/V ``[D, heads·d]`` with
  ``W[h] = weight[:, h·d:(h+1)·d]``; GPT-2's c_proj ``[H·d, D]`` with ``W_O[h] = weight[h·d:(h+1)·d]`` (rows).

Biases: ``"hooked"`` ``[heads, d]``; ``"linear"``/``"conv1d"`` ``[heads·d]`` (head-major).

Gradient rows from activations (the factored engine): a block's per-sample weight gradient is a sum over
positions of outer products. Q/K/V: ``dL/dW[h] = Σ_t x_t ⊗ dL/d(hook_q|k|v)_t[h]`` and ``dL/db[h] = Σ_t
dL/d(...)_t[h]`` (x: the attention input; hook_q/k/v hold ``x·W + b`` before rotary and qk-norm); O:
``dL/dW_O[h] = Σ_t z_t[h] ⊗ dL/d(attention output)_t``.

>>> import torch
>>> weight = torch.arange(12.0).reshape(6, 2)  # a Linear q_proj: 3 heads of d_head 2 over d_model 2
>>> heads = weight_to_heads(weight, "Q", "linear", heads=3)
>>> heads.shape, torch.equal(heads[1], weight[2:4].T)
(torch.Size([3, 2, 2]), True)
>>> torch.equal(heads_to_weight(heads, "Q", "linear"), weight)
True
>>> n_params_per_head("Q", d_model=2, d_head=2, include_biases=True), head_kind("K")
(6, 'kv')
"""

from __future__ import annotations

from typing import Literal, Optional

import einops
import torch
from jaxtyping import Float
from torch import Tensor

Block = Literal["Q", "K", "V", "O"]
BLOCKS: tuple[Block, ...] = ("Q", "K", "V", "O")
WeightLayout = Literal["hooked", "linear", "conv1d"]
WEIGHT_LAYOUTS: tuple[WeightLayout, ...] = ("hooked", "linear", "conv1d")
HeadKind = Literal["query", "kv"]

# parameter-shaped -> per-head [..., heads, a, b] (a, b = D, d for Q/K/V; d, D for O); read right to left
# for the inverse. "hooked" parameters are already per head.
_WEIGHT_PATTERNS = {
    ("linear", False): "... (h e) m -> ... h m e",
    ("conv1d", False): "... m (h e) -> ... h m e",
    ("linear", True): "... m (h e) -> ... h e m",
    ("conv1d", True): "... (h e) m -> ... h e m",
}


def check_block(block: object) -> None:
    """Raise ValueError naming the problem if ``block`` is not one of :data:`BLOCKS`."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")


def check_layout(layout: object) -> None:
    """Raise ValueError naming the problem if ``layout`` is not one of :data:`WEIGHT_LAYOUTS`."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {WEIGHT_LAYOUTS}")


def head_kind(block: Block) -> HeadKind:
    """``"kv"`` for K/V (resolved over KV heads), ``"query"`` for Q/O (over query heads)."""
    check_block(block)
    return "kv" if block in ("K", "V") else "query"


def n_params_per_head(block: Block, d_model: int, d_head: int, include_biases: bool = False) -> int:
    """Length of a head's row: ``d_model·d_head``, plus ``d_head`` for a Q/K/V bias."""
    check_block(block)
    return d_model * d_head + (d_head if include_biases and block != "O" else 0)


def _pattern(block: Block, layout: WeightLayout, inverse: bool) -> Optional[str]:
    check_block(block)
    check_layout(layout)
    if layout == "hooked":
        return None
    pattern = _WEIGHT_PATTERNS[(layout, block == "O")]
    if inverse:
        left, right = pattern.split(" -> ")
        pattern = f"{right} -> {left}"
    return pattern


def projection_layout(module: object) -> WeightLayout:
    """``"linear"`` for an ``nn.Linear`` (weight ``[out, in]``; Falcon's ``FalconLinear`` is one), ``"conv1d"`` for
    Hugging Face's ``Conv1D`` (``[in, out]``)."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    raise NotImplementedError(f"tl_circuits cannot read per-head weights from a {type(module).__name__} projection")


def check_projection_shape(
    weight: Tensor, block: Block, layout: WeightLayout, heads: int, d_model: int, d_head: int, where: str
) -> None:
    """Raise NotImplementedError naming ``where`` if a projection weight is not ``heads`` heads of ``d_head``
    over ``d_model`` (e.g. a q_proj twice as wide for a gated query, or a latent-compressed K/V)."""
    per_head = (heads * d_head, d_model) if block != "O" else (d_model, heads * d_head)
    expected = per_head if layout == "linear" else per_head[::-1]
    if tuple(weight.shape) != expected:
        raise NotImplementedError(
            f"{where}: the {block} projection weight has shape {tuple(weight.shape)}, not {expected} "
            f"({heads} heads of d_head={d_head} over d_model={d_model} in the {layout} layout), so its per-head "
            "layout is unknown")


def weight_to_heads(
    weight: Float[Tensor, "... p q"], block: Block, layout: WeightLayout, heads: int
) -> Float[Tensor, "... heads a b"]:
    """A layer's block weight (any leading dims) as per-head slices ``[..., heads, a, b]``.

    Q/K/V give ``[..., heads, d_model, d_head]``, O gives ``[..., heads, d_head, d_model]`` (module docstring).
    """
    pattern = _pattern(block, layout, inverse=False)
    if pattern is None:
        if weight.ndim < 3 or weight.shape[-3] != heads:
            raise ValueError(f"a HookedTransformer {block} weight must be [..., {heads}, a, b], "
                             f"got {tuple(weight.shape)}")
        return weight
    if weight.ndim < 2:
        raise ValueError(f"a {layout} {block} weight must have at least 2 dims, got shape {tuple(weight.shape)}")
    # the dim holding (head, d_head): rows of Linear Q/K/V and Conv1D O, columns otherwise
    split_dim = -2 if (layout == "linear") != (block == "O") else -1
    if weight.shape[split_dim] % heads:
        raise ValueError(f"a {layout} {block} weight of shape {tuple(weight.shape)} does not split into {heads} heads "
                         f"along dim {split_dim}")
    return einops.rearrange(weight, pattern, h=heads)


def heads_to_weight(
    weight_heads: Float[Tensor, "... heads a b"], block: Block, layout: WeightLayout
) -> Float[Tensor, "... p q"]:
    """Inverse of :func:`weight_to_heads`: per-head slices back to a parameter-shaped tensor."""
    pattern = _pattern(block, layout, inverse=True)
    if weight_heads.ndim < 3:
        raise ValueError(f"per-head {block} weights must be [..., heads, a, b], got shape {tuple(weight_heads.shape)}")
    return weight_heads if pattern is None else einops.rearrange(weight_heads, pattern)


def bias_to_heads(
    bias: Float[Tensor, "... p"], heads: int, layout: WeightLayout = "linear"
) -> Float[Tensor, "... heads d_head"]:
    """A Q/K/V bias as ``[..., heads, d_head]`` (``"linear"``/``"conv1d"``: from ``[..., heads·d_head]``)."""
    check_layout(layout)
    if layout == "hooked":
        if bias.ndim < 2 or bias.shape[-2] != heads:
            raise ValueError(f"a HookedTransformer bias must be [..., {heads}, d_head], got {tuple(bias.shape)}")
        return bias
    if bias.ndim < 1 or bias.shape[-1] % heads:
        raise ValueError(f"a {layout} bias of shape {tuple(bias.shape)} does not split into {heads} heads")
    return einops.rearrange(bias, "... (h e) -> ... h e", h=heads)


def heads_to_bias(bias_heads: Float[Tensor, "... heads d_head"], layout: WeightLayout = "linear") -> Tensor:
    """Inverse of :func:`bias_to_heads`."""
    check_layout(layout)
    if bias_heads.ndim < 2:
        raise ValueError(f"per-head biases must be [..., heads, d_head], got shape {tuple(bias_heads.shape)}")
    return bias_heads if layout == "hooked" else einops.rearrange(bias_heads, "... h e -> ... (h e)")


def layer_rows(
    weight: Tensor, bias: Optional[Tensor], block: Block, layout: WeightLayout, heads: int
) -> Float[Tensor, "... heads per_head"]:
    """One layer's block weight (and Q/K/V bias, or None) as per-head rows ``[..., heads, n_params_per_head]``."""
    parts = [einops.rearrange(weight_to_heads(weight, block, layout, heads), "... h a b -> ... h (a b)")]
    if bias is not None:
        if block == "O":
            raise ValueError("b_O is not per head and has no per-head layout")
        parts.append(bias_to_heads(bias, heads, layout))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def layer_params_from_rows(
    rows: Float[Tensor, "... heads per_head"],
    block: Block,
    layout: WeightLayout,
    d_model: int,
    d_head: int,
    include_biases: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Inverse of :func:`layer_rows`: ``(weight, bias)`` shaped like the parameters (bias None unless asked)."""
    expected = n_params_per_head(block, d_model, d_head, include_biases)
    if rows.ndim < 2 or rows.shape[-1] != expected:
        raise ValueError(f"{block} rows must be [..., heads, {expected}] (d_model={d_model}, d_head={d_head}, "
                         f"include_biases={include_biases}), got shape {tuple(rows.shape)}")
    n_weights = d_model * d_head
    a, b = (d_head, d_model) if block == "O" else (d_model, d_head)
    weight = heads_to_weight(rows[..., :n_weights].unflatten(-1, (a, b)), block, layout)
    bias = heads_to_bias(rows[..., n_weights:], layout) if include_biases and block != "O" else None
    return weight, bias


def factor_shapes(block: Block, heads: int, d_model: int, d_head: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-position shapes of ``(inputs, out_grads)`` for :func:`rows_from_factors`: Q/K/V read the attention
    input ``(D,)`` and the gradient at hook_q/k/v ``(heads, d)``; O reads hook_z ``(H, d)`` and the gradient of
    the attention output ``(D,)``."""
    check_block(block)
    return ((heads, d_head), (d_model,)) if block == "O" else ((d_model,), (heads, d_head))


def rows_from_factors(
    block: Block,
    inputs: Float[Tensor, "... n_layers pos in_dim"],
    out_grads: Float[Tensor, "... n_layers pos out_dim"],
    include_biases: bool = False,
) -> Float[Tensor, "... n_layers block_heads per_head"]:
    """Per-head gradient rows (as :func:`layer_rows` lays them out) from activations and output gradients.

    Q/K/V: ``inputs`` is the attention input ``[..., L, pos, D]`` and ``out_grads`` the gradient at
    ``hook_q``/``hook_k``/``hook_v`` ``[..., L, pos, heads, d]``. O: ``inputs`` is ``hook_z``
    ``[..., L, pos, H, d]`` and ``out_grads`` the gradient of the attention module's output ``[..., L, pos, D]``.
    """
    check_block(block)
    if block == "O":
        rows = einops.einsum(inputs, out_grads, "... t h e, ... t m -> ... h e m")
    else:
        rows = einops.einsum(inputs, out_grads, "... t m, ... t h e -> ... h m e")
    rows = einops.rearrange(rows, "... h a b -> ... h (a b)")
    if include_biases and block != "O":
        rows = torch.cat([rows, out_grads.sum(-3)], dim=-1)
    return rows


def write_rows_from_factors(
    block: Block,
    inputs: Float[Tensor, "n n_layers pos in_dim"],
    out_grads: Float[Tensor, "n n_layers pos out_dim"],
    out: Float[Tensor, "n_layers block_heads n per_head"],
    scratch: Tensor,
    heads: int,
    d_model: int,
    d_head: int,
    include_biases: bool = False,
) -> None:
    """:func:`rows_from_factors` written into ``out`` (sample-minor layout ``[L, heads, n, P]``, any strides),
    through ``scratch`` (a contiguous float32 tensor of at least ``n·L·D·heads·d`` elements): one batched
    matmul, one strided copy, no large allocation. ``heads`` is H for Q/O and G for K/V."""
    check_block(block)
    n, n_layers, n_pos = inputs.shape[:3]
    d_in, d_out = (heads * d_head, d_model) if block == "O" else (d_model, heads * d_head)
    lhs = inputs.reshape(n * n_layers, n_pos, d_in).transpose(1, 2)  # [n·L, in, pos]
    rhs = out_grads.reshape(n * n_layers, n_pos, d_out)  # [n·L, pos, out]
    product = scratch.view(-1)[: n * n_layers * d_in * d_out].view(n * n_layers, d_in, d_out)
    torch.bmm(lhs, rhs, out=product)
    if block == "O":  # [n, L, (h e), m] -> [L, h, n, e, m]
        rows = product.view(n, n_layers, heads, d_head, d_model).permute(1, 2, 0, 3, 4)
    else:  # [n, L, m, (h e)] -> [L, h, n, m, e]
        rows = product.view(n, n_layers, d_model, heads, d_head).permute(1, 3, 0, 2, 4)
    n_weights = d_model * d_head
    out[..., :n_weights].unflatten(-1, rows.shape[-2:]).copy_(rows)
    if include_biases and block != "O":
        out[..., n_weights:].copy_(out_grads.sum(2).permute(1, 2, 0, 3))
