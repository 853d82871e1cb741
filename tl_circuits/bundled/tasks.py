"""Synthetic next-token tasks with known mechanisms: token batches plus the positions that matter.

Every generator returns a :class:`TaskBatch`: ``tokens`` [batch, pos] (int64) and ``scored``
[batch, pos], True at the positions whose *next-token prediction* is the point of the task (for
induction: the positions inside the repeat, where the next token can be copied from context).

Token layout shared by all generators (and by the bundled models):

- id ``0`` is BOS and every row starts with it. TransformerLens prepends BOS by default, so
  ``model.to_tokens("5 9 2")`` and TransformerLens's ``head_detector`` produce rows of the same form,
  and heads get a fixed resting position.
- ids ``1 .. d_vocab - 1`` are ordinary tokens; :func:`task_tokenizer` spells them as decimal
  numbers (``"17"``).

Tasks (mechanisms differ, which is what makes them useful together):

=============  ==========================================  ===========================================
task           rows                                        mechanism that solves the scored positions
=============  ==========================================  ===========================================
``induction``  BOS, then a pattern of distinct random      in-context copying: a previous-token head
               tokens repeated (``a b c d a b c d a …``)   (layer 0) + an induction head (layer 1)
``counting``   BOS, then consecutive ids (``7 8 9 …``),    a fixed token -> successor lookup, from the
               wrapping from ``d_vocab - 1`` to 1          current token alone (no context needed)
``random``     BOS, then distinct random tokens            nothing is predictable: the control /
                                                           corrupted input (``scored`` all False)
=============  ==========================================  ===========================================

Each generator is deterministic in ``seed`` (its own ``torch.Generator``; the global RNG is not used).

>>> batch = induction_batch(2, seq_len=9, d_vocab=20, seed=0, period=3)
>>> batch.tokens[0].tolist()[:1], (batch.tokens[0, 1:4] == batch.tokens[0, 4:7]).all().item()
([0], True)
>>> batch.scored[0].nonzero().flatten().tolist()   # positions 4..7 predict a repeated token
[4, 5, 6, 7]
>>> counting_batch(1, seq_len=6, d_vocab=20, seed=3).tokens[0].tolist()
[0, 14, 15, 16, 17, 18]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_circuits.bundled.task_metrics import (  # noqa: F401 (re-exported)
    in_context_accuracy,
    in_context_loss,
    scored_accuracy,
    scored_loss,
    scored_loss_metric,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from transformers import PreTrainedTokenizerFast

BOS = 0
"""Token id of BOS; every generated row starts with it."""

__all__ = [
    "BOS",
    "TASK_GENERATORS",
    "TaskBatch",
    "counting_batch",
    "in_context_accuracy",
    "in_context_loss",
    "induction_batch",
    "make_task_batch",
    "random_batch",
    "scored_accuracy",
    "scored_loss",
    "scored_loss_metric",
    "skip_induction_batch",
    "task_tokenizer",
]


@dataclass(frozen=True)
class TaskBatch:
    """A batch of one synthetic task.

    Attributes:
        tokens: [batch, pos] int64 token ids, BOS (0) first.
        scored: [batch, pos] bool; ``scored[b, p]`` means the prediction made at position ``p`` (of
            token ``p + 1``) is what the task tests. The last position is never scored.
        name: the task's name (``"induction"``, ``"counting"``, ``"random"``).
        params: the generator's arguments (``seq_len``, ``d_vocab``, ``seed``, ...), so a batch says
            how it was made.
        info: per-row extras, e.g. ``info["period"]`` [batch] for induction.
        attention_mask: ``None`` (every position real), or [batch, pos] int64, 1 on real tokens, for rows
            right-padded with BOS (counting with ``min_len``). Pass it on to gradient and interference calls
            (``attention_mask_a=batch.attention_mask``); padded positions are never scored.
    """

    tokens: Int[Tensor, "batch pos"]
    scored: Bool[Tensor, "batch pos"]
    name: str
    params: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None

    def __post_init__(self) -> None:
        if self.tokens.shape != self.scored.shape:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and scored {tuple(self.scored.shape)} differ in shape")
        if self.attention_mask is not None and self.attention_mask.shape != self.tokens.shape:
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} and tokens "
                             f"{tuple(self.tokens.shape)} differ in shape")
        if self.scored.shape[1] and self.scored[:, -1].any():
            raise ValueError("the last position has no next token and cannot be scored")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def targets(self) -> Int[Tensor, "batch pos_minus_1"]:
        """The token each position predicts: ``tokens[:, 1:]``."""
        return self.tokens[:, 1:]

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    def to(self, device: Union[str, torch.device]) -> "TaskBatch":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return TaskBatch(self.tokens.to(device), self.scored.to(device), self.name, dict(self.params),
                         {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.info.items()}, mask)

    def __getitem__(self, rows: Union[int, slice, Sequence[int], Tensor]) -> "TaskBatch":
        """The rows ``rows`` (an int, a slice or an index tensor) as a TaskBatch."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        return TaskBatch(self.tokens[rows], self.scored[rows], self.name, dict(self.params),
                         {k: v[rows] if isinstance(v, Tensor) else v for k, v in self.info.items()}, mask)


