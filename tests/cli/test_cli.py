"""The ``tl-circuits`` command's main job on the bundled default model: the report, its numbers against direct
library calls, and the entry points."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from tests.cli.helpers import REPO, assert_complete_report, grid_from_csv, json_grid, run_main
from tl_circuits import freeze_sweep
from tl_circuits.bundled import tasks
from tl_circuits.cli.command import main
from tl_circuits.stats.corrections import fdr_correction


# ----- the main job on the bundled default model -------------------------------------------------------

def test_main_job_writes_every_promised_file(bundled_report):
    out = bundled_report["out"]
    assert_complete_report(out)
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["source"] == "bundled" and data["tasks"]["A"]["n_samples"] == 6
    assert data["tasks"]["B"]["n_samples"] == 5 and data["statistics"]["settings"]["n_permutations"] == 99
    markdown = (out / "report.md").read_text()
    for heading in ("## Freeze sweep", "## Interference between task A and task B", "## Top conflicting sample pairs"):
        assert heading in markdown


def test_sweep_numbers_equal_freeze_sweep_called_directly(bundled_report):
    out, model = bundled_report["out"], bundled_report["model"]
    sweep_csv = pd.read_csv(out / "sweep.csv")
    data = json.loads((out / "report.json").read_text())
    for task, batch in (("A", bundled_report["batch_a"]), ("B", bundled_report["batch_b"])):
        # the report's metric: each sample's loss on its scored positions, averaged over samples
        metric = lambda logits, b=batch: tasks.scored_loss(logits, b, per_sample=True)  # noqa: E731
        direct = freeze_sweep(model, batch.tokens, metric, circuits=("qk", "ov"), per_sample=True,
                              progress=False)                         # ZERO: BOTH = OV, not swept
        assert data["sweep"][task]["clean"] == pytest.approx(direct.clean, rel=1e-6)
        tested = direct.test(n_bootstrap=50, seed=3)                       # SMALL's bootstrap, the run's seed
        for circuit in ("qk", "ov"):
            rows = sweep_csv[(sweep_csv.task == task) & (sweep_csv.circuit == circuit)]
            shape = direct.effect[circuit].shape
            for column in ("p_value", "q_value_bh", "ci_low", "ci_high"):
                np.testing.assert_allclose(grid_from_csv(rows, column, shape),
                                           getattr(tested, column)[circuit].numpy(), rtol=1e-4, atol=1e-6)
        assert sweep_csv[(sweep_csv.task == task) & (sweep_csv.circuit == "both")].effect.isna().all()
        for circuit in ("qk", "ov"):
            rows = sweep_csv[(sweep_csv.task == task) & (sweep_csv.circuit == circuit)]
            from_csv = grid_from_csv(rows, "effect", direct.effect[circuit].shape)
            np.testing.assert_allclose(from_csv, direct.effect[circuit].numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(from_csv, json_grid(data["sweep"][task]["effect"][circuit]), rtol=1e-12)


def test_interference_numbers_equal_compute_interference_called_directly(bundled_report):
    out, direct = bundled_report["out"], bundled_report["interference"]
    table = pd.read_csv(out / "interference.csv")
    data = json.loads((out / "report.json").read_text())
    for block in "QKVO":
        rows = table[table.block == block]
        mean = grid_from_csv(rows, "mean", direct.mean[block].shape)
        scale = float(direct.mean[block].abs().max())
        np.testing.assert_allclose(mean, direct.mean[block].numpy(), rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(mean, json_grid(data["interference"]["mean"][block]), rtol=1e-12)
        # the map and the test's observed statistic come from one matrix
        np.testing.assert_allclose(mean, grid_from_csv(rows, "observed", mean.shape), rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(grid_from_csv(rows, "q_value_bh", mean.shape),
                                   json_grid(data["statistics"]["q_value_bh"][block]), rtol=1e-12)
    top = pd.read_csv(out / "top_conflicts.csv").iloc[0]
    expected = direct.top_conflicts(1)[0]
    assert (top.id_a, top.id_b, top.block, top.layer, top["head"]) == tuple(expected)[:5]
    assert top.score == pytest.approx(expected.score, rel=1e-4)


def test_statistics_columns_are_consistent(bundled_report):
    table = pd.read_csv(bundled_report["out"] / "interference.csv")
    p = table.p_value.to_numpy()
    assert ((p >= 1 / 100) & (p <= 1)).all()
    q = fdr_correction({"all": torch.tensor(p)[None]}, "bh")["all"][0].numpy()
    np.testing.assert_allclose(table.q_value_bh.to_numpy(), q, rtol=1e-12)
    assert (table.significant == (table.q_value_bh <= 0.05)).all()
    assert (table.ci_low <= table.ci_high).all()


def test_top_pairs_are_the_most_negative_pair_totals(bundled_report):
    out, direct = bundled_report["out"], bundled_report["interference"]
    totals = sum(s.double().sum(dim=(2, 3)) for s in direct.scores.values())
    pairs = pd.read_csv(out / "top_pairs.csv")
    assert len(pairs) == min(10, totals.numel())
    i, j = divmod(int(totals.argmin()), totals.shape[1])
    assert (pairs.id_a[0], pairs.id_b[0]) == (direct.ids_a[i], direct.ids_b[j])
    assert pairs.total[0] == pytest.approx(float(totals[i, j]), rel=1e-4)
    assert (np.diff(pairs.total.to_numpy()) >= 0).all()  # most negative first
    markdown = (out / "report.md").read_text()
    assert f"| 1 | {pairs.id_a[0]} | {pairs.id_b[0]} |" in markdown


def test_report_names_the_top_heads(bundled_report):
    out = bundled_report["out"]
    sweep_csv = pd.read_csv(out / "sweep.csv")
    top = sweep_csv[sweep_csv.task == "A"].iloc[sweep_csv[sweep_csv.task == "A"].effect.abs().argmax()]
    markdown = (out / "report.md").read_text()
    assert f"| A | {top.circuit} | {top.layer} | {top['head']} |" in markdown
    table = pd.read_csv(out / "interference.csv")
    worst = table.iloc[table["mean"].argmin()]
    assert f"| {worst.block} | {worst.layer} | {worst['head']} |" in markdown
    # rows of known heads carry their role from the model's metadata, and only those rows do
    from tl_circuits.bundled.models import DEFAULT_BUNDLED_MODEL, bundled_model_info

    roles = {}
    for role, heads in bundled_model_info(DEFAULT_BUNDLED_MODEL).known_heads.items():
        for layer, head in heads:
            roles.setdefault((layer, head), []).append(role)
    data = json.loads((out / "report.json").read_text())
    for row in data["top_heads_by_freeze"] + data["top_heads_by_interference"]:
        assert row["known_role"] == ", ".join(roles.get((row["layer"], row["head"]), []))


def test_sweep_csv_names_the_frozen_loss(bundled_report):
    """sweep.csv: the loss with the head's circuit frozen is ``frozen_loss``, beside ``clean_loss``; effect is their
    difference, as in report.json."""
    out = bundled_report["out"]
    sweep_csv = pd.read_csv(out / "sweep.csv")
    assert list(sweep_csv.columns)[:8] == ["task", "task_name", "circuit", "layer", "head", "clean_loss",
                                           "frozen_loss", "effect"]
    assert {"ci_low", "ci_high", "p_value", "q_value_bh", "significant"} <= set(sweep_csv.columns)
    np.testing.assert_array_equal(sweep_csv.effect, sweep_csv.frozen_loss - sweep_csv.clean_loss)
    data = json.loads((out / "report.json").read_text())
    for task in ("A", "B"):
        rows = sweep_csv[sweep_csv.task == task]
        assert (rows.clean_loss == data["sweep"][task]["clean"]).all()
        for circuit in ("qk", "ov"):
            cells = rows[rows.circuit == circuit]
            frozen = json_grid(data["sweep"][task]["frozen"][circuit])
            np.testing.assert_array_equal(grid_from_csv(cells, "frozen_loss", frozen.shape), frozen)


def test_one_analysis_time_per_run(bundled_report):
    """One wall time per stage and one total, the same in report.json and report.md."""
    out = bundled_report["out"]
    timings = json.loads((out / "report.json").read_text())["timings_s"]
    assert list(timings) == ["load_s", "sweep_a_s", "sweep_b_s", "interference_s", "statistics_s", "total_s"]
    stages = sum(v for k, v in timings.items() if k != "total_s")
    assert stages <= timings["total_s"] <= stages + 1.0  # one clock over the stages
    assert f"Analysis time {timings['total_s']:.1f} s (loading {timings['load_s']:.1f} s" in (
        out / "report.md").read_text()


def test_default_permutations_are_recorded_as_used(checkpoint_inputs, tmp_path, capsys):
    """Without --n-permutations the report records the number used (2 layers x 4 heads x 4 blocks = 32 cells:
    defaults.default_n_permutations(32) = 1280), and the last message gives report.json's total time."""
    from tl_circuits import defaults

    root, out = checkpoint_inputs["root"], tmp_path / "report"
    status, _, err = run_main(["--model", root / "model", "--task-a", root / "a.tokens", "--task-b", root / "b.npy",
                               "--n-bootstrap", "20", "--out", out], capsys)
    assert status == 0
    data = json.loads((out / "report.json").read_text())
    used = defaults.default_n_permutations(32)
    assert used == 1280 and data["statistics"]["settings"]["n_permutations"] == used
    assert data["settings"]["n_permutations"] == used and data["settings"]["n_permutations_requested"] is None
    assert f"{used} label permutations" in (out / "report.md").read_text()
    assert f"(analysis {data['timings_s']['total_s']:.1f} s, writing " in err[-1]


