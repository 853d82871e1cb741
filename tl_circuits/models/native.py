"""HookedTransformer weights as a TransformerLens-native ``TransformerBridge`` (TransformerLens 3.x and 4.x).

TransformerLens 4.x has no ``HookedTransformer``; its own answer for weights saved by one is
``transformer_lens.model_bridge.sources.tl_legacy``: derive a ``TransformerBridgeConfig`` from the
TransformerLens-style config, convert the state dict with
``transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint`` (``blocks.0.attn.W_Q``
``[head, d_model, d_head]`` -> ``blocks.0.attn.q.weight`` ``[head·d_head, d_model]``, ...), and load it
strictly into ``TransformerBridge.boot_native(cfg)``. :func:`native_bridge_from_tl` does the same for
local weights (the bundled models, local checkpoints). TransformerLens 3.9.0 has ``boot_native`` with the
same parameter names but not the converter, so :func:`convert_tl_state_dict` uses TransformerLens's
converter where it exists and an equivalent port otherwise (``tests/bundled/test_bundled_bridge.py`` checks the two
agree on 4.x, and that the bridge's logits equal the HookedTransformer's on 3.x).

Only configurations whose forward pass the native model reproduces are accepted: learned ("standard")
positions, LayerNorm / RMSNorm / no normalisation, MHA or GQA, attention-only or a (gated) MLP, no
HookedTransformer-only features (local attention, soft caps, QK norm, ...). Anything else raises
``NotImplementedError`` naming the field.

>>> from tl_circuits import load_bundled_model
>>> bridge = load_bundled_model("induction-2l", as_bridge=True)  # native_bridge_from_tl on the bundled weights
>>> type(bridge).__name__
'TransformerBridge'
"""

from __future__ import annotations

from typing import Any, Optional, Union

import einops
import torch
from torch import Tensor

from tl_circuits.models.types import Model

__all__ = ["bridge_config", "convert_tl_state_dict", "native_bridge_from_tl"]

# HookedTransformerConfig arguments the native model reads, with HookedTransformerConfig's defaults
_PASSED = dict(n_layers=None, d_model=None, n_heads=-1, d_head=None, d_mlp=None, n_ctx=None, d_vocab=-1,
               act_fn="relu", attn_only=False, normalization_type="LN", eps=1e-5, n_key_value_heads=None,
               gated_mlp=False, final_rms=False, use_attn_scale=True, attn_scale=-1.0, seed=None,
               d_vocab_out=-1, positional_embedding_type="standard")
# features the native model does not have: accepted only at these (HookedTransformerConfig default) values
_PLAIN = dict(num_experts=None, use_qk_norm=False, clip_qkv=None, use_logn_attn=False, use_dynamic_ntk_rope=False,
              use_local_attn=False, window_size=None, attn_types=None, attention_dir="causal",
              scale_attn_by_inverse_layer_idx=False, parallel_attn_mlp=False, post_embedding_ln=False,
              relative_attention_max_distance=None, relative_attention_num_buckets=None,
              use_normalization_before_and_after=False, attn_scores_soft_cap=-1.0, output_logits_soft_cap=-1.0,
              use_attention_sinks=False, layer_norm_folding=False, ungroup_grouped_query_attention=False,
              tie_word_embeddings=False, load_in_4bit=False)
_POSITIONS = ("standard",)
_NORMS = ("LN", "RMS", None)


def bridge_config(config: dict) -> dict:
    """``TransformerBridge.boot_native`` config from ``HookedTransformerConfig`` arguments (a dict).

    Raises:
        NotImplementedError: a feature the native bridge does not reproduce (the message names the field).
    """
    for name, plain in _PLAIN.items():
        if name in config and config[name] != plain:
            raise NotImplementedError(f"the native TransformerBridge cannot reproduce a HookedTransformer with "
                                      f"{name}={config[name]!r}")
    if config.get("positional_embedding_type", "standard") not in _POSITIONS:
        raise NotImplementedError(f"the native TransformerBridge is supported here only with learned positions "
                                  f"(positional_embedding_type='standard'), not "
                                  f"{config['positional_embedding_type']!r}")
    if config.get("normalization_type", "LN") not in _NORMS:
        raise NotImplementedError(f"the native TransformerBridge has no normalization_type="
                                  f"{config['normalization_type']!r} (LN, RMS or None)")
    out: dict[str, Any] = {name: config.get(name, default) for name, default in _PASSED.items()}
    out = {name: value for name, value in out.items() if value is not None}
    if out.get("attn_only") and config.get("d_mlp") is None:
        out.pop("d_mlp", None)
    if out["d_vocab_out"] == -1:
        out["d_vocab_out"] = out["d_vocab"]
    if out["n_heads"] == -1:
        out["n_heads"] = out["d_model"] // out["d_head"]
    return out


def _kv_heads(cfg) -> int:
    return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads


