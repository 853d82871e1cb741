"""What tl_circuits needs to know about a TransformerLens ``TransformerBridge`` (TransformerLens 3.x and 4.x).

Only :mod:`tl_circuits.models` uses this module (``spec.py`` reads a bridge's :class:`ModelSpec` here and
``hooked.py`` dispatches to it); everything else asks the spec. The per-head layout of its ``nn.Linear``/
``Conv1D`` weights is :mod:`tl_circuits.models.layout`'s (re-exported here: :func:`weight_to_heads`,
:func:`bias_to_heads`).

A bridge wraps a Hugging Face (or TransformerLens-native) model and exposes HookedTransformer's hook names,
but it is a different machine underneath. Facts this module relies on (checked on TransformerLens 3.9.0 and
4.3.0 by ``tests/models/test_bridge.py``):

- ``blocks.{l}.attn.hook_q``/``hook_k``/``hook_v`` are aliases of ``attn.q.hook_out``/``k.hook_out``/
  ``v.hook_out`` (pre-rotary ``x·W + b``) and ``hook_z`` of ``attn.o.hook_in``. Hook *functions* see
  ``[batch, pos, heads, d_head]``; a plain torch forward hook on the same ``HookPoint`` sees the flat
  ``[batch, pos, heads·d_head]`` tensor. Hook functions may be called with the canonical name
  (``hook.name == "blocks.0.attn.o.hook_in"``), so nothing here keys on ``hook.name``.
- Attention bridges that rebuild attention from q/k/v — GPT-2's ``JointQKVAttentionBridge`` and LLaMA's
  ``PositionEmbeddingsAttentionBridge`` — fire ``hook_attn_scores`` (pre-softmax, masked with
  ``finfo(dtype).min``, not ``-inf``) and ``hook_pattern`` before z is formed, and edits to either take
  effect; LLaMA fires ``hook_rot_q``/``hook_rot_k`` after rotary.
- A native bridge (``TransformerBridge.boot_native``) is a plain ``AttentionBridge`` that delegates to
  ``NativeAttention``: ``hook_attn_scores`` fires after the output, holding the *pattern*, and edits are
  discarded; ``hook_pattern`` edits reach the output only where ``NativeAttention`` accepts the hook as
  ``pattern_fn`` (TransformerLens 4.x; in 3.x they are discarded); ``hook_rot_q``/``hook_rot_k`` never
  fire (rotary is applied inside ``NativeAttention``). Masked entries of its pattern are exactly 0.
- The trainable parameters are the wrapped modules' own (names like
  ``...q_proj._original_component.weight``): ``nn.Linear`` weights ``[out, in]``, or GPT-2's ``Conv1D``
  ``[in, out]`` (``c_proj``). GPT-2's fused ``c_attn`` is split into q/k/v ``nn.Linear`` modules whose
  parameters are views of ``c_attn``'s storage; the forward pass uses the split ones.
- ``forward(start_at_layer=...)`` raises ``NotImplementedError``; ``forward(attention_mask=...)`` cannot run
  under ``torch.func.vmap`` (data-dependent control flow in mask handling); ``functional_call`` needs
  ``tie_weights=False`` (tied-weight re-tying otherwise writes into the model).

>>> from tl_circuits import load_bundled_model
>>> bridge = load_bundled_model("induction-2l", as_bridge=True)
>>> is_bridge(bridge), architecture(bridge)
(True, 'TransformerLensNative')
"""

from __future__ import annotations

from typing import Any, Callable

import einops
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call

try:  # TransformerLens >= 3.0
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
except ImportError:  # TransformerLens 2.x has no bridge
    TransformerBridge = None  # type: ignore[misc,assignment]
    AttentionBridge = None  # type: ignore[misc,assignment]

from tl_circuits.models.layout import WeightLayout, bias_to_heads, weight_to_heads  # noqa: F401 (re-exported)
from tl_circuits.models.types import Model


# Architectures whose attention bridges were checked hook by hook and parameter by parameter.
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "TransformerLensNative")
_PROJECTIONS = {"Q": "q", "K": "k", "V": "v", "O": "o"}


