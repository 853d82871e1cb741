"""Every result saves and loads one way (tl_circuits/results_io.py): result.save(folder) and tl_circuits.load(folder)
give back the same class with every tensor bit for bit (NaN and inf kept) and equal settings; load() refuses what is
not a saved result, naming the problem."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import tl_circuits
from tests.saved_results import assert_same_result
from tl_circuits import InterferenceConfig, InterferenceResult, SweepResult, conflict_test, permutation_test
from tl_circuits.interference.fisher import DiagonalFisher
from tl_circuits.freezing.attribution_result import AttributionResult, MissedEffectBound
from tl_circuits.results_io import KINDS, META_FILE, TENSORS_FILE, VERSION


def interference_result() -> InterferenceResult:
    gen = torch.Generator().manual_seed(0)
    scores = {b: torch.randn(3, 4, 2, 2, generator=gen) for b in "QKVO"}
    scores["Q"][0, 1, 0, 0] = math.nan
    scores["O"][2, 3, 1, 1] = -math.inf
    fisher = DiagonalFisher({b: torch.rand(2, 2, 5, generator=gen, dtype=torch.float64) for b in "QKVO"}, 7,
                            source="pooled")
    settings = {"plan": {"budget_gb": 4.0, "spill": False}, "n_layers": 2, "timings": {"total_s": 0.5},
                "note": float("nan")}
    return InterferenceResult(scores, ["a", "b", "c"], [0, 1, 2, 3], InterferenceConfig(fisher_source="pooled"),
                              settings, fisher=fisher)


def sweep_result() -> SweepResult:
    gen = torch.Generator().manual_seed(1)
    effect = torch.randn(10, 2, 3, generator=gen, dtype=torch.float64) * 0.1
    effect[:, 1, 0] += 1.0
    effect[4, 0, 0] = math.nan
    clean = torch.full((10,), 2.0, dtype=torch.float64)
    return SweepResult(clean=2.0, frozen={"qk": (2.0 + effect.nanmean(0)).float()}, replacement="zero",
                       metric_name="loss", settings={"seed": 0, "circuits": ["qk"]}, clean_per_sample=clean,
                       per_sample_effect={"qk": effect}, per_draw_effect={"qk": effect.nanmean(0)[None]})


def every_result():
    pooled = torch.randn(10, 10, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pooled[1, 2, 0, 0] = math.nan
    sweep = sweep_result()
    return {
        "InterferenceResult": interference_result(),
        "SweepResult": sweep,
        "AttributionResult": AttributionResult(
            clean=2.0, frozen={}, replacement="mean", metric_name="loss", settings={"sweep": "attribution"},
            estimate={"ov": torch.tensor([[0.5, math.nan]])}, verified={"ov": torch.tensor([[True, False]])},
            exact={"ov": torch.tensor([[0.4, math.nan]])},
            missed={"ov": MissedEffectBound("ov", 0.1, 1, 5, 1, 0.97, 0.97, [0.1] * 5, [[[0, 1]]] * 5, 0)}),
        "SweepTestResult": sweep.test(n_bootstrap=50, progress=False),
        "InterferenceTestResult": permutation_test({"O": pooled}, 5, n_permutations=19, n_bootstrap=20,
                                                   progress=False),
        "ConflictTestResult": conflict_test({"O": pooled[:5, 5:]}, alternative="two-sided"),
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")  # the NaN cells, few permutations
def test_every_result_round_trips_bit_for_bit(tmp_path):
    results = every_result()
    assert set(results) == set(KINDS)           # every saveable kind is covered
    for kind, result in results.items():
        folder = result.save(tmp_path / kind)
        assert sorted(p.name for p in folder.iterdir()) == [META_FILE, TENSORS_FILE]
        back = tl_circuits.load(folder)
        assert type(back) is type(result), kind
        skip = ("fisher",) if kind == "InterferenceResult" else ()   # compared below
        assert_same_result(back, result, skip=skip)
        assert type(result).load(folder).__class__ is type(result)
        if hasattr(result, "settings"):
            settings_back, settings = back.settings, result.settings
            assert json.dumps(settings_back, sort_keys=True) == json.dumps(settings, sort_keys=True), kind
        if hasattr(result, "null_hypothesis"):
            assert back.null_hypothesis == result.null_hypothesis
    back = tl_circuits.load(tmp_path / "InterferenceResult")
    original = results["InterferenceResult"]
    assert back.config == original.config
    assert (back.fisher.n_samples, back.fisher.source, back.fisher.include_biases) == (7, "pooled", False)
    for block in "QKVO":
        assert torch.equal(back.fisher.per_block[block], original.fisher.per_block[block])
    assert math.isnan(back.settings["note"]) and math.isinf(float(back.scores["O"][2, 3, 1, 1]))


def test_one_format_one_version(tmp_path):
    """What is on disk: the one record (format, version, kind) and plain safetensors, readable without tl_circuits."""
    result = interference_result()
    folder = result.save(tmp_path / "run")
    record = json.loads((folder / META_FILE).read_text())
    assert (record["format"], record["version"], record["kind"]) == ("tl_circuits.result", VERSION,
                                                                    "InterferenceResult")
    assert record["fields"]["ids_a"] == {"value": ["a", "b", "c"]} and record["fields"]["scores"] == {
        "grid": ["Q", "K", "V", "O"]}
    tensors = load_file(str(folder / TENSORS_FILE))
    assert torch.equal(tensors["scores/0"].isnan(), result.scores["Q"].isnan())
    result.save(folder)                                             # saving again replaces the files
    assert tl_circuits.load(folder).ids_a == ["a", "b", "c"]


def test_load_refuses_what_is_not_a_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tl_circuits.load(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"plain is not a saved tl_circuits result: it has no result\.json"):
        tl_circuits.load(tmp_path / "plain")
    folder = interference_result().save(tmp_path / "run")
    good = (folder / META_FILE).read_text()
    (folder / META_FILE).write_text(good[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        tl_circuits.load(folder)
    for change, match in (({"format": "other"}, "not a saved tl_circuits result"),
                          ({"version": 99}, "version 99"), ({"kind": "Mystery"}, "unknown kind of result 'Mystery'")):
        (folder / META_FILE).write_text(json.dumps({**json.loads(good), **change}))
        with pytest.raises(ValueError, match=match):
            tl_circuits.load(folder)
    (folder / META_FILE).write_text(good)
    (folder / TENSORS_FILE).write_bytes(b"damaged")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tl_circuits.load(folder)
    with pytest.raises(ValueError, match="holds a saved InterferenceResult, not a SweepResult"):
        SweepResult.load(interference_result().save(tmp_path / "other"))


def test_what_cannot_be_saved_is_an_error_before_anything_is_written(tmp_path):
    result = interference_result()
    result.ids_a[0] = ("not", "json")
    with pytest.raises(TypeError, match="ids_a must be JSON values"):
        result.save(tmp_path / "bad")
    with pytest.raises(TypeError, match="settings"):
        SweepResult(clean=1.0, frozen={}, replacement="zero", metric_name="loss", settings={"f": len}).save(
            tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
