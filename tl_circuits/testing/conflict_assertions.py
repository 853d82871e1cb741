"""``assert_conflict`` / ``assert_no_conflict``: claims that two tasks do, or do not, conflict in chosen heads,
judged by the conflict test (:func:`tl_circuits.conflict_test`, docs/spec.md §4.1) over those heads only.

Compute the scores once (:func:`conflict_scores`: signed A × B interference under the pooled Fisher) and make
any number of claims about them:

>>> import tl_circuits as tlc
>>> model = tlc.load_bundled_model("induction-counting-2l")
>>> make_a, make_b = tlc.bundled_tasks("induction-counting-2l").values()
>>> a, b = make_a(16, seed=0), make_b(16, seed=0)
>>> scores = conflict_scores(model, a, b, config=tlc.InterferenceConfig(tlc.GradientConfig(progress=False)))
>>> _ = assert_conflict(scores, [(0, 0)], blocks="QK")
>>> _ = assert_no_conflict(scores, [(0, 1)])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.bundled.tasks import TaskBatch
from tl_circuits.freezing.options import normalize_heads
from tl_circuits.interference.engine import compute_interference
from tl_circuits.interference.result import InterferenceResult
from tl_circuits.models.layout import BLOCKS
from tl_circuits.models.spec import ModelSpec, model_spec
from tl_circuits.stats.conflict import ConflictTestResult, conflict_config, conflict_test

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.freezing.options import HeadsLike
    from tl_circuits.interference.config import InterferenceConfig
    from tl_circuits.models.types import Model

__all__ = ["ConflictScores", "assert_conflict", "assert_no_conflict", "conflict_scores"]

Batch = Union[Tensor, TaskBatch]
_MAX_LINES = 24  # cells listed in a failure message


def _p_values(test: ConflictTestResult) -> dict[str, Tensor]:
    """The one place that names the result's p-value field (a rename to ``p_value`` is a one-line change here)."""
    return test.p_value


@dataclass(frozen=True)
class ConflictScores:
    """Signed A × B interference scores under the pooled Fisher (``result``) and the layout of the model they
    came from (``spec``: which KV head a query head reads under GQA). Made by :func:`conflict_scores`."""

    result: InterferenceResult
    spec: ModelSpec


def _tokens_and_mask(batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, TaskBatch):
        return batch.tokens, batch.attention_mask
    if isinstance(batch, Tensor):
        return batch, None
    raise TypeError(f"a task batch must be a TaskBatch or tokens [batch, pos], got {type(batch).__name__}")


def conflict_scores(model: Model, batch_a: Batch, batch_b: Batch, *,
                    config: Optional[InterferenceConfig] = None) -> ConflictScores:
    """The scores the conflict test reads: :func:`tl_circuits.compute_interference` of ``batch_a`` × ``batch_b``
    with :func:`tl_circuits.stats.conflict.conflict_config` (signed, pooled Fisher; ``config`` for the rest).
    A :class:`~tl_circuits.TaskBatch` passes its ``attention_mask`` on."""
    tokens_a, mask_a = _tokens_and_mask(batch_a)
    tokens_b, mask_b = _tokens_and_mask(batch_b)
    result = compute_interference(model, tokens_a, tokens_b, attention_mask_a=mask_a, attention_mask_b=mask_b,
                                  config=conflict_config(config))
    return ConflictScores(result, model_spec(model))


