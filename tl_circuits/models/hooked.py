"""Forward passes and hooks that the rest of tl_circuits asks of a model, HookedTransformer or TransformerBridge.

Each function takes the model and its :class:`~tl_circuits.models.spec.ModelSpec` and does the
HookedTransformer thing here, or dispatches to :mod:`tl_circuits.models.bridge` for a bridge
(``spec.kind == "bridge"``).

>>> import torch
>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> from tl_circuits.models.spec import model_spec
>>> model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=6,
...                                                  d_vocab=10, act_fn="gelu"))
>>> spec = model_spec(model)
>>> tokens = torch.tensor([[1, 2, 3]])
>>> check_tokens(spec, tokens)
>>> model_logits(model, spec, tokens).shape
torch.Size([1, 3, 10])
>>> check_tokens(spec, tokens + 9)
Traceback (most recent call last):
...
ValueError: tokens has ids in [10, 12] outside the vocabulary [0, 9]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import functional_call

from tl_circuits.models import bridge
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - spec.py re-exports this module's names
    from tl_circuits.models.spec import ModelSpec

__all__ = ["attention_scores", "check_tokens", "functional_logits", "model_logits", "post_rotary",
           "register_factor_hooks"]

def attention_scores(
    model: Model,
    spec: ModelSpec,
    layer: int,
    q: Float[Tensor, "batch q_pos head d_head"],
    k: Float[Tensor, "batch k_pos head d_head"],
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Unmasked attention scores of matched query/key heads (``k[..., i, :]`` pairs with ``q[..., i, :]``,
    no GQA repeat), with the model's own scaling (and soft-cap on a HookedTransformer)."""
    if spec.kind == "bridge":
        return bridge.attention_scores(model, layer, q, k)
    from transformer_lens.components.abstract_attention import AbstractAttention

    # TransformerLens's own scaling and soft-cap, without the GQA override that repeats keys
    return AbstractAttention.calculate_attention_scores(model.blocks[layer].attn, q, k)


def post_rotary(model: Model, spec: ModelSpec, layer: int, x: Float[Tensor, "batch pos head d_head"]) -> Tensor:
    """Queries/keys as they enter the scores, from what :meth:`ModelSpec.query_hook`/``key_hook`` hold:
    the identity, except on a bridge whose rotary hooks never fire (native), where rotary is applied here."""
    if spec.rotary and not spec.rotary_hooked:
        return bridge.rotate(model, layer, x)
    return x


def model_logits(model: Model, spec: ModelSpec, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Logits of ``tokens`` (one sample inside ``vmap`` or a batch). On a bridge ``attention_mask`` must be
    ``None`` (``spec.masks_under_vmap`` is False: callers trim padding instead)."""
    if spec.kind == "bridge":
        if attention_mask is not None:
            raise ValueError("a TransformerBridge forward with an attention mask cannot run under vmap; trim padding")
        return bridge.logits(model, tokens)
    return model(tokens, attention_mask=attention_mask, return_type="logits")


def functional_logits(
    model: Model, spec: ModelSpec, params: Mapping[str, Tensor], tokens: Tensor, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """:func:`model_logits` with the named parameters replaced (``torch.func.functional_call``), the model's
    own parameters untouched; HookedTransformer only (a bridge is refused: functional_call corrupts it)."""
    if spec.kind == "bridge":
        bridge.refuse_functional_call(model)
    return functional_call(model, dict(params), (tokens,), {"attention_mask": attention_mask, "return_type": "logits"})


def register_factor_hooks(
    model: Model,
    spec: ModelSpec,
    layer: int,
    perturb: Callable[[str, Tensor], Tensor],
    capture_input: Callable[[str, Tensor], None],
    capture_z: Callable[[Tensor], None],
) -> list:
    """Torch hooks on one layer for the factored gradient engine; returns their handles (the caller removes them).

    - ``perturb(block, out)`` returns its replacement of ``x·W + b`` of Q/K/V (``out``: ``[batch, pos, heads,
      d_head]``, before rotary and before any caller hook at hook_q/k/v) and of the attention output
      ``z·W_O + b_O`` for ``"O"`` (``[batch, pos, d_model]``);
    - ``capture_input(block, x)`` receives what the Q/K/V projection reads (``[batch, pos, d_model]``);
    - ``capture_z(z)`` receives ``hook_z`` after the caller's hooks (``[batch, pos, n_heads, d_head]``).
    """
    if spec.kind == "bridge":
        return bridge.register_factor_hooks(model, layer, perturb, capture_input, capture_z)
    attn = model.blocks[layer].attn

    def capture_inputs(module, args, kwargs):
        names = ("query_input", "key_input", "value_input")
        for position, (name, block) in enumerate(zip(names, "QKV")):
            capture_input(block, kwargs[name] if name in kwargs else args[position])

    handles = []
    # q/k/v perturbed before any caller's hook (the gradient is w.r.t. x·W + b itself); z read after
    for block, hook_point in (("Q", attn.hook_q), ("K", attn.hook_k), ("V", attn.hook_v)):
        handles.append(hook_point.register_forward_hook(lambda m, a, out, block=block: perturb(block, out),
                                                        prepend=True))
    handles.append(attn.register_forward_hook(lambda m, a, out: perturb("O", out), prepend=True))
    handles.append(attn.register_forward_pre_hook(capture_inputs, with_kwargs=True, prepend=True))
    handles.append(attn.hook_z.register_forward_hook(lambda m, a, out: capture_z(out)))
    return handles


def check_tokens(spec: ModelSpec, tokens: Tensor, what: str = "tokens") -> None:
    """Raise a clear error if ``tokens`` is not a [batch, pos] LongTensor the model can read."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{what} must have shape [batch, pos], got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(tokens.shape)}")
    if tokens.shape[1] > spec.n_ctx:
        raise ValueError(f"{what} has {tokens.shape[1]} positions but the model's n_ctx is {spec.n_ctx}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= spec.d_vocab:
        raise ValueError(f"{what} has ids in [{lo}, {hi}] outside the vocabulary [0, {spec.d_vocab - 1}]")
