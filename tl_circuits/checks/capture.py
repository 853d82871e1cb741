"""The forward passes the sanity checks read: what the model's own hooks hold, per layer.

- :func:`capture_clean`: one unhooked-looking forward recording, per layer, what the Q/K/V projections read
  (``x``), ``hook_q``/``hook_k``/``hook_v``, the queries that enter the scores (``"query"``:
  :meth:`ModelSpec.query_hook`), ``hook_pattern``, ``hook_z``, the attention output (``z·W_O + b_O``) and
  ``hook_resid_pre``;
- :func:`attention_bias_out`: the attention output with every ``hook_z`` set to 0, i.e. ``b_O`` (or 0), read
  off the model without knowing where its bias lives;
- :func:`isolated_run`: a forward whose every layer reads the clean residual stream (``hook_resid_pre``
  restored), so an edit in layer l shows up in layer l only; returns each layer's pattern and z.

Hooks are TransformerLens ``fwd_hooks`` (removed when the ``model.hooks`` block ends) and, for ``x`` and the
attention output, the torch hooks of :func:`tl_circuits.models.spec.register_factor_hooks` (removed in
``finally``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from tl_circuits.models.spec import ModelSpec, register_factor_hooks
from tl_circuits.models.types import Model

HookFn = Callable[..., object]
Hooks = Sequence[tuple[str, HookFn]]


@dataclass
class Activations:
    """Activations of one forward, per layer (shapes as docs/spec.md §0.3)."""

    x: dict[tuple[int, str], Tensor] = field(default_factory=dict)  # (layer, "Q"|"K"|"V") -> [b, t, D]
    hooked: dict[tuple[int, str], Tensor] = field(default_factory=dict)  # (layer, "q"|"k"|"v"|"query"|"z"|"pattern")
    attn_out: dict[int, Tensor] = field(default_factory=dict)  # [b, t, D]
    resid_pre: dict[int, Tensor] = field(default_factory=dict)  # [b, t, D]


def _keep(store: dict, key: object) -> HookFn:
    def hook(tensor: Tensor, hook: object) -> None:
        store[key] = tensor.detach().clone()
    return hook


def _fired(acts: Activations, kept: list[tuple[str, tuple[int, str]]]) -> None:
    """RuntimeError naming the first hook that was expected to fire and did not."""
    for name, key in kept:
        if key not in acts.hooked:
            raise RuntimeError(f"{name} did not fire in a forward pass: tl_circuits reads it (docs/spec.md §0.3)")


def _run(model: Model, spec: ModelSpec, tokens: Tensor, hooks: Hooks, acts: Activations, torch_hooks: bool) -> None:
    """Forward with ``hooks`` (TransformerLens) and, if asked, the factor hooks filling ``acts.x``/``attn_out``."""
    handles: list = []

    def layer_hooks(layer: int):
        def perturb(block: str, out: Tensor) -> Tensor:
            if block == "O":
                acts.attn_out[layer] = out.detach().clone()
            return out

        def read_input(block: str, x: Tensor) -> None:
            acts.x[(layer, block)] = x.detach().clone()

        return perturb, read_input, lambda z: None

    try:
        if torch_hooks:
            for layer in range(spec.n_layers):
                handles += register_factor_hooks(model, spec, layer, *layer_hooks(layer))
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):  # type: ignore[arg-type]  # TL's list of unions
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()


def capture_clean(model: Model, spec: ModelSpec, tokens: Tensor) -> Activations:
    """The clean forward's activations (module docstring)."""
    acts = Activations()
    kept = [(spec.hook_name(layer, name), (layer, name))
            for layer in range(spec.n_layers) for name in ("q", "k", "v", "pattern", "z")]
    kept += [(spec.query_hook(layer), (layer, "query")) for layer in range(spec.n_layers)]
    hooks = [(spec.resid_pre_hook(layer), _keep(acts.resid_pre, layer)) for layer in range(spec.n_layers)]
    hooks += [(name, _keep(acts.hooked, key)) for name, key in kept]
    _run(model, spec, tokens, hooks, acts, torch_hooks=True)
    _fired(acts, kept)
    if len(acts.resid_pre) != spec.n_layers or len(acts.attn_out) != spec.n_layers:
        raise RuntimeError("hook_resid_pre or the attention output was not seen in every layer")
    return acts


def attention_bias_out(model: Model, spec: ModelSpec, tokens: Tensor) -> dict[int, Tensor]:
    """Each layer's attention output with every head's z set to 0: ``b_O`` broadcast over ``[b, t, D]``."""
    acts = Activations()
    hooks = [(spec.hook_name(layer, "z"), lambda z, hook: torch.zeros_like(z)) for layer in range(spec.n_layers)]
    _run(model, spec, tokens, hooks, acts, torch_hooks=True)
    if len(acts.attn_out) != spec.n_layers:
        raise RuntimeError("the attention output was not seen in every layer")
    return acts.attn_out


def restore_resid(clean: Activations, spec: ModelSpec) -> list[tuple[str, HookFn]]:
    """Hooks writing the clean ``hook_resid_pre`` into every layer."""
    return [(spec.resid_pre_hook(layer), lambda resid, hook, layer=layer: clean.resid_pre[layer].clone())
            for layer in range(spec.n_layers)]


def isolated_run(model: Model, spec: ModelSpec, tokens: Tensor, clean: Activations,
                 edits: Hooks = ()) -> Activations:
    """Forward with ``edits`` where every layer reads the clean residual stream; records pattern and z."""
    acts = Activations()
    hooks = restore_resid(clean, spec) + list(edits)
    kept = [(spec.hook_name(layer, name), (layer, name)) for layer in range(spec.n_layers) for name in ("pattern", "z")]
    hooks += [(name, _keep(acts.hooked, key)) for name, key in kept]
    _run(model, spec, tokens, hooks, acts, torch_hooks=False)
    _fired(acts, kept)
    return acts
