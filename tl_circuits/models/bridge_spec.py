"""The :class:`~tl_circuits.models.spec.ModelSpec` of a TransformerBridge, read off its attention components.

Nothing here is keyed on a model name: the sizes come from the bridge's config, the per-head layout from
its split q/k/v/o projection modules (checked against the sizes, :func:`~tl_circuits.models.layout.
check_projection_shape`), and what a QK freeze needs — where the scores, mask and rotated queries are, whether
pattern edits apply, whether an additive position bias is present — from the attention family
(:mod:`tl_circuits.models.architectures`).

>>> from tl_circuits import load_bundled_model
>>> spec = bridge_spec(load_bundled_model("induction-2l", as_bridge=True))
>>> spec.kind, spec.architecture, spec.qk_route
('bridge', 'TransformerLensNative', 'pattern')
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from tl_circuits.models import architectures, bridge
from tl_circuits.models.layout import BLOCKS, Block, WeightLayout, check_projection_shape, head_kind
from tl_circuits.models.spec import ModelSpec, config_sizes, dtype_of
from tl_circuits.models.types import Model

__all__ = ["bridge_spec"]

MaskSource = Optional[Literal["scores", "pattern", "causal"]]


def _mask_source(family: architectures.Family, attn: object) -> MaskSource:
    if family == "delegating":
        return "causal"  # no mask is hooked before z; these causal decoders mask nothing else unpadded
    if not architectures.pattern_edits_apply(family, attn):
        return None
    return "scores" if architectures.scores_hook_is_live(family) else "pattern"


def _layouts(model: Model, n_kv: int) -> tuple[tuple[Block, WeightLayout], ...]:
    """Each block's weight layout, the same in every layer, with every projection's shape checked."""
    cfg, out = model.cfg, []
    for block in BLOCKS:
        kinds = set()
        heads = n_kv if head_kind(block) == "kv" else cfg.n_heads
        for layer in range(cfg.n_layers):
            module: Any = bridge.projection(model, layer, block)
            layout = bridge.weight_layout(module)
            check_projection_shape(module.weight, block, layout, heads, cfg.d_model, cfg.d_head,
                                   f"{bridge.architecture(model)} layer {layer}")
            kinds.add(layout)
        if len(kinds) != 1:
            raise NotImplementedError(f"{block} projections of this bridge mix weight layouts {sorted(kinds)}")
        out.append((block, kinds.pop()))
    return tuple(out)


def bridge_spec(model: Model) -> ModelSpec:
    """:class:`ModelSpec` of a TransformerBridge (module docstring); NotImplementedError naming the architecture
    and the problem for one whose attention tl_circuits does not know."""
    cfg = model.cfg
    problems = bridge.problems(model)
    if problems:
        raise NotImplementedError("tl_circuits does not support this TransformerBridge: " + "; ".join(problems))
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ValueError(f"{bridge.architecture(model)}: n_heads={cfg.n_heads} is not a multiple of "
                         f"n_key_value_heads={n_kv}")
    family = bridge.family(model, 0)
    attn = bridge.attention(model, 0)
    return ModelSpec(
        **config_sizes(cfg, n_kv),
        grouped=n_kv != cfg.n_heads,
        kind="bridge",
        rotary_hooked=not architectures.rotary_hidden(model, family),
        qk_mask_source=_mask_source(family, attn),
        qk_route="z" if family == "delegating" else "pattern",
        position_bias=architectures.has_position_bias(family),
        architecture=bridge.architecture(model),
        starts_at_layer=False,
        masks_under_vmap=False,
        weight_layouts=_layouts(model, n_kv),
        param_names=tuple(sorted(bridge.parameter_names(model).items())),
        dtype=dtype_of(bridge.projection(model, 0, "Q").weight),
    )
