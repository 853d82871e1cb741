"""SweepResult.save / SweepResult.load: the file pair, read back by tl_circuits and by plain safetensors + json."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import builders

from tl_circuits import SweepResult, freeze_sweep
from tl_circuits.freezing import SWEEP_FORMAT, sweep_result_files


@pytest.fixture(scope="module")
def swept(mha_model):
    """A real sweep, with a NaN cell and an all-NaN circuit (as the report stores a circuit it left out)."""
    result = freeze_sweep(mha_model, builders.random_tokens(), progress=False)
    result.frozen["qk"][1, 2] = float("nan")
    result.frozen["both"] = torch.full_like(result.frozen["ov"], float("nan"))
    return result


def assert_same_result(loaded: SweepResult, original: SweepResult) -> None:
    assert loaded.clean == original.clean or (math.isnan(loaded.clean) and math.isnan(original.clean))
    assert list(loaded.frozen) == list(original.frozen)
    for circuit, values in original.frozen.items():
        got = loaded.frozen[circuit]
        assert got.dtype == values.dtype and got.shape == values.shape
        assert torch.equal(torch.isnan(got), torch.isnan(values))
        torch.testing.assert_close(got, values, rtol=0, atol=0, equal_nan=True)
    assert loaded.replacement == original.replacement
    assert loaded.metric_name == original.metric_name
    assert loaded.settings == original.settings
    for name in ("per_sample_effect", "per_draw_effect"):
        theirs, ours = getattr(original, name), getattr(loaded, name)
        assert (theirs is None) == (ours is None)
        for circuit in theirs or {}:
            torch.testing.assert_close(ours[circuit], theirs[circuit], rtol=0, atol=0, equal_nan=True)
    if original.clean_per_sample is None:
        assert loaded.clean_per_sample is None
    else:
        torch.testing.assert_close(loaded.clean_per_sample, original.clean_per_sample, rtol=0, atol=0,
                                   equal_nan=True)


def test_round_trip_keeps_every_field(swept, tmp_path):
    tensors_file, metadata_file = swept.save(tmp_path / "sweep")
    assert (tensors_file.name, metadata_file.name) == ("sweep.safetensors", "sweep.json")
    loaded = SweepResult.load(tmp_path / "sweep")
    assert_same_result(loaded, swept)
    for circuit in swept.frozen:
        torch.testing.assert_close(loaded.effect[circuit], swept.effect[circuit], rtol=0, atol=0, equal_nan=True)
    assert loaded.top_heads(3, "ov") == swept.top_heads(3, "ov")


def test_the_files_hold_what_the_docstring_says(swept, tmp_path):
    """Read back without tl_circuits: safetensors for the numbers, json for the rest."""
    tensors_file, metadata_file = swept.save(tmp_path / "sweep")
    tensors = load_file(str(tensors_file))
    assert set(tensors) == {"clean"} | {f"frozen.{c}" for c in swept.frozen} | {
        f"per_draw_effect.{c}" for c in swept.per_draw_effect}
    assert tensors["clean"].dtype == torch.float64 and tensors["clean"].tolist() == [swept.clean]
    assert torch.isnan(tensors["frozen.qk"][1, 2]) and torch.isnan(tensors["frozen.both"]).all()
    metadata = json.loads(metadata_file.read_text())
    assert metadata["format"] == SWEEP_FORMAT and metadata["version"] == 2
    assert metadata["per_sample_circuits"] is None and metadata["per_draw_circuits"] == ["qk", "ov"]
    assert metadata["circuits"] == ["qk", "ov", "both"]
    assert metadata["replacement"] == "zero" and metadata["metric_name"] == "loss"
    assert metadata["settings"] == swept.settings


def test_nan_and_infinite_metrics_survive(tmp_path):
    result = SweepResult(clean=float("nan"), frozen={"ov": torch.tensor([[float("-inf"), 1.0], [float("nan"), 0.0]],
                                                                         dtype=torch.float64)},
                         replacement="mean", metric_name="logit_diff", settings={})
    result.save(tmp_path / "odd")
    assert_same_result(SweepResult.load(tmp_path / "odd"), result)


def test_either_file_name_names_the_pair(swept, tmp_path):
    swept.save(tmp_path / "nested" / "run.json")  # the parent folder is made
    assert_same_result(SweepResult.load(tmp_path / "nested" / "run.safetensors"), swept)
    assert_same_result(SweepResult.load(str(tmp_path / "nested" / "run")), swept)
    assert sweep_result_files("a/b.c") == (Path("a/b.c.safetensors"), Path("a/b.c.json"))


def test_plot_works_on_a_loaded_result(swept, tmp_path):
    swept.save(tmp_path / "sweep")
    loaded = SweepResult.load(tmp_path / "sweep")
    figure, expected = loaded.plot(), swept.plot()
    assert figure is not None and len(figure.axes) == len(expected.axes)


def test_missing_files_are_named(swept, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors is missing"):
        SweepResult.load(tmp_path / "nothing")
    _, metadata_file = swept.save(tmp_path / "sweep")
    metadata_file.unlink()
    with pytest.raises(FileNotFoundError, match="sweep.json is missing"):
        SweepResult.load(tmp_path / "sweep")


def test_corrupt_files_are_a_clear_error(swept, tmp_path):
    tensors_file, metadata_file = swept.save(tmp_path / "sweep")
    good_tensors, good_metadata = tensors_file.read_bytes(), metadata_file.read_text()

    tensors_file.write_bytes(good_tensors[: len(good_tensors) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SweepResult.load(tmp_path / "sweep")
    tensors_file.write_bytes(good_tensors)

    metadata_file.write_text(good_metadata[:-10])
    with pytest.raises(ValueError, match="not valid JSON"):
        SweepResult.load(tmp_path / "sweep")

    metadata_file.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a saved SweepResult"):
        SweepResult.load(tmp_path / "sweep")

    metadata = json.loads(good_metadata)
    metadata_file.write_text(json.dumps({**metadata, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        SweepResult.load(tmp_path / "sweep")

    metadata_file.write_text(json.dumps({**metadata, "circuits": ["qk", "extra"]}))
    with pytest.raises(ValueError, match="lacks the tensors \\['frozen.extra'\\]"):
        SweepResult.load(tmp_path / "sweep")

    del metadata["settings"]
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="lacks settings"):
        SweepResult.load(tmp_path / "sweep")


def test_bad_save_targets(swept, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        swept.save(tmp_path)
    unsaveable = SweepResult(clean=1.0, frozen=dict(swept.frozen), replacement="zero", metric_name="loss",
                             settings={"metric": len})
    with pytest.raises(TypeError, match="JSON values"):
        unsaveable.save(tmp_path / "bad")
    assert not (tmp_path / "bad.safetensors").exists()


def test_per_sample_round_trip_keeps_the_new_tensors(mha_model, tmp_path):
    tokens = builders.random_tokens(4, 10, seed=3)
    result = freeze_sweep(mha_model, tokens, circuits=("qk", "ov", "both"), replacement="noise", n_draws=2,
                          per_sample=True, progress=False)
    result.per_sample_effect["ov"][1, 0, 0] = float("nan")
    result.save(tmp_path / "ps")
    loaded = SweepResult.load(tmp_path / "ps")
    assert_same_result(loaded, result)
    assert loaded.per_sample_effect["qk"].shape == (4, 2, 4) and loaded.per_draw_effect["both"].shape == (2, 2, 4)
    tensors = load_file(str(tmp_path / "ps.safetensors"))
    assert {"clean_per_sample", "per_sample_effect.both", "per_draw_effect.ov"} <= set(tensors)
    # the loaded result is testable, with the same numbers
    ours, theirs = loaded.test(n_bootstrap=99), result.test(n_bootstrap=99)
    for circuit in ours.p_value:
        torch.testing.assert_close(ours.p_value[circuit], theirs.p_value[circuit], equal_nan=True)


def test_version_1_files_still_load(tmp_path):
    """A file pair as version 1 wrote it (batch means only), made by hand with safetensors + json."""
    from safetensors.torch import save_file

    save_file({"clean": torch.tensor([1.5], dtype=torch.float64), "frozen.qk": torch.tensor([[1.0, 2.0]])},
              str(tmp_path / "old.safetensors"), metadata={"format": SWEEP_FORMAT})
    (tmp_path / "old.json").write_text(json.dumps(dict(format=SWEEP_FORMAT, version=1, replacement="zero",
                                                       metric_name="loss", circuits=["qk"], settings={"seed": 0})))
    loaded = SweepResult.load(tmp_path / "old")
    assert loaded.clean == 1.5 and loaded.frozen["qk"].tolist() == [[1.0, 2.0]]
    assert loaded.per_sample_effect is None and loaded.per_draw_effect is None and loaded.clean_per_sample is None
    with pytest.raises(ValueError, match="per_sample=True"):
        loaded.test()
