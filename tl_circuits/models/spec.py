"""What tl_circuits knows about a model: sizes, hook names and the per-head Q/K/V/O layout.

This is the only module that knows how attention parameters are laid out per head (SPEC §0) and which kind
of model it is talking to — a ``HookedTransformer`` (TransformerLens 2.x/3.x) or a ``TransformerBridge``
(TransformerLens 3.x/4.x; the bridge-specific facts live in :mod:`tl_circuits.models.bridge`, used only here).
Everything else asks it: freezing asks for hook names, the KV head of a query head and the attention
scores of replaced q/k; the gradient engines ask for parameter names, per-head views of gradients, the
forward pass and where to tap activations.

Per-head layout in a HookedTransformer (H query heads, G KV heads, d_model D, d_head d):

======  ===========================================  ============  ==========
block   parameter (per layer)                         shape         head index
======  ===========================================  ============  ==========
Q       ``W_Q`` (+ ``b_Q``)                           [H, D, d]     query head
K       ``_W_K`` (+ ``_b_K``) under GQA, else ``W_K``   [G, D, d]     KV head
V       ``_W_V`` (+ ``_b_V``) under GQA, else ``W_V``   [G, D, d]     KV head
O       ``W_O`` (``b_O`` is not per head)             [H, d, D]     query head
======  ===========================================  ============  ==========

Under GQA ``attn.W_K`` is a *repeated copy* of ``_W_K``: gradients are taken of, and writes go to,
the underscore parameters. Query head ``h`` reads KV head ``h // (H // G)``.

On a TransformerBridge the parameters are the wrapped model's projections (:mod:`tl_circuits.models.bridge`), mapped
to the same per-head rows: an ``nn.Linear`` weight ``[heads·d, D]`` gives ``W_Q[h] = weight[h·d:(h+1)·d].T``
(K, V likewise over KV heads) and an ``o_proj`` ``[D, H·d]`` gives ``W_O[h] = weight[:, h·d:(h+1)·d].T``
(per-head *columns*); GPT-2's ``Conv1D`` ``c_proj`` ``[H·d, D]`` gives ``W_O[h] = weight[h·d:(h+1)·d]``
(per-head *rows*). Hook names are the same; what differs in behaviour is recorded in :class:`ModelSpec`
(``kind``, ``rotary_hooked``, ``qk_mask_source``, ``starts_at_layer``, ``masks_under_vmap``).

>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, n_ctx=8,
...                               d_vocab=10, act_fn="gelu", n_key_value_heads=2,
...                               positional_embedding_type="rotary")
>>> spec = model_spec(HookedTransformer(cfg))
>>> spec.n_kv_heads, spec.kv_head(3)
(2, 1)
>>> spec.param_name(1, "K")
'blocks.1.attn._W_K'
>>> spec.query_hook(0)
'blocks.0.attn.hook_rot_q'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import functional_call

from tl_circuits.models import bridge

try:  # TransformerLens 2.x/3.x; 4.x removed HookedTransformer
    from transformer_lens import HookedTransformer
except ImportError:
    HookedTransformer = None

Block = Literal["Q", "K", "V", "O"]
BLOCKS: tuple[Block, ...] = ("Q", "K", "V", "O")

# Architectures whose attention scores are not a plain function of hook_q/hook_k (or their rotary
# versions): a QK freeze recomputes a head's scores from those hooks, so these would be wrong.
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
    # ("scores"), or exact zeros of the pattern in every head ("pattern"); None: pattern edits do not
    # reach the output, so QK freezes are impossible
    qk_mask_source: Optional[Literal["scores", "pattern"]] = "scores"
    starts_at_layer: bool = True  # forward(start_at_layer=...) restarts from a cached resid_pre
    masks_under_vmap: bool = True  # forward(attention_mask=...) runs under torch.func.vmap
    # bridge only: block -> "linear" | "conv1d" weight layout, (layer, block, bias) -> parameter name
    weight_layouts: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    param_names: tuple[tuple[tuple[int, str, bool], str], ...] = field(default=(), repr=False)

    # ----- heads -----------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head ``head`` reads: ``head // (H // G)``."""
        return head // self.group_size

    def n_block_heads(self, block: Block) -> int:
        """Heads along which ``block`` is resolved: KV heads for K/V, query heads for Q/O."""
        _check_block(block)
        return self.n_kv_heads if block in ("K", "V") else self.n_heads

    def check_layer_head(self, layer: int, head: int) -> None:
        """Raise IndexError naming the problem if (layer, head) is not in the model."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not isinstance(head, int) or isinstance(head, bool):
            raise TypeError(f"head must be an int, got {head!r}")
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} heads per layer (0..{self.n_heads - 1})")

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

    # ----- parameters --------------------------------------------------------------------------
    def param_name(self, layer: int, block: Block, bias: bool = False) -> str:
        """Name (in ``model.named_parameters()``) of a layer's block weight or bias.

        Raises ValueError for ``("O", bias=True)``: ``b_O`` is shared by all heads; on a bridge, also for a
        bias the wrapped model does not have (e.g. LLaMA's projections).
        """
        _check_block(block)
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
        per_layer = []
        heads = self.n_block_heads(block)
        for layer in range(self.n_layers):
            weight = tensors[self.param_name(layer, block)]
            if self.kind == "bridge":  # the wrapped model's Linear/Conv1D weight -> [..., heads, a, b]
                weight = bridge.weight_to_heads(weight, block, dict(self.weight_layouts)[block], heads)
            # every per-layer weight now has the head first: [..., heads, a, b]
            parts = [einops.rearrange(weight, "... head a b -> ... head (a b)")]
            if include_biases and block != "O":
                bias = tensors[self.param_name(layer, block, bias=True)]
                parts.append(bridge.bias_to_heads(bias, heads) if self.kind == "bridge" else bias)
            per_layer.append(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        return torch.stack(per_layer, dim=-3)

    # ----- per-head gradients from activations (used by tl_circuits.interference.gradients) ------------------
    # A block's per-sample weight gradient is a sum over positions of outer products:
    #   Q/K/V: W[h] is [D, d] and its input is the attention input x_t (query/key/value input of
    #          the attention module): dL/dW[h] = Σ_t x_t ⊗ dL/d(hook_q|k|v)_t[h], dL/db[h] = Σ_t dL/d(...)_t[h]
    #          (hook_q/k/v hold x·W + b before rotary and qk-norm; K/V over KV heads under GQA);
    #   O:     W_O[h] is [d, D] and reads z (hook_z): dL/dW_O[h] = Σ_t z_t[h] ⊗ dL/d(attention output)_t.
    def rows_from_factors(
        self,
        block: Block,
        inputs: Float[Tensor, "... n_layers pos in_dim"],
        out_grads: Float[Tensor, "... n_layers pos out_dim"],
        include_biases: bool = False,
    ) -> Float[Tensor, "... n_layers block_heads per_head"]:
        """Per-head gradient rows (as :meth:`per_head` lays them out) from activations and output gradients.

        Q/K/V: ``inputs`` is the attention input ``[..., L, pos, D]`` and ``out_grads`` the gradient at
        ``hook_q``/``hook_k``/``hook_v`` ``[..., L, pos, heads, d]``. O: ``inputs`` is ``hook_z``
        ``[..., L, pos, H, d]`` and ``out_grads`` the gradient of the attention module's output
        ``[..., L, pos, D]``.
        """
        _check_block(block)
        if block == "O":
            rows = einops.einsum(inputs, out_grads, "... t h e, ... t m -> ... h e m")
        else:
            rows = einops.einsum(inputs, out_grads, "... t m, ... t h e -> ... h m e")
        rows = einops.rearrange(rows, "... h a b -> ... h (a b)")
        if include_biases and block != "O":
            rows = torch.cat([rows, out_grads.sum(-3)], dim=-1)
        return rows

    def write_rows_from_factors(
        self,
        block: Block,
        inputs: Float[Tensor, "n n_layers pos in_dim"],
        out_grads: Float[Tensor, "n n_layers pos out_dim"],
        out: Float[Tensor, "n_layers block_heads n per_head"],
        scratch: Tensor,
        include_biases: bool = False,
    ) -> None:
        """:meth:`rows_from_factors` written into ``out`` (sample-minor layout ``[L, heads, n, P]``, any
        strides), through ``scratch`` (a contiguous float32 tensor of at least ``n·L·D·H·d`` elements):
        one batched matmul, one strided copy, no large allocation."""
        _check_block(block)
        n, n_layers, n_pos = inputs.shape[:3]
        heads = self.n_block_heads(block)
        d_in, d_out = (self.n_heads * self.d_head, self.d_model) if block == "O" else (self.d_model, heads * self.d_head)
        lhs = inputs.reshape(n * n_layers, n_pos, d_in).transpose(1, 2)  # [n·L, in, pos]
        rhs = out_grads.reshape(n * n_layers, n_pos, d_out)  # [n·L, pos, out]
        product = scratch.view(-1)[: n * n_layers * d_in * d_out].view(n * n_layers, d_in, d_out)
        torch.bmm(lhs, rhs, out=product)
        if block == "O":  # [n, L, (h e), m] -> [L, h, n, e, m]
            rows = product.view(n, n_layers, heads, self.d_head, self.d_model).permute(1, 2, 0, 3, 4)
        else:  # [n, L, m, (h e)] -> [L, h, n, m, e]
            rows = product.view(n, n_layers, self.d_model, heads, self.d_head).permute(1, 3, 0, 2, 4)
        n_weights = self.d_model * self.d_head
        out[..., :n_weights].unflatten(-1, rows.shape[-2:]).copy_(rows)
        if include_biases and block != "O":
            out[..., n_weights:].copy_(out_grads.sum(2).permute(1, 2, 0, 3))

    def n_params_per_head(self, block: Block, include_biases: bool = False) -> int:
        """Length of a head's row in :meth:`per_head`."""
        n = self.d_model * self.d_head
        if include_biases and block != "O":
            n += self.d_head
        return n


def _check_block(block: str) -> None:
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")


def model_spec(model: object) -> ModelSpec:
    """Read a :class:`ModelSpec` off a HookedTransformer or a TransformerBridge, rejecting what tl_circuits
    cannot handle (``NotImplementedError`` naming the problem)."""
    if bridge.is_bridge(model):
        return _bridge_spec(model)
    if HookedTransformer is None or not isinstance(model, HookedTransformer):
        raise TypeError(
            "tl_circuits needs a transformer_lens.HookedTransformer or TransformerBridge, got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    cfg = model.cfg
    problems = []
    if cfg.positional_embedding_type in ("alibi", "relative_positional_bias"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} adds a bias to the scores")
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
    return ModelSpec(**_sizes(cfg, n_kv), grouped=cfg.n_key_value_heads is not None)


def _sizes(cfg, n_kv: int) -> dict:
    """The :class:`ModelSpec` fields read off a HookedTransformerConfig or TransformerBridgeConfig alike."""
    return dict(n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=n_kv, d_model=cfg.d_model,
                d_head=cfg.d_head, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
                rotary=cfg.positional_embedding_type == "rotary")


def _bridge_spec(model) -> ModelSpec:
    """:class:`ModelSpec` of a TransformerBridge: sizes from its cfg, parameters and hook behaviour from
    its attention bridges (:mod:`tl_circuits.models.bridge`)."""
    cfg = model.cfg
    problems = bridge.problems(model)
    if problems:
        raise NotImplementedError("tl_circuits does not support this TransformerBridge: " + "; ".join(problems))
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ValueError(f"n_heads={cfg.n_heads} is not a multiple of n_key_value_heads={n_kv}")
    attn = bridge.attention(model, 0)
    if not bridge.pattern_edits_apply(attn):
        mask_source = None
    else:
        mask_source = "scores" if bridge.scores_hook_is_live(attn) else "pattern"
    layouts = []
    for block in BLOCKS:
        kinds = {bridge.weight_layout(bridge.projection(model, layer, block)) for layer in range(cfg.n_layers)}
        if len(kinds) != 1:
            raise NotImplementedError(f"{block} projections of this bridge mix weight layouts {sorted(kinds)}")
        layouts.append((block, kinds.pop()))
    return ModelSpec(
        **_sizes(cfg, n_kv),
        grouped=n_kv != cfg.n_heads,
        kind="bridge",
        rotary_hooked=bridge.rotary_hooks_fire(attn),
        qk_mask_source=mask_source,
        starts_at_layer=False,
        masks_under_vmap=False,
        weight_layouts=tuple(layouts),
        param_names=tuple(sorted(bridge.parameter_names(model).items())),
    )


# ----- what the rest of the package asks of a model ------------------------------------------------

def attention_scores(
    model,
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


def post_rotary(model, spec: ModelSpec, layer: int, x: Float[Tensor, "batch pos head d_head"]) -> Tensor:
    """Queries/keys as they enter the scores, from what :meth:`ModelSpec.query_hook`/``key_hook`` hold:
    the identity, except on a bridge whose rotary hooks never fire (native), where rotary is applied here."""
    if spec.rotary and not spec.rotary_hooked:
        return bridge.rotate(model, layer, x)
    return x


def model_logits(model, spec: ModelSpec, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Logits of ``tokens`` (one sample inside ``vmap`` or a batch). On a bridge ``attention_mask`` must be
    ``None`` (``spec.masks_under_vmap`` is False: callers trim padding instead)."""
    if spec.kind == "bridge":
        if attention_mask is not None:
            raise ValueError("a TransformerBridge forward with an attention mask cannot run under vmap; trim padding")
        return bridge.logits(model, tokens)
    return model(tokens, attention_mask=attention_mask, return_type="logits")


def functional_logits(
    model, spec: ModelSpec, params: Mapping[str, Tensor], tokens: Tensor, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """:func:`model_logits` with the named parameters replaced (``torch.func.functional_call``), the model's
    own parameters untouched."""
    if spec.kind == "bridge":
        if attention_mask is not None:
            raise ValueError("a TransformerBridge forward with an attention mask cannot run under vmap; trim padding")
        return bridge.functional_logits(model, dict(params), tokens)
    return functional_call(model, dict(params), (tokens,), {"attention_mask": attention_mask, "return_type": "logits"})


def register_factor_hooks(
    model,
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
