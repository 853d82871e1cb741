"""BH/BY against statsmodels; max-statistic and cluster-mass corrections against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import tl_circuits.stats as S
from tests.reference import multipletests
from tests.stats.synthetic import first, flat, make_scores, plant, run


@pytest.mark.parametrize("method", ["bh", "by"])
def test_q_values_equal_statsmodels(method):
    scores = plant(make_scores(20, seed=10), first(20, 10), [("Q", 0, 1), ("K", 1, 0)], 0.8)
    res = run(scores, 10, n_permutations=400, seed=2)
    p = flat(res.p_value)
    expected = multipletests(p, method=f"fdr_{method}")[1]
    got = flat(res.q_value_bh if method == "bh" else res.q_value_by)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert len(np.unique(got)) > 1                  # not all equal to the smallest p (the original's bug)
    # direct call, with ties and across blocks of different shapes
    rng = np.random.default_rng(0)
    ps = {"Q": torch.tensor(rng.choice([0.001, 0.01, 0.02, 0.3, 0.9], size=(3, 4))),
          "K": torch.tensor(rng.uniform(size=(3, 2)))}
    np.testing.assert_allclose(flat(S.fdr_correction(ps, method)),
                               multipletests(flat(ps), method=f"fdr_{method}")[1],
                               rtol=1e-12)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_maxstat_follows_the_definition(alternative):
    scores = plant(make_scores(18, seed=12), first(18, 9), [("Q", 1, 2)], 3.0)
    res = run(scores, 9, n_permutations=300, alternative=alternative, seed=4)
    z_null = {b: (res.null_distribution[b] - res.null_mean[b]) / res.null_std[b] for b in scores}
    side = {"greater": lambda z: z, "less": lambda z: -z, "two-sided": torch.abs}[alternative]
    max_null = torch.stack([side(z).reshape(300, -1).amax(1) for z in z_null.values()]).amax(0)
    for block in scores:
        s = side(res.z[block])
        expected = (1 + (max_null[:, None, None] >= s - 1e-9).sum(0).double()) / 301
        expected = torch.maximum(expected.double(), res.p_value[block])
        torch.testing.assert_close(res.p_value_maxstat[block], expected, rtol=1e-12, atol=0)
        assert bool((res.p_value_maxstat[block] >= res.p_value[block]).all())


def test_find_clusters_connectivity():
    z = torch.tensor([[3.0, 0.0, 0.0, 2.5],
                      [0.0, 2.0, 0.0, 2.5],
                      [0.0, 0.0, 0.0, 0.0]])
    labels4, masses4 = S.find_clusters(z, 1.5, connectivity=4)
    labels8, masses8 = S.find_clusters(z, 1.5, connectivity=8)
    assert sorted(masses4.tolist()) == [2.0, 3.0, 5.0]          # (0,0), (1,1) separate; right column joined
    assert sorted(masses8.tolist()) == [5.0, 5.0]               # diagonal (0,0)-(1,1) joins under 8
    assert labels8[0, 0] == labels8[1, 1] != labels8[0, 3]
    # a batch of grids is never linked across the batch
    labels, masses = S.find_clusters(torch.stack([z, z]), 1.5, connectivity=4)
    assert masses.size == 6 and labels[0, 0, 0] != labels[1, 0, 0]
    with pytest.raises(ValueError, match="connectivity"):
        S.find_clusters(z, 1.0, connectivity=6)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_cluster_mass_follows_the_definition(alternative):
    # a planted 2-cell cluster (adjacent heads of one layer) and a planted single cell in another block
    scores = plant(make_scores(24, (("Q", 3, 4), ("K", 3, 2)), seed=13), first(24, 12),
                   [("Q", 1, 1), ("Q", 1, 2), ("K", 0, 1)], 4.0)
    thr = 1.7
    res = run(scores, 12, n_permutations=250, alternative=alternative, seed=8, cluster_threshold=thr)
    z_null = {b: ((res.null_distribution[b] - res.null_mean[b]) / res.null_std[b]).numpy() for b in scores}
    structure = ndimage.generate_binary_structure(2, 1)
    signs = {"greater": (1.0,), "less": (-1.0,), "two-sided": (1.0, -1.0)}[alternative]

    def masses(grid):  # plain loop over ndimage.label, one grid at a time
        out = []
        for sign in signs:
            labels, k = ndimage.label(sign * grid >= thr, structure=structure)
            out += [(sign * grid)[labels == i].sum() for i in range(1, k + 1)]
        return out

    max_null = np.array([max([0.0] + [m for b in scores for m in masses(z_null[b][p])]) for p in range(250)])
    for block in scores:
        z = res.z[block].numpy()
        expected = np.ones_like(z)
        for sign in signs:
            labels, k = ndimage.label(sign * z >= thr, structure=structure)
            for i in range(1, k + 1):
                mass = (sign * z)[labels == i].sum()
                expected[labels == i] = (1 + np.sum(max_null >= mass - 1e-9)) / 251
        np.testing.assert_allclose(res.p_value_cluster[block].numpy(), expected, rtol=1e-12)
    if alternative != "less":
        assert res.p_value_cluster["Q"][1, 1] == res.p_value_cluster["Q"][1, 2] < 0.05   # one cluster, one p, found
        assert res.p_value_cluster["K"][0, 1] < 0.05
