"""Locally built models for the tests (no hub): HookedTransformerConfig models with random weights,
HF GPT-2 / LLaMA models built from their config classes and converted into HookedTransformers
with TransformerLens's own weight-conversion functions (no weight processing), and TransformerBridges
around the same HF models (or TransformerLens-native ones) for the bridge parity tests.

Under TransformerLens 4.x (no HookedTransformer) only the HF models and the bridges can be built.

The *model under test* builders (:func:`mha_under_test`, :func:`gqa_under_test`) are what tests use when the
model is only the thing tl_circuits runs on (freezing, gradients, interference, sweeps, statistics, the
command), not the subject of the test: a HookedTransformer (:func:`mha`, :func:`gqa`) where TransformerLens
has one (< 4), and on TransformerLens 4 an equivalent TransformerBridge around a tiny HF model
(:func:`gpt2_bridge`: MHA, LayerNorm, learned positions, non-zero biases; :func:`llama_bridge`: GQA 4 over 2,
rotary, RMSNorm, no biases). Tests about HookedTransformer itself build it with :func:`hooked` and carry the
``needs_hooked_transformer`` marker (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

try:  # TransformerLens 2.x/3.x
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # 4.x
    HookedTransformer = HookedTransformerConfig = None

HAS_HOOKED_TRANSFORMER = HookedTransformer is not None

D_VOCAB = 50
N_CTX = 16


def _randomise_biases(model: HookedTransformer, seed: int) -> None:
    """TransformerLens initialises biases to zero; give them values so bias paths are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1].lstrip("_").startswith("b_"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def hooked(seed: int = 0, biases: bool = True, **overrides) -> HookedTransformer:
    """A small random HookedTransformer; ``overrides`` go into HookedTransformerConfig."""
    cfg = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=N_CTX, d_vocab=D_VOCAB,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=seed,
        device="cpu",
    )
    cfg.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    if biases:
        _randomise_biases(model, seed + 1)
    model.eval()
    return model


def mha(seed: int = 0, biases: bool = True, n_layers: int = 2) -> HookedTransformer:
    """MHA, LayerNorm, learned positions, GELU MLP."""
    return hooked(seed, biases, n_layers=n_layers)


def gqa(seed: int = 0, biases: bool = False, **overrides) -> HookedTransformer:
    """GQA (4 query heads over 2 KV heads), rotary, RMSNorm, gated SiLU MLP (LLaMA-like)."""
    return hooked(
        seed, biases, n_key_value_heads=2, positional_embedding_type="rotary",
        normalization_type="RMS", act_fn="silu", gated_mlp=True, final_rms=True,
        rotary_dim=8, rotary_adjacent_pairs=False, **overrides,
    )


def attn_only(seed: int = 0, biases: bool = True) -> HookedTransformer:
    """Attention-only, LayerNorm, learned positions."""
    return hooked(seed, biases, attn_only=True, d_mlp=None)


def _spread_weights(hf, std: float = 0.3) -> None:
    """HF initialises matrices with std 0.02, which leaves attention almost uniform and heads almost
    inert; wider weights make every head matter, so equivalence tests can tell heads apart."""
    with torch.no_grad():
        for _name, param in hf.named_parameters():
            if param.ndim == 2:
                param.normal_(0, std)


# ----- HF models converted by TransformerLens's own functions -----------------------------------

def hf_gpt2_model(seed: int = 0, n_layers: int = 2):
    """HF GPT2LMHeadModel (fused Conv1D c_attn, Conv1D c_proj) with random weights and biases."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(vocab_size=D_VOCAB, n_positions=N_CTX, n_embd=32, n_layer=n_layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_cfg._attn_implementation = "eager"
    hf = GPT2LMHeadModel(hf_cfg).eval()
    _spread_weights(hf)
    with torch.no_grad():  # HF initialises biases to zero too; make the fused QKV bias layout matter
        for block in hf.transformer.h:
            block.attn.c_attn.bias.normal_(0, 0.1)
            block.attn.c_proj.bias.normal_(0, 0.1)
    return hf


def hf_gpt2(seed: int = 0):
    """(HF GPT2LMHeadModel with random weights, the same model as a HookedTransformer)."""
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = hf_gpt2_model(seed)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, n_ctx=N_CTX, d_vocab=D_VOCAB,
        act_fn="gelu_new", normalization_type="LN", eps=hf.config.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel", device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )
    return hf, model.eval()


def hf_llama_model(seed: int = 0):
    """HF LlamaForCausalLM (split q/k/v/o Linear, GQA 4 query heads over 2 KV heads, rotary) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(vocab_size=D_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).eval()
    _spread_weights(hf)
    return hf


