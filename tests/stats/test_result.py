"""InterferenceTestResult: table, plots, save/load; the docstring examples of every statistics module."""

from __future__ import annotations

import dataclasses
import doctest
import json

import pytest
import torch

import tl_circuits
import tl_circuits.stats as S
from tests.saved_results import assert_same_result, write_test_result_pair
from tests.stats.synthetic import first, make_scores, plant, run
from tl_circuits.stats import InterferenceTestResult


def test_result_dataframe_is_tidy_and_matches_fields():
    scores = make_scores(12, seed=19)
    res = run(scores, 6, n_permutations=99, n_bootstrap=100)
    df = res.to_dataframe()
    assert len(df) == 2 * 3 + 2 * 2
    assert not df.duplicated(["block", "layer", "head"]).any()
    for name in ("observed", "p_value", "q_value_bh", "q_value_by", "p_value_maxstat", "p_value_cluster", "ci_low",
                 "ci_high", "effect_size", "z", "null_mean", "null_std", "significant"):
        assert name in df.columns
    row = df[(df["block"] == "K") & (df["layer"] == 1) & (df["head"] == 0)].iloc[0]
    assert row.observed == res.observed["K"][1, 0].item()
    assert row.q_value_bh == res.q_value_bh["K"][1, 0].item()
    assert res.settings["n_permutations"] == 99 and res.settings["alternative"] == "greater"
    assert "InterferenceTestResult" in repr(res) and len(repr(res)) < 400
    no_ci = run(scores, 6, n_permutations=9)
    assert no_ci.ci_low is None and "ci_low" not in no_ci.to_dataframe().columns


def test_plot_masks_the_non_significant_cells():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = first(30, 15)
    scores = plant(make_scores(30, (("Q", 3, 4), ("K", 3, 2)), seed=20), labels, [("Q", 0, 1), ("K", 2, 1)], 4.0)
    res = run(scores, labels, n_permutations=499, correction="maxstat")

    def hatched(fig):
        heatmaps = [ax for ax in fig.axes if ax.get_title() in ("Q", "K")]
        return {ax.get_title(): sum(1 for p in ax.patches if p.get_hatch()) for ax in heatmaps}

    fig = res.plot("observed")
    expected = {b: int((~res.significant[b]).sum()) for b in ("Q", "K")}
    assert hatched(fig) == expected and expected == {"Q": 11, "K": 5}
    plt.close(fig)
    fig = res.plot("effect_size", mask_with="p_value")
    assert hatched(fig) == {b: int((res.p_value[b] > res.alpha).sum()) for b in ("Q", "K")}
    plt.close(fig)
    fig = res.plot("z", mask_with=False)
    assert hatched(fig) == {"Q": 0, "K": 0}
    plt.close(fig)
    with pytest.raises(ValueError, match="field"):
        res.plot("ci_low")          # no intervals were computed
    with pytest.raises(ValueError, match="mask_with"):
        res.plot("observed", mask_with="observed")


