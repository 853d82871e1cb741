"""Which heads really interfere: the interference metric and its permutation test, end to end (docs/spec.md §4).

The statistics work on the *pooled* pairwise matrix: A ∪ B is scored once against itself under the
pooled Fisher, and every permutation of the task labels is a reduction of that one matrix.

>>> import torch
>>> from tl_circuits import GradientConfig, InterferenceConfig
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # 2 layers of 4 heads
>>> gen = torch.Generator().manual_seed(0)
>>> a, b = torch.randint(0, 64, (6, 6), generator=gen), torch.randint(0, 64, (6, 6), generator=gen)
>>> quiet = InterferenceConfig(gradients=GradientConfig(progress=False))
>>> res = interference_permutation_test(model, a, b, n_permutations=99, n_bootstrap=50,
...                                     config=quiet, progress=False)
>>> sorted(res.p_value), tuple(res.p_value["K"].shape)
(['K', 'O', 'Q', 'V'], (2, 4))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from jaxtyping import Int
from torch import Tensor

from tl_circuits.interference.config import InterferenceConfig
from tl_circuits.interference.engine import pooled_scores
from tl_circuits.interference.loss_fn import LossFn
from tl_circuits.models.types import Model
from tl_circuits.stats.permutation import InterferenceTestResult, permutation_test


def pooled_pairwise_scores(
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
) -> tuple[dict[str, Tensor], int]:
    """``({block: [N, N, L, H_B]}, n_a)``: A ∪ B scored against itself under the pooled Fisher.

    Streamed through the one engine (:func:`tl_circuits.interference.engine.pooled_scores`): the memory it
    needs is the pooled matrix and one tile of rows, not the gradients. Uses ``config``'s variant, reduction,
    damping, leave-one-out and memory budget; its ``fisher_source`` is ignored (the permutation null needs a
    label-free, pooled normaliser). The tasks' losses (``loss_mask_*``, ``loss_fn_*``) as
    :func:`tl_circuits.compute_interference`.
    """
    scores, _, _ = pooled_scores(model, tokens_a, tokens_b, attention_mask_a=attention_mask_a,
                                 attention_mask_b=attention_mask_b, loss_mask_a=loss_mask_a, loss_mask_b=loss_mask_b,
                                 loss_fn_a=loss_fn_a, loss_fn_b=loss_fn_b, config=config)
    return scores, tokens_a.shape[0]


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
    **test_kwargs: Any,
) -> InterferenceTestResult:
    """Per-sample gradients of A and B, pooled Fisher, the pooled pairwise matrix once, then
    :func:`tl_circuits.stats.permutation.permutation_test` (``test_kwargs``: n_permutations, alpha, correction,
    seed, n_bootstrap, ci_method, ...).

    ``alternative`` defaults to ``"less"`` for the signed variant (negative = conflict) and to
    ``"greater"`` otherwise (more interference than exchangeable task labels predict). The tasks' losses
    (``loss_mask_*``, ``loss_fn_*``) as :func:`tl_circuits.compute_interference`; the result's ``loss`` (and
    ``settings["loss"]``) says what each task scored.
    """
    scores, _, settings = pooled_scores(model, tokens_a, tokens_b, attention_mask_a=attention_mask_a,
                                        attention_mask_b=attention_mask_b, loss_mask_a=loss_mask_a,
                                        loss_mask_b=loss_mask_b, loss_fn_a=loss_fn_a, loss_fn_b=loss_fn_b,
                                        config=config)
    config = config or InterferenceConfig()
    if alternative is None:
        alternative = "less" if config.variant == "signed" else "greater"
    test_kwargs.setdefault("progress", config.progress)
    result = permutation_test(scores, tokens_a.shape[0], alternative=alternative, **test_kwargs)
    return dataclasses.replace(result, loss=settings["loss"])