# ----- generators ---------------------------------------------------------------------------------

def _check_sizes(n: int, seq_len: int, d_vocab: int, min_len: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seq_len < min_len:
        raise ValueError(f"seq_len must be >= {min_len}, got {seq_len}")
    if d_vocab < 3:
        raise ValueError(f"d_vocab must be >= 3 (BOS and at least two ordinary tokens), got {d_vocab}")


def _distinct_tokens(n: int, k: int, d_vocab: int, generator: torch.Generator) -> Int[Tensor, "n k"]:
    """``k`` distinct ordinary tokens per row, uniformly (the first k of a random permutation)."""
    return torch.rand(n, d_vocab - 1, generator=generator).argsort(dim=1)[:, :k] + 1


def induction_batch(
    n: int,
    *,
    seq_len: int = 33,
    d_vocab: int = 64,
    seed: int = 0,
    period: Union[None, int, tuple[int, int]] = None,
) -> TaskBatch:
    """Repeated random sequences: BOS, then a pattern of ``period`` distinct random tokens repeated
    until the row has ``seq_len`` tokens.

    Args:
        n: rows.
        seq_len: tokens per row, BOS included.
        d_vocab: vocabulary size (ordinary tokens are ``1 .. d_vocab - 1``).
        seed: seeds this batch's own generator.
        period: pattern length. ``None`` (default): ``(seq_len - 1) // 2``, the classic "random tokens,
            repeated once" batch; an int: that length for every row; ``(lo, hi)``: each row's length
            drawn uniformly from ``lo..hi`` (inclusive). Training on varied periods keeps a model
            from solving the task by position alone (attending a fixed distance back).

    Scored positions are those holding a repeated token (``p >= 1 + period``), except the last:
    there the next token is the pattern's continuation, copied from context. Pattern tokens are
    distinct, so the token to copy is unambiguous.

    >>> b = induction_batch(3, seq_len=11, d_vocab=30, seed=1)
    >>> b.tokens.shape, b.info["period"].tolist(), b.scored[0].nonzero().flatten().tolist()
    (torch.Size([3, 11]), [5, 5, 5], [6, 7, 8, 9])
    """
    _check_sizes(n, seq_len, d_vocab, min_len=4)
    if period is None:
        lo = hi = (seq_len - 1) // 2
    elif isinstance(period, int):
        lo = hi = period
    else:
        lo, hi = (int(x) for x in period)
    # at least one scored position (period <= seq_len - 3), and enough distinct tokens
    if not (1 <= lo <= hi <= min(seq_len - 3, d_vocab - 1)):
        raise ValueError(
            f"period {period!r} must lie in 1..{min(seq_len - 3, d_vocab - 1)} "
            f"(seq_len={seq_len} leaves room for a repeat, d_vocab={d_vocab} for distinct tokens)"
        )
    generator = torch.Generator().manual_seed(seed)
    periods = torch.randint(lo, hi + 1, (n,), generator=generator)
    pattern = _distinct_tokens(n, hi, d_vocab, generator)
    pos = torch.arange(seq_len - 1)
    body = pattern.gather(1, pos.unsqueeze(0) % periods.unsqueeze(1))  # pattern repeated, per row
    tokens = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body], dim=1)
    full_pos = torch.arange(seq_len).unsqueeze(0)
    scored = (full_pos >= 1 + periods.unsqueeze(1)) & (full_pos <= seq_len - 2)
    params = dict(seq_len=seq_len, d_vocab=d_vocab, seed=seed, period=period)
    return TaskBatch(tokens, scored, "induction", params, {"period": periods})