def test_list_models_names_every_bundled_model(capsys):
    from tl_circuits.bundled.models import DEFAULT_BUNDLED_MODEL, list_bundled_models

    status, out, err = run_main(["--list-models"], capsys)
    assert status == 0 and not err
    for info in list_bundled_models():
        assert info.name in out
    assert f"{DEFAULT_BUNDLED_MODEL} (default)" in out


@pytest.mark.slow
def test_no_argument_run_at_default_sizes(tmp_path, monkeypatch):
    """The README's first command, exactly: no arguments, in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert_complete_report(tmp_path / "tl_circuits_report")
    data = json.loads((tmp_path / "tl_circuits_report" / "report.json").read_text())
    assert data["tasks"]["A"]["n_samples"] == 64 and data["tasks"]["B"]["n_samples"] == 64
    n_cells = sum(len(grid) * len(grid[0]) for grid in data["statistics"]["observed"].values())
    assert data["statistics"]["settings"]["n_permutations"] == max(1000, int(np.ceil(2 * n_cells / 0.05)))



# ----- entry points ------------------------------------------------------------------------------------

def test_help_lists_every_option(capsys):
    status, stdout, err = run_main(["--help"], capsys)
    assert status == 0 and stdout.startswith("usage: tl-circuits") and not err
    for option in ("--model", "--task-a", "--task-b", "--n-a", "--n-b", "--n-permutations", "--device", "--seed",
                   "--out", "--quiet", "--list-models"):
        assert option in stdout


def test_console_script_entry_point():
    """pyproject declares ``tl-circuits = tl_circuits.cli.command:main``; where the package is installed (CI installs it
    with ``pip install -e .``), the generated script runs it."""
    import shutil
    import sysconfig

    import tl_circuits.cli.command

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tl-circuits": "tl_circuits.cli:main"}
    module, _, function = scripts["tl-circuits"].partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is tl_circuits.cli.command.main
    script = shutil.which("tl-circuits", path=sysconfig.get_path("scripts"))
    if script is None:
        pytest.skip("tl_circuits is not installed with its console script here: run `pip install -e .`")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tl-circuits")


@pytest.mark.slow  # a whole (small) command run
def test_normalization_is_used_and_recorded_in_the_report(tmp_path):
    """``--normalization hybrid``: the report's map is compute_interference's under that mode, and report.json and
    report.md name the mode."""
    from tl_circuits import GradientConfig, InterferenceConfig, compute_interference
    from tl_circuits.bundled.models import DEFAULT_BUNDLED_MODEL, bundled_tasks, load_bundled_model

    out = tmp_path / "report"
    assert main(["--n-a", "5", "--n-b", "4", "--seed", "3", "--normalization", "hybrid", "--n-permutations", "99",
                 "--n-bootstrap", "0", "--quiet", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["interference"]["normalization"] == "hybrid"
    assert data["settings"]["interference"]["normalization"] == "hybrid"
    assert data["interference"]["settings"]["normalization"] == "hybrid"
    assert "`hybrid` normalisation" in (out / "report.md").read_text()
    make_a, make_b = list(bundled_tasks(DEFAULT_BUNDLED_MODEL).values())[:2]
    batch_a, batch_b = make_a(5, 3), make_b(4, 4)
    direct = compute_interference(load_bundled_model(DEFAULT_BUNDLED_MODEL, "cpu"), batch_a.tokens, batch_b.tokens,
                                  attention_mask_a=batch_a.attention_mask, attention_mask_b=batch_b.attention_mask,
                                  config=InterferenceConfig(gradients=GradientConfig(progress=False),
                                                            fisher_source="pooled", normalization="hybrid"))
    for block in "QKVO":
        mean = np.array(json_grid(data["interference"]["mean"][block]))
        scale = float(direct.mean[block].abs().max())
        np.testing.assert_allclose(mean, direct.mean[block].numpy(), rtol=1e-4, atol=1e-5 * scale)
