"""Locally built models for the tests (no hub): HookedTransformerConfig models with random weights, and thin
names over :mod:`tl_circuits.testing` (the public builders): HF GPT-2 / LLaMA models built from their config
classes, the same weights converted into HookedTransformers by TransformerLens's own loader (no weight
processing), and TransformerBridges around the same HF models (or TransformerLens-native ones) for the bridge
parity tests.

Under TransformerLens 4.x (no HookedTransformer) only the HF models and the bridges can be built.

The *model under test* builders (:func:`mha_under_test`, :func:`gqa_under_test`) are what tests use when the
model is only the thing tl_circuits runs on (freezing, gradients, interference, sweeps, statistics, the
command), not the subject of the test: the tiny GPT-2 (MHA, LayerNorm, learned positions, non-zero biases) and
LLaMA (GQA 4 over 2, rotary, RMSNorm, no biases) of :func:`tl_circuits.testing.tiny_model`, as HookedTransformers
where TransformerLens has them (< 4) and as TransformerBridges on TransformerLens 4. Tests about
HookedTransformer itself build it with :func:`hooked` and carry the ``needs_hooked_transformer`` marker
(tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from tl_circuits import testing

try:  # TransformerLens 2.x/3.x
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # 4.x
    HookedTransformer = HookedTransformerConfig = None

HAS_HOOKED_TRANSFORMER = HookedTransformer is not None

D_VOCAB = testing.TINY_D_VOCAB
N_CTX = testing.TINY_N_CTX
widen = testing.widen          # wide random weights (seeded): heads that differ
bridge_of = testing.bridge_of  # a TransformerBridge around a given HF model


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


# ----- HF GPT-2 / LLaMA, as they are and converted by TransformerLens (tl_circuits.testing) ---------------------

def hf_gpt2_model(seed: int = 0, n_layers: int = 2):
    """HF GPT2LMHeadModel (fused Conv1D c_attn, Conv1D c_proj) with wide random weights and biases."""
    return testing.tiny_hf_model("GPT2LMHeadModel", seed, n_layers=n_layers)


def hf_gpt2(seed: int = 0):
    """(HF GPT2LMHeadModel with random weights, the same model as a HookedTransformer by TransformerLens's loader)."""
    return hf_gpt2_model(seed), testing.tiny_model("GPT2LMHeadModel", seed, kind="hooked")


def hf_llama_model(seed: int = 0):
    """HF LlamaForCausalLM (split q/k/v/o Linear, GQA 4 query heads over 2 KV heads, rotary) with random weights."""
    return testing.tiny_hf_model("LlamaForCausalLM", seed)


def hf_llama(seed: int = 0):
    """(HF LlamaForCausalLM with GQA and random weights, the same model as a HookedTransformer)."""
    return hf_llama_model(seed), testing.tiny_model("LlamaForCausalLM", seed, kind="hooked")


# ----- the model under test: a HookedTransformer on TL < 4, a TransformerBridge on TL 4 ----------------------

UNDER_TEST_KIND = "hooked" if HAS_HOOKED_TRANSFORMER else "bridge"


def mha_under_test(seed: int = 0, n_layers: int = 2):
    """MHA with LayerNorm, learned positions and non-zero biases: the tiny GPT-2 of tl_circuits.testing, as a
    HookedTransformer on TL < 4 and a bridge on TL 4. ``n_layers`` (2) x 4 heads, d_model 32, d_head 8, d_vocab
    :data:`D_VOCAB` on both."""
    return testing.tiny_model("GPT2LMHeadModel", seed, kind=UNDER_TEST_KIND, n_layers=n_layers)


def gqa_under_test(seed: int = 0):
    """GQA (4 query heads over 2 KV heads), rotary, RMSNorm, gated SiLU MLP, no biases, untied embeddings: the tiny
    LLaMA of tl_circuits.testing, as a HookedTransformer on TL < 4 and a bridge on TL 4."""
    return testing.tiny_model("LlamaForCausalLM", seed, kind=UNDER_TEST_KIND)


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
    from tl_circuits.models import model_spec

    return dict(model.named_parameters())[model_spec(model).param_name(layer, block)]


# method="direct" (torch.func.functional_call) is refused on bridges: parametrise engines with these
METHODS = ["factored", pytest.param("direct", marks=pytest.mark.needs_hooked_transformer)]


# ----- TransformerBridges ---------------------------------------------------------------------------

def gpt2_bridge(seed: int = 0, n_layers: int = 2):
    """TransformerBridge around a fresh :func:`hf_gpt2_model` (the weights of :func:`hf_gpt2` with the same seed)."""
    return testing.tiny_model("GPT2LMHeadModel", seed, n_layers=n_layers)


def llama_bridge(seed: int = 0):
    """TransformerBridge around a fresh :func:`hf_llama_model` (the weights of :func:`hf_llama` with the same seed)."""
    return testing.tiny_model("LlamaForCausalLM", seed)


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


def padded_float64_model(which: str, seed: int = 0):
    """:func:`float64_model` for left-padded batches: the LLaMA bridge stays float32 there (HF LLaMA's eager softmax
    runs in float32, where a left-padded row's float64 mask, all finfo(float64).min, becomes -inf: NaN)."""
    return llama_bridge(seed) if which == "llama-bridge" else float64_model(which, seed)


def native_bridge(seed: int = 0, rotary: bool = False):
    """TransformerBridge.boot_native: MHA, LayerNorm, GELU, learned positions (or rotary, adjacent pairs),
    random weights with wide matrices and non-zero biases so heads are distinguishable."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=N_CTX, d_vocab=D_VOCAB, act_fn="gelu",
               normalization_type="LN", positional_embedding_type="rotary" if rotary else "standard", seed=seed)
    bridge = TransformerBridge.boot_native(cfg).eval()
    widen(bridge, seed + 1)
    return bridge


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
    return testing.tiny_tokens(batch, pos, seed, d_vocab)


# ----- local Hugging Face model directories (save_pretrained), as a user has them ---------------------------

def hf_directory_model(architecture: str, d_vocab: int, seed: int = 0, n_ctx: int = N_CTX, hub_fields: bool = True,
                       special_ids: tuple = (0, 0)):
    """A tiny random HF causal LM to be saved with ``save_pretrained``: ``"gpt2"`` (GPT2LMHeadModel, embeddings tied
    to the unembedding as in every GPT-2 checkpoint) or ``"llama"`` (LlamaForCausalLM, GQA 4 query heads over 2 KV
    heads, rotary, untied). ``hub_fields``: GPT-2's config also holds ``n_ctx``, as the hub's GPT-2 configs do
    (TransformerLens 3's conversion reads it). ``special_ids``: (bos, eos) ids of the tokenizer it is saved with.
    Wide weights (std 0.3) so that heads and positions are told apart."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    bos, eos = special_ids
    if architecture == "gpt2":
        extra = dict(n_ctx=n_ctx) if hub_fields else {}
        config = GPT2Config(vocab_size=d_vocab, n_positions=n_ctx, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=bos,
                            eos_token_id=eos, **extra)
        hf = GPT2LMHeadModel(config)
    elif architecture == "llama":
        config = LlamaConfig(vocab_size=d_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_ctx,
                             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=bos,
                             eos_token_id=eos)
        hf = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    _spread_matrices(hf)
    return hf.eval()


def _spread_matrices(hf, std: float = 0.3) -> None:
    """Matrices only, from the global generator ``hf_directory_model`` seeded (biases stay HF's zeros): not
    :func:`tl_circuits.testing.builders.widen`, whose wider biases push the bf16 directory test's logits past its
    calibrated tolerance."""
    with torch.no_grad():
        for param in hf.parameters():
            if param.ndim == 2:
                param.normal_(0, std)


def save_hf_directory(directory, architecture: str, tokenizer, seed: int = 0, n_ctx: int = N_CTX,
                      hub_fields: bool = True):
    """:func:`hf_directory_model` with ``tokenizer``'s vocabulary, saved with its tokenizer into ``directory`` by
    ``save_pretrained`` (a directory as a fine-tune or a hub snapshot leaves it). Returns the HF model."""
    hf = hf_directory_model(architecture, len(tokenizer), seed, n_ctx, hub_fields,
                            (tokenizer.bos_token_id, tokenizer.eos_token_id))
    if architecture == "gpt2":
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as the case
    hf.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return hf


def padded_tokens(batch: int, pos: int, seed: int, right_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and an attention mask: sample 1 left-padded by 3 positions, sample 2 right-padded from
    position ``right_from`` on, the others unpadded."""
    tokens = random_tokens(batch, pos, seed=seed)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, right_from:] = 0
    return tokens, mask
