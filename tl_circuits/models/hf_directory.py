"""Local model directories: a Hugging Face ``save_pretrained`` directory, or tl_circuits' own checkpoint.

Both hold a ``config.json``; they are told apart by **what it contains**, never by file names:

- a **Hugging Face model directory** (a fine-tuned model, a hub cache snapshot): ``config.json`` names
  ``architectures`` or ``model_type``, next to its weights (``model.safetensors``, ``pytorch_model.bin`` or
  their sharded index) and its tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json`` or
  ``tokenizer.model``);
- a **tl_circuits checkpoint** (:mod:`tl_circuits.models.model_dir`): ``config.json`` holds
  ``HookedTransformerConfig`` arguments (``d_model``, ``n_layers``, ...) and neither of those keys.

:func:`load_hf_directory` loads a Hugging Face directory offline (nothing is looked up on the hub):

- as a ``TransformerBridge``: ``TransformerBridge.boot_transformers(directory)`` (TransformerLens 4.x always, and
  3.x when asked or when the conversion below is not possible);
- as a ``HookedTransformer`` (TransformerLens 3.x, the default there): TransformerLens's own conversion of a
  local directory (``get_pretrained_model_config`` and ``get_pretrained_state_dict`` with the loaded HF model
  passed in: what ``HookedTransformer.from_pretrained(name, hf_model=...)`` does, which itself accepts only
  hub names). No weight processing (no LayerNorm folding, centring or value-bias folding), so the model's
  logits are the HF model's own, as the bridge's are. TransformerLens 3.9 picks some architectures by the
  model's *name* (a path containing "llama" or "gemma" is taken for a hub name), so the directory is shown to
  it under a neutral name; and its conversion reads some config fields that a ``save_pretrained`` of a
  small config may lack (GPT-2's ``n_ctx``). Whenever the conversion fails, or its logits on a probe input
  differ from the HF model's, the directory is loaded as a bridge and the returned note says why.

``dtype``: the model's parameters (float32, bfloat16 or float16); gradients, Fisher and scores are accumulated
in float32 or better whatever it is (docs/spec.md §2).

>>> import json, tempfile
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as folder:
...     _ = (Path(folder) / "config.json").write_text(json.dumps({"d_model": 8, "n_layers": 1}))
...     directory_kind(folder)
'tl_circuits'
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from tl_circuits.models.model_dir import CheckpointError, load_tokenizer
from tl_circuits.models.types import Model

__all__ = ["DTYPES", "HF", "TL_CIRCUITS", "HFDirectoryError", "LoadedDirectory", "directory_kind",
           "load_hf_directory"]

HF, TL_CIRCUITS = "hugging_face", "tl_circuits"
CONFIG_FILE = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
              "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# how far a converted HookedTransformer's probe logits may be from the HF model's, relative to their largest
# magnitude: a wrong conversion is off by O(1); the same weights in another operation order by rounding only
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_PROBE_TOKENS = 8


class HFDirectoryError(ValueError):
    """A directory that is not a loadable Hugging Face model (the message says what is missing)."""


@dataclass
class LoadedDirectory:
    """A model loaded from a Hugging Face directory, and what the report should say about how."""

    model: Model
    architecture: str
    notes: list[str] = field(default_factory=list)


def _read_config(directory: Path) -> Optional[dict]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def directory_kind(directory: Union[str, Path]) -> Optional[str]:
    """:data:`HF` or :data:`TL_CIRCUITS` by what ``config.json`` holds (module docstring); None for a directory
    that is neither (no or unreadable ``config.json``, or one with neither kind's keys)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    config = _read_config(directory)
    if config is None:
        return None
    if "architectures" in config or "model_type" in config:
        return HF
    if "d_model" in config and "n_layers" in config:
        return TL_CIRCUITS
    return None


def _check_files(directory: Path) -> None:
    if not any((directory / name).is_file() for name in HF_WEIGHTS):
        raise HFDirectoryError(f"{directory}: a Hugging Face config.json but no weights (expected one of "
                               f"{', '.join(HF_WEIGHTS)})")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise HFDirectoryError(f"{directory}: a Hugging Face model without a tokenizer (expected one of "
                               f"{', '.join(TOKENIZER_FILES)}); save it there with tokenizer.save_pretrained")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' and the hub client's progress bars and info logging off (restored after)."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        hf_logging.set_verbosity(level)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_hf_directory(directory: Union[str, Path], device: Optional[str] = None, dtype: torch.dtype = torch.float32,
                      as_bridge: Optional[bool] = None) -> LoadedDirectory:
    """A Hugging Face model directory as a TransformerLens model, offline (module docstring), in eval mode.

    Args:
        as_bridge: ``True``: a ``TransformerBridge``; ``False`` or ``None`` (default): a HookedTransformer where
            TransformerLens has one (3.x) and can convert the architecture, else a bridge (with a note).
    Raises:
        HFDirectoryError: not a Hugging Face directory, no weights, no tokenizer, or neither TransformerLens
            route loads it (the message says why, in one line).
    """
    directory = Path(directory)
    if directory_kind(directory) != HF:
        raise HFDirectoryError(f"{directory}: not a Hugging Face model directory (expected config.json with "
                               "'architectures' or 'model_type')")
    _check_files(directory)
    config = _read_config(directory) or {}
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
    with _quiet_transformers():
        try:
            tokenizer = load_tokenizer(directory)
        except CheckpointError as err:
            raise HFDirectoryError(str(err)) from None
        hf_model, notes = None, []
        if not as_bridge and _has_hooked_transformer():
            hf_model = _hf_model(directory, dtype)
            try:
                return LoadedDirectory(_hooked(directory, hf_model, tokenizer, device, dtype), architecture)
            except Exception as err:  # any failure of the conversion: the bridge reads the same directory
                notes.append(f"{directory}: TransformerLens could not convert {architecture} to a HookedTransformer "
                             f"({_first_line(err)}); loaded as a TransformerBridge instead")
        return LoadedDirectory(_bridge(directory, hf_model, tokenizer, device, dtype), architecture, notes)


