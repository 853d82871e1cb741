"""Which heads really interfere: the interference metric and its permutation test, end to end (SPEC §4).

The statistics work on the *pooled* pairwise matrix: A ∪ B is scored once against itself under the
pooled Fisher, and every permutation of the task labels is a reduction of that one matrix.

>>> import torch
>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4,
...                                                  n_ctx=6, d_vocab=10, act_fn="gelu"))
>>> gen = torch.Generator().manual_seed(0)
>>> a, b = torch.randint(0, 10, (6, 6), generator=gen), torch.randint(0, 10, (6, 6), generator=gen)
>>> res = interference_permutation_test(model, a, b, n_permutations=99, n_bootstrap=50,
...                                     config=InterferenceConfig(progress=False), progress=False)
>>> sorted(res.p_value), tuple(res.p_value["K"].shape)
(['K', 'O', 'Q', 'V'], (1, 2))
"""

from __future__ import annotations

from typing import Optional

from jaxtyping import Int
from torch import Tensor

from tl_circuits.interference.fisher import fisher_from_gradients
from tl_circuits.interference.gradients import GradientConfig, PerSampleGradients, per_sample_gradients
from tl_circuits.interference.engine import InterferenceConfig, pairwise_scores
from tl_circuits.stats.permutation import InterferenceTestResult, permutation_test


def pooled_pairwise_scores(
    model,
    tokens_a: Int[Tensor, "n_a pos_a"],
    tokens_b: Int[Tensor, "n_b pos_b"],
    *,
    attention_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    attention_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    config: InterferenceConfig = InterferenceConfig(),
) -> tuple[dict[str, Tensor], int]:
    """``({block: [N, N, L, H_B]}, n_a)``: A ∪ B scored against itself under the pooled Fisher.

    Uses ``config``'s variant, reduction, damping, leave-one-out and memory budget; its
    ``fisher_source`` is ignored (the permutation null needs a label-free, pooled normaliser).
    """
    grad_config = GradientConfig(include_biases=config.include_biases, memory_budget_gb=config.memory_budget_gb,
                                 chunk_size=config.chunk_size, progress=config.progress)
    grads_a = per_sample_gradients(model, tokens_a, attention_mask_a, grad_config)
    grads_b = per_sample_gradients(model, tokens_b, attention_mask_b, grad_config)
    pooled = PerSampleGradients.cat([grads_a, grads_b])
    scores = pairwise_scores(
        pooled, pooled, fisher_from_gradients(pooled, source="pooled"), config.variant, config.reduction,
        leave_one_out=config.leave_one_out, damping_abs=config.damping_abs, damping_rel=config.damping_rel,
        memory_budget_gb=config.memory_budget_gb, progress=config.progress,
    )
    return scores, grads_a.n_samples


def interference_permutation_test(
    model,
    tokens_a: Int[Tensor, "n_a pos_a"],
    tokens_b: Int[Tensor, "n_b pos_b"],
    *,
    attention_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    attention_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    config: InterferenceConfig = InterferenceConfig(),
    alternative: Optional[str] = None,
    **test_kwargs,
) -> InterferenceTestResult:
    """Per-sample gradients of A and B, pooled Fisher, the pooled pairwise matrix once, then
    :func:`tl_circuits.stats.permutation.permutation_test` (``test_kwargs``: n_permutations, alpha, correction,
    seed, n_bootstrap, ci_method, ...).

    ``alternative`` defaults to ``"less"`` for the signed variant (negative = conflict) and to
    ``"greater"`` otherwise (more interference than exchangeable task labels predict).
    """
    scores, n_a = pooled_pairwise_scores(model, tokens_a, tokens_b, attention_mask_a=attention_mask_a,
                                         attention_mask_b=attention_mask_b, config=config)
    if alternative is None:
        alternative = "less" if config.variant == "signed" else "greater"
    test_kwargs.setdefault("progress", config.progress)
    return permutation_test(scores, n_a, alternative=alternative, **test_kwargs)
