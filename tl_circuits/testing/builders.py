"""Tiny random-weight models of every architecture of :mod:`tl_circuits.testing.architectures`, built locally
(no hub, no download), deterministic in a seed, in a fraction of a second each.

- :func:`tiny_hf_model`: the Hugging Face model itself (eager attention, no dropout, wide random weights);
- :func:`tiny_model`: the same weights as a ``TransformerBridge`` (the default, on TransformerLens 3.x and 4.x)
  or, on TransformerLens < 4 and where asked (``kind="hooked"``), as a ``HookedTransformer`` converted by
  TransformerLens's own loader. The bridge is the default everywhere because it exists for every architecture
  on both major versions and wraps the very HF model that :func:`tiny_hf_model` returns, so HF's own forward
  is the reference;
- :func:`tiny_hf_dir`: a local HF directory (``save_pretrained`` and a word-level tokenizer) for code that loads
  from disk (``AutoModelForCausalLM.from_pretrained``, ``TransformerBridge.boot_transformers``).

Weights: HF's initialisation leaves attention almost uniform and heads almost alike, so :func:`widen` redraws
every matrix with std 0.3 and every bias with std 0.1, from a generator seeded with ``seed + 1``. The global
torch RNG is left as it was.

>>> model = tiny_model("LlamaForCausalLM", seed=0)          # GQA: 4 query heads over 2 KV heads, rotary
>>> logits = model(tiny_tokens(2, 8))
>>> tuple(logits.shape)
(2, 8, 50)
>>> hf = tiny_hf_model("LlamaForCausalLM", seed=0)          # the same weights, as HF's own model
>>> bool((hf(tiny_tokens(2, 8)).logits - logits).abs().max() < 1e-4)
True
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Int
from torch import Tensor

from tl_circuits.bundled.tasks import task_tokenizer
from tl_circuits.testing.architectures import (
    TINY_D_VOCAB,
    ModelKind,
    check_architecture,
    unsupported_reason,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from transformers import PreTrainedModel

    from tl_circuits.models.types import Model

__all__ = ["bridge_of", "tiny_hf_dir", "tiny_hf_model", "tiny_model", "tiny_tokens", "widen"]

_DROPOUTS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout",
             "activation_dropout")
_LAYER_KEYS = ("num_hidden_layers", "n_layer")


def widen(module: torch.nn.Module, seed: int) -> None:
    """Redraw, in place and in parameter order, every matrix with std 0.3 and every bias with std 0.1 from a
    ``torch.Generator`` seeded with ``seed``: HF's and TransformerLens's std-0.02 initialisation leaves heads
    nearly inert and alike, so tests could not tell heads apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 2:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def tiny_hf_model(architecture: str, seed: int = 0, *, n_layers: Union[int, None] = None) -> PreTrainedModel:
    """A fresh tiny HF causal LM of ``architecture`` (a name of
    :data:`~tl_circuits.testing.architectures.TINY_ARCHITECTURES`), eval mode, eager attention, no dropout,
    weights :func:`widen`-ed with ``seed + 1``; the same ``seed`` gives the same weights.

    Args:
        n_layers: layers (default 2).
    """
    import transformers

    arch = check_architecture(architecture)
    config_args = dict(arch.config)
    if n_layers is not None:
        config_args[next(k for k in _LAYER_KEYS if k in config_args)] = n_layers
    config = getattr(transformers, arch.config_class)(vocab_size=TINY_D_VOCAB, **config_args)
    for dropout in _DROPOUTS:
        if hasattr(config, dropout):
            setattr(config, dropout, 0.0)
    config._attn_implementation = "eager"
    config.architectures = [arch.name]
    with torch.random.fork_rng(devices=[]):  # HF draws its initialisation from the global RNG
        torch.manual_seed(seed)
        hf = getattr(transformers, arch.name)(config).eval()
    widen(hf, seed + 1)
    return hf


def bridge_of(hf_model: PreTrainedModel):
    """A ``TransformerBridge`` around ``hf_model`` itself (built offline; the bridge wraps its modules in place),
    in eval mode."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(hf_model, architecture=type(hf_model).__name__,
                                    hf_config=hf_model.config).eval()


def _hooked_from_hf(hf_model: PreTrainedModel):
    """The HookedTransformer of ``hf_model``'s weights, by TransformerLens 3.x's own config and weight conversion
    (no weight processing); its loader reads the config from a folder, written here to a temporary one."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    with tempfile.TemporaryDirectory(prefix="tl_circuits_tiny_") as folder:
        hf_model.config.save_pretrained(folder)
        cfg = get_pretrained_model_config(folder, hf_cfg=hf_model.config.to_dict(), device="cpu")
        cfg.tokenizer_name = None  # no tokenizer: the loader would look for one in the folder
        state = get_pretrained_state_dict(folder, cfg, hf_model=hf_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # TL 3.x: "HookedTransformer is deprecated"
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


def tiny_model(architecture: str = "GPT2LMHeadModel", seed: int = 0, *, kind: ModelKind = "bridge",
               n_layers: Union[int, None] = None) -> Model:
    """A tiny random-weight model of ``architecture`` that tl_circuits runs on: the weights of
    :func:`tiny_hf_model` with the same ``seed``, in eval mode.

    Args:
        kind: ``"bridge"`` (default, TransformerLens 3.x and 4.x): a ``TransformerBridge`` around a fresh
            :func:`tiny_hf_model`; ``"hooked"`` (TransformerLens < 4): a ``HookedTransformer`` converted from it
            by TransformerLens's own loader, for the architectures whose
            :attr:`~tl_circuits.testing.architectures.TinyArchitecture.hooked` is True.
        n_layers: layers (default 2).

    Raises:
        ValueError: an unknown architecture or kind.
        NotImplementedError: the installed TransformerLens / transformers cannot give this model; the message is
            :func:`~tl_circuits.testing.architectures.unsupported_reason` (the pytest plugin skips with it).
    """
    reason = unsupported_reason(architecture, kind)
    if reason is not None:
        raise NotImplementedError(reason)
    hf = tiny_hf_model(architecture, seed, n_layers=n_layers)
    return _hooked_from_hf(hf) if kind == "hooked" else bridge_of(hf)


def tiny_hf_dir(architecture: str, path: Union[str, Path], seed: int = 0) -> Path:
    """Write :func:`tiny_hf_model` (``save_pretrained``: config and safetensors weights) and a word-level tokenizer
    (:func:`tl_circuits.bundled.tasks.task_tokenizer`: ``"<bos>"`` = 0, token ``i`` = the word ``"i"``) into the
    folder ``path`` (made if missing); returns it. Loads offline with ``AutoModelForCausalLM.from_pretrained`` /
    ``AutoTokenizer.from_pretrained`` or ``TransformerBridge.boot_transformers(str(path))``. A loader picks its own
    attention implementation; the weights are those of ``tiny_model(architecture, seed)``.

    >>> import tempfile
    >>> from transformers import AutoTokenizer
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir("GPT2LMHeadModel", folder))
    >>> tokenizer("3 1 4")["input_ids"]
    [0, 3, 1, 4]
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_hf_model(architecture, seed).save_pretrained(folder)
    task_tokenizer(TINY_D_VOCAB).save_pretrained(folder)
    return folder


def tiny_tokens(batch: int = 3, pos: int = 8, seed: int = 0, d_vocab: int = TINY_D_VOCAB) -> Int[Tensor, "batch pos"]:
    """Uniform random token ids [batch, pos] from a generator seeded with ``seed``.

    >>> tiny_tokens(1, 4, seed=0).tolist()
    [[44, 39, 33, 10]]
    """
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))
