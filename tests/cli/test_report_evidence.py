"""The report's conflict test, cosines, rank stability, drivers and headlines, against direct library calls."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.cli.helpers import grid_from_csv, json_grid
from tl_circuits import InterferenceConfig, conflict_test, fisher_cosines, pooled_pairwise_scores
from tl_circuits.cli.headlines import (
    NEEDED_RELATIVE,
    joint_optimum_sentence,
    shared_table,
)
from tl_circuits.stats.robustness import cell_drivers, rank_stability


def test_conflict_columns_equal_conflict_test_of_the_map(bundled_report):
    out, direct = bundled_report["out"], bundled_report["interference"]
    table = pd.read_csv(out / "interference.csv")
    data = json.loads((out / "report.json").read_text())
    expected = conflict_test(direct)
    for block in "QKVO":
        rows = table[table.block == block]
        shape = direct.mean[block].shape
        for column, field in (("conflict_p", "p_value"), ("conflict_q_bh", "q_value_bh"),
                              ("conflict_ci_low", "ci_low"), ("conflict_ci_high", "ci_high")):
            want = getattr(expected, field)[block].numpy()
            scale = np.nanmax(np.abs(want)) if column.startswith("conflict_ci") else 1.0
            np.testing.assert_allclose(grid_from_csv(rows, column, shape), want, rtol=1e-3, atol=1e-4 * scale)
        np.testing.assert_allclose(grid_from_csv(rows, "conflict_p", shape),
                                   json_grid(data["conflict"]["test"]["p_value"][block]), rtol=1e-12)
        assert (rows.conflict_significant == (rows.conflict_q_bh <= 0.05)).all()
    assert data["conflict"]["test"]["null_hypothesis"].startswith("H0: E[s_ij] >= 0")


def test_cosines_ranking_and_drivers_equal_direct_calls(bundled_report):
    out, model = bundled_report["out"], bundled_report["model"]
    batch_a, batch_b, direct = bundled_report["batch_a"], bundled_report["batch_b"], bundled_report["interference"]
    table = pd.read_csv(out / "interference.csv")
    pooled = pooled_pairwise_scores(model, batch_a.tokens, batch_b.tokens, attention_mask_a=batch_a.attention_mask,
                                    attention_mask_b=batch_b.attention_mask,
                                    config=InterferenceConfig(variant="signed"), progress=False)
    cosines = fisher_cosines(pooled.scores, pooled.n_a)
    ranking = rank_stability(direct.scores, k=10, n_resamples=50, seed=3)     # SMALL: 50 bootstrap resamples
    drivers = cell_drivers(direct.scores, top=3)
    for block in "QKVO":
        rows = table[table.block == block]
        shape = direct.mean[block].shape
        np.testing.assert_allclose(grid_from_csv(rows, "task_mean_cosine", shape),
                                   cosines.task_mean_cosine[block].numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(grid_from_csv(rows, "fraction_negative_pairs", shape),
                                   cosines.fraction_negative[block].numpy(), atol=1e-12)
        np.testing.assert_array_equal(grid_from_csv(rows, "rank", shape), ranking.rank[block].numpy())
        np.testing.assert_allclose(grid_from_csv(rows, "top_k_frequency", shape),
                                   ranking.top_k_frequency[block].numpy())
        for _, row in rows.iterrows():
            top = drivers.top_a[block][int(row.layer), int(row["head"])].tolist()
            assert row.drivers_a == ";".join(direct.ids_a[i] for i in top)


def test_report_has_headlines_and_names_both_nulls(bundled_report):
    out = bundled_report["out"]
    markdown = (out / "report.md").read_text()
    for text in ("## Headlines", "### Where the tasks conflict (conflict test)",
                 "### Where the tasks use a head differently (label-permutation test)",
                 "H0: *the expected A × B signed score is ≥ 0*", "H0: *task labels are exchangeable*",
                 "**Is the sign forced?**"):
        assert text in markdown
    sweep = pd.read_csv(out / "sweep.csv")
    data = json.loads((out / "report.json").read_text())
    relative = sweep.effect / (np.log(data["model"]["d_vocab"]) - sweep.clean_loss)
    needed = pd.DataFrame(data["headlines"]["needed"])
    # needed: a large enough share of the gap to chance, and shown by the paired test
    assert len(needed) == int(((relative >= NEEDED_RELATIVE) & (sweep.significant == 1.0)).sum())
    if len(needed):
        assert (needed.relative_effect >= NEEDED_RELATIVE).all()
        first = needed[needed.task == needed.task.iloc[0]].iloc[0]
        assert f"L{first.layer}H{first['head']} ({first.circuit.upper()} {100 * first.relative_effect:.0f}%" in markdown
        np.testing.assert_allclose(needed.relative_to_clean, needed.effect / needed.clean_loss)


def test_shared_heads_are_the_heads_both_tasks_need():
    needed = pd.DataFrame([dict(task="A", circuit="qk", layer=1, head=2, relative_effect=0.5),
                           dict(task="A", circuit="ov", layer=1, head=2, relative_effect=0.9),
                           dict(task="A", circuit="qk", layer=0, head=0, relative_effect=0.3),
                           dict(task="B", circuit="ov", layer=1, head=2, relative_effect=0.2),
                           dict(task="B", circuit="ov", layer=0, head=3, relative_effect=0.2)])
    shared = shared_table(needed)
    assert shared[["layer", "head"]].values.tolist() == [[1, 2]]
    assert shared.circuits_a[0] == "QK+OV" and shared.relative_effect_a[0] == pytest.approx(0.9)
    assert shared_table(needed[needed.task == "A"]).empty


def test_joint_optimum_sentence_says_when_the_sign_is_forced():
    forced = joint_optimum_sentence(torch.tensor([-0.99, -0.95, -0.97, 0.2, float("nan")]))
    assert forced.startswith("3 of 4 cells") and "forces" in forced
    free = joint_optimum_sentence(torch.tensor([-0.99, 0.1, 0.3, -0.2]))
    assert "not forced" in free
    assert "undefined" in joint_optimum_sentence(torch.tensor([float("nan")]))


def test_unsigned_report_says_the_conflict_test_is_not_run(tmp_path):
    from tests.cli.helpers import SMALL
    from tl_circuits.cli.command import main

    out = tmp_path / "report"
    assert main(["--n-a", "4", "--n-b", "4", "--variant", "unsigned", *SMALL, "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "**Where the tasks conflict:** not tested" in markdown
    table = pd.read_csv(out / "interference.csv")
    assert table.conflict_p.isna().all() and table.task_mean_cosine.isna().all()
    assert table["rank"].notna().all()


def test_mean_replacement_report_compares_qk_ov_and_the_whole_head(tmp_path):
    from tests.cli.helpers import SMALL
    from tl_circuits.cli.command import main

    out = tmp_path / "report"
    assert main(["--n-a", "6", "--n-b", "6", "--replacement", "mean", *SMALL, "--out", str(out)]) == 0
    tests = pd.read_csv(out / "freeze_tests.csv")
    assert set(tests.circuit) == {"qk", "ov", "both", "interaction"}
    # the interaction is BOTH − (QK + OV) of the per-sample effects, so its mean is that of the means
    for task in ("A", "B"):
        part = tests[tests.task == task].set_index(["circuit", "layer", "head"]).mean_effect
        both, qk, ov, inter = (part.xs(c, level="circuit") for c in ("both", "qk", "ov", "interaction"))
        np.testing.assert_allclose(inter, both - qk - ov, rtol=1e-6, atol=1e-9)
    markdown = (out / "report.md").read_text()
    assert "| task | layer | head | Δ QK | Δ OV | Δ BOTH | interaction |" in markdown


def test_duplicate_samples_are_detected_and_reported(checkpoint_inputs, tmp_path):
    from tests.cli.helpers import SMALL, write_ids
    from tl_circuits.cli.command import main

    rows_a = [[1, 2, 3, 4], [5, 6, 7], [1, 2, 3, 4], [8, 9, 10, 11, 12], [13, 14, 15]]
    rows_b = [[20, 21, 22], [5, 6, 7], [23, 24, 25, 26], [27, 28, 29]]
    write_ids(tmp_path / "a.tokens", rows_a)
    write_ids(tmp_path / "b.tokens", rows_b)
    out = tmp_path / "report"
    assert main([str(a) for a in ["--model", checkpoint_inputs["root"] / "model", "--task-a", tmp_path / "a.tokens",
                                  "--task-b", tmp_path / "b.tokens", *SMALL, "--out", out]]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["duplicates"] == {"A": [["A:a:1", "A:a:3"]], "B": [], "A+B": [["A:a:2", "B:b:2"]]}
    markdown = (out / "report.md").read_text()
    assert "2 samples within task A are duplicates" in markdown
    assert "2 samples shared by task A and task B are duplicates" in markdown
