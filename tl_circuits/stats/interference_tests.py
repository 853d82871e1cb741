"""Which heads really interfere: the label-permutation test from a model, end to end (docs/spec.md §4).

The statistics work on the *pooled* pairwise matrix: A ∪ B is scored once against itself under the
pooled Fisher (:func:`pooled_pairwise_scores`, a :class:`~tl_circuits.interference.result.PooledScores`), and
every permutation of the task labels is a reduction of that one matrix. (The conflict test from a model is
:func:`tl_circuits.stats.conflict.interference_conflict_test`.)

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # 2 layers of 4 heads
>>> gen = torch.Generator().manual_seed(0)
>>> a, b = torch.randint(0, 64, (6, 6), generator=gen), torch.randint(0, 64, (6, 6), generator=gen)
>>> res = interference_permutation_test(model, a, b, n_permutations=99, n_bootstrap=50, progress=False)
>>> sorted(res.p_value), tuple(res.p_value["K"].shape), res.alternative
(['K', 'O', 'Q', 'V'], (2, 4), 'less')
"""

from __future__ import annotations

from typing import Any, Optional

from jaxtyping import Int
from torch import Tensor

from tl_circuits.interference.config import InterferenceConfig
from tl_circuits.interference.engine import pooled_scores
from tl_circuits.interference.loss_fn import LossFn
from tl_circuits.interference.result import PooledScores
from tl_circuits.models.types import Model
from tl_circuits.stats.result import InterferenceTestResult

pooled_pairwise_scores = pooled_scores
"""A ∪ B scored against itself under the pooled Fisher, as a :class:`PooledScores` (``scores``, ``n_a``,
``config``, ``fisher``, ``settings``): :func:`tl_circuits.interference.engine.pooled_scores`, the one engine
(streamed: the memory it needs is the pooled matrix and one tile of rows, not the gradients)."""


def interference_permutation_test(
    model: Model,
    tokens_a: Int[Tensor, "n_a pos_a"],
    tokens_b: Int[Tensor, "n_b pos_b"],
    *,
    attention_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    attention_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    loss_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_fn_a: Optional[LossFn] = None,
    loss_fn_b: Optional[LossFn] = None,
    config: Optional[InterferenceConfig] = None,
    alternative: Optional[str] = None,
    progress: Optional[bool] = None,
    **test_kwargs: Any,
) -> InterferenceTestResult:
    """Per-sample gradients of A and B, pooled Fisher, the pooled pairwise matrix once, then
    :meth:`PooledScores.permutation_test` (:func:`tl_circuits.stats.permutation.permutation_test`; ``test_kwargs``:
    n_permutations, screen, alpha, correction, seed, n_bootstrap, ci_method, ...).

    ``alternative`` defaults to the direction of conflict of ``config``'s variant
    (:func:`tl_circuits.defaults.conflict_alternative`): ``"less"`` for signed scores (negative = conflict),
    ``"greater"`` otherwise (more interference than exchangeable task labels predict). ``progress`` (``None``:
    ``config.progress``) and ``config.memory_budget_gb`` hold for the whole call, the test included. The tasks'
    losses (``loss_mask_*``, ``loss_fn_*``) as :func:`tl_circuits.compute_interference`; the result's ``loss``
    (and the pooled matrix's ``settings["loss"]``) says what each task scored.
    """
    pooled: PooledScores = pooled_scores(model, tokens_a, tokens_b, attention_mask_a=attention_mask_a,
                                         attention_mask_b=attention_mask_b, loss_mask_a=loss_mask_a,
                                         loss_mask_b=loss_mask_b, loss_fn_a=loss_fn_a, loss_fn_b=loss_fn_b,
                                         config=config, progress=progress)
    return pooled.permutation_test(alternative=alternative, **test_kwargs)


__all__ = ["interference_permutation_test", "pooled_pairwise_scores"]
