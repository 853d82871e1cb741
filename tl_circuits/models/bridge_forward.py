"""Restarting a TransformerBridge's forward pass at a layer, from a cached residual stream.

TransformerLens 4.3's ``forward(start_at_layer=k)`` still runs blocks 0..k-1 (it swaps the residual in at block
k), so a sweep over layer k's heads pays for the whole model each time. Here the blocks are called directly:
one clean forward records what each block is called with besides the residual (the attention mask, rotary
cos/sin, ALiBi, position ids — functions of the tokens' shape and padding only), and
:meth:`BridgeRestart.run_from_layer` runs blocks k..L-1 on any residual with those arguments, then the final
norm and the unembedding (and Gemma 2's final logit soft-cap, which the HF model applies after ``lm_head``).
Every hook on those blocks fires, so a freeze applies exactly as in a full forward.

A batch of ``n`` variants stacked along the batch (``resid_pre.repeat(n, 1, 1)``) reuses the recorded
arguments, repeated along their batch dim the same way (``[batch, ...]`` and ALiBi's ``[batch·heads, ...]``).

Where it cannot be used (:func:`restart_problem` says why): bridges without a ``blocks`` stack, ``ln_final``
and ``unembed``; models whose logits get other post-processing outside those modules (a ``logit_scale``,
``logits_scaling`` or ``output_multiplier``: Cohere, Granite, ...); the TransformerLens-native bridge (its
blocks are not called with the residual alone). tests/models/test_bridge_forward.py checks every architecture of
the support table against the full forward.

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l", as_bridge=True)
>>> restart_problem(model)
'the TransformerLens-native bridge calls its blocks with more than the residual'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits.models import architectures
from tl_circuits.models.types import Model

__all__ = ["BridgeRestart", "prepare_restart", "restart_problem", "run_from_layer"]

# config attributes of logit post-processing the HF CausalLM applies outside ln_final/unembed (not reproduced)
_LOGIT_POSTPROCESSING = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def restart_problem(model: Model) -> Optional[str]:
    """Why :func:`run_from_layer` cannot restart this bridge (None: it can)."""
    if architectures.architecture_name(model) == "TransformerLensNative":
        return "the TransformerLens-native bridge calls its blocks with more than the residual"
    for name in ("blocks", "ln_final", "unembed"):
        if not hasattr(model, name):
            return f"the bridge has no {name!r} component"
    config = getattr(model.original_model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"{architectures.architecture_name(model)} post-processes its logits ({name}={value})"
    return None


@dataclass
class BridgeRestart:
    """What each block was called with besides the residual, recorded on one clean forward of ``batch`` samples."""

    model: Any
    batch: int
    block_args: list[tuple[tuple, dict]]  # per layer: (positional args after the residual, keyword args)
    resid_pre: list[Tensor]  # the clean residual stream entering each block
    logits: Optional[Tensor] = None  # the recording forward's logits (the clean run: callers need not rerun it)

    def run_from_layer(
        self, resid_pre: Float[Tensor, "batch pos d_model"], layer: int
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of blocks ``layer``..L-1 run on ``resid_pre`` (its batch: a multiple of the recorded one)."""
        if resid_pre.shape[0] % self.batch:
            raise ValueError(f"resid_pre has batch {resid_pre.shape[0]}, not a multiple of the recorded batch "
                             f"{self.batch}")
        copies = resid_pre.shape[0] // self.batch
        x = resid_pre
        for block, (args, kwargs) in zip(self.model.blocks[layer:], self.block_args[layer:]):
            out = block(x, *_repeat(args, self.batch, copies), **_repeat(kwargs, self.batch, copies))
            x = out[0] if isinstance(out, tuple) else out
        logits = self.model.unembed(self.model.ln_final(x))
        cap = getattr(getattr(self.model.original_model, "config", None), "final_logit_softcapping", None)
        if cap:  # Gemma 2: HF's CausalLM soft-caps the logits after lm_head
            logits = torch.tanh(logits / cap) * cap
        return logits


def _repeat(value: Any, batch: int, copies: int) -> Any:
    """Recorded block arguments for ``copies`` stacked copies of the batch (tensors with a batch-major dim 0)."""
    if copies == 1:
        return value
    if isinstance(value, Tensor):  # 1-D tensors (cache positions) and broadcast dims of 1 are not per sample
        if value.ndim >= 2 and value.shape[0] % batch == 0 and (value.shape[0] > 1 or batch == 1):
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(_repeat(v, batch, copies) for v in value)
    if isinstance(value, list):
        return [_repeat(v, batch, copies) for v in value]
    if isinstance(value, dict):
        return {k: _repeat(v, batch, copies) for k, v in value.items()}
    return value


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a TransformerLens dependency
        return False
    return isinstance(value, Cache)


def prepare_restart(
    model: Model, tokens: Int[Tensor, "batch pos"], attention_mask: Optional[Int[Tensor, "batch pos"]] = None
) -> BridgeRestart:
    """One clean forward of ``tokens`` recording every block's call (NotImplementedError where it cannot restart)."""
    problem = restart_problem(model)
    if problem is not None:
        raise NotImplementedError(f"cannot restart this TransformerBridge at a layer: {problem}")
    blocks: Any = model.blocks
    calls: list[Optional[tuple[tuple, dict, Tensor]]] = [None] * len(blocks)

    def recorder(layer: int):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            # no KV cache (whatever the architecture calls it): a restart must not attend to the recording run
            rest = {k: (None if _is_cache(v) else v) for k, v in kwargs.items() if k != "hidden_states"}
            if "use_cache" in rest:
                rest["use_cache"] = False
            calls[layer] = (tuple(None if _is_cache(a) else a for a in args[1:]), rest, hidden.detach())
        return pre_hook

    handles = [block.register_forward_pre_hook(recorder(layer), with_kwargs=True) for layer, block in
               enumerate(blocks)]
    try:
        with torch.no_grad():
            logits = model(tokens, attention_mask=attention_mask, return_type="logits")
    finally:
        for handle in handles:
            handle.remove()
    if any(call is None for call in calls):
        raise NotImplementedError("cannot restart this TransformerBridge at a layer: some blocks were not called "
                                  "by its forward pass")
    recorded = [call for call in calls if call is not None]
    return BridgeRestart(model, tokens.shape[0], [(args, kwargs) for args, kwargs, _ in recorded],
                         [hidden for _, _, hidden in recorded], logits)


def run_from_layer(
    model: Model, resid_pre: Float[Tensor, "batch pos d_model"], layer: int,
    tokens: Int[Tensor, "batch pos"], attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of ``model`` restarted at ``layer`` from ``resid_pre`` (``blocks.{layer}.hook_resid_pre`` of
    ``tokens``, or a batch of stacked variants of it); one recording forward of ``tokens`` first. Use
    :func:`prepare_restart` once and :meth:`BridgeRestart.run_from_layer` per variant to pay for it once."""
    return prepare_restart(model, tokens, attention_mask).run_from_layer(resid_pre, layer)