def is_bridge(model: object) -> bool:
    """True for a ``transformer_lens.model_bridge.TransformerBridge``."""
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def architecture(model: Model) -> str:
    return str(getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", None))


def attention(model: Model, layer: int) -> Any:
    """The attention bridge of a layer (``model.blocks[layer].attn``; an ``AttentionBridge`` module, typed ``Any``
    because its submodules ``q``/``o``/``original_component`` are reached by attribute)."""
    return model.blocks[layer].attn


def projection(model: Model, layer: int, block: str) -> nn.Module:
    """The wrapped ``nn.Linear``/``Conv1D`` computing a block's projection (q, k, v or o)."""
    return getattr(attention(model, layer), _PROJECTIONS[block]).original_component


def weight_layout(module: nn.Module) -> WeightLayout:
    """``"linear"`` for an ``nn.Linear`` (weight ``[out, in]``), ``"conv1d"`` for HF's ``Conv1D`` (``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    raise NotImplementedError(f"tl_circuits cannot read per-head weights from a {type(module).__name__} projection")


def _rebuilds_attention(attn: nn.Module) -> bool:
    # Subclasses that override forward recompute attention from q/k/v and fire the score/pattern hooks
    # inside the computation; the base AttentionBridge delegates to the wrapped module.
    return type(attn).forward is not AttentionBridge.forward


def pattern_edits_apply(attn: nn.Module) -> bool:
    """Whether a value returned by a ``hook_pattern`` function reaches the attention output."""
    return _rebuilds_attention(attn) or bool(getattr(attn.original_component, "accepts_pattern_fn", False))


def scores_hook_is_live(attn: nn.Module) -> bool:
    """Whether ``hook_attn_scores`` holds the masked pre-softmax scores and fires before ``hook_pattern``."""
    return _rebuilds_attention(attn)


def rotary_hooks_fire(attn: nn.Module) -> bool:
    """Whether ``hook_rot_q``/``hook_rot_k`` fire with the rotated queries/keys."""
    return _rebuilds_attention(attn)


def problems(model: Model) -> list[str]:
    """What makes this bridge unsupported (empty when supported)."""
    cfg, out = model.cfg, []
    arch = architecture(model)
    if arch not in SUPPORTED_ARCHITECTURES:
        out.append(f"architecture {arch} (supported on a TransformerBridge: {', '.join(SUPPORTED_ARCHITECTURES)})")
        return out
    for flag in ("use_attn_result", "use_split_qkv_input", "use_attn_in", "ungroup_grouped_query_attention"):
        if getattr(cfg, flag, False):
            out.append(f"cfg.{flag}=True")
    if (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0:
        out.append("attention score soft-capping")
    for layer in range(cfg.n_layers):
        inner = attention(model, layer).original_component
        if getattr(inner, "scale_attn_by_inverse_layer_idx", False):
            out.append("GPT-2 scale_attn_by_inverse_layer_idx (scores scaled per layer)")
            break
        if getattr(inner, "attn_logit_softcapping", None) is not None:
            out.append("attention logit soft-capping")
            break
    return out


def attention_scale(model: Model, layer: int) -> float:
    """Factor multiplying ``q·k`` in the layer's scores, as the bridge computes them."""
    attn = attention(model, layer)
    inner = attn.original_component
    if not _rebuilds_attention(attn):  # NativeAttention divides by its own scale
        return 1.0 / float(inner.scale)
    return float(getattr(inner, "scaling", model.cfg.d_head**-0.5))


def attention_scores(
    model: Model, layer: int, q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos head d_head"]
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Unmasked scores of matched query/key heads (no GQA repeat: ``k[..., i, :]`` pairs with ``q[..., i, :]``)."""
    scores = einops.einsum(q, k, "batch q_pos head d, batch k_pos head d -> batch head q_pos k_pos")
    return scores * attention_scale(model, layer)


def rotate(
    model: Model, layer: int, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotary applied to pre-rotary q or k the way the layer's ``NativeAttention`` does (positions 0..pos-1)."""
    rotary = attention(model, layer).original_component.rotary
    heads_first = einops.rearrange(x, "batch pos head d -> batch head pos d")
    rotated, _ = rotary.apply_rope(heads_first, heads_first)
    return einops.rearrange(rotated, "batch head pos d -> batch pos head d")


def parameter_names(model: Model, include_biases: bool = True) -> dict[tuple[int, str, bool], str]:
    """``(layer, block, bias) -> name in model.named_parameters()`` of every attention projection."""
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for layer in range(model.cfg.n_layers):
        for block in _PROJECTIONS:
            module = projection(model, layer, block)
            out[(layer, block, False)] = names_by_id[id(module.weight)]
            if include_biases and block != "O" and getattr(module, "bias", None) is not None:
                out[(layer, block, True)] = names_by_id[id(module.bias)]
    return out


def logits(model: Model, tokens: Tensor) -> Tensor:
    """Logits of unpadded tokens (a bridge's masked forward cannot run under vmap; callers trim padding)."""
    return model(tokens, return_type="logits")


def functional_logits(model: Model, params: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """``functional_call`` of the bridge with some parameters replaced, leaving the bridge's own untouched."""
    return functional_call(model, params, (tokens,), {"return_type": "logits"}, tie_weights=False)


def register_factor_hooks(
    model: Model,
    layer: int,
    perturb: Callable[[str, Tensor], Tensor],
    capture_input: Callable[[str, Tensor], None],
    capture_z: Callable[[Tensor], None],
) -> list:
    """Torch hooks for the factored gradient engine on one layer
    (see :func:`tl_circuits.models.hooked.register_factor_hooks`)."""
    attn = attention(model, layer)
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    handles = []
    for block, heads in (("Q", cfg.n_heads), ("K", n_kv), ("V", n_kv)):
        linear = getattr(attn, _PROJECTIONS[block])

        def add(module, args, output, block=block, heads=heads):
            # the raw HookPoint output is flat [batch, pos, heads·d_head]
            return perturb(block, output.unflatten(-1, (heads, cfg.d_head))).flatten(-2)

        def read(module, args, output, block=block):
            capture_input(block, output)

        handles.append(linear.hook_out.register_forward_hook(add, prepend=True))  # before the caller's hooks
        handles.append(linear.hook_in.register_forward_hook(read))  # after them: what the projection reads
    handles.append(attn.o.hook_out.register_forward_hook(lambda m, a, out: perturb("O", out), prepend=True))
    handles.append(attn.o.hook_in.register_forward_hook(
        lambda m, a, out: capture_z(out.unflatten(-1, (cfg.n_heads, cfg.d_head)))))
    return handles
