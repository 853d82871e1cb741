"""A local checkpoint format for HookedTransformers: a directory anyone can write without a model hub.

::

    my_model/
        config.json          HookedTransformerConfig keyword arguments (JSON; ``dtype`` as a string, e.g. "float32")
        model.safetensors    the model's state_dict (or model.pt: ``torch.save(model.state_dict(), ...)``)
        tokenizer/           optional: a Hugging Face tokenizer saved with ``save_pretrained``
                             (its files may also sit in my_model/ itself)

:func:`save_checkpoint` writes it, :func:`load_checkpoint` reads it (offline: the tokenizer is loaded from the
directory with ``local_files_only``, and a ``tokenizer_name`` in the config is never looked up on the hub).
``load_checkpoint(directory, as_bridge=True)`` reads the same directory as a TransformerLens-native
``TransformerBridge`` (:mod:`tl_circuits.models.native`; learned positions only); under TransformerLens 4.x,
which has no ``HookedTransformer``, that is the default, and :func:`save_checkpoint` (HookedTransformers only)
raises ``TypeError``.

>>> import tempfile
>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=6,
...                                                  d_vocab=10, act_fn="gelu"))
>>> with tempfile.TemporaryDirectory() as directory:
...     _ = save_checkpoint(model, directory)
...     loaded = load_checkpoint(directory)
>>> all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters()))
True
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

try:  # TransformerLens 2.x/3.x; 4.x removed HookedTransformer (checkpoints then load as native bridges)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[misc,assignment]

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.pt")
TOKENIZER_DIR = "tokenizer"
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# config fields that name things to download or are set from the environment at load time
_NOT_SAVED = ("device", "tokenizer_name")


class CheckpointError(ValueError):
    """A local checkpoint directory that cannot be read (the message says what is wrong)."""


def is_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a directory holding a ``config.json`` (a checkpoint, possibly a broken one)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _json_config(cfg: HookedTransformerConfig) -> dict:
    """The config as JSON-able HookedTransformerConfig keyword arguments."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.name in _NOT_SAVED:
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        try:
            json.dumps(value)
        except TypeError:
            continue  # derived or exotic fields (callables, objects) are recomputed from the others
        out[f.name] = value
    return out


