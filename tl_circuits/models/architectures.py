"""How each TransformerBridge attention family computes its scores: the facts a QK freeze needs.

TransformerLens 4 bridges ~140 Hugging Face architectures with a handful of attention bridge classes.
tl_circuits reads everything it needs from the bridge's own attention component, not from a table of model
names; an architecture is supported when its attention bridge belongs to one of these families
(docs/spec.md §0.1, §1.4):

===========================  ==================================================  ===============================
family                       TransformerLens class (architectures)               rotary / scores
===========================  ==================================================  ===============================
``"position_embeddings"``    ``PositionEmbeddingsAttentionBridge`` (LLaMA,       ``hook_rot_q``/``k`` fire; scale
                             Mistral, Mixtral, Qwen2/3, Gemma 2/3, OLMo-2,       ``hf_attn.scaling``; soft-cap
                             StableLM, ...)                                      ``attn_logit_softcapping``
``"joint_qkv"``              ``JointQKVAttentionBridge`` (GPT-2, GPT-BigCode)    no rotary; ``d**-0.5`` (÷ l+1
                                                                                 under GPT-2's inverse-layer flag)
``"joint_qkv_rotary"``       ``JointQKVPositionEmbeddingsAttentionBridge``       rotary inside, not hooked: applied
                             (Phi-3, GPT-NeoX, Falcon)                           here with the model's cos/sin
``"alibi"``                  ``BloomAttentionBridge`` (BLOOM)                    an additive position bias
``"delegating"``             plain ``AttentionBridge`` (GPT-J, OPT)              the HF module computes attention:
                                                                                 ``hook_pattern`` fires afterwards
``"native"``                 ``AttentionBridge`` around ``NativeAttention``      TransformerLens-native bridges
===========================  ==================================================  ===============================

On a ``"delegating"`` bridge edits at ``hook_pattern`` never reach the output, so a QK freeze writes the
frozen head's ``z = pattern · v`` at ``hook_z`` instead (:mod:`tl_circuits.freezing.hooks`); that needs the
queries and keys as they enter the scores, which this module gives (GPT-J's interleaved rotary is the one
architecture special case here, :func:`rotate`).

>>> from tl_circuits import load_bundled_model
>>> family_of(load_bundled_model("induction-2l", as_bridge=True).blocks[0].attn)
'native'
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_circuits.models.types import Model

Family = Literal["position_embeddings", "joint_qkv", "joint_qkv_rotary", "alibi", "delegating", "native"]
FAMILIES: tuple[Family, ...] = ("position_embeddings", "joint_qkv", "joint_qkv_rotary", "alibi", "delegating",
                                "native")


def _tl_class(module: str, name: str) -> Optional[type]:
    """A TransformerLens attention bridge class, or None where this TransformerLens version has none."""
    import importlib

    try:
        return getattr(importlib.import_module(f"transformer_lens.model_bridge.generalized_components.{module}"), name)
    except (ImportError, AttributeError):
        return None


_FAMILY_CLASSES: tuple[tuple[Family, str, str], ...] = (
    ("alibi", "bloom_attention", "BloomAttentionBridge"),
    ("joint_qkv_rotary", "joint_qkv_position_embeddings_attention", "JointQKVPositionEmbeddingsAttentionBridge"),
    ("joint_qkv", "joint_qkv_attention", "JointQKVAttentionBridge"),
    ("position_embeddings", "position_embeddings_attention", "PositionEmbeddingsAttentionBridge"),
)


def family_of(attn: Any) -> Optional[Family]:
    """The attention family of an attention bridge (module docstring), or None for one tl_circuits has not checked."""
    for family, module, name in _FAMILY_CLASSES:
        # the exact class: a subclass (MLA, gated or other variants) may compute its scores its own way
        if type(attn) is _tl_class(module, name):
            return family
    base = _tl_class("attention", "AttentionBridge")
    if base is not None and type(attn) is base:
        inner = getattr(attn, "original_component", None)
        if type(inner).__name__ == "NativeAttention":
            return "native"
        return "delegating" if type(inner).__name__ in DELEGATING_ATTENTIONS else None
    return None


# Hugging Face attention modules behind a plain AttentionBridge whose scores were checked to be
# softmax(scale · rotary(q)·rotary(k) + causal/padding mask) (tests/architectures)
DELEGATING_ATTENTIONS = {"GPTJAttention": "GPT-J", "OPTAttention": "OPT"}


def pattern_edits_apply(family: Family, attn: Any) -> bool:
    """Whether a value returned by a ``hook_pattern`` function reaches the attention output."""
    if family == "native":
        return bool(getattr(attn.original_component, "accepts_pattern_fn", False))
    return family != "delegating"


def scores_hook_is_live(family: Family) -> bool:
    """Whether ``hook_attn_scores`` holds the masked pre-softmax scores and fires before ``hook_pattern``."""
    return family in ("position_embeddings", "joint_qkv", "joint_qkv_rotary", "alibi")


def rotary_hooks_fire(family: Family) -> bool:
    """Whether ``hook_rot_q``/``hook_rot_k`` fire with the rotated (and q/k-normed) queries/keys."""
    return family == "position_embeddings"


def attention_scale(model: Model, layer: int, family: Family) -> float:
    """The factor multiplying ``q·k`` in the layer's scores, as the bridge (or, delegating, HF) computes them."""
    attn: Any = model.blocks[layer].attn
    inner = attn.original_component
    d_head = model.cfg.d_head
    if family == "native":
        return 1.0 / float(inner.scale)
    if family in ("position_embeddings", "delegating"):
        return float(getattr(inner, "scaling", d_head**-0.5))
    scale = d_head**-0.5
    if family == "joint_qkv" and getattr(model.cfg, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)  # GPT-2's option, as JointQKVAttentionBridge applies it
    return scale


