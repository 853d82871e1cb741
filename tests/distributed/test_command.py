"""``tl-circuits`` under ``torchrun --standalone --nproc_per_node=2``: the same report as one process, written by
rank 0 alone; a rank that fails makes the run fail with its error, and nothing is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli.helpers import SMALL, assert_complete_report
from tests.distributed.launch import REPO, torchrun
from tl_circuits.cli.command import main

ARGS = ["--n-a", "5", "--n-b", "4", *SMALL]
WORKER = str(REPO / "tests" / "distributed" / "command_worker.py")
# wall times, dates, the world itself, and the memory plan (a rank's is made for its share of the layers)
VOLATILE = ("created", "timings_s", "timings", "world_size", "plan")


def assert_same_json(got, want, where: str = "report") -> None:
    """Equal structure; numbers within 1e-5 relative (1e-7 absolute near 0); strings equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() - VOLATILE == want.keys() - VOLATILE, where
        for key in want:
            if key not in VOLATILE:
                assert_same_json(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_json(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), \
            f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.slow  # two full command runs (~2 min on 2 cores); the failing-rank launch below stays in the default run
def test_report_under_torchrun_equals_one_process(tmp_path: Path):
    single, distributed = tmp_path / "single", tmp_path / "distributed"
    assert main([*ARGS, "--out", str(single)]) == 0
    run = torchrun([WORKER, "-1", *ARGS, "--out", str(distributed)], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert_complete_report(distributed)
    report = json.loads((distributed / "report.json").read_text())
    assert report["interference"]["settings"]["world_size"] == 2  # it did run split
    assert_same_json(report, json.loads((single / "report.json").read_text()))


def test_a_failing_rank_fails_the_run_and_nothing_is_written(tmp_path: Path):
    out = tmp_path / "report"
    run = torchrun([WORKER, "1", *ARGS, "--out", str(out), "--dist-timeout", "60"], cwd=tmp_path)
    assert run.returncode != 0
    assert "tl-circuits: error: rank 1 of 2: RuntimeError: injected failure in the score pass; no report written" \
        in run.stderr, run.stderr[-4000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "report" and "report" in p.name]  # no partial folder