def _has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _hf_model(directory: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype).eval()
    except Exception as err:
        raise HFDirectoryError(f"{directory}: cannot load the Hugging Face model ({_first_line(err)})") from None


def _bridge(directory: Path, hf_model: Any, tokenizer: Any, device: Optional[str], dtype: torch.dtype) -> Model:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        model = TransformerBridge.boot_transformers(str(directory), device=device, dtype=dtype, tokenizer=tokenizer,
                                                    hf_model=hf_model)
    except Exception as err:
        raise HFDirectoryError(f"{directory}: cannot load as a TransformerBridge ({_first_line(err)})") from None
    return model.eval()


def _hooked(directory: Path, hf_model: Any, tokenizer: Any, device: Optional[str], dtype: torch.dtype) -> Model:
    """TransformerLens 3.x's conversion of a local directory (module docstring), checked on a probe input."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="tl_circuits_hf_") as folder:
        neutral = Path(folder) / "model"  # TransformerLens 3.9 reads "llama"/"gemma" in a path as a hub name
        neutral.symlink_to(directory.resolve(), target_is_directory=True)
        cfg = loading.get_pretrained_model_config(str(neutral), hf_cfg=hf_model.config.to_dict(), fold_ln=False,
                                                  device=device, dtype=dtype)
        state = loading.get_pretrained_state_dict(str(neutral), cfg, hf_model, dtype=dtype)
    cfg.model_name = directory.name
    model = HookedTransformer(cfg, tokenizer, move_to_device=True)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    model.eval()
    _check_probe(model, hf_model, dtype)
    return model


def _check_probe(model: Any, hf_model: Any, dtype: torch.dtype) -> None:
    """ValueError unless the converted model's logits on a probe input equal the HF model's (to rounding)."""
    n = min(_PROBE_TOKENS, model.cfg.n_ctx)
    probe = (torch.arange(n) * 7 % model.cfg.d_vocab).unsqueeze(0)
    with torch.no_grad():
        ours = model(probe.to(model.cfg.device)).float().cpu()
        theirs = hf_model(probe.to(hf_model.device)).logits.float().cpu()
    error = float((ours - theirs).abs().max())
    scale = max(1.0, float(theirs.abs().max()))
    if not error <= _PROBE_TOLERANCE.get(dtype, 1e-2) * scale:
        raise ValueError(f"its logits differ from the Hugging Face model's by {error:.3g} on a probe input")