def _port_convert(state_dict: dict[str, Tensor], cfg) -> dict[str, Tensor]:
    """A port of TransformerLens 4.x's ``convert_tl_checkpoint`` (same keys, same layouts, same shape checks)."""
    h, kv, d_model, d_head = cfg.n_heads, _kv_heads(cfg), cfg.d_model, cfg.d_head

    def check(t: Tensor, shape: tuple, key: str) -> Tensor:
        if tuple(t.shape) != shape:
            raise ValueError(f"{key!r} has shape {tuple(t.shape)}, expected {shape} for the config")
        return t

    def w_in(n):  # W_Q/W_K/W_V [head, d_model, d_head] -> nn.Linear [head·d_head, d_model]
        return lambda t, k: einops.rearrange(check(t, (n, d_model, d_head), k), "h m e -> (h e) m")

    def b_in(n):
        return lambda t, k: einops.rearrange(check(t, (n, d_head), k), "h e -> (h e)")

    same = lambda t, k: t  # noqa: E731
    transpose = lambda t, k: t.T.contiguous()  # noqa: E731
    table = [(".W_Q", ".q.weight", w_in(h)), ("._W_K", ".k.weight", w_in(kv)), ("._W_V", ".v.weight", w_in(kv)),
             (".W_K", ".k.weight", w_in(kv)), (".W_V", ".v.weight", w_in(kv)),
             (".W_O", ".o.weight",
              lambda t, k: einops.rearrange(check(t, (h, d_head, d_model), k), "h e m -> m (h e)")),
             (".b_Q", ".q.bias", b_in(h)), ("._b_K", ".k.bias", b_in(kv)), ("._b_V", ".v.bias", b_in(kv)),
             (".b_K", ".k.bias", b_in(kv)), (".b_V", ".v.bias", b_in(kv)), (".b_O", ".o.bias", same),
             (".W_in", ".in.weight", transpose), (".b_in", ".in.bias", same), (".W_out", ".out.weight", transpose),
             (".b_out", ".out.bias", same), (".W_gate", ".gate.weight", transpose), (".b_gate", ".gate.bias", same),
             (".W_U", ".weight", transpose), (".b_U", ".bias", same), (".W_E", ".weight", same),
             (".W_pos", ".weight", same), (".w", ".weight", same), (".b", ".bias", same)]
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith((".mask", ".IGNORE")):
            continue
        for old, new, convert in table:
            if key.endswith(old):
                out[key[: -len(old)] + new] = convert(tensor, key)
                break
        else:
            raise ValueError(f"don't know how to convert key {key!r} (not a HookedTransformer parameter)")
    return out


def convert_tl_state_dict(state_dict: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """A HookedTransformer state dict in the key/tensor format of ``TransformerBridge.boot_native(cfg)``:
    TransformerLens's ``convert_tl_checkpoint`` (4.x) or its port (3.x)."""
    try:
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    except ImportError:
        return _port_convert(state_dict, cfg)
    return convert_tl_checkpoint(state_dict, cfg)


def native_bridge_from_tl(config: dict, state_dict: dict[str, Tensor], device: Union[str, torch.device, None] = None,
                          dtype: Optional[torch.dtype] = None, tokenizer: Optional[Any] = None,
                          model_name: str = "native") -> Model:
    """A ``TransformerBridge.boot_native`` model (eval mode) with a HookedTransformer's weights.

    Args:
        config: ``HookedTransformerConfig`` arguments (JSON-like; see :func:`bridge_config`).
        state_dict: a ``HookedTransformer.state_dict()`` (buffers such as masks are ignored); a missing
            unembedding bias is taken as zero, as the HookedTransformer loader does.
        tokenizer: attached to the bridge (``to_tokens``/``to_string`` work).

    Raises:
        NotImplementedError: a configuration the native bridge does not reproduce.
        RuntimeError: weights that do not fit the config (missing, extra or misshapen parameters).
    """
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_native(  # type: ignore[attr-defined, unused-ignore]  # TL 4.3: set at import
        bridge_config(config), tokenizer=tokenizer, device=device, dtype=dtype, model_name=model_name)
    try:
        converted = convert_tl_state_dict(state_dict, bridge.cfg)
    except ValueError as err:
        raise RuntimeError(f"the weights do not fit the config: {err}") from None
    if "unembed.bias" not in converted:
        converted["unembed.bias"] = torch.zeros(bridge.cfg.d_vocab_out, dtype=next(bridge.parameters()).dtype)
    target = bridge.state_dict()
    converted = {k: v.to(device=target[k].device, dtype=target[k].dtype) if k in target else v
                 for k, v in converted.items()}
    missing, unexpected = sorted(set(target) - set(converted)), sorted(set(converted) - set(target))
    if missing or unexpected:
        raise RuntimeError(f"the weights do not fit the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    try:
        bridge.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise RuntimeError(f"the weights do not fit the config: {first}") from None
    return bridge.eval()
