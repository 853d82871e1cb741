"""Prompt -> completion tasks: records with a prompt and its answer, the loss counted on the answer only.

The records (:mod:`tl_circuits.cli.task_records`: JSON Lines, CSV, Parquet, a ``datasets`` directory) follow the
prompt-completion convention of Hugging Face TRL datasets: a ``prompt`` field and a ``completion`` field (other
names with ``--prompt-field`` / ``--completion-field``), optionally a ``corrupted_prompt`` and an ``id``.

**Tokens.** As TRL does, the sample is ``prompt + completion`` (the two strings joined, nothing inserted: put
the space that separates them at the start of the completion, ``" Paris"``, as the model would generate it),
tokenised by ``model.to_tokens`` (BOS prepended when the model's ``cfg.default_prepend_bos`` is True, as for text
task files). No end-of-sequence token is added: the completion is counted exactly as written.

**Counted predictions.** The prompt is tokenised alone too. Its tokens are the sample's prompt tokens when they
are a prefix of the sample's tokens; the predictions that count are those whose target is a completion token
(``loss_mask[p]`` for ``p`` from ``n_prompt - 1`` to the sample's second-to-last token).

**A token that spans the boundary.** A tokenizer may merge the prompt's last characters with the completion's
first (BPE: ``"The answer is "`` + ``"Paris"`` gives ``" Paris"``, not ``" "`` + ``"Paris"``). Then the prompt's
tokens are not a prefix of the sample's, and the completion starts at the **first token that differs** from
the prompt alone: that token holds the answer's first characters (and some of the prompt's), and its prediction
counts. (TRL instead cuts at the prompt's token count and warns, which would skip the answer's first token
here.) The task gets a note naming such records; the report shows the prompt and completion token counts.

**Corrupted prompts.** ``corrupted_prompt + completion`` is the sample's corrupted twin, the RESAMPLE reference
of the freeze sweep (row ``i`` patches sample ``i``, position by position). So it must have the sample's length
with the completion at the same positions: the corrupted prompt must tokenise to as many tokens as the prompt.
Give a corrupted prompt in every record or in none.

**Errors** (one line naming the file and the line or row): a record without the prompt or completion field, a
field that is not text, an empty completion, a completion that tokenises to nothing, a sample longer than the
model's ``n_ctx`` (it is never truncated: that would cut the answer), words the tokenizer does not know, a
corrupted twin of another length, a duplicate ``id``.

>>> import tempfile
>>> from pathlib import Path
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # its tokenizer: BOS, then the words "1" ... "63"
>>> with tempfile.TemporaryDirectory() as folder:
...     path = Path(folder) / "a.jsonl"
...     _ = path.write_text('{"prompt": "5 6 7 5 6", "completion": " 7"}\\n')
...     task = read_prompt_completion(path, model)
>>> task.tokens.tolist(), task.loss_mask.int().tolist(), task.prompt_lengths.tolist(), task.ids
([[0, 5, 6, 7, 5, 6, 7]], [[0, 0, 0, 0, 0, 1, 0]], [6], ['a:1'])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tl_circuits.cli.task_input import (
    COMPLETION_TARGETS,
    PREVIEW_CHARS,
    TaskInput,
    TaskInputError,
    check_ids_in_vocab,
    check_known_words,
    model_pad_id,
    pad_samples,
    require_tokenizer,
)
from tl_circuits.cli.task_records import Record, read_records
from tl_circuits.models.spec import model_spec
from tl_circuits.models.types import Model

MERGED_SHOWN = 5  # records named in the note about tokens that span the prompt/completion boundary


@dataclass(frozen=True)
class RecordFields:
    """The names of a record's fields (TRL's by default)."""

    prompt: str = "prompt"
    completion: str = "completion"
    corrupted_prompt: str = "corrupted_prompt"
    id: str = "id"


@dataclass(frozen=True)
class _Sample:
    tokens: list[int]
    n_prompt: int  # tokens before the first completion token
    merged: bool  # the prompt alone tokenises to something that is not a prefix of the sample
    corrupted: Optional[list[int]]


def _text_field(record: Record, name: str, option: str, required: bool = True) -> Optional[str]:
    if name not in record.fields or record.fields[name] is None:
        if not required:
            return None
        found = ", ".join(repr(k) for k in record.fields) or "none"
        raise TaskInputError(f"{record.where}: no {name!r} field (fields: {found}); a prompt -> completion record "
                             f"needs text fields {option}")
    value = record.fields[name]
    if not isinstance(value, str):
        hint = ("; conversational records (lists of messages) are not read: apply the chat template and give the "
                "text" if isinstance(value, (list, dict)) else "")
        raise TaskInputError(f"{record.where}: field {name!r} must be text, got {type(value).__name__}{hint}")
    return value


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenise(model: Any, text: str) -> list[int]:
    return model.to_tokens(text, truncate=False)[0].tolist()


def _sample(record: Record, model: Any, tokenizer: Any, fields: RecordFields, n_ctx: int, d_vocab: int) -> _Sample:
    option = f"{fields.prompt!r} and {fields.completion!r} (name others with --prompt-field/--completion-field)"
    prompt = _text_field(record, fields.prompt, option)
    completion = _text_field(record, fields.completion, option)
    assert prompt is not None and completion is not None
    if not completion:
        raise TaskInputError(f"{record.where}: empty completion (nothing to score)")
    check_known_words(record.where, prompt + completion, model, tokenizer)
    tokens = _tokenise(model, prompt + completion)
    prompt_tokens = _tokenise(model, prompt)
    n_prompt = _common_prefix(prompt_tokens, tokens)
    if n_prompt == len(tokens):
        raise TaskInputError(f"{record.where}: the completion {completion!r} adds no token to the prompt's")
    if n_prompt == 0:
        raise TaskInputError(f"{record.where}: the sample's first token already differs from the prompt's (no BOS and "
                             "an empty or merged prompt): nothing precedes the completion to predict it from")
    if len(tokens) > n_ctx:
        raise TaskInputError(f"{record.where}: prompt + completion are {len(tokens)} tokens ({len(tokens) - n_prompt} "
                             f"of them the completion), more than the model's n_ctx = {n_ctx}")
    check_ids_in_vocab(record.where, tokens, d_vocab)
    corrupted = None
    corrupted_prompt = _text_field(record, fields.corrupted_prompt, option, required=False)
    if corrupted_prompt:
        corrupted = _tokenise(model, corrupted_prompt + completion)
        n_corrupted = _common_prefix(_tokenise(model, corrupted_prompt), corrupted)
        if len(corrupted) != len(tokens) or n_corrupted != n_prompt:
            raise TaskInputError(
                f"{record.where}: {fields.corrupted_prompt} + completion are {len(corrupted)} tokens with the "
                f"completion from token {n_corrupted}, prompt + completion {len(tokens)} tokens from token {n_prompt}: "
                "RESAMPLE patches position by position, so the corrupted prompt must tokenise to as many tokens as "
                "the prompt")
        check_ids_in_vocab(record.where, corrupted, d_vocab)
    return _Sample(tokens, n_prompt, n_prompt < len(prompt_tokens), corrupted)


def _sample_ids(path: Path, records: list[Record], fields: RecordFields) -> list[str]:
    ids: list[str] = []
    seen: dict[str, str] = {}
    for record in records:
        given = record.fields.get(fields.id)
        sample_id = str(given).strip() if given is not None and str(given).strip() else f"{path.stem}:{record.number}"
        if sample_id in seen:
            raise TaskInputError(f"{record.where}: id {sample_id!r} is already the id of {seen[sample_id]}; "
                                 "sample ids must be unique")
        seen[sample_id] = record.where
        ids.append(sample_id)
    return ids


def _check_all_or_none_corrupted(records: list[Record], samples: list[_Sample], fields: RecordFields) -> None:
    with_twin = [r for r, s in zip(records, samples) if s.corrupted is not None]
    if with_twin and len(with_twin) < len(records):
        missing = next(r for r, s in zip(records, samples) if s.corrupted is None)
        raise TaskInputError(f"{missing.where}: no {fields.corrupted_prompt!r}, while {with_twin[0].where} has one: "
                             "RESAMPLE needs a corrupted prompt in every record (or in none)")


def _preview(record: Record, fields: RecordFields) -> str:
    prompt, completion = str(record.fields[fields.prompt]), str(record.fields[fields.completion])
    return f"{' '.join(prompt.split())} → {' '.join(completion.split())}"[:PREVIEW_CHARS]


def read_prompt_completion(path: Path, model: Model, *, fields: Optional[RecordFields] = None,
                           fmt: Optional[str] = None, max_samples: Optional[int] = None,
                           name: Optional[str] = None) -> TaskInput:
    """A prompt -> completion task file (module docstring) as a :class:`TaskInput` whose ``loss_mask`` counts the
    completion's tokens; at most ``max_samples`` records. TaskInputError (naming the file and line) on bad input."""
    path, fields = Path(path), fields or RecordFields()
    tokenizer = require_tokenizer(path, model, "a prompt -> completion task")
    spec = model_spec(model)
    records = read_records(path, fmt, max_samples)
    samples = [_sample(record, model, tokenizer, fields, spec.n_ctx, spec.d_vocab) for record in records]
    _check_all_or_none_corrupted(records, samples, fields)
    ids = _sample_ids(path, records, fields)
    pad = model_pad_id(model)
    tokens, attention_mask = pad_samples([s.tokens for s in samples], pad)
    loss_mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, sample in enumerate(samples):
        loss_mask[row, sample.n_prompt - 1:len(sample.tokens) - 1] = True
    corrupted = None
    if samples[0].corrupted is not None:
        corrupted = pad_samples([s.corrupted or [] for s in samples], pad)[0]
    notes = []
    merged = [record.where for record, sample in zip(records, samples) if sample.merged]
    if merged:
        shown = ", ".join(merged[:MERGED_SHOWN]) + (" ..." if len(merged) > MERGED_SHOWN else "")
        notes.append(f"{path}: {len(merged)} record(s) have a token spanning the prompt/completion boundary ({shown}); "
                     "their completion is counted from the first token that differs from the prompt tokenised "
                     "alone (it includes the prompt's last characters)")
    return TaskInput(name or path.stem, tokens, attention_mask, loss_mask, ids,
                     [_preview(record, fields) for record in records], str(path), notes, corrupted=corrupted,
                     prompt_lengths=torch.tensor([s.n_prompt for s in samples], dtype=torch.int64),
                     counted=COMPLETION_TARGETS)
