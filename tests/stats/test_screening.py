"""The default permutation test is screened (docs/spec.md §4.3): every cell on 1000 relabelings, the cells with
screen p <= 2·alpha on all of them. Checked against the unscreened test on the same relabelings, and by simulation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats as st
import torch

import tl_circuits.stats as S
from tests.stats.synthetic import first, make_scores, plant
from tl_circuits import defaults
from tl_circuits.stats.result import InterferenceTestResult

GRID = tuple((b, 6, 8) for b in "QKVO")          # 192 cells: the default is max(1000, 2·192/0.05) = 7680


def _both(scores, n_a, **kwargs):
    """(screened default, unscreened test on the same relabelings: the explicit default number)."""
    m = sum(s.shape[2] * s.shape[3] for s in scores.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        screened = S.permutation_test(scores, n_a, n_bootstrap=0, progress=False, **kwargs)
        full = S.permutation_test(scores, n_a, n_bootstrap=0, progress=False, screen=False,
                                  n_permutations=defaults.default_n_permutations(m, kwargs.get("alpha", 0.05)),
                                  **kwargs)
    return screened, full


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_screened_default_flags_exactly_the_cells_of_the_full_test(alternative):
    n = 40
    labels = first(n, 20)
    cells = [("Q", 0, 0, 3.0), ("K", 2, 5, 1.2), ("V", 5, 7, 0.8), ("O", 1, 1, 0.5), ("O", 3, 3, 0.35)]
    scores = make_scores(n, GRID, seed=4, d=2)
    for block, layer, head, delta in cells:
        sign = -1.0 if alternative == "less" else 1.0
        scores = plant(scores, labels, [(block, layer, head)], sign * delta)
    screened, full = _both(scores, 20, alternative=alternative)
    assert screened.n_permutations == full.n_permutations == 7680 and screened.n_permutations_screen == 1000
    for block in screened.blocks:
        continued = screened.permutations_used[block] == 7680
        # continued cells carry the full test's p exactly; the others their screen p, which is above alpha
        torch.testing.assert_close(screened.p_value[block][continued], full.p_value[block][continued],
                                   rtol=0, atol=0)
        assert (screened.p_value[block][~continued] > 2 * 0.05).all()
        assert ((screened.permutations_used[block] == 1000) | continued).all()
    for correction in ("bh", "by", "none"):
        adjusted = {"bh": "q_value_bh", "by": "q_value_by", "none": "p_value"}[correction]
        for block in screened.blocks:
            ours = getattr(screened, adjusted)[block] <= 0.05
            theirs = getattr(full, adjusted)[block] <= 0.05
            assert torch.equal(ours, theirs), (correction, block)
    n_flagged = sum(int(s.sum()) for s in screened.significant.values())
    assert n_flagged >= 2                                 # planted cells are found: the check is not vacuous
    # the screen is the first 1000 of the full test's relabelings
    assert torch.equal(screened.permutations, full.permutations[:1000])


def test_screening_is_an_explicit_argument_recorded_in_the_result():
    """screen=True (the default) screens random relabelings however their number was given; screen=False and given
    relabelings (their order need not be random) are never screened; the result says what was asked and done."""
    scores = plant(make_scores(12, GRID[:1], seed=1), first(12, 6), [("Q", 0, 0)], 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        common = dict(variant="unsigned", n_bootstrap=0, progress=False)     # unsigned scores, planted above
        explicit = S.permutation_test(scores, 6, n_permutations=3000, **common)
        full = S.permutation_test(scores, 6, n_permutations=3000, screen=False, **common)
        given = S.permutation_test(scores, 6, permutations=full.permutations, **common)
    assert explicit.n_permutations_screen == 1000 and explicit.settings["screen"] is True
    assert full.n_permutations_screen is None and full.permutations_used is None and full.settings["screen"] is False
    assert full.permutations.shape[0] == 3000 and torch.equal(explicit.permutations, full.permutations[:1000])
    continued = explicit.permutations_used["Q"] == 3000
    assert bool(continued.any())
    assert torch.equal(explicit.p_value["Q"][continued], full.p_value["Q"][continued])
    assert given.n_permutations_screen is None and torch.equal(given.p_value["Q"], full.p_value["Q"])
    small = S.permutation_test(make_scores(12, (("Q", 1, 2),), seed=1), 6, n_bootstrap=0, progress=False)
    assert small.n_permutations == 1000 and small.n_permutations_screen is None   # nothing to screen


def test_screened_p_values_are_calibrated_under_the_null():
    # exchangeable scores: P(p <= u) <= u for every u, and close to u at the levels that matter
    p_values = []
    for seed in range(6):
        scores = make_scores(24, GRID, seed=100 + seed, d=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = S.permutation_test(scores, 12, n_bootstrap=0, progress=False, seed=seed)
        p_values.append(torch.cat([p.flatten() for p in res.p_value.values()]).numpy())
    p = np.concatenate(p_values)                                         # 6 x 192 null cells
    for u in (0.01, 0.05, 0.2, 0.5):
        rate = float((p <= u).mean())
        assert rate <= u + 3 * np.sqrt(u * (1 - u) / p.size), (u, rate)
    assert st.kstest(p, "uniform").pvalue > 1e-3


def test_permutations_used_round_trips_and_old_files_still_load(tmp_path):
    scores = plant(make_scores(30, GRID[:2], seed=2, d=2), first(30, 15), [("Q", 0, 0)], 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = S.permutation_test(scores, 15, variant="unsigned", n_bootstrap=0, progress=False)
    assert res.n_permutations_screen == 1000
    back = InterferenceTestResult.load(res.save(tmp_path / "run"))
    assert back.settings == res.settings
    for block in res.blocks:
        torch.testing.assert_close(back.permutations_used[block], res.permutations_used[block], equal_nan=True)
    assert "permutations_used" in res.to_dataframe().columns
