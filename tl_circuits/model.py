"""What tl_circuits knows about a model: sizes, hook names and the per-head Q/K/V/O layout.

This is the only module that knows how attention parameters are laid out per head (SPEC §0).
Everything else asks it: freezing asks for hook names and the KV head of a query head,
interference asks for parameter names and for per-head views of gradients.

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

from dataclasses import dataclass
from typing import Literal, Mapping

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

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
        """Hook holding the queries that enter the scores (post-rotary where rotary is used)."""
        return self.hook_name(layer, "rot_q" if self.rotary else "q")

    def key_hook(self, layer: int) -> str:
        """Hook holding the keys that enter the scores (post-rotary where rotary is used)."""
        return self.hook_name(layer, "rot_k" if self.rotary else "k")

    @staticmethod
    def resid_pre_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    # ----- parameters --------------------------------------------------------------------------
    def param_name(self, layer: int, block: Block, bias: bool = False) -> str:
        """Name (in ``model.named_parameters()``) of a layer's block weight or bias.

        Raises ValueError for ``("O", bias=True)``: ``b_O`` is shared by all heads.
        """
        _check_block(block)
        if block == "O" and bias:
            raise ValueError("b_O is not per head and has no per-head layout")
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
        for layer in range(self.n_layers):
            weight = tensors[self.param_name(layer, block)]
            # every per-layer weight has the head first: [..., heads, a, b]
            parts = [einops.rearrange(weight, "... head a b -> ... head (a b)")]
            if include_biases and block != "O":
                parts.append(tensors[self.param_name(layer, block, bias=True)])
            per_layer.append(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        return torch.stack(per_layer, dim=-3)

    # ----- per-head gradients from activations (used by tl_circuits.gradients) ------------------
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
    """Read a :class:`ModelSpec` off a HookedTransformer, rejecting what tl_circuits cannot handle."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(
            f"tl_circuits needs a transformer_lens.HookedTransformer, got {type(model).__module__}."
            f"{type(model).__name__}"
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
    return ModelSpec(
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        grouped=cfg.n_key_value_heads is not None,
        rotary=cfg.positional_embedding_type == "rotary",
    )


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
