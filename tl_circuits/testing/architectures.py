"""The tiny architectures of :mod:`tl_circuits.testing`: one Hugging Face causal LM per attention family that
tl_circuits supports, its config, its attention features, and whether the installed TransformerLens can run it.

Every model: 2 layers, d_model 32, 4 query heads of d_head 8 (KV heads as the architecture groups them),
vocabulary 50, 16 positions, eager attention, no dropout. :func:`tl_circuits.testing.tiny_model` builds them.

>>> architecture_names(features=("alibi",))
['BloomForCausalLM']
>>> TINY_ARCHITECTURES["Gemma2ForCausalLM"].features >= {"gqa", "softcap", "rotary"}
True
>>> select_architectures("representative", features=("mqa",))
['FalconForCausalLM']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterable, Literal, Optional, Sequence

__all__ = [
    "FEATURES", "REPRESENTATIVE_ARCHITECTURES", "TINY_ARCHITECTURES", "TINY_D_HEAD", "TINY_D_MODEL", "TINY_D_VOCAB",
    "TINY_N_CTX", "TINY_N_HEADS", "TINY_N_LAYERS", "ModelKind", "TinyArchitecture", "architecture_names",
    "check_architecture", "has_hooked_transformer", "hf_unsupported_reason", "select_architectures",
    "unsupported_reason",
]

TINY_D_VOCAB, TINY_N_CTX, TINY_D_MODEL, TINY_N_HEADS, TINY_D_HEAD, TINY_N_LAYERS = 50, 16, 32, 4, 8, 2
ModelKind = Literal["bridge", "hooked"]
"""``"bridge"``: a ``TransformerBridge`` (TransformerLens 3.x and 4.x); ``"hooked"``: a ``HookedTransformer`` (< 4)."""

FEATURES = {
    "gqa": "fewer KV heads than query heads (multi-query included)",
    "mqa": "one KV head",
    "fused_qkv": "q, k and v come out of one projection",
    "rotary": "rotary position embeddings (full or partial)",
    "partial_rotary": "rotary on part of each head's dimensions",
    "alibi": "ALiBi position bias on the scores",
    "softcap": "attention-logit soft-capping",
    "learned_positions": "learned absolute position embeddings",
    "parallel_residual": "attention and MLP read the same residual",
    "qk_norm": "queries and keys normalised before the scores",
    "sliding_window": "local (sliding-window) attention in some layers",
    "qkv_bias": "biases on the q/k/v projections",
    "moe": "mixture-of-experts MLP",
}
"""Feature tag -> what it means; :attr:`TinyArchitecture.features` draws from these."""


@dataclass(frozen=True)
class TinyArchitecture:
    """One architecture of the table.

    Attributes:
        name: the HF ``*ForCausalLM`` class, which is also TransformerLens's architecture name.
        config_class: the ``transformers`` config class; ``config``: its arguments (vocabulary aside).
        n_kv_heads: KV heads (4 = multi-head, 1 = multi-query).
        fused: how the HF model fuses q/k/v (``""`` = split q/k/v/o projections).
        tags: features not implied by ``n_kv_heads`` / ``fused`` (see :data:`FEATURES`).
        hooked: TransformerLens 3.x converts it into a ``HookedTransformer`` (its own loader, tested) and
            tl_circuits supports that HookedTransformer.
        notes: one line for tables.
    """

    name: str
    config_class: str
    config: dict = field(hash=False)
    n_kv_heads: int = TINY_N_HEADS
    fused: str = ""
    tags: frozenset = frozenset()
    hooked: bool = False
    notes: str = ""

    @property
    def features(self) -> frozenset:
        """``tags`` plus ``gqa`` / ``mqa`` / ``fused_qkv`` where the layout says so."""
        derived = {"gqa"} if self.n_kv_heads < TINY_N_HEADS else set()
        derived |= {"mqa"} if self.n_kv_heads == 1 else set()
        derived |= {"fused_qkv"} if self.fused else set()
        return frozenset(self.tags) | derived


def _arch(name: str, config_class: str, config: dict, n_kv_heads: int = TINY_N_HEADS, fused: str = "",
          tags: Iterable[str] = (), hooked: bool = False, notes: str = "") -> TinyArchitecture:
    unknown = set(tags) - set(FEATURES)
    if unknown:
        raise ValueError(f"{name}: unknown feature tags {sorted(unknown)}")
    return TinyArchitecture(name, config_class, config, n_kv_heads, fused, frozenset(tags), hooked, notes)


_SPLIT = dict(hidden_size=TINY_D_MODEL, intermediate_size=64, num_hidden_layers=TINY_N_LAYERS,
              num_attention_heads=TINY_N_HEADS, max_position_embeddings=TINY_N_CTX)
_GPT = dict(n_embd=TINY_D_MODEL, n_layer=TINY_N_LAYERS, n_head=TINY_N_HEADS, n_positions=TINY_N_CTX)

TINY_ARCHITECTURES: dict[str, TinyArchitecture] = {a.name: a for a in [
    _arch("LlamaForCausalLM", "LlamaConfig", dict(**_SPLIT, num_key_value_heads=2), 2, tags={"rotary"}, hooked=True,
          notes="GQA, rotary"),
    _arch("MistralForCausalLM", "MistralConfig", dict(**_SPLIT, num_key_value_heads=2, sliding_window=4), 2,
          tags={"rotary", "sliding_window"}, hooked=True, notes="GQA, sliding window 4"),
    _arch("MixtralForCausalLM", "MixtralConfig", dict(**_SPLIT, num_key_value_heads=2, num_local_experts=4,
                                                       num_experts_per_tok=2), 2,
          tags={"rotary", "moe"}, hooked=True, notes="GQA, MoE MLP"),
    _arch("Qwen2ForCausalLM", "Qwen2Config", dict(**_SPLIT, num_key_value_heads=2), 2, tags={"rotary", "qkv_bias"},
          hooked=True, notes="q/k/v biases"),
    _arch("Qwen3ForCausalLM", "Qwen3Config", dict(**_SPLIT, num_key_value_heads=2, head_dim=TINY_D_HEAD), 2,
          tags={"rotary", "qk_norm"}, hooked=True, notes="per-head q/k RMSNorm"),
    _arch("Gemma2ForCausalLM", "Gemma2Config", dict(**_SPLIT, num_key_value_heads=2, head_dim=TINY_D_HEAD,
                                                     sliding_window=4, query_pre_attn_scalar=16,
                                                     attn_logit_softcapping=5.0, final_logit_softcapping=10.0), 2,
          tags={"rotary", "softcap", "sliding_window"}, notes="soft-capping, query_pre_attn_scalar, sliding window"),
    _arch("Gemma3ForCausalLM", "Gemma3TextConfig", dict(**_SPLIT, num_key_value_heads=2, head_dim=TINY_D_HEAD,
                                                         sliding_window=4, query_pre_attn_scalar=16), 2,
          tags={"rotary", "qk_norm", "sliding_window"}, notes="q/k norm, query_pre_attn_scalar, sliding window"),
    _arch("Phi3ForCausalLM", "Phi3Config", dict(**_SPLIT, num_key_value_heads=2, pad_token_id=0), 2, "phi3",
          tags={"rotary"}, hooked=True, notes="fused qkv_proj [Q|K|V]"),
    _arch("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(**_SPLIT, rotary_pct=0.5), TINY_N_HEADS, "neox",
          tags={"rotary", "partial_rotary", "parallel_residual", "qkv_bias"}, hooked=True,
          notes="per-head interleaved query_key_value, partial rotary, parallel residual"),
    _arch("GPTJForCausalLM", "GPTJConfig", dict(**_GPT, rotary_dim=4), TINY_N_HEADS,
          tags={"rotary", "partial_rotary", "parallel_residual"}, hooked=True,
          notes="interleaved partial rotary, parallel"),
    _arch("FalconForCausalLM", "FalconConfig", dict(hidden_size=TINY_D_MODEL, num_hidden_layers=TINY_N_LAYERS,
                                                    num_attention_heads=TINY_N_HEADS, multi_query=True,
                                                    new_decoder_architecture=False, alibi=False, bias=True),
          1, "falcon_mqa", tags={"rotary", "parallel_residual", "qkv_bias"},
          notes="fused multi-query query_key_value, rotary, parallel"),
    _arch("BloomForCausalLM", "BloomConfig", dict(hidden_size=TINY_D_MODEL, n_layer=TINY_N_LAYERS,
                                                  n_head=TINY_N_HEADS), TINY_N_HEADS, "neox",
          tags={"alibi", "qkv_bias"}, hooked=True, notes="per-head interleaved query_key_value, ALiBi"),
    _arch("OPTForCausalLM", "OPTConfig", dict(hidden_size=TINY_D_MODEL, ffn_dim=64, num_hidden_layers=TINY_N_LAYERS,
                                              num_attention_heads=TINY_N_HEADS, max_position_embeddings=TINY_N_CTX,
                                              word_embed_proj_dim=TINY_D_MODEL), TINY_N_HEADS,
          tags={"learned_positions", "qkv_bias"}, hooked=True, notes="learned positions"),
    # a HookedTransformer of OLMo-2 normalises q/k after its hooks, which tl_circuits refuses (docs/spec.md §0.5)
    _arch("Olmo2ForCausalLM", "Olmo2Config", dict(**_SPLIT, num_key_value_heads=2), 2, tags={"rotary", "qk_norm"},
          notes="q/k RMSNorm over the whole projection"),
    _arch("StableLmForCausalLM", "StableLmConfig", dict(**_SPLIT, num_key_value_heads=2, partial_rotary_factor=0.5,
                                                        use_qkv_bias=True), 2,
          tags={"rotary", "partial_rotary", "qkv_bias"}, notes="partial rotary, q/k/v biases"),
    _arch("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(**_GPT, multi_query=True), 1, "bigcode",
          tags={"learned_positions", "qkv_bias"}, notes="fused multi-query c_attn [Q|K|V]"),
    # n_ctx: TransformerLens 3.x's HookedTransformer loader reads it (transformers 5's GPT2Config has n_positions)
    _arch("GPT2LMHeadModel", "GPT2Config", dict(**_GPT, n_ctx=TINY_N_CTX), TINY_N_HEADS, "gpt2",
          tags={"learned_positions", "qkv_bias"}, hooked=True, notes="fused Conv1D c_attn, Conv1D c_proj"),
]}
"""Architecture name -> :class:`TinyArchitecture`, in the order of the README's support table."""

