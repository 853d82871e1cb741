"""Bootstrap intervals against scipy.stats.bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

import tl_circuits.stats as S
from tests.reference import cell_stat
from tests.stats.synthetic import first, make_scores, plant, run


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_bootstrap_intervals_equal_scipy(method):
    n = 26
    labels = torch.zeros(n, dtype=torch.bool)
    labels[::3] = True                                        # 9 in A, 17 in B, interleaved
    scores = plant(make_scores(n, seed=14), labels, [("K", 0, 0)], 0.5)
    ci = S.bootstrap_ci(scores, labels, n_resamples=999, method=method, seed=21, confidence_level=0.9)
    ia, ib = np.flatnonzero(labels.numpy()), np.flatnonzero(~labels.numpy())
    for block, m in scores.items():
        for layer, head in [(0, 0), (1, 1)]:
            ref = st.bootstrap((ia, ib), cell_stat(m[:, :, layer, head].numpy()), n_resamples=999,
                               method=method, confidence_level=0.9, vectorized=True,
                               rng=np.random.default_rng(21))
            assert ci.low[block][layer, head].item() == pytest.approx(ref.confidence_interval.low, rel=1e-10)
            assert ci.high[block][layer, head].item() == pytest.approx(ref.confidence_interval.high, rel=1e-10)
            assert ci.standard_error[block][layer, head].item() == pytest.approx(ref.standard_error, rel=1e-10)
    # permutation_test's intervals are bootstrap_ci's with the same seed
    res = run(scores, labels, n_permutations=10, n_bootstrap=999, ci_method=method, seed=21,
              confidence_level=0.9)
    for block in scores:
        torch.testing.assert_close(res.ci_low[block], ci.low[block], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(res.ci_high[block], ci.high[block], rtol=1e-12, atol=1e-14)


def test_bootstrap_interval_covers_planted_effect_and_excludes_null():
    labels = first(40, 20)
    scores = plant(make_scores(40, seed=15), labels, [("Q", 0, 0)], 3.0)
    res = run(scores, labels, n_permutations=200, n_bootstrap=1000)
    assert res.ci_low["Q"][0, 0] > res.null_mean["Q"][0, 0]
    for block in scores:
        assert bool((res.ci_low[block] <= res.observed[block]).all())
        assert bool((res.observed[block] <= res.ci_high[block]).all())
