"""Task samples for the ``tl-circuits`` command: read from files, or taken from a bundled task batch.

Formats (``fmt="auto"`` picks by suffix):

- **text** (any other suffix, e.g. ``.txt``): one sample per line, tokenised by the model's tokenizer
  (``model.to_tokens``). Needs a model with a tokenizer.
- **ids** (``.tokens``, ``.ids``, or ``fmt="ids"`` for any suffix): one sample per line, whitespace-separated
  integer token ids; for tokenizer-less models.
- **tensor** (``.pt``, ``.npy``): an integer array ``[n_samples, pos]`` (a ``.pt`` file may instead hold a dict
  with ``"tokens"`` and optionally ``"attention_mask"``), every position valid unless a mask says otherwise.

Rules common to every format:

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_circuits.models.spec import model_spec
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.bundled.tasks import TaskBatch

TEXT, IDS, TENSOR = "text", "ids", "tensor"
FORMATS = ("auto", TEXT, IDS)
ID_SUFFIXES = (".tokens", ".ids")
TENSOR_SUFFIXES = (".pt", ".npy")
PREVIEW_CHARS = 60


class TaskInputError(ValueError):
    """A task that cannot be used (the message names the file and line)."""


@dataclass
class TaskInput:
    """One task's samples, ready for the analysis.

    Attributes:
        name: the task's name (bundled task name or file stem).
        tokens: ``[n, pos]`` int64 token ids, right-padded.
        attention_mask: ``[n, pos]`` int64, 1 on real tokens.
        scored: ``[n, pos]`` bool, :class:`tl_circuits.bundled.tasks.TaskBatch`'s convention: ``scored[i, p]`` means
            the prediction made at position ``p`` (of token ``p + 1``) counts in the sweep metric; the last
            position is never scored.
        ids: one id per sample (row order).
        previews: a short human-readable form of each sample (text, or its first token ids).
        source: where the samples came from (file path or ``bundled:<model>``).
    """

    name: str
    tokens: Int[Tensor, "n pos"]
    attention_mask: Int[Tensor, "n pos"]
    scored: Bool[Tensor, "n pos"]
    ids: list[str]
    previews: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: Union[str, torch.device]) -> "TaskInput":
        return TaskInput(self.name, self.tokens.to(device), self.attention_mask.to(device), self.scored.to(device),
                         self.ids, self.previews, self.source, self.notes)


def valid_target_positions(attention_mask: Int[Tensor, "n pos"]) -> Bool[Tensor, "n pos"]:
    """Positions p whose next-token prediction counts: p and p + 1 both real tokens (never the last)."""
    scored = torch.zeros(attention_mask.shape, dtype=torch.bool)
    scored[:, :-1] = (attention_mask[:, :-1] > 0) & (attention_mask[:, 1:] > 0)
    return scored


def _preview_ids(ids: Sequence[int], n: int = 12) -> str:
    return " ".join(str(i) for i in ids[:n]) + (" …" if len(ids) > n else "")


def _pad(samples: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad variable-length samples: (tokens, attention_mask)."""
    width = max(len(s) for s in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(samples), width), dtype=torch.int64)
    for row, sample in enumerate(samples):
        tokens[row, :len(sample)] = torch.tensor(sample, dtype=torch.int64)
        mask[row, :len(sample)] = 1
    return tokens, mask


def _pad_id(model: Model) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) and 0 <= pad < model_spec(model).d_vocab else 0


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
    return IDS if suffix in ID_SUFFIXES else TEXT


def _check_ids_in_vocab(path: Path, where: str, ids: Sequence[int], d_vocab: int) -> None:
    bad = [i for i in ids if not 0 <= i < d_vocab]
    if bad:
        raise TaskInputError(f"{path}{where}: token id {bad[0]} is outside the model's vocabulary "
                             f"[0, {d_vocab - 1}]")


