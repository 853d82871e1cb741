"""Task samples for the ``tl-circuits`` command: read from files, or taken from a bundled task batch.

Formats (``fmt="auto"`` picks by suffix):

- **prompt -> completion records** (``.jsonl``/``.json``, ``.csv``, ``.parquet``, or a directory written by
  ``datasets``' ``save_to_disk``): each record a ``prompt`` and its ``completion``; only the completion's tokens
  count in the loss. Formats, tokenisation, corrupted prompts and errors: :mod:`tl_circuits.cli.prompt_completion`.
- **text** (any other suffix, e.g. ``.txt``): one sample per line, tokenised by the model's tokenizer
  (``model.to_tokens``). Needs a model with a tokenizer.
- **ids** (``.tokens``, ``.ids``, or ``fmt="ids"`` for any suffix): one sample per line, whitespace-separated
  integer token ids; for tokenizer-less models.
- **tensor** (``.pt``, ``.npy``): an integer array ``[n_samples, pos]`` (a ``.pt`` file may instead hold a dict
  with ``"tokens"`` and optionally ``"attention_mask"``), every position valid unless a mask says otherwise.

Rules common to the text, ids and tensor formats (prompt -> completion records follow the same BOS rule and
name samples the same way, by line or row, or by their ``id``; every valid target counts in these formats):

- **BOS.** Text is tokenised with TransformerLens's convention: ``model.to_tokens(line)`` prepends BOS when the
  model's ``cfg.default_prepend_bos`` is True (the default). Token ids (ids and tensor files) are the model's
  input *exactly as given*: nothing is prepended, so a sample that should start with BOS must contain it (the
  task gets a note when the model prepends BOS to text and some token rows do not start with it). The same
  sequence written as a text line and as its ``to_tokens`` ids therefore gives the same samples.
- **Sample ids** say where a sample is in its file: ``"<file stem>:<n>"`` with ``n`` the 1-based line number
  (text and ids files; blank lines are skipped but counted) or the 1-based row number (tensor files).
  Bundled tasks have no file: their ids are ``"<task>#<row>"`` (0-based).
- **Length.** Samples longer than the model's ``n_ctx`` are truncated (with a note); a sample needs at least
  two tokens (one next-token target); samples of different lengths are right-padded (pad id: the tokenizer's,
  else 0) with a 0/1 attention mask. Right padding leaves every real position's causal computation unchanged,
  so the freeze sweep (which runs without a mask) and the masked per-sample gradients see the same real tokens.
- **Vocabulary.** A token id outside ``[0, d_vocab)`` and a word the tokenizer does not know are errors
  naming the line.

>>> from tl_circuits.bundled.tasks import induction_batch
>>> task = task_from_batch(induction_batch(2, seq_len=9), "induction", "bundled")
>>> task.ids, tuple(task.tokens.shape)
(['induction#0', 'induction#1'], (2, 9))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from tl_circuits.cli.prompt_completion import RecordFields, read_prompt_completion
from tl_circuits.cli.task_input import (  # noqa: F401  (TaskInput, TaskInputError: this module's public names too)
    PREVIEW_CHARS,
    SCORED_TARGETS,
    TaskInput,
    TaskInputError,
    check_ids_in_vocab,
    check_known_words,
    model_pad_id,
    pad_samples,
    preview_ids,
    require_tokenizer,
    valid_target_positions,
)
from tl_circuits.cli.task_records import CSV, DATASET, JSONL, PARQUET, record_format
from tl_circuits.models.spec import model_spec
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.bundled.tasks import TaskBatch

TEXT, IDS, TENSOR = "text", "ids", "tensor"
RECORD_FORMATS = (JSONL, CSV, PARQUET)
FORMATS = ("auto", TEXT, IDS, *RECORD_FORMATS)
ID_SUFFIXES = (".tokens", ".ids")
TENSOR_SUFFIXES = (".pt", ".npy")


def _non_blank_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TaskInputError(f"{path}: not a UTF-8 text file (token tensors must end in .pt or .npy)") from None
    except OSError as err:
        raise TaskInputError(f"{path}: cannot read ({err.strerror or err})") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _format_of(path: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise TaskInputError(f"unknown task format {fmt!r}; expected one of {FORMATS}")
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return TENSOR
    if path.is_dir():
        return DATASET
    return IDS if suffix in ID_SUFFIXES else record_format(path) or TEXT


def _text_samples(path: Path, lines, model) -> tuple[list[list[int]], list[str], list[str], int]:
    spec = model_spec(model)
    tokenizer = require_tokenizer(path, model, "a text file")
    samples, ids, previews, truncated = [], [], [], 0
    for number, line in lines:
        check_known_words(f"{path}:{number}", line, model, tokenizer)
        full = model.to_tokens(line, truncate=False)[0].tolist()
        sample = full[:spec.n_ctx]
        truncated += len(full) > len(sample)
        if len(sample) < 2:
            raise TaskInputError(f"{path}:{number}: the line tokenises to {len(sample)} token(s); a sample needs "
                                 "at least 2 (one next-token target)")
        check_ids_in_vocab(f"{path}:{number}", sample, spec.d_vocab)
        samples.append(sample)
        ids.append(f"{path.stem}:{number}")
        previews.append(line.strip()[:PREVIEW_CHARS])
    return samples, ids, previews, truncated


def _id_samples(path: Path, lines, model) -> tuple[list[list[int]], list[str], list[str], int]:
    spec = model_spec(model)
    samples, ids, previews, truncated = [], [], [], 0
    for number, line in lines:
        try:
            full = [int(word) for word in line.split()]
        except ValueError:
            raise TaskInputError(f"{path}:{number}: expected whitespace-separated integer token ids, got "
                                 f"{line.strip()[:40]!r} (is it a text file? name it .txt)") from None
        check_ids_in_vocab(f"{path}:{number}", full, spec.d_vocab)
        sample = full[:spec.n_ctx]
        truncated += len(full) > len(sample)
        if len(sample) < 2:
            raise TaskInputError(f"{path}:{number}: a sample needs at least 2 token ids, got {len(sample)}")
        samples.append(sample)
        ids.append(f"{path.stem}:{number}")
        previews.append(preview_ids(sample))
    return samples, ids, previews, truncated


def _missing_bos_note(path: Path, tokens: Int[Tensor, "n pos"], model: Model) -> list[str]:
    """A note when the model prepends BOS to text but some token rows do not start with it (they are kept as
    given: a token file is the model's exact input)."""
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    if not isinstance(bos, int) or not getattr(model.cfg, "default_prepend_bos", True):
        return []
    missing = int((tokens[:, 0] != bos).sum())
    if not missing:
        return []
    return [f"{path}: {missing} of {tokens.shape[0]} sample(s) do not start with BOS (id {bos}), which text lines "
            "get prepended; token ids are used as given"]


def _tensor_task(path: Path, model, max_samples: Optional[int], name: str) -> TaskInput:
    try:
        if path.suffix.lower() == ".npy":
            loaded = np.load(path, allow_pickle=False)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: one line naming it
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise TaskInputError(f"{path}: cannot read ({type(err).__name__}: {first_line})") from None
    mask = None
    if isinstance(loaded, dict):
        if "tokens" not in loaded:
            raise TaskInputError(f"{path}: a dict must hold 'tokens' (and optionally 'attention_mask'), "
                                 f"got keys {sorted(loaded)}")
        mask = loaded.get("attention_mask")
        loaded = loaded["tokens"]
    tokens = torch.as_tensor(np.asarray(loaded) if not isinstance(loaded, Tensor) else loaded)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dtype.is_complex:
        raise TaskInputError(f"{path}: token ids must be integers, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise TaskInputError(f"{path}: token ids must be a 2-d array [n_samples, pos], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise TaskInputError(f"{path}: empty task (shape {tuple(tokens.shape)})")
    tokens = tokens.to(torch.int64)
    mask = torch.ones_like(tokens) if mask is None else torch.as_tensor(mask).to(torch.int64)
    if mask.shape != tokens.shape or not bool(((mask == 0) | (mask == 1)).all()):
        raise TaskInputError(f"{path}: attention_mask must be 0/1 with the tokens' shape {tuple(tokens.shape)}")
    if max_samples is not None:
        tokens, mask = tokens[:max_samples], mask[:max_samples]
    notes = []
    spec = model_spec(model)
    if tokens.shape[1] > spec.n_ctx:
        notes.append(f"{path}: truncated to the model's n_ctx = {spec.n_ctx} positions")
        tokens, mask = tokens[:, :spec.n_ctx], mask[:, :spec.n_ctx]
    real = tokens[mask > 0]
    check_ids_in_vocab(str(path), [int(real.min()), int(real.max())], spec.d_vocab)
    tokens = torch.where(mask > 0, tokens, torch.full_like(tokens, model_pad_id(model)))
    scored = valid_target_positions(mask)
    empty = (~scored.any(1)).nonzero().flatten().tolist()
    if empty:
        raise TaskInputError(f"{path}: sample {empty[0]} has fewer than 2 valid tokens (no next-token target)")
    ids = [f"{path.stem}:{i + 1}" for i in range(tokens.shape[0])]
    previews = [preview_ids(row[m > 0].tolist()) for row, m in zip(tokens, mask)]
    notes += _missing_bos_note(path, tokens, model)
    return TaskInput(name, tokens, mask, scored, ids, previews, str(path), notes)


def read_task_file(path: Union[str, Path], model: Model, *, fmt: str = "auto", max_samples: Optional[int] = None,
                   name: Optional[str] = None, fields: Optional[RecordFields] = None) -> TaskInput:
    """Read one task from a file (formats in the module docstring), at most ``max_samples`` samples.

    ``fields``: the names of a prompt -> completion record's fields (TRL's ``prompt`` and ``completion`` by
    default).

    Raises:
        TaskInputError: a missing or unreadable file, no samples, a text file for a model without a tokenizer,
            token ids outside the vocabulary, a sample shorter than 2 tokens; the errors of
            :mod:`tl_circuits.cli.prompt_completion` for record files.
    """
    path = Path(path)
    if not path.exists():
        raise TaskInputError(f"{path}: no such file")
    kind = _format_of(path, fmt)
    if path.is_dir() and kind != DATASET:
        raise TaskInputError(f"{path}: is a directory; only a datasets directory (Dataset.save_to_disk) is a task")
    name = name or path.stem
    if kind == DATASET or kind in RECORD_FORMATS:
        return read_prompt_completion(path, model, fields=fields, fmt=kind, max_samples=max_samples, name=name)
    if kind == TENSOR:
        return _tensor_task(path, model, max_samples, name)
    lines = _non_blank_lines(path)
    if not lines:
        raise TaskInputError(f"{path}: empty task (no non-blank lines)")
    lines = lines[:max_samples] if max_samples is not None else lines
    reader = _text_samples if kind == TEXT else _id_samples
    samples, ids, previews, truncated = reader(path, lines, model)
    tokens, mask = pad_samples(samples, model_pad_id(model))
    n_ctx = model_spec(model).n_ctx
    notes = [f"{path}: {truncated} sample(s) truncated to n_ctx = {n_ctx} tokens"] if truncated else []
    if kind == IDS:
        notes += _missing_bos_note(path, tokens, model)
    return TaskInput(name, tokens, mask, valid_target_positions(mask), ids, previews, str(path), notes)


def task_from_batch(batch: TaskBatch, name: str, source: str) -> TaskInput:
    """A bundled task's ``TaskBatch`` (``tokens`` [n, pos], ``scored`` [n, pos]) as a :class:`TaskInput`."""
    tokens = torch.as_tensor(batch.tokens).to(torch.int64).cpu()
    scored = torch.as_tensor(batch.scored).to(torch.bool).cpu()
    mask = getattr(batch, "attention_mask", None)
    mask = torch.ones_like(tokens) if mask is None else torch.as_tensor(mask).to(torch.int64).cpu()
    name = getattr(batch, "name", None) or name
    ids = [f"{name}#{i}" for i in range(tokens.shape[0])]
    previews = [preview_ids(row[m > 0].tolist()) for row, m in zip(tokens, mask)]
    return TaskInput(name, tokens, mask, scored, ids, previews, source, counted=SCORED_TARGETS)