REPRESENTATIVE_ARCHITECTURES = ("Gemma2ForCausalLM", "GPTNeoXForCausalLM", "FalconForCausalLM", "BloomForCausalLM",
                                "GPTJForCausalLM")
"""One architecture per attention family and special feature (soft-capping, interleaved fused QKV, multi-query,
ALiBi, interleaved partial rotary): a fast subset for a default test run."""


def check_architecture(name: str) -> TinyArchitecture:
    """The table's entry for ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {name!r}; known: {', '.join(TINY_ARCHITECTURES)}")
    return TINY_ARCHITECTURES[name]


def architecture_names(features: Sequence[str] = (), *, representative: bool = False) -> list[str]:
    """Names of the table's architectures that have every feature in ``features`` (:data:`FEATURES`), in table
    order; only :data:`REPRESENTATIVE_ARCHITECTURES` with ``representative=True``.

    >>> architecture_names(("mqa",))
    ['FalconForCausalLM', 'GPTBigCodeForCausalLM']
    """
    if isinstance(features, str):
        features = (features,)
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {', '.join(FEATURES)}")
    return [name for name, arch in TINY_ARCHITECTURES.items()
            if arch.features >= set(features) and (not representative or name in REPRESENTATIVE_ARCHITECTURES)]


def select_architectures(selection: str = "all", names: Sequence[str] = (), features: Sequence[str] = ()) -> list[str]:
    """The architectures of a selection (what the pytest plugin's ``--tlc-architectures`` option takes):
    ``"all"``, ``"representative"`` or comma-separated names; narrowed to ``names`` when given and to those with
    every one of ``features`` (the ``tlc_architectures`` mark).

    >>> select_architectures("LlamaForCausalLM,GPT2LMHeadModel", features=("rotary",))
    ['LlamaForCausalLM']
    """
    if selection in ("all", "representative"):
        chosen = architecture_names(features, representative=selection == "representative")
    else:
        listed = [check_architecture(n.strip()).name for n in selection.split(",") if n.strip()]
        chosen = [n for n in architecture_names(features) if n in listed]
    wanted = [check_architecture(n).name for n in names]
    return [n for n in chosen if not wanted or n in wanted]


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens has ``HookedTransformer`` (< 4; 4.x removed it)."""
    try:  # 4.x raises ImportError (not AttributeError) for the removed name
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def hf_unsupported_reason(name: str) -> Optional[str]:
    """Why the installed transformers cannot build the tiny HF model ``name`` (its classes are missing), or None."""
    import transformers

    arch = check_architecture(name)
    for cls in (arch.config_class, arch.name):
        if not hasattr(transformers, cls):
            return f"transformers {transformers.__version__} has no {cls}"
    return None


def unsupported_reason(name: str, kind: ModelKind = "bridge") -> Optional[str]:
    """Why the installed TransformerLens / transformers cannot give a tiny ``name`` model of ``kind``, or None.

    A reason, not an error, for the pytest plugin to skip with; an unknown ``name`` or ``kind`` is a ValueError.

    >>> unsupported_reason("GPT2LMHeadModel") is None
    True
    """
    if kind not in ("bridge", "hooked"):
        raise ValueError(f"kind must be 'bridge' or 'hooked', got {kind!r}")
    arch = check_architecture(name)
    missing = hf_unsupported_reason(name)
    if missing is not None:
        return missing
    lens = f"TransformerLens {_installed('transformer-lens')}"
    if kind == "hooked":
        if not has_hooked_transformer():
            return f"{lens} has no HookedTransformer (4.x removed it); use kind='bridge'"
        if not arch.hooked:
            return (f"no HookedTransformer of {name} here: TransformerLens 3.x cannot convert it from a local config, "
                    "or tl_circuits refuses that HookedTransformer (docs/spec.md §0.5); use kind='bridge'")
        return None
    try:
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    except ImportError:
        return f"{lens} has no TransformerBridge (it came in 3.x)"
    if name not in SUPPORTED_ARCHITECTURES:
        return f"{lens} cannot bridge {name} (no architecture adapter for it)"
    return None
