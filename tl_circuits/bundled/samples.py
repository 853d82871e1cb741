"""Distinct samples: how many rows a task generator can make, batches without repeated rows, and a
duplicate detector for any task.

A repeated sample counts twice in every statistic (its gradients are identical), so the bundled task makers
(:func:`tl_circuits.bundled.bundled_tasks`) draw with :func:`distinct_batch`: the rows of
``generator(n, seed=seed)``, each repeated row replaced by new rows drawn with derived seeds, until ``n``
distinct rows are found. Asking for more rows than the task's settings can make at all
(:func:`n_distinct_rows`) is a ``ValueError`` naming how many exist.

Rows are compared on their real tokens: two rows are the same sample when their attention masks and their
tokens at real positions are equal (padding is ignored).

>>> import torch
>>> tokens = torch.tensor([[0, 5, 6], [0, 7, 8], [0, 5, 6], [0, 7, 9]])
>>> duplicate_groups(tokens)
[[0, 2]]
>>> mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
>>> duplicate_groups(tokens, mask)                      # rows 1 and 3 differ only in padding
[[0, 2], [1, 3]]
>>> n_distinct_rows("counting", seq_len=33, d_vocab=64)  # a full-length row is fixed by its start
63
>>> batch = distinct_batch("counting", 64, seed=0, seq_len=33, d_vocab=64, min_len=29)
>>> len(batch), duplicate_groups(batch.tokens, batch.attention_mask)
(64, [])
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from tl_circuits.bundled.tasks import TASK_GENERATORS, TaskBatch

__all__ = ["concat_batches", "distinct_batch", "duplicate_groups", "n_distinct_rows"]

MAX_ROUNDS = 1000
"""Draws of :func:`distinct_batch` before it gives up (only reached when nearly every possible row is asked for)."""

ROUND_SEED_STRIDE = 1_000_003
"""Round ``r`` of :func:`distinct_batch` draws with seed ``seed + r * ROUND_SEED_STRIDE`` (round 0: ``seed`` itself,
so a batch with no repeated row is exactly ``generator(n, seed=seed)``)."""


def _row_keys(tokens: Int[Tensor, "n pos"], attention_mask: Optional[Int[Tensor, "n pos"]]) -> list[tuple]:
    """One hashable key per row: its real tokens and where they are."""
    tokens = torch.as_tensor(tokens).cpu()
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_samples, pos], got shape {tuple(tokens.shape)}")
    if attention_mask is None:
        return [tuple(row) for row in tokens.tolist()]
    mask = torch.as_tensor(attention_mask).cpu()
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} and tokens {tuple(tokens.shape)} differ in shape")
    real = mask > 0
    return [(tuple(row[m].tolist()), tuple(m.nonzero().flatten().tolist())) for row, m in zip(tokens, real)]


def duplicate_groups(tokens: Int[Tensor, "n pos"],
                     attention_mask: Optional[Int[Tensor, "n pos"]] = None) -> list[list[int]]:
    """Groups (size ≥ 2) of row indices whose samples are identical, each group ascending, groups ordered by
    their first row; ``[]`` when every row is distinct. ``attention_mask`` (1 on real tokens): padding ignored."""
    groups: dict[tuple, list[int]] = {}
    for index, key in enumerate(_row_keys(tokens, attention_mask)):
        groups.setdefault(key, []).append(index)
    return [rows for rows in groups.values() if len(rows) > 1]


def n_distinct_rows(task: str, *, seq_len: int = 33, d_vocab: int = 64,
                    period: Union[None, int, tuple[int, int], list[int]] = None,
                    min_len: Optional[int] = None) -> int:
    """How many distinct rows ``task``'s generator (:data:`tl_circuits.bundled.tasks.TASK_GENERATORS`) can make
    with these settings (counted exactly, as a Python int).

    - induction: a row is fixed by its pattern of ``p`` distinct tokens (and rows of different periods differ),
      so Σ over periods p of (V−1)!/(V−1−p)!, with V = ``d_vocab``;
    - counting: a row is fixed by its start (V − 1) and, with ``min_len``, its length (``seq_len − min_len + 1``);
    - random: (V−1)!/(V−seq_len)! ordered choices of ``seq_len − 1`` distinct tokens;
    - skip_induction: as induction, over its periods (``period`` must be given).

    >>> n_distinct_rows("counting", seq_len=33, d_vocab=64, min_len=29)
    315
    >>> n_distinct_rows("induction", seq_len=9, d_vocab=5, period=(2, 3))   # 4·3 + 4·3·2
    36
    """
    n_ordinary = d_vocab - 1
    if task == "induction":
        if period is None:
            lo = hi = (seq_len - 1) // 2
        elif isinstance(period, int):
            lo = hi = period
        else:
            lo, hi = (int(x) for x in period)
        return sum(math.perm(n_ordinary, p) for p in range(lo, hi + 1))
    if task == "counting":
        return n_ordinary * (1 if min_len is None else seq_len - min_len + 1)
    if task == "random":
        return math.perm(n_ordinary, seq_len - 1)
    if task == "skip_induction":  # a row is fixed by its pattern; rows of different k differ (x1 follows xk)
        lo, hi = (period, period) if isinstance(period, int) else (int(period[0]), int(period[1]))  # type: ignore
        return sum(math.perm(n_ordinary, k) for k in range(lo, hi + 1))
    raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(TASK_GENERATORS))}")


def concat_batches(batches: list[TaskBatch]) -> TaskBatch:
    """The rows of ``batches`` (same task and settings) as one batch; per-row ``info`` tensors concatenated."""
    first = batches[0]
    masks = [b.attention_mask for b in batches]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise ValueError("cannot concatenate batches with and without an attention mask")
    mask = None if masks[0] is None else torch.cat([m for m in masks if m is not None])
    info = {k: torch.cat([b.info[k] for b in batches]) if isinstance(v, Tensor) else v for k, v in first.info.items()}
    return TaskBatch(torch.cat([b.tokens for b in batches]), torch.cat([b.scored for b in batches]), first.name,
                     dict(first.params), info, mask)


def distinct_batch(task: str, n: int, *, seed: int = 0, **settings: Any) -> TaskBatch:
    """``n`` distinct rows of ``task`` with generator ``settings``, deterministic in ``seed`` (module docstring).

    Raises:
        ValueError: ``n`` is more than :func:`n_distinct_rows` (the message says how many exist).

    >>> distinct_batch("counting", 64, seq_len=33, d_vocab=64)
    Traceback (most recent call last):
    ...
    ValueError: 64 distinct 'counting' samples asked for, but only 63 exist with seq_len=33, d_vocab=64
    """
    available = n_distinct_rows(task, **settings)
    if n > available:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        raise ValueError(f"{n} distinct {task!r} samples asked for, but only {available} exist with {shown}")
    generator = TASK_GENERATORS[task]
    parts: list[TaskBatch] = []
    seen: set[tuple] = set()
    for round_index in range(MAX_ROUNDS):
        batch = generator(n, seed=seed + round_index * ROUND_SEED_STRIDE, **settings)
        fresh = []
        for index, key in enumerate(_row_keys(batch.tokens, batch.attention_mask)):
            if key not in seen and len(seen) < n:
                seen.add(key)
                fresh.append(index)
        parts.append(batch[torch.tensor(fresh, dtype=torch.long)])
        if len(seen) == n:
            out = concat_batches(parts)
            return TaskBatch(out.tokens, out.scored, out.name, {**out.params, "seed": seed}, out.info,
                             out.attention_mask)
    raise RuntimeError(f"found only {len(seen)} distinct {task!r} samples of {n} in {MAX_ROUNDS} draws")