def soft_cap(model: Model, layer: int, family: Family) -> Optional[float]:
    """Gemma 2's ``attn_logit_softcapping`` where the bridge applies it (scores = c·tanh(scores / c)), else None."""
    if family != "position_embeddings":
        return None
    cap = getattr(model.blocks[layer].attn.original_component, "attn_logit_softcapping", None)
    return None if cap is None else float(cap)


def has_position_bias(family: Family) -> bool:
    """Whether the scores carry an additive bias that is not a function of q and k (ALiBi)."""
    return family == "alibi"


def attention_scores(
    model: Model, layer: int, family: Family,
    q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos head d_head"],
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Unmasked scores of matched query/key heads (``k[..., i, :]`` pairs with ``q[..., i, :]``, no GQA repeat),
    scaled and soft-capped as the layer does; no position bias (ALiBi is added by the caller, §1.4)."""
    scores = einops.einsum(q, k, "batch q_pos head d, batch k_pos head d -> batch head q_pos k_pos")
    scores = scores * attention_scale(model, layer, family)
    cap = soft_cap(model, layer, family)
    return scores if cap is None else cap * torch.tanh(scores / cap)


# ----- rotary where the bridge does not hook the rotated queries and keys ------------------------------------

def _hf_rotary_embedding(model: Model) -> Any:
    """The wrapped model's rotary embedding module (HF ``*RotaryEmbedding``, called as ``(x, position_ids)``)."""
    wrapped: Any = model.original_model
    for name, module in wrapped.named_modules():
        if name.endswith("rotary_emb"):  # the bridge wraps it in place: call the HF module, not its hooks
            return getattr(module, "original_component", None) or module
    raise NotImplementedError(f"no rotary embedding module found in this {architecture_name(model)} model")


def _gptj_rotate(x: Tensor, sin: Tensor, cos: Tensor, rotary_dim: Optional[int]) -> Tensor:
    """GPT-J: rotary on adjacent pairs (``rotate_every_two``) of the first ``rotary_dim`` dims, HF's own function."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    if rotary_dim is None:
        return apply_rotary_pos_emb(x, sin, cos)
    return torch.cat([apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos), x[..., rotary_dim:]], dim=-1)


def rotate(
    model: Model, layer: int, family: Family, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotary applied to pre-rotary q or k (positions 0..pos-1) exactly as the layer applies it."""
    attn: Any = model.blocks[layer].attn
    if family == "native":
        heads_first = einops.rearrange(x, "batch pos head d -> batch head pos d")
        rotated, _ = attn.original_component.rotary.apply_rope(heads_first, heads_first)
        return einops.rearrange(rotated, "batch head pos d -> batch pos head d")
    positions = torch.arange(x.shape[1], device=x.device)[None]
    first, second = _hf_rotary_embedding(model)(x, positions)
    if family == "joint_qkv_rotary":  # the bridge's own rotation (partial rotary: the first cos.shape[-1] dims)
        heads_first = einops.rearrange(x, "batch pos head d -> batch head pos d")
        rotated, _ = attn._apply_rotary_pos_emb(heads_first, heads_first, first.to(x.dtype), second.to(x.dtype))
        return einops.rearrange(rotated, "batch head pos d -> batch pos head d")
    if type(attn.original_component).__name__ == "GPTJAttention":  # HF's GPTJRotaryEmbedding returns (sin, cos)
        return _gptj_rotate(x, first, second, attn.original_component.rotary_dim)
    raise NotImplementedError(f"tl_circuits does not know how {architecture_name(model)} rotates its queries")


def rotary_hidden(model: Model, family: Family) -> bool:
    """Whether the model uses rotary that the bridge applies without hooking the result (rotated by :func:`rotate`)."""
    uses_rotary = model.cfg.positional_embedding_type == "rotary"
    return uses_rotary and not rotary_hooks_fire(family)


def architecture_name(model: Model) -> str:
    return str(getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", None))
