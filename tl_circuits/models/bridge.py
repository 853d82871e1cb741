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
- Which attention bridge a layer has decides where its scores, rotary and mask are
  (:mod:`tl_circuits.models.architectures`, one entry per attention *family*, not per model name). Bridges
  that rebuild attention from q/k/v fire ``hook_attn_scores`` (pre-softmax, masked with ``finfo(dtype).min``,
  not ``-inf``) and ``hook_pattern`` before z is formed, and edits to either take effect. A plain
  ``AttentionBridge`` (GPT-J, OPT, native on TransformerLens 3.x) fires both after the output and discards
  edits (native on 4.x accepts ``hook_pattern`` as ``pattern_fn``).
- The trainable parameters are the wrapped modules' own (names like
  ``...q_proj._original_component.weight``): ``nn.Linear`` weights ``[out, in]``, or GPT-2's ``Conv1D``
  ``[in, out]`` (``c_proj``). A fused QKV projection (GPT-2's ``c_attn``, GPT-NeoX's and BLOOM's per-head
  interleaved ``query_key_value``, Falcon's and GPT-BigCode's multi-query ``[Q | K | V]``, Phi-3's
  ``qkv_proj``) is split by the bridge into q/k/v ``nn.Linear`` modules, head-major like any split
  projection; the forward pass uses the split ones (views of the fused storage for GPT-2, copies otherwise),
  so the split ones are the parameters gradients are taken of.
- ``forward(start_at_layer=...)`` still runs blocks 0..k-1 (:mod:`tl_circuits.models.bridge_forward` restarts
  at a layer); ``forward(attention_mask=...)`` cannot run under ``torch.func.vmap``; ``functional_call`` is
  never used on a bridge (TransformerLens: it corrupts the model; :func:`refuse_functional_call`).

>>> from tl_circuits import load_bundled_model
>>> bridge = load_bundled_model("induction-2l", as_bridge=True)
>>> is_bridge(bridge), architecture(bridge)
(True, 'TransformerLensNative')
"""

from __future__ import annotations

from typing import Any, Callable

from jaxtyping import Float
from torch import Tensor, nn

try:  # TransformerLens >= 3.0
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # TransformerLens 2.x has no bridge
    TransformerBridge = None  # type: ignore[misc,assignment]

from tl_circuits.models import architectures
from tl_circuits.models.architectures import Family
from tl_circuits.models.layout import (  # noqa: F401 (bias_to_heads, weight_to_heads re-exported)
    WeightLayout,
    bias_to_heads,
    projection_layout,
    weight_to_heads,
)
from tl_circuits.models.types import Model


_PROJECTIONS = {"Q": "q", "K": "k", "V": "v", "O": "o"}


def is_bridge(model: object) -> bool:
    """True for a ``transformer_lens.model_bridge.TransformerBridge``."""
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def architecture(model: Model) -> str:
    return architectures.architecture_name(model)


def attention(model: Model, layer: int) -> Any:
    """The attention bridge of a layer (``model.blocks[layer].attn``; an ``AttentionBridge`` module, typed ``Any``
    because its submodules ``q``/``o``/``original_component`` are reached by attribute)."""
    return model.blocks[layer].attn


def family(model: Model, layer: int = 0) -> Family:
    """The layer's attention family (:mod:`tl_circuits.models.architectures`); NotImplementedError if unknown."""
    found = architectures.family_of(attention(model, layer))
    if found is None:
        raise NotImplementedError(f"tl_circuits does not support this TransformerBridge: {_unknown(model, layer)}")
    return found


def _unknown(model: Model, layer: int) -> str:
    attn = attention(model, layer)
    inner = type(getattr(attn, "original_component", None)).__name__
    return (f"the attention of {architecture(model)} ({type(attn).__name__} around {inner}) is none of the "
            f"attention families whose scores tl_circuits knows ({', '.join(architectures.FAMILIES)})")


def projection(model: Model, layer: int, block: str) -> nn.Module:
    """The wrapped ``nn.Linear``/``Conv1D`` computing a block's projection (q, k, v or o)."""
    return getattr(attention(model, layer), _PROJECTIONS[block]).original_component


def weight_layout(module: nn.Module) -> WeightLayout:
    """``"linear"`` for an ``nn.Linear`` (weight ``[out, in]``), ``"conv1d"`` for HF's ``Conv1D`` (``[in, out]``)."""
    return projection_layout(module)


def pattern_edits_apply(model: Model, layer: int = 0) -> bool:
    """Whether a value returned by a ``hook_pattern`` function reaches the attention output."""
    return architectures.pattern_edits_apply(family(model, layer), attention(model, layer))


def problems(model: Model) -> list[str]:
    """What makes this bridge unsupported (empty when supported)."""
    cfg, out = model.cfg, []
    families = set()
    for layer in range(cfg.n_layers):
        found = architectures.family_of(attention(model, layer))
        if found is None:
            return [_unknown(model, layer)]
        families.add(found)
    if len(families) > 1:
        out.append(f"layers of different attention families {sorted(families)}")
    for flag in ("use_attn_result", "use_split_qkv_input", "use_attn_in", "ungroup_grouped_query_attention"):
        if getattr(cfg, flag, False):
            out.append(f"cfg.{flag}=True")
    return out


def attention_scores(
    model: Model, layer: int, q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos head d_head"]
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Unmasked scores of matched query/key heads (no GQA repeat: ``k[..., i, :]`` pairs with ``q[..., i, :]``),
    scaled and soft-capped as the layer does (no position bias)."""
    return architectures.attention_scores(model, layer, family(model, layer), q, k)


def rotate(
    model: Model, layer: int, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotary applied to pre-rotary q or k the way the layer does (positions 0..pos-1)."""
    return architectures.rotate(model, layer, family(model, layer), x)


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


def refuse_functional_call(model: Model) -> None:
    """``torch.func.functional_call`` is never used on a bridge: TransformerLens 4.3's own docstring warns that it
    "fails to restore parameters" (each component is registered twice) and corrupts the model."""
    raise ValueError(
        f"method='direct' runs torch.func.functional_call, which TransformerLens warns corrupts a TransformerBridge "
        f"(here {architecture(model)}: its components are registered twice and are not restored); use the default "
        "method='factored', which gives the same gradients through hooks")


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
