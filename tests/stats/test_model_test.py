"""The end-to-end interference permutation test against an independent path (compute_interference)."""

import pytest
import torch

from tests import builders
from tl_circuits import InterferenceConfig, compute_interference
from tl_circuits.stats.model_test import interference_permutation_test



@pytest.mark.parametrize("variant", ["unsigned", "signed"])
def test_observed_is_the_pooled_fisher_interference_mean(gqa_model, variant):
    a, b = builders.random_tokens(5, 10, seed=1), builders.random_tokens(4, 10, seed=2)
    config = InterferenceConfig(variant=variant, progress=False)
    res = interference_permutation_test(gqa_model, a, b, config=config, n_permutations=49, n_bootstrap=30, seed=0)
    direct = compute_interference(gqa_model, a, b, config=InterferenceConfig(variant=variant, fisher_source="pooled",
                                                                              progress=False))
    for block in "QKVO":
        torch.testing.assert_close(res.observed[block].float(), direct.mean[block].float(), rtol=1e-4, atol=1e-6)
        assert res.p_value[block].shape == direct.mean[block].shape
        assert ((res.p_value[block] >= 1 / 50) & (res.p_value[block] <= 1)).all()
    assert res.settings["alternative"] == ("less" if variant == "signed" else "greater")
