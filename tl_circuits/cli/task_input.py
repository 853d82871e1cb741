"""One task's samples as the analysis takes them (:class:`TaskInput`), and the checks every task reader shares.

A task is a right-padded batch of token ids with its attention mask and its **loss mask** in the bundled
``scored`` convention (:class:`tl_circuits.bundled.tasks.TaskBatch`): ``loss_mask[i, p]`` means that the
prediction made at position ``p`` (of token ``p + 1``) counts in sample ``i``'s loss. Which predictions count
depends on where the task came from:

- a bundled task: its ``scored`` positions (e.g. the repeated half of an induction sample);
- a prompt -> completion task file: the predictions whose target is a completion token;
- a plain text, token-id or tensor file: every valid target (:func:`valid_target_positions`).

>>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
>>> valid_target_positions(mask).int().tolist()
[[1, 1, 0, 0], [1, 1, 1, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_circuits.models.spec import model_spec
from tl_circuits.models.types import Model

PREVIEW_CHARS = 60
ALL_TARGETS = "every next-token prediction of the sample (all valid targets)"
COMPLETION_TARGETS = "the predictions of the completion's tokens (prompt tokens are context only)"
SCORED_TARGETS = "the task's scored positions"


class TaskInputError(ValueError):
    """A task that cannot be used (the message names the file and line)."""


@dataclass
class TaskInput:
    """One task's samples, ready for the analysis.

    Attributes:
        name: the task's name (bundled task name or file stem).
        tokens: ``[n, pos]`` int64 token ids, right-padded.
        attention_mask: ``[n, pos]`` int64, 1 on real tokens.
        loss_mask: ``[n, pos]`` bool, the predictions that count (module docstring; the bundled ``scored``
            convention: position ``p`` counts the prediction of token ``p + 1``; the last position never counts).
            The freeze sweep's metric and the interference's per-sample loss both use it.
        ids: one id per sample (row order).
        previews: a short human-readable form of each sample (text, or its first token ids).
        source: where the samples came from (file path or ``bundled:<model>``).
        notes: things the user should know about how the file was read (shown and written in the report).
        corrupted: ``[n, pos]`` int64 or None: each sample's corrupted twin (a prompt -> completion record's
            ``corrupted_prompt`` + its completion), the per-sample RESAMPLE reference of the freeze sweep; same
            shape and attention mask as ``tokens``.
        prompt_lengths: ``[n]`` int64 or None: a prompt -> completion sample's prompt tokens (BOS included); its
            completion tokens are the rest of its real tokens.
        counted: what ``loss_mask`` counts, in words (the report says it).
    """

    name: str
    tokens: Int[Tensor, "n pos"]
    attention_mask: Int[Tensor, "n pos"]
    loss_mask: Bool[Tensor, "n pos"]
    ids: list[str]
    previews: list[str]
    source: str
    notes: list[str] = field(default_factory=list)
    corrupted: Optional[Int[Tensor, "n pos"]] = None
    prompt_lengths: Optional[Int[Tensor, " n"]] = None
    counted: str = ALL_TARGETS

    @property
    def n_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_counted(self) -> Int[Tensor, " n"]:
        """Counted predictions per sample (``loss_mask.sum(1)``)."""
        return self.loss_mask.sum(1)

    @property
    def completion_lengths(self) -> Optional[Int[Tensor, " n"]]:
        """A prompt -> completion sample's completion tokens (None for other tasks)."""
        if self.prompt_lengths is None:
            return None
        return self.attention_mask.sum(1) - self.prompt_lengths

    def to(self, device: Union[str, torch.device]) -> "TaskInput":
        corrupted = None if self.corrupted is None else self.corrupted.to(device)
        return replace(self, tokens=self.tokens.to(device), attention_mask=self.attention_mask.to(device),
                       loss_mask=self.loss_mask.to(device), corrupted=corrupted)

    def scoring_summary(self) -> dict[str, Any]:
        """What the report says was scored: the loss, and the counted predictions (prompt and completion tokens of
        prompt -> completion tasks) per sample."""
        out: dict[str, Any] = dict(loss="mean next-token cross-entropy over the counted predictions of each sample",
                                   counted=self.counted, n_counted=self.n_counted.tolist(),
                                   n_tokens=self.attention_mask.sum(1).tolist())
        completion = self.completion_lengths
        if self.prompt_lengths is not None and completion is not None:
            out.update(n_prompt_tokens=self.prompt_lengths.tolist(), n_completion_tokens=completion.tolist())
        out["corrupted_prompts"] = self.corrupted is not None
        return out


def valid_target_positions(attention_mask: Int[Tensor, "n pos"]) -> Bool[Tensor, "n pos"]:
    """Positions p whose next-token prediction counts: p and p + 1 both real tokens (never the last)."""
    scored = torch.zeros(attention_mask.shape, dtype=torch.bool)
    scored[:, :-1] = (attention_mask[:, :-1] > 0) & (attention_mask[:, 1:] > 0)
    return scored


def preview_ids(ids: Sequence[int], n: int = 12) -> str:
    """The first ``n`` token ids as text (an ellipsis when there are more)."""
    return " ".join(str(i) for i in ids[:n]) + (" …" if len(ids) > n else "")


def pad_samples(samples: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad variable-length samples: (tokens, attention_mask)."""
    width = max(len(s) for s in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(samples), width), dtype=torch.int64)
    for row, sample in enumerate(samples):
        tokens[row, :len(sample)] = torch.tensor(sample, dtype=torch.int64)
        mask[row, :len(sample)] = 1
    return tokens, mask


def model_pad_id(model: Model) -> int:
    """The id padding is written with: the tokenizer's pad id if it is in the vocabulary, else 0 (padding is never
    attended to nor counted, so its value does not matter)."""
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) and 0 <= pad < model_spec(model).d_vocab else 0


def check_ids_in_vocab(where: str, ids: Sequence[int], d_vocab: int) -> None:
    """TaskInputError naming ``where`` (``"file:line"``) for a token id outside ``[0, d_vocab)``."""
    bad = [i for i in ids if not 0 <= i < d_vocab]
    if bad:
        raise TaskInputError(f"{where}: token id {bad[0]} is outside the model's vocabulary [0, {d_vocab - 1}]")


def check_known_words(where: str, text: str, model: Any, tokenizer: Any) -> None:
    """TaskInputError naming the words of ``text`` that the tokenizer maps to its unknown token (never silently)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    unk_text = getattr(tokenizer, "unk_token", None)
    if unk is None or (unk_text and unk_text in text):
        return
    tokens = model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist()
    n_unknown = sum(1 for token in tokens if token == unk)
    if not n_unknown:
        return
    words = [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    shown = ", ".join(repr(w) for w in dict.fromkeys(words)) or "(not separable by whitespace)"
    raise TaskInputError(f"{where}: {n_unknown} token(s) the tokenizer does not know ({shown}); they would "
                         f"silently become its unknown token {unk_text!r} (id {unk}): fix the text, or give token ids")


def require_tokenizer(path: Path, model: Model, what: str) -> Any:
    """The model's tokenizer, or a TaskInputError saying that ``what`` (e.g. "a text file") needs one."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TaskInputError(f"{path}: is {what} but the model has no tokenizer; give token ids instead "
                             "(a .tokens/.ids file of whitespace-separated ids per line, a .pt/.npy array, or "
                             "--task-format ids)")
    return tokenizer