def hf_llama(seed: int = 0):
    """(HF LlamaForCausalLM with GQA and random weights, the same model as a HookedTransformer)."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf = hf_llama_model(seed)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=N_CTX, d_vocab=D_VOCAB,
        act_fn="silu", normalization_type="RMS", eps=1e-6, n_key_value_heads=2,
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=8,
        rotary_base=10000, final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM",
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )
    return hf, model.eval()


# ----- the model under test: a HookedTransformer on TL < 4, a TransformerBridge on TL 4 ----------------------

def mha_under_test(seed: int = 0, n_layers: int = 2):
    """MHA with LayerNorm, learned positions and non-zero biases: :func:`mha` on TL < 4, :func:`gpt2_bridge` on
    TL 4. ``n_layers`` (2) x 4 heads, d_model 32, d_head 8, d_vocab :data:`D_VOCAB` on both."""
    return mha(seed, n_layers=n_layers) if HAS_HOOKED_TRANSFORMER else gpt2_bridge(seed, n_layers)


def gqa_under_test(seed: int = 0):
    """GQA (4 query heads over 2 KV heads), rotary, RMSNorm, gated SiLU MLP, no biases: :func:`gqa` on TL < 4,
    :func:`llama_bridge` on TL 4."""
    return gqa(seed) if HAS_HOOKED_TRANSFORMER else llama_bridge(seed)


def under_test(which: str, seed: int = 0):
    """``"mha"`` or ``"gqa"``: :func:`mha_under_test` or :func:`gqa_under_test`."""
    return {"mha": mha_under_test, "gqa": gqa_under_test}[which](seed)


def is_hooked(model) -> bool:
    """Whether ``model`` is a HookedTransformer (else a TransformerBridge)."""
    return HAS_HOOKED_TRANSFORMER and isinstance(model, HookedTransformer)


def embedding_weight(model) -> torch.nn.Parameter:
    """The token embedding [d_vocab, d_model] of a model under test: W_E, or the wrapped HF model's input embeddings."""
    return model.embed.W_E if is_hooked(model) else model.original_model.get_input_embeddings().weight


def attention_param(model, layer: int, block: str, kv: bool = False) -> torch.nn.Parameter:
    """A layer's Q/K/V/O weight as a parameter of a model under test (``blocks.{layer}.attn.W_Q`` on a
    HookedTransformer; under GQA ``_W_K``/``_W_V``), found by the name model_spec gives it."""
    from tl_circuits import model_spec

    return dict(model.named_parameters())[model_spec(model).param_name(layer, block)]


# method="direct" (torch.func.functional_call) is refused on bridges: parametrise engines with these
METHODS = ["factored", pytest.param("direct", marks=pytest.mark.needs_hooked_transformer)]


# ----- TransformerBridges ---------------------------------------------------------------------------

