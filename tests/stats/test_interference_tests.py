"""The end-to-end interference permutation test against an independent path (compute_interference)."""

import pytest
import torch

from tests import builders
from tl_circuits import InterferenceConfig, compute_interference
from tl_circuits.stats.interference_tests import interference_permutation_test, pooled_pairwise_scores


@pytest.mark.parametrize("variant", ["unsigned", "signed"])
def test_observed_is_the_pooled_fisher_interference_mean(gqa_model, variant):
    a, b = builders.random_tokens(5, 10, seed=1), builders.random_tokens(4, 10, seed=2)
    config = InterferenceConfig(variant=variant)
    res = interference_permutation_test(gqa_model, a, b, config=config, n_permutations=49, n_bootstrap=30, seed=0,
                                        progress=False)
    direct = compute_interference(gqa_model, a, b, config=InterferenceConfig(variant=variant, fisher_source="pooled"),
                                  progress=False)
    for block in "QKVO":
        torch.testing.assert_close(res.observed[block].float(), direct.mean[block].float(), rtol=1e-4, atol=1e-6)
        assert res.p_value[block].shape == direct.mean[block].shape
        assert ((res.p_value[block] >= 1 / 50) & (res.p_value[block] <= 1)).all()
    assert res.settings["alternative"] == ("less" if variant == "signed" else "greater")
    assert ("conflict" in res.null_hypothesis) == (variant == "signed")


def test_pooled_scores_is_one_result_with_both_tests(gqa_model):
    """pooled_pairwise_scores gives one object: its A x B block is the pooled-Fisher map, and its two test methods
    equal the tests called on its matrices."""
    from tl_circuits import conflict_test, permutation_test

    a, b = builders.random_tokens(4, 10, seed=3), builders.random_tokens(5, 10, seed=4)
    pooled = pooled_pairwise_scores(gqa_model, a, b, progress=False)
    assert pooled.n_a == 4 and pooled.config.fisher_source == "pooled" and pooled.fisher is not None
    direct = compute_interference(gqa_model, a, b, config=InterferenceConfig(fisher_source="pooled"), progress=False)
    cross = pooled.interference(ids_b=list("vwxyz"))
    assert cross.ids_a == [0, 1, 2, 3] and cross.ids_b == list("vwxyz")
    for block in "QKVO":
        torch.testing.assert_close(cross.scores[block], direct.scores[block], rtol=1e-4, atol=1e-6)
    ours = pooled.permutation_test(n_permutations=19, n_bootstrap=0, seed=1)
    theirs = permutation_test(pooled.scores, 4, n_permutations=19, n_bootstrap=0, seed=1, progress=False)
    assert ours.alternative == "less" and ours.loss == pooled.settings["loss"] is not None
    assert ours.settings == {**theirs.settings, "loss": pooled.settings["loss"]}
    mine, reference = pooled.conflict_test(), conflict_test(cross.scores)
    for block in "QKVO":
        torch.testing.assert_close(ours.p_value[block], theirs.p_value[block], rtol=0, atol=0)
        torch.testing.assert_close(mine.p_value[block], reference.p_value[block], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(TypeError, match="not the pooled matrix"):
        conflict_test(pooled)