def counting_batch(n: int, *, seq_len: int = 33, d_vocab: int = 64, seed: int = 0,
                   min_len: Optional[int] = None) -> TaskBatch:
    """Counting: BOS, then consecutive token ids from a random start, wrapping from ``d_vocab - 1`` to 1.

    Every position from the first ordinary token on is scored (its successor is fixed); the
    prediction at BOS (the random start) is not. With ``seq_len <= d_vocab`` no token repeats in a
    row, so induction cannot help.

    A row is fixed by its start, so only ``d_vocab - 1`` distinct full-length rows exist. ``min_len``
    (the bundled evaluation setting) gives more: each row counts for ``min_len .. seq_len`` tokens
    (BOS included, uniformly drawn), is right-padded with BOS and has an ``attention_mask``; starts
    are a random permutation (cycled when ``n > d_vocab - 1``), so up to ``d_vocab - 1`` rows never
    share a start. ``min_len=None`` (training): every row has ``seq_len`` tokens and no mask.

    >>> counting_batch(2, seq_len=5, d_vocab=10, seed=0).tokens.tolist()
    [[0, 9, 1, 2, 3], [0, 1, 2, 3, 4]]
    >>> short = counting_batch(3, seq_len=5, d_vocab=10, seed=0, min_len=3)
    >>> short.attention_mask.sum(1).tolist(), short.scored.sum(1).tolist()
    ([4, 3, 5], [2, 1, 3])
    """
    _check_sizes(n, seq_len, d_vocab, min_len=3)
    if min_len is not None and not 3 <= min_len <= seq_len:
        raise ValueError(f"min_len must lie in 3..seq_len={seq_len}, got {min_len}")
    generator = torch.Generator().manual_seed(seed)
    n_ordinary = d_vocab - 1
    if min_len is None:
        start = torch.randint(0, n_ordinary, (n, 1), generator=generator)
        lengths = torch.full((n, 1), seq_len)
    else:
        cycles = -(-n // n_ordinary)
        start = torch.cat([torch.randperm(n_ordinary, generator=generator) for _ in range(cycles)])[:n, None]
        lengths = torch.randint(min_len, seq_len + 1, (n, 1), generator=generator)
    body = (start + torch.arange(seq_len - 1).unsqueeze(0)) % n_ordinary + 1
    tokens = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body], dim=1)
    pos = torch.arange(seq_len).unsqueeze(0).expand(n, -1)
    real = pos < lengths
    scored = (pos >= 1) & (pos <= lengths - 2)
    params = dict(seq_len=seq_len, d_vocab=d_vocab, seed=seed)
    if min_len is None:
        return TaskBatch(tokens, scored, "counting", params, {"start": start.squeeze(1) + 1})
    return TaskBatch(tokens.masked_fill(~real, BOS), scored, "counting", {**params, "min_len": min_len},
                     {"start": start.squeeze(1) + 1, "length": lengths.squeeze(1)}, real.long())


def random_batch(n: int, *, seq_len: int = 33, d_vocab: int = 64, seed: int = 0) -> TaskBatch:
    """Control input: BOS, then ``seq_len - 1`` *distinct* random tokens; nothing is scored.

    No token repeats, so there is nothing to copy in context: the natural RESAMPLE reference (the
    corrupted run) for the induction task. Needs ``seq_len <= d_vocab``.

    >>> random_batch(1, seq_len=6, d_vocab=10, seed=0).scored.any().item()
    False
    """
    _check_sizes(n, seq_len, d_vocab, min_len=2)
    if seq_len - 1 > d_vocab - 1:
        raise ValueError(f"seq_len - 1 = {seq_len - 1} distinct tokens need d_vocab >= {seq_len}, got {d_vocab}")
    generator = torch.Generator().manual_seed(seed)
    body = _distinct_tokens(n, seq_len - 1, d_vocab, generator)
    tokens = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body], dim=1)
    return TaskBatch(tokens, torch.zeros_like(tokens, dtype=torch.bool), "random",
                     dict(seq_len=seq_len, d_vocab=d_vocab, seed=seed))

