"""The report folder is written all or nothing: a failure while writing or analysing leaves no report and an
earlier report intact; a rerun replaces an earlier report."""

from __future__ import annotations

import json


from tests.cli.helpers import assert_complete_report, checkpoint_args, run_main



# ----- all or nothing ----------------------------------------------------------------------------------

def test_failure_while_writing_leaves_no_report(checkpoint_inputs, tmp_path, capsys, monkeypatch):
    import tl_circuits.cli.output as output

    real_write_figures = output.write_figures

    def write_some_then_fail(analysis, directory):
        real_write_figures(analysis, directory)  # CSVs, JSON and PNGs are on disk by now, report.md is not
        assert (directory / "report.json").exists() and (directory / "interference.png").exists()
        raise RuntimeError("disk full")

    monkeypatch.setattr(output, "write_figures", write_some_then_fail)
    out = tmp_path / "report"
    status, _, err = run_main(checkpoint_args(checkpoint_inputs, out), capsys)
    assert status == 1 and len(err) == 1 and "RuntimeError: disk full; no report written" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the report nor a partial directory


def test_failure_mid_analysis_keeps_an_earlier_report_intact(checkpoint_inputs, checkpoint_report, tmp_path,
                                                              capsys, monkeypatch):
    import shutil

    import tl_circuits.cli.pipeline as analysis

    out = tmp_path / "report"
    shutil.copytree(checkpoint_report[3], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis, "pooled_statistics", interrupted)
    status, _, err = run_main(checkpoint_args(checkpoint_inputs, out), capsys)
    assert status == 130 and err == ["tl-circuits: interrupted; no report written"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_rerun_replaces_an_earlier_report_with_progress_unless_quiet(checkpoint_inputs, checkpoint_report, tmp_path,
                                                                     capsys):
    import shutil

    out = tmp_path / "report"
    shutil.copytree(checkpoint_report[3], out)
    args = [a for a in checkpoint_args(checkpoint_inputs, out) if a != "--quiet"]
    status, _, err = run_main([*args, "--seed", "1"], capsys)
    text = "\n".join(err)
    assert status == 0
    for stage in ("model model (checkpoint) on cpu", "freeze sweep on task A", "per-sample gradients",
                  "report written to"):
        assert stage in text
    assert "permutation test:" in text and "%|" in text  # tqdm bars
    # the earlier report is replaced and nothing else is left behind
    assert json.loads((out / "report.json").read_text())["settings"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert_complete_report(out)