def _chosen_cells(scores: ConflictScores, heads: Optional[HeadsLike],
                  blocks: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """``{block: [N_A, N_B, 1, K]}``: the scores of the chosen heads' cells (a query head's KV head for K/V,
    once per KV head), and their labels."""
    if not isinstance(scores, ConflictScores):
        raise TypeError(f"pass the scores of conflict_scores(model, batch_a, batch_b), got {type(scores).__name__}")
    spec = scores.spec
    pairs = (normalize_heads(spec, heads) if heads is not None
             else tuple((layer, head) for layer in range(spec.n_layers) for head in range(spec.n_heads)))
    if not pairs:
        raise ValueError("no heads chosen")
    chosen, labels = {}, {}
    for block in blocks:
        if block not in scores.result.scores:
            raise ValueError(f"no scores for block {block!r}; the scores have blocks {scores.result.blocks}")
        kv = spec.head_kind(block) == "kv" and spec.n_kv_heads < spec.n_heads  # type: ignore[arg-type]
        cells = sorted({(layer, spec.kv_head(head) if kv else head) for layer, head in pairs})
        layers, columns = torch.tensor([c[0] for c in cells]), torch.tensor([c[1] for c in cells])
        chosen[block] = scores.result.scores[block][:, :, layers, columns][:, :, None, :]
        labels[block] = [f"{block} L{layer}{'KV' if kv else 'H'}{column}" for layer, column in cells]
    return chosen, labels


def _cell_lines(test: ConflictTestResult, labels: dict[str, list[str]], only: Optional[bool]) -> list[str]:
    """One line per cell (flagged ones when ``only`` is True, unflagged when False, all when None), most
    significant first."""
    p_values = _p_values(test)
    rows = []
    for block, names in labels.items():
        for k, name in enumerate(names):
            flagged = bool(test.significant[block][0, k])
            if only is not None and flagged != only:
                continue
            p = float(p_values[block][0, k])
            rows.append((p if p == p else 2.0, f"  {name}: estimate {float(test.estimate[block][0, k]):+.4g}, "
                         f"{test.confidence_level:.0%} interval [{float(test.ci_low[block][0, k]):+.4g}, "
                         f"{float(test.ci_high[block][0, k]):+.4g}], p = {p:.3g}, "
                         f"q_bh = {float(test.q_value_bh[block][0, k]):.3g}"))
    rows.sort(key=lambda row: row[0])
    lines = [line for _, line in rows[:_MAX_LINES]]
    if len(rows) > _MAX_LINES:
        lines.append(f"  ... and {len(rows) - _MAX_LINES} more")
    return lines


def _run(scores: ConflictScores, heads: Optional[HeadsLike], blocks: Sequence[str], alpha: float, correction: str,
         confidence_level: float) -> tuple[ConflictTestResult, dict[str, list[str]], int, int]:
    chosen, labels = _chosen_cells(scores, heads, list(blocks))
    test = conflict_test(chosen, alpha=alpha, correction=correction, confidence_level=confidence_level)
    n_cells = sum(len(names) for names in labels.values())
    n_flagged = sum(int(flags.sum()) for flags in test.significant.values())
    return test, labels, n_cells, n_flagged


def _header(test: ConflictTestResult, n_cells: int) -> str:
    decided = {"bh": "BH q", "by": "BY q", "none": "p"}[test.correction]
    return (f"per cell, {test.null_hypothesis}; flagged: {decided} <= {test.alpha:g} over the {n_cells} chosen "
            f"cells; {test.n_a} task-A x {test.n_b} task-B samples")


def assert_no_conflict(scores: ConflictScores, heads: Optional[HeadsLike] = None, *, blocks: Sequence[str] = BLOCKS,
                       alpha: float = defaults.ALPHA, correction: str = "bh",
                       confidence_level: float = defaults.CONFIDENCE_LEVEL) -> ConflictTestResult:
    """Assert that the conflict test flags none of the chosen cells: ``blocks`` (default Q, K, V, O) of ``heads``
    (default every head; under GQA a query head's K/V cell is its KV head's). Returns the test of those cells;
    raises ``AssertionError`` listing the flagged ones (estimate, interval, p, q) otherwise.

    **What is tested**: per cell, H0 "E[s_ij] ≥ 0" (the tasks' Fisher-normalised mean gradients are not opposed)
    against conflict, by :func:`tl_circuits.conflict_test` on the chosen cells only, with ``correction`` (BH by
    default) over them. **False-failure rate**: when no chosen cell conflicts, the assertion fails with probability
    at most ``alpha`` (BH controls the family-wise rate when every null is true). Passing is not proof that there
    is no conflict: a small sample has little power; read the intervals. Cells whose scores are non-finite or
    constant (e.g. a head no gradient reaches) cannot be tested: they are NaN and never flagged (with a warning),
    and an assertion with no testable cell is a ``ValueError``.
    """
    test, labels, n_cells, n_flagged = _run(scores, heads, blocks, alpha, correction, confidence_level)
    _check_testable(test)
    if n_flagged:
        raise AssertionError("\n".join([f"no-conflict claim failed: the conflict test flags {n_flagged} of {n_cells} "
                                        "chosen cells", f"  ({_header(test, n_cells)})"]
                                       + _cell_lines(test, labels, only=True)))
    return test


def assert_conflict(scores: ConflictScores, heads: HeadsLike, *, blocks: Sequence[str] = BLOCKS,
                    require: str = "any", alpha: float = defaults.ALPHA, correction: str = "bh",
                    confidence_level: float = defaults.CONFIDENCE_LEVEL) -> ConflictTestResult:
    """Assert that the conflict test flags the chosen cells (``blocks`` of ``heads``, as :func:`assert_no_conflict`):
    at least one (``require="any"``, default) or every one (``"all"``). Returns the test of those cells; raises
    ``AssertionError`` listing the cells not flagged otherwise.

    **What is tested**: as :func:`assert_no_conflict`; the claim is the alternative (E[s_ij] < 0). **Error rates**:
    when no chosen cell conflicts the assertion passes with probability at most ``alpha`` (``"any"``: BH over the
    chosen cells controls the family-wise rate under that null; ``"all"``: also when only some cells do not
    conflict, since each must be flagged). When the claim is true it fails with probability 1 − power, which is not
    bounded: it grows as the conflict shrinks relative to its spread; use enough samples.
    """
    if require not in ("any", "all"):
        raise ValueError(f"require must be 'any' or 'all', got {require!r}")
    test, labels, n_cells, n_flagged = _run(scores, heads, blocks, alpha, correction, confidence_level)
    _check_testable(test)
    if n_flagged == 0 or (require == "all" and n_flagged < n_cells):
        raise AssertionError("\n".join([f"conflict claim failed ({require} of the chosen cells): the conflict test "
                                        f"flags {n_flagged} of {n_cells} chosen cells",
                                        f"  ({_header(test, n_cells)})", "  not flagged:"]
                                       + _cell_lines(test, labels, only=False)))
    return test


def _check_testable(test: ConflictTestResult) -> None:
    if all(bool(torch.isnan(p).all()) for p in _p_values(test).values()):
        raise ValueError("no chosen cell can be tested: every one has non-finite or constant scores")
