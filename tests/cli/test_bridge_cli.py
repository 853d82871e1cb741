"""The ``tl-circuits`` command on a TransformerBridge: ``--bridge`` under TransformerLens 3.x gives the
HookedTransformer report's numbers; under 4.x (no HookedTransformer) the no-argument main job runs on the bundled
default as a bridge and writes every file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import tl_circuits as tlc
from tests.builders import HAS_HOOKED_TRANSFORMER
from tl_circuits.cli.command import main
from tl_circuits.cli.output import FILES

SMALL = ["--n-a", "6", "--n-b", "5", "--seed", "3", "--n-permutations", "99", "--n-bootstrap", "50", "--quiet"]
QK_WARNING = "QK freezes are not available on this model"


def assert_every_file(out) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for name in FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.needs_hooked_transformer  # compares with the HookedTransformer report
def test_bridge_report_equals_the_hooked_transformer_report(tmp_path):
    bridge_out, hooked_out = tmp_path / "bridge", tmp_path / "hooked"
    assert main([*SMALL, "--bridge", "--out", str(bridge_out)]) == 0
    assert main([*SMALL, "--out", str(hooked_out)]) == 0
    assert_every_file(bridge_out)
    b, h = (json.loads((out / "report.json").read_text()) for out in (bridge_out, hooked_out))
    assert (b["model"]["model_class"], h["model"]["model_class"]) == ("TransformerBridge", "HookedTransformer")
    assert b["tasks"] == h["tasks"]
    # sweep: OV effects equal; the QK half is left out (NaN, with a warning) on a 3.x native bridge
    sweep_b, sweep_h = pd.read_csv(bridge_out / "sweep.csv"), pd.read_csv(hooked_out / "sweep.csv")
    assert sweep_b[["task", "circuit", "layer", "head"]].equals(sweep_h[["task", "circuit", "layer", "head"]])
    ov = (sweep_b.circuit == "ov").to_numpy()
    np.testing.assert_allclose(sweep_b.effect[ov], sweep_h.effect[ov], rtol=1e-5, atol=1e-6)
    assert sweep_b.effect[~ov].isna().all() and any(QK_WARNING in w for w in b["warnings"])
    assert not any(QK_WARNING in w for w in h["warnings"])
    # interference and its statistics: same cells, same values within float32 gradient rounding
    inter_b, inter_h = pd.read_csv(bridge_out / "interference.csv"), pd.read_csv(hooked_out / "interference.csv")
    assert inter_b[["block", "layer", "head"]].equals(inter_h[["block", "layer", "head"]])
    for column in ("mean", "observed", "null_mean", "null_std", "ci_low", "ci_high"):
        scale = float(np.abs(inter_h[column]).max())
        np.testing.assert_allclose(inter_b[column], inter_h[column], rtol=1e-4, atol=1e-6 * scale, err_msg=column)
    np.testing.assert_allclose(inter_b.z, inter_h.z, rtol=1e-4, atol=1e-5)
    for column in ("p_value", "q_value_bh", "p_value_maxstat", "p_value_cluster", "significant"):
        assert inter_b[column].equals(inter_h[column]), column
    pairs_b, pairs_h = pd.read_csv(bridge_out / "top_pairs.csv"), pd.read_csv(hooked_out / "top_pairs.csv")
    assert pairs_b[["id_a", "id_b"]].equals(pairs_h[["id_a", "id_b"]])
    np.testing.assert_allclose(pairs_b.total, pairs_h.total, rtol=1e-4)


@pytest.mark.skipif(HAS_HOOKED_TRANSFORMER,
                    reason="TransformerLens 4.x only (3.x: the slow test in tests/cli/test_cli.py)")
def test_no_argument_job_runs_on_a_bridge_and_writes_every_file(tmp_path, monkeypatch):
    """The README's first command, exactly, under TransformerLens 4.x; task A's QK and OV sweep equals the per-head
    freeze effects recorded in the model's JSON when it was analysed as a HookedTransformer (same batch: 64 rows,
    seed 0; rounded to 1e-4)."""
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet"]) == 0
    out = tmp_path / "tl_circuits_report"
    assert_every_file(out)
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["model_class"] == "TransformerBridge" and data["model"]["source"] == "bundled"
    assert data["tasks"]["A"]["n_samples"] == 64 and data["tasks"]["B"]["n_samples"] == 64
    # the only warning a default run gives: strongly different cells sit at the permutation p-value floor
    assert not [w for w in data["warnings"] if "at their floor" not in w]
    info = tlc.bundled_model_info(tlc.DEFAULT_BUNDLED_MODEL)
    task_a = data["tasks"]["A"]["name"]
    for circuit in ("qk", "ov"):
        recorded = np.array(info.metadata["freeze_effects"][task_a]["zero"][circuit])
        np.testing.assert_allclose(np.array(data["sweep"]["A"]["effect"][circuit], dtype=float), recorded, atol=2e-4)
    assert "## Interference between task A and task B" in (out / "report.md").read_text()