def bridge_of(hf):
    """A TransformerBridge around ``hf`` itself (built offline; the bridge wraps hf's modules in place)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(hf, architecture=type(hf).__name__, hf_config=hf.config).eval()


def gpt2_bridge(seed: int = 0, n_layers: int = 2):
    """TransformerBridge around a fresh :func:`hf_gpt2_model` (the weights of :func:`hf_gpt2` with the same seed)."""
    return bridge_of(hf_gpt2_model(seed, n_layers))


def llama_bridge(seed: int = 0):
    """TransformerBridge around a fresh :func:`hf_llama_model` (the weights of :func:`hf_llama` with the same seed)."""
    return bridge_of(hf_llama_model(seed))


FLOAT64_MODELS = ("hooked-mha", "hooked-gqa", "gpt2-bridge", "llama-bridge")


def float64_model(which: str, seed: int = 0):
    """A float64 model for checks that need more than float32's digits (first-order limits): ``"hooked-mha"`` /
    ``"hooked-gqa"`` (:func:`mha` / :func:`gqa` weights' configs, TL < 4), ``"gpt2-bridge"`` / ``"llama-bridge"``
    (bridges around :func:`hf_gpt2_model` / :func:`hf_llama_model` in float64; LLaMA's rotary tables stay float32)."""
    if which == "hooked-mha":
        return hooked(seed, True, dtype=torch.float64)
    if which == "hooked-gqa":
        return gqa(seed, dtype=torch.float64)
    hf = {"gpt2-bridge": hf_gpt2_model, "llama-bridge": hf_llama_model}[which](seed)
    return bridge_of(hf.double())


def native_bridge(seed: int = 0, rotary: bool = False):
    """TransformerBridge.boot_native: MHA, LayerNorm, GELU, learned positions (or rotary, adjacent pairs),
    random weights with wide matrices and non-zero biases so heads are distinguishable."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=N_CTX, d_vocab=D_VOCAB, act_fn="gelu",
               normalization_type="LN", positional_embedding_type="rotary" if rotary else "standard", seed=seed)
    bridge = TransformerBridge.boot_native(cfg).eval()
    widen(bridge, seed + 1)
    return bridge


def widen(module: torch.nn.Module, seed: int) -> None:
    """Matrices drawn with std 0.3, biases with std 0.1 (seeded, in parameter order): HF's and TransformerLens's
    std-0.02 init leaves heads nearly inert and alike, so equivalence tests could not tell heads apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 2:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def hooked_from_native(bridge):
    """The HookedTransformer with the weights of a :func:`native_bridge` (nn.Linear [out, in] -> [head, in, d_head])."""
    import einops

    cfg = bridge.cfg
    rotary = cfg.positional_embedding_type == "rotary"
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab, act_fn=cfg.act_fn, normalization_type="LN", eps=cfg.eps,
        positional_embedding_type=cfg.positional_embedding_type, device="cpu",
        **(dict(rotary_dim=cfg.d_head, rotary_adjacent_pairs=True, rotary_base=cfg.rotary_base) if rotary else {}),
    ))
    native = bridge.original_model
    heads = dict(h=cfg.n_heads)
    state = {"embed.W_E": native.tok_embed.original_component.weight,
             "ln_final.w": native.ln_out.original_component.weight, "ln_final.b": native.ln_out.original_component.bias,
             "unembed.W_U": native.head.original_component.weight.T, "unembed.b_U": native.head.original_component.bias}
    if not rotary:
        state["pos_embed.W_pos"] = native.pos.original_component.weight
    for layer, block in enumerate(native.layers):
        block = block.original_component
        attn, mlp, prefix = block.attn.original_component, block.mlp.original_component, f"blocks.{layer}."
        for letter in "qkv":
            linear = getattr(attn, letter).original_component
            state[prefix + f"attn.W_{letter.upper()}"] = einops.rearrange(linear.weight, "(h e) m -> h m e", **heads)
            state[prefix + f"attn.b_{letter.upper()}"] = einops.rearrange(linear.bias, "(h e) -> h e", **heads)
        state[prefix + "attn.W_O"] = einops.rearrange(attn.o.original_component.weight, "m (h e) -> h e m", **heads)
        state[prefix + "attn.b_O"] = attn.o.original_component.bias
        for ln, name in (("ln1", "ln1"), ("ln2", "ln2")):
            norm = getattr(block, ln).original_component
            state[prefix + f"{name}.w"], state[prefix + f"{name}.b"] = norm.weight, norm.bias
        state[prefix + "mlp.W_in"] = mlp.fc_in.original_component.weight.T
        state[prefix + "mlp.b_in"] = mlp.fc_in.original_component.bias
        state[prefix + "mlp.W_out"] = mlp.fc_out.original_component.weight.T
        state[prefix + "mlp.b_out"] = mlp.fc_out.original_component.bias
    buffers = model.state_dict()  # masks and rotary tables stay HookedTransformer's own
    model.load_state_dict({**buffers, **{k: v.detach().clone() for k, v in state.items()}})
    return model.eval()


def random_tokens(batch: int = 3, pos: int = 12, seed: int = 0, d_vocab: int = D_VOCAB) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))