def skip_induction_batch(
    n: int,
    *,
    seq_len: int = 33,
    d_vocab: int = 64,
    seed: int = 0,
    period: Union[int, tuple[int, int]] = (22, 28),
) -> TaskBatch:
    """Skip induction: BOS, a pattern of ``k`` distinct random tokens x1..xk, then x1, x3, x5, … (every other one)
    until the row has ``seq_len`` tokens.

    In the second part the token after x_i is x_{i+2}: it is found at the earlier position whose token *two*
    back is x_i (the layer-0 head attends two back, the layer-1 head matches and copies). Scored: the positions of
    the second part whose next token is in it (the prediction of x1 at the end of the pattern is not).
    ``period`` (k, or a range ``(lo, hi)`` drawn per row): the second part must not run past xk, so
    ``2·(seq_len − 1 − k) − 1 <= k``; the default (22, 28) at 33 tokens leaves 4..10 tokens of second part.
    Deterministic in ``seed``.
    """
    lo, hi = (period, period) if isinstance(period, int) else (int(period[0]), int(period[1]))
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (1 <= lo <= hi <= d_vocab - 1) or 2 * (seq_len - 1 - lo) - 1 > lo or seq_len - 1 - hi < 2:
        raise ValueError(f"period {period!r} does not fit seq_len={seq_len}, d_vocab={d_vocab}: the second part "
                         "(seq_len - 1 - k tokens, every other pattern token) must hold 2 to (k + 1) // 2 tokens")
    generator = torch.Generator().manual_seed(seed)
    periods = torch.randint(lo, hi + 1, (n, 1), generator=generator)
    pattern = _distinct_tokens(n, hi, d_vocab, generator)
    pos = torch.arange(seq_len - 1).unsqueeze(0)  # body positions 0.. (token position - 1)
    index = torch.where(pos < periods, pos, 2 * (pos - periods))
    body = pattern.gather(1, index)
    tokens = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body], dim=1)
    full = torch.arange(seq_len).unsqueeze(0)
    scored = (full >= periods + 1) & (full <= seq_len - 2)
    params = dict(seq_len=seq_len, d_vocab=d_vocab, seed=seed, period=period)
    return TaskBatch(tokens, scored, "skip_induction", params, {"period": periods.squeeze(1)})


TASK_GENERATORS: dict[str, Callable[..., TaskBatch]] = {
    "induction": induction_batch,
    "counting": counting_batch,
    "random": random_batch,
    "skip_induction": skip_induction_batch,
}
"""Task name -> generator ``(n, *, seq_len, d_vocab, seed, ...) -> TaskBatch``."""


def make_task_batch(task: str, n: int, **kwargs: Any) -> TaskBatch:
    """The generator of ``task`` by name (see :data:`TASK_GENERATORS`), called with ``n`` and ``kwargs``.

    >>> make_task_batch("counting", 1, seq_len=4, d_vocab=10, seed=0).tokens.tolist()
    [[0, 9, 1, 2]]
    """
    if task not in TASK_GENERATORS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(TASK_GENERATORS))}")
    return TASK_GENERATORS[task](n, **kwargs)


# ----- tokenizer ----------------------------------------------------------------------------------

def task_tokenizer(d_vocab: int) -> PreTrainedTokenizerFast:
    """A local Hugging Face tokenizer for this token layout: ``"<bos>"`` is 0, ordinary token ``i`` is
    the word ``str(i)``; words are separated by whitespace and BOS is prepended.

    Built in memory (no hub, no files). It lets TransformerLens's string tools work on the bundled
    models — ``to_tokens``, ``to_str_tokens``, ``head_detector.detect_head`` — and reads task text
    files such as ``"5 6 7 8"``. Unknown words map to BOS (``"<bos>"`` doubles as unk/pad/eos).

    >>> tok = task_tokenizer(20)
    >>> tok("5 6 7")["input_ids"], tok.decode([5, 6, 7])
    ([0, 5, 6, 7], '5 6 7')
    """
    from tokenizers import Tokenizer, decoders, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": BOS, **{str(i): i for i in range(1, d_vocab)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<bos>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    # add_bos_token=True and a name_or_path: TransformerLens's set_tokenizer would otherwise try to
    # reload the tokenizer "with BOS" from the hub by name.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<bos>", pad_token="<bos>", unk_token="<bos>",
        name_or_path=f"tl_circuits/task-tokenizer-{d_vocab}", add_bos_token=True, padding_side="right",
    )
