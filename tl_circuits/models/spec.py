"""What tl_circuits knows about a model: sizes, hook names, parameter names and which kind of model it is.

:func:`model_spec` reads a :class:`ModelSpec` off a ``HookedTransformer`` (TransformerLens 2.x/3.x) or a
``TransformerBridge`` (TransformerLens 3.x/4.x; the bridge-specific facts live in :mod:`tl_circuits.models.bridge`).
Everything else asks the spec rather than ``model.cfg``: freezing asks for hook names, the KV head of a
query head and the parameter dtype; the gradient engines ask for parameter names, per-head rows and
whether the q/k/v inputs are one tensor.

The per-head Q/K/V/O layout itself (docs/spec.md §0) lives in :mod:`tl_circuits.models.layout`; the methods
:meth:`ModelSpec.per_head`, :meth:`~ModelSpec.params_from_per_head`, :meth:`~ModelSpec.rows_from_factors`,
:meth:`~ModelSpec.write_rows_from_factors` and :meth:`~ModelSpec.n_params_per_head` delegate to it with this
model's sizes. In a HookedTransformer (H query heads, G KV heads): Q ``W_Q`` [H, D, d], K/V ``_W_K``/``_W_V``
[G, D, d] under GQA (``W_K``/``W_V`` otherwise; ``attn.W_K`` is a repeated *copy* of ``_W_K``, so gradients
are taken of and writes go to the underscore parameters), O ``W_O`` [H, d, D]. Query head ``h`` reads KV
head ``h // (H // G)``. On a bridge the parameters are the wrapped model's projections, and what differs
in behaviour is recorded in :class:`ModelSpec` (``kind``, ``rotary_hooked``, ``qk_mask_source``,
``starts_at_layer``, ``masks_under_vmap``).

The forward passes and hooks (:func:`attention_scores`, :func:`model_logits`, :func:`register_factor_hooks`,
...) live in :mod:`tl_circuits.models.hooked` and are re-exported here.

A LLaMA-style model with GQA (4 query heads over 2 KV heads) and rotary positions, random weights, as a bridge:

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
>>> hf = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                                   num_attention_heads=4, num_key_value_heads=2))
>>> spec = model_spec(build_bridge_from_module(hf, architecture="LlamaForCausalLM", hf_config=hf.config))
>>> spec.kind, spec.n_kv_heads, spec.kv_head(3)
('bridge', 2, 1)
>>> spec.param_name(1, "K")  # the wrapped k_proj (a HookedTransformer's would be 'blocks.1.attn._W_K')
'model.layers.1._original_component.self_attn._original_component.k_proj._original_component.weight'
>>> spec.query_hook(0)
'blocks.0.attn.hook_rot_q'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from tl_circuits.models import bridge
from tl_circuits.models.hooked import (  # re-exported: callers import them from here
    attention_scores,
    check_tokens,
    functional_logits,
    model_logits,
    post_rotary,
    register_factor_hooks,
)
from tl_circuits.models.layout import (
    BLOCKS,
    Block,
    HeadKind,
    WeightLayout,
    check_block,
    factor_shapes,
    head_kind,
    layer_params_from_rows,
    layer_rows,
    n_params_per_head,
    rows_from_factors,
    write_rows_from_factors,
)

try:  # TransformerLens 2.x/3.x; 4.x removed HookedTransformer
    from transformer_lens import HookedTransformer
except ImportError:
    HookedTransformer = None  # type: ignore[misc,assignment]

__all__ = [
    "BLOCKS", "Block", "HeadKind", "ModelSpec", "WeightLayout", "model_spec",
    # re-exported from tl_circuits.models.hooked
    "attention_scores", "check_tokens", "functional_logits", "model_logits", "post_rotary", "register_factor_hooks",
]

# HookedTransformer architectures that normalise q/k after hook_rot_q/hook_rot_k: a QK freeze recomputes a
# head's scores from those hooks, so these would be wrong (their TransformerBridges hook the normalised ones).
_UNSUPPORTED_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


@dataclass(frozen=True)
class ModelSpec:
    """Sizes, hook names and parameter layout of one HookedTransformer (see module docstring)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    grouped: bool  # K/V stored per KV head (`_W_K`), i.e. cfg.n_key_value_heads is set
    rotary: bool  # rotary is applied after hook_q/hook_k; scores read hook_rot_q/hook_rot_k
    # ----- what differs between a HookedTransformer and a TransformerBridge (defaults: HookedTransformer)
    kind: Literal["hooked", "bridge"] = "hooked"
    rotary_hooked: bool = True  # hook_rot_q/k fire; False: rotate hook_q/hook_k as the model does (post_rotary)
    # where a QK freeze finds the causal/padding mask: masked pre-softmax scores at hook_attn_scores
    # ("scores"), exact zeros of the pattern in every head ("pattern"), or the causal mask alone where
    # no mask is hooked before z ("causal": delegating bridges, GPT-J/OPT); None: QK freezes are impossible
    qk_mask_source: Optional[Literal["scores", "pattern", "causal"]] = "scores"
    # where a QK freeze writes the frozen head: its slice of hook_pattern ("pattern"), or, where pattern edits
    # never reach the output (GPT-J, OPT), its z = pattern · v at hook_z ("z"; docs/spec.md §1.4)
    qk_route: Literal["pattern", "z"] = "pattern"
    # the live scores carry an additive position bias that q·k does not give (ALiBi), kept by QK freezes
    position_bias: bool = False
    architecture: str = ""  # what error messages call the model (the wrapped HF class, or "HookedTransformer")
    # forward(start_at_layer=...) restarts from a cached resid_pre (bridges: False; the sweep restarts them with
    # models.bridge_forward where restart_problem allows)
    starts_at_layer: bool = True
    masks_under_vmap: bool = True  # forward(attention_mask=...) runs under torch.func.vmap
    # bridge only: block -> "linear" | "conv1d" weight layout, (layer, block, bias) -> parameter name
    weight_layouts: tuple[tuple[Block, WeightLayout], ...] = field(default=(), repr=False)
    param_names: tuple[tuple[tuple[int, str, bool], str], ...] = field(default=(), repr=False)
    # ----- the rest of the model, for memory rules and callers that would otherwise read model.cfg
    d_mlp: Optional[int] = None  # cfg.d_mlp as the config gives it (set even when attn_only; None: not given)
    attn_only: bool = False  # no MLP blocks
    shared_qkv_input: bool = True  # Q/K/V read one tensor (False under shortformer positions: added to Q/K only)
    use_attn_result: bool = False  # hook_result fires per head (W_O's output split by head before the sum)
    dtype: torch.dtype = torch.float32  # dtype of the attention parameters, and so of q/k/v/z

    # ----- heads -----------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head ``head`` reads: ``head // (H // G)``."""
        return head // self.group_size

    def head_kind(self, block: Block) -> HeadKind:
        """``"kv"`` for K/V (resolved over the G KV heads), ``"query"`` for Q/O (over the H query heads)."""
        return head_kind(block)

    def n_block_heads(self, block: Block) -> int:
        """Heads along which ``block`` is resolved: KV heads for K/V, query heads for Q/O."""
        return self.n_kv_heads if head_kind(block) == "kv" else self.n_heads

    def check_layer_head(self, layer: int, head: int) -> None:
        """Raise IndexError naming the problem if (layer, head) is not in the model."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not isinstance(head, int) or isinstance(head, bool):
            raise TypeError(f"head must be an int, got {head!r}")
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers "
                             f"(0..{self.n_layers - 1})")
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} heads per layer "
                             f"(0..{self.n_heads - 1})")

    # ----- hook names --------------------------------------------------------------------------
    @staticmethod
    def hook_name(layer: int, name: str) -> str:
        """``blocks.{layer}.attn.hook_{name}``, e.g. ``hook_name(3, "z")``."""
        return f"blocks.{layer}.attn.hook_{name}"

    def query_hook(self, layer: int) -> str:
        """Hook holding the queries that enter the scores (post-rotary where rotary is used and hooked;
        pre-rotary on a native bridge, whose rotary hooks never fire: see :func:`post_rotary`)."""
        return self.hook_name(layer, "rot_q" if self.rotary and self.rotary_hooked else "q")

    def key_hook(self, layer: int) -> str:
        """Hook holding the keys that enter the scores (as :meth:`query_hook`)."""
        return self.hook_name(layer, "rot_k" if self.rotary and self.rotary_hooked else "k")

    @staticmethod
    def resid_pre_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    def block_output_hooks(self, layer: int) -> list[str]:
        """Hooks of what block ``layer`` adds to the residual stream: its attention output, and its MLP output
        unless the model is attention-only."""
        return [f"blocks.{layer}.hook_attn_out"] + ([] if self.attn_only else [f"blocks.{layer}.hook_mlp_out"])

    # ----- parameters --------------------------------------------------------------------------
    def param_name(self, layer: int, block: Block, bias: bool = False) -> str:
        """Name (in ``model.named_parameters()``) of a layer's block weight or bias.

        Raises ValueError for ``("O", bias=True)``: ``b_O`` is shared by all heads; on a bridge, also for a
        bias the wrapped model does not have (e.g. LLaMA's projections).
        """
        check_block(block)
        if block == "O" and bias:
            raise ValueError("b_O is not per head and has no per-head layout")
        if self.kind == "bridge":
            name = dict(self.param_names).get((layer, block, bias))
            if name is None:
                raise ValueError(f"this bridge's {block} projection of layer {layer} has no bias parameter")
            return name
        prefix = "_" if (self.grouped and block in ("K", "V")) else ""
        kind = "b" if bias else "W"
        return f"blocks.{layer}.attn.{prefix}{kind}_{block}"

    def attention_param_names(self, include_biases: bool = False) -> list[str]:
        """Names of every per-head attention parameter, layer by layer, blocks in Q/K/V/O order."""
        names = []
        for layer in range(self.n_layers):
            for block in BLOCKS:
                names.append(self.param_name(layer, block))
                if include_biases and block != "O":
                    names.append(self.param_name(layer, block, bias=True))
        return names

    def weight_layout(self, block: Block) -> WeightLayout:
        """How a ``block`` parameter is laid out (:mod:`tl_circuits.models.layout`): ``"hooked"`` on a
        HookedTransformer; ``"linear"`` or ``"conv1d"`` for a bridge's wrapped projections."""
        check_block(block)
        return "hooked" if self.kind == "hooked" else dict(self.weight_layouts)[block]

    def per_head(
        self,
        tensors: Mapping[str, Tensor],
        block: Block,
        include_biases: bool = False,
    ) -> Float[Tensor, "... n_layers block_heads per_head"]:
        """Stack one block's per-layer tensors (weights, then biases) into per-head rows.

        ``tensors`` maps parameter names (as :meth:`param_name`) to tensors shaped like the
        parameter with any number of leading dims (e.g. a sample dim for per-sample gradients).
        Returns ``[..., n_layers, heads, n_params_per_head]`` where ``heads`` is G for K/V and H
        for Q/O, and a head's row is its weight slice flattened (then its bias slice, if asked).
        """
        layout, heads = self.weight_layout(block), self.n_block_heads(block)
        with_bias = include_biases and block != "O"
        return torch.stack([
            layer_rows(tensors[self.param_name(layer, block)],
                       tensors[self.param_name(layer, block, bias=True)] if with_bias else None,
                       block, layout, heads)
            for layer in range(self.n_layers)
        ], dim=-3)

    def params_from_per_head(
        self,
        rows: Float[Tensor, "... n_layers block_heads per_head"],
        block: Block,
        include_biases: bool = False,
    ) -> dict[str, Tensor]:
        """Inverse of :meth:`per_head`: parameter name -> tensor shaped like that parameter (leading dims kept)."""
        heads = self.n_block_heads(block)
        if rows.ndim < 3 or rows.shape[-3:-1] != (self.n_layers, heads):
            raise ValueError(f"{block} rows must be [..., n_layers={self.n_layers}, heads={heads}, per_head], "
                             f"got shape {tuple(rows.shape)}")
        out = {}
        for layer in range(self.n_layers):
            weight, bias = layer_params_from_rows(rows[..., layer, :, :], block, self.weight_layout(block),
                                                  self.d_model, self.d_head, include_biases)
            out[self.param_name(layer, block)] = weight
            if bias is not None:
                out[self.param_name(layer, block, bias=True)] = bias
        return out

    # ----- per-head gradients from activations (used by tl_circuits.interference.gradients) ------------------
    def factor_shapes(self, block: Block) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-position shapes of a block's ``(inputs, out_grads)`` in :meth:`rows_from_factors`."""
        return factor_shapes(block, self.n_block_heads(block), self.d_model, self.d_head)

    def rows_from_factors(
        self,
        block: Block,
        inputs: Float[Tensor, "... n_layers pos in_dim"],
        out_grads: Float[Tensor, "... n_layers pos out_dim"],
        include_biases: bool = False,
    ) -> Float[Tensor, "... n_layers block_heads per_head"]:
        """Per-head gradient rows (as :meth:`per_head` lays them out) from activations and output gradients
        (:func:`tl_circuits.models.layout.rows_from_factors`)."""
        return rows_from_factors(block, inputs, out_grads, include_biases)

    def write_rows_from_factors(
        self,
        block: Block,
        inputs: Float[Tensor, "n n_layers pos in_dim"],
        out_grads: Float[Tensor, "n n_layers pos out_dim"],
        out: Float[Tensor, "n_layers block_heads n per_head"],
        scratch: Tensor,
        include_biases: bool = False,
    ) -> None:
        """:meth:`rows_from_factors` written into ``out`` through ``scratch``
        (:func:`tl_circuits.models.layout.write_rows_from_factors`)."""
        write_rows_from_factors(block, inputs, out_grads, out, scratch, self.n_block_heads(block),
                                self.d_model, self.d_head, include_biases)

    def n_params_per_head(self, block: Block, include_biases: bool = False) -> int:
        """Length of a head's row in :meth:`per_head`."""
        return n_params_per_head(block, self.d_model, self.d_head, include_biases)

    def n_attention_params(self, include_biases: bool = False) -> int:
        """Number of per-head attention parameters, all layers and blocks (the length of a full gradient)."""
        return sum(self.n_layers * self.n_block_heads(b) * self.n_params_per_head(b, include_biases) for b in BLOCKS)

    def of_layers(self, n_layers: int) -> "ModelSpec":
        """The sizes of ``n_layers`` of this model's layers seen as a model of their own: what the factor store, the
        memory plan and the score pass of a run over a layer subset work on (its layer ``i`` is the subset's
        ``i``-th layer). Its hook and parameter names are not the model's: ask this spec, not that one, for them."""
        return dataclasses.replace(self, n_layers=n_layers)

def model_spec(model: object) -> ModelSpec:
    """Read a :class:`ModelSpec` off a HookedTransformer or a TransformerBridge, rejecting what tl_circuits
    cannot handle (``NotImplementedError`` naming the problem)."""
    if bridge.is_bridge(model):
        from tl_circuits.models.bridge_spec import bridge_spec  # it builds on ModelSpec

        return bridge_spec(model)  # type: ignore[arg-type]  # is_bridge checked it
    if HookedTransformer is None or not isinstance(model, HookedTransformer):
        raise TypeError(
            "tl_circuits needs a transformer_lens.HookedTransformer or TransformerBridge, got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    cfg = model.cfg
    problems = []
    if cfg.positional_embedding_type == "relative_positional_bias":
        problems.append("positional_embedding_type='relative_positional_bias' (a bias of the scores not yet tested)")
    for flag in ("use_attention_sinks", "use_logn_attn", "load_in_4bit"):
        if getattr(cfg, flag, False):
            problems.append(f"cfg.{flag}=True")
    if getattr(cfg, "use_qk_norm", False) and cfg.positional_embedding_type != "rotary":
        problems.append("cfg.use_qk_norm without rotary (normalised queries are not hooked)")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("cfg.clip_qkv is set")
    if getattr(cfg, "original_architecture", None) in _UNSUPPORTED_ARCHITECTURES:
        problems.append(f"architecture {cfg.original_architecture} normalises q/k after the hooks")
    if getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False):
        problems.append("per-head attention inputs (use_split_qkv_input / use_attn_in)")
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        problems.append("cfg.ungroup_grouped_query_attention=True")
    if problems:
        raise NotImplementedError("tl_circuits does not support this model: " + "; ".join(problems))
    n_kv = cfg.n_key_value_heads if cfg.n_key_value_heads is not None else cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ValueError(f"n_heads={cfg.n_heads} is not a multiple of n_key_value_heads={n_kv}")
    return ModelSpec(**config_sizes(cfg, n_kv), grouped=cfg.n_key_value_heads is not None,
                     use_attn_result=bool(getattr(cfg, "use_attn_result", False)),
                     position_bias=cfg.positional_embedding_type == "alibi",
                     architecture=str(getattr(cfg, "original_architecture", None) or "HookedTransformer"),
                     dtype=dtype_of(model.blocks[0].attn.W_Q))


def dtype_of(parameter: object) -> torch.dtype:
    if not isinstance(parameter, Tensor):
        raise TypeError(f"expected an attention weight tensor, got {type(parameter).__name__}")
    return parameter.dtype


def config_sizes(cfg, n_kv: int) -> dict:
    """The :class:`ModelSpec` fields read off a HookedTransformerConfig or TransformerBridgeConfig alike."""
    d_mlp = getattr(cfg, "d_mlp", None)
    return dict(n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=n_kv, d_model=cfg.d_model,
                d_head=cfg.d_head, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
                rotary=cfg.positional_embedding_type == "rotary",
                d_mlp=None if d_mlp is None else int(d_mlp), attn_only=bool(getattr(cfg, "attn_only", False)),
                # shortformer positions are added to the query and key inputs only
                shared_qkv_input=cfg.positional_embedding_type != "shortformer")