def test_save_load_round_trip_keeps_every_field(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = plant(make_scores(14, (("Q", 2, 3), ("K", 2, 1), ("V/odd name", 1, 2)), seed=26), first(14, 7),
                   [("Q", 0, 1)], 4.0)
    scores["K"][2, 5, 1, 0] = float("nan")                      # one missing cell: NaN in every grid
    with pytest.warns(RuntimeWarning, match="1 of 10 cells"):
        res = run(scores, 7, n_permutations=99, n_bootstrap=50, seed=4, correction="maxstat")
    assert torch.isnan(res.p_value["K"][1, 0]) and torch.isnan(res.ci_low["K"][1, 0])
    folder = res.save(tmp_path / "run")
    assert folder == tmp_path / "run" and {p.name for p in folder.iterdir()} == {"result.json",
                                                                                   "tensors.safetensors"}
    back = tl_circuits.load(folder)
    assert type(back) is InterferenceTestResult
    assert_same_result(back, res)
    assert back.settings == res.settings and repr(back) == repr(res)
    assert back.to_dataframe().equals(res.to_dataframe())
    fig = back.plot("z", mask_with="p_value_maxstat")
    assert {ax.get_title() for ax in fig.axes} >= set(res.blocks)
    plt.close(fig)
    # None fields stay None; an empty null distribution stays empty
    bare = dataclasses.replace(run(scores, 7, n_permutations=9, seed=1), permutations=None, null_distribution={})
    assert bare.ci_low is None and bare.ci_high is None
    back = InterferenceTestResult.load(bare.save(tmp_path / "sub" / "bare"))
    assert_same_result(back, bare)
    assert back.ci_low is None and back.permutations is None and back.null_distribution == {}
    plt.close(back.plot("observed"))


def test_old_file_pairs_still_load(tmp_path):
    """The file pair of earlier versions (old grid names p_maxstat/p_cluster, no "screen"), by either file's name."""
    scores = plant(make_scores(14, seed=27), first(14, 7), [("Q", 0, 1)], 4.0)
    res = run(scores, 7, n_permutations=99, n_bootstrap=50, seed=4)
    tensor_path, json_path = write_test_result_pair(res, tmp_path / "old")
    for path in (tmp_path / "old", json_path, tensor_path):
        back = tl_circuits.load(path)
        assert_same_result(back, res, skip=("screen",))
        assert back.screen is False      # not screened (n_permutations_screen is None): what the old file says
    bare = dataclasses.replace(res, ci_low=None, ci_high=None, permutations=None)
    write_test_result_pair(bare, tmp_path / "bare")
    assert_same_result(InterferenceTestResult.load(tmp_path / "bare"), bare, skip=("screen",))


def test_deprecated_field_names_still_read():
    res = run(make_scores(8), 4, n_permutations=9)
    with pytest.warns(DeprecationWarning, match="p_value_maxstat"):
        assert res.p_maxstat is res.p_value_maxstat
    with pytest.warns(DeprecationWarning, match="p_value_cluster"):
        assert res.p_cluster is res.p_value_cluster


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.*does not exist"):
        InterferenceTestResult.load(tmp_path / "nothing")
    res = run(make_scores(8), 4, n_permutations=9)
    tensor_path, json_path = write_test_result_pair(res, tmp_path / "run")
    json_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"run\.json is missing"):
        InterferenceTestResult.load(tmp_path / "run")
    write_test_result_pair(res, tmp_path / "run")
    json_path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a saved InterferenceTestResult"):
        InterferenceTestResult.load(tmp_path / "run")
    folder = run(make_scores(8), 4, n_permutations=9).save(tmp_path / "new")
    with pytest.raises(ValueError, match="holds a saved InterferenceTestResult, not a SweepResult"):
        tl_circuits.SweepResult.load(folder)


def test_docstring_examples_run():
    # every tensor-level statistics module (interference_tests needs a model; it runs under --doctest-modules)
    from tl_circuits.stats import bootstrap, corrections, null, permutation, pvalues, reduction, result, validation

    failures = tried = 0
    for module in (S, validation, reduction, null, permutation, pvalues, corrections, bootstrap, result):
        f, t = doctest.testmod(module, verbose=False)
        failures, tried = failures + f, tried + t
    assert tried > 10 and failures == 0


def test_plot_of_signed_scores_is_diverging_and_says_what_hatching_means():
    """All-negative signed scores get a diverging map centred at 0; the title says hatched = not significant."""
    import matplotlib

    matplotlib.use("Agg")
    from tl_circuits import permutation_test

    gen = torch.Generator().manual_seed(3)
    pooled = -torch.rand(12, 12, 2, 3, generator=gen, dtype=torch.float64) - 1.0  # every score below 0
    res = permutation_test({"O": pooled}, 6, n_permutations=99, n_bootstrap=0, progress=False)
    fig = res.plot()
    assert "hatched = not significant" in fig.texts[0].get_text() or "hatched = not significant" in (
        fig._suptitle.get_text() if fig._suptitle is not None else "")
    image = fig.axes[0].images[0]
    low, high = image.get_clim()
    assert low == -high and image.get_cmap().name == "RdBu_r"