def _check_known_words(path: Path, number: int, line: str, model: Any, tokenizer: Any) -> None:
    """TaskInputError naming the words of a line that the tokenizer maps to its unknown token (never silently)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    unk_text = getattr(tokenizer, "unk_token", None)
    if unk is None or (unk_text and unk_text in line):
        return
    tokens = model.to_tokens(line, prepend_bos=False, truncate=False)[0].tolist()
    n_unknown = sum(1 for token in tokens if token == unk)
    if not n_unknown:
        return
    words = [w for w in line.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    shown = ", ".join(repr(w) for w in dict.fromkeys(words)) or "(not separable by whitespace)"
    raise TaskInputError(f"{path}:{number}: {n_unknown} token(s) the tokenizer does not know ({shown}); they would "
                         f"silently become its unknown token {unk_text!r} (id {unk}): fix the text, or give token ids")


def _text_samples(path: Path, lines, model) -> tuple[list[list[int]], list[str], list[str], int]:
    spec = model_spec(model)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TaskInputError(f"{path}: is a text file but the model has no tokenizer; give token ids instead "
                             f"(a {'/'.join(ID_SUFFIXES)} file of whitespace-separated ids per line, "
                             f"a .pt/.npy array, or --task-format ids)")
    samples, ids, previews, truncated = [], [], [], 0
    for number, line in lines:
        _check_known_words(path, number, line, model, tokenizer)
        full = model.to_tokens(line, truncate=False)[0].tolist()
        sample = full[:spec.n_ctx]
        truncated += len(full) > len(sample)
        if len(sample) < 2:
            raise TaskInputError(f"{path}:{number}: the line tokenises to {len(sample)} token(s); a sample needs "
                                 "at least 2 (one next-token target)")
        _check_ids_in_vocab(path, f":{number}", sample, spec.d_vocab)
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
        _check_ids_in_vocab(path, f":{number}", full, spec.d_vocab)
        sample = full[:spec.n_ctx]
        truncated += len(full) > len(sample)
        if len(sample) < 2:
            raise TaskInputError(f"{path}:{number}: a sample needs at least 2 token ids, got {len(sample)}")
        samples.append(sample)
        ids.append(f"{path.stem}:{number}")
        previews.append(_preview_ids(sample))
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
    _check_ids_in_vocab(path, "", [int(real.min()), int(real.max())], spec.d_vocab)
    tokens = torch.where(mask > 0, tokens, torch.full_like(tokens, _pad_id(model)))
    scored = valid_target_positions(mask)
    empty = (~scored.any(1)).nonzero().flatten().tolist()
    if empty:
        raise TaskInputError(f"{path}: sample {empty[0]} has fewer than 2 valid tokens (no next-token target)")
    ids = [f"{path.stem}:{i + 1}" for i in range(tokens.shape[0])]
    previews = [_preview_ids(row[m > 0].tolist()) for row, m in zip(tokens, mask)]
    notes += _missing_bos_note(path, tokens, model)
    return TaskInput(name, tokens, mask, scored, ids, previews, str(path), notes)


def read_task_file(path: Union[str, Path], model: Model, *, fmt: str = "auto", max_samples: Optional[int] = None,
                   name: Optional[str] = None) -> TaskInput:
    """Read one task from a file (formats in the module docstring), at most ``max_samples`` samples.

    Raises:
        TaskInputError: a missing or unreadable file, no samples, a text file for a model without a tokenizer,
            token ids outside the vocabulary, a sample shorter than 2 tokens.
    """
    path = Path(path)
    if not path.exists():
        raise TaskInputError(f"{path}: no such file")
    if path.is_dir():
        raise TaskInputError(f"{path}: is a directory, expected a task file")
    kind = _format_of(path, fmt)
    name = name or path.stem
    if kind == TENSOR:
        return _tensor_task(path, model, max_samples, name)
    lines = _non_blank_lines(path)
    if not lines:
        raise TaskInputError(f"{path}: empty task (no non-blank lines)")
    lines = lines[:max_samples] if max_samples is not None else lines
    reader = _text_samples if kind == TEXT else _id_samples
    samples, ids, previews, truncated = reader(path, lines, model)
    tokens, mask = _pad(samples, _pad_id(model))
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
    previews = [_preview_ids(row[m > 0].tolist()) for row, m in zip(tokens, mask)]
    return TaskInput(name, tokens, mask, scored, ids, previews, source)