def save_checkpoint(model: HookedTransformer, directory: Union[str, Path], tokenizer: Optional[Any] = None,
                    weights_format: str = "safetensors") -> Path:
    """Write ``model`` (and optionally a Hugging Face tokenizer) as a local checkpoint directory.

    Args:
        model: the HookedTransformer to save.
        directory: created if missing; existing files of the format are overwritten.
        tokenizer: a ``PreTrainedTokenizerBase`` saved under ``tokenizer/`` (default: ``model.tokenizer``,
            if the model has one).
        weights_format: ``"safetensors"`` (model.safetensors) or ``"pt"`` (model.pt).
    Returns:
        The directory.
    """
    if HookedTransformer is None or not isinstance(model, HookedTransformer):
        why = " (this TransformerLens, 4.x, has no HookedTransformer)" if HookedTransformer is None else ""
        raise TypeError(f"save_checkpoint writes a HookedTransformer, got {type(model).__name__}{why}")
    if weights_format not in ("safetensors", "pt"):
        raise ValueError(f"weights_format must be 'safetensors' or 'pt', got {weights_format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(_json_config(model.cfg), indent=1, sort_keys=True))
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        # buffers such as attention masks may share storage: save independent copies
        save_file({name: t.clone() for name, t in state.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "model.pt")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    return directory


def _read_kwargs(directory: Path) -> dict:
    """config.json as HookedTransformerConfig keyword arguments (``dtype`` as a torch.dtype; no device or
    tokenizer name)."""
    path = directory / CONFIG_FILE
    try:
        kwargs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: expected a JSON object of HookedTransformerConfig arguments")
    for name in _NOT_SAVED:
        kwargs.pop(name, None)  # never download a tokenizer named in the config; the device is the caller's
    if isinstance(kwargs.get("dtype"), str):
        dtype = getattr(torch, kwargs["dtype"].removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{path}: unknown dtype {kwargs['dtype']!r}")
        kwargs["dtype"] = dtype
    return kwargs


def _read_config(directory: Path, device: Optional[str]) -> HookedTransformerConfig:
    path = directory / CONFIG_FILE
    kwargs = _read_kwargs(directory)
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown HookedTransformerConfig fields {unknown}")
    try:
        return HookedTransformerConfig(**kwargs, device=device)
    except (TypeError, ValueError, AssertionError) as err:
        raise CheckpointError(f"{path}: invalid HookedTransformerConfig ({err})") from None


def _read_weights(directory: Path) -> dict:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt file: report which one, in one line
            raise CheckpointError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        return state
    raise CheckpointError(f"{directory}: no weights file (expected one of {', '.join(WEIGHT_FILES)})")


def tokenizer_directory(directory: Union[str, Path]) -> Optional[Path]:
    """Where the checkpoint's tokenizer files are (``tokenizer/`` or the directory itself), or None."""
    directory = Path(directory)
    for candidate in (directory / TOKENIZER_DIR, directory):
        if candidate.is_dir() and any((candidate / m).is_file() for m in _TOKENIZER_MARKERS):
            return candidate
    return None


def load_tokenizer(directory: Union[str, Path]) -> Any:
    """A Hugging Face tokenizer from local files only (no hub lookup)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


def load_checkpoint(directory: Union[str, Path], device: Optional[str] = None,
                    as_bridge: Optional[bool] = None) -> HookedTransformer:
    """A HookedTransformer (eval mode) from a checkpoint directory written by :func:`save_checkpoint` — or, with
    ``as_bridge``, the same weights as a TransformerLens-native ``TransformerBridge``.

    The tokenizer, if the directory has one, is attached with ``model.set_tokenizer`` (a bridge gets it at boot).

    Args:
        as_bridge: ``True``: a ``TransformerBridge.boot_native`` model
            (:func:`tl_circuits.models.native.native_bridge_from_tl`; learned positions only, see there);
            ``False``: a HookedTransformer; ``None`` (default): a
            HookedTransformer where TransformerLens has one (2.x/3.x), a bridge otherwise (4.x).

    Raises:
        CheckpointError: a missing or unreadable config or weights file, unknown config fields, weights that
            do not match the config, a configuration the native bridge cannot reproduce, or a tokenizer that
            cannot be loaded.
    """
    from tl_circuits.models.hf_directory import HF, directory_kind

    directory = Path(directory)
    if not is_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {CONFIG_FILE})")
    if directory_kind(directory) == HF:
        raise CheckpointError(f"{directory}: a Hugging Face model directory (its config.json names "
                              "'architectures'/'model_type'), not a tl_circuits checkpoint: load it with "
                              "tl_circuits.models.load_hf_directory")
    if as_bridge is None:
        as_bridge = HookedTransformer is None
    if as_bridge:
        return _load_as_bridge(directory, device)
    if HookedTransformer is None:
        raise CheckpointError(f"{directory}: cannot load as a HookedTransformer: this TransformerLens (4.x) has "
                              "none; load it as a bridge (as_bridge=True)")
    cfg = _read_config(directory, device)
    state = _read_weights(directory)
    model = HookedTransformer(cfg, move_to_device=True)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{directory}: weights do not match config.json ({first})") from None
    # buffers (causal masks, rotary tables) are rebuilt from the config; a file may hold only the parameters
    parameters = {name for name, _ in model.named_parameters()}
    missing = [name for name in result.missing_keys if name in parameters]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match config.json (missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''})")
    model.eval()
    tok_dir = tokenizer_directory(directory)
    if tok_dir is not None:
        model.set_tokenizer(load_tokenizer(tok_dir))
    return model


def _load_as_bridge(directory: Path, device: Optional[str]):
    from tl_circuits.models.native import native_bridge_from_tl

    kwargs = _read_kwargs(directory)
    dtype = kwargs.pop("dtype", None)
    state = _read_weights(directory)
    tok_dir = tokenizer_directory(directory)
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    try:
        return native_bridge_from_tl(kwargs, state, device=device, dtype=dtype, tokenizer=tokenizer,
                                     model_name=directory.name)
    except NotImplementedError as err:
        raise CheckpointError(f"{directory}: cannot load as a TransformerBridge: {err}") from None
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory}: cannot load as a TransformerBridge ({type(err).__name__}: "
                              f"{' '.join(str(err).split())})") from None
