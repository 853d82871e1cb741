"""SweepResult and SweepTestResult save and load (the one folder format, read back by tl_circuits and by plain
safetensors + json), and the file pairs of earlier versions, still read."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tl_circuits
from tests import builders
from tests.saved_results import assert_same_result, write_sweep_pair
from tl_circuits import SweepResult, SweepTestResult, freeze_sweep
from tl_circuits.freezing import sweep_result_files


@pytest.fixture(scope="module")
def swept(mha_model):
    """A real sweep, with a NaN cell and an all-NaN circuit (as the report stores a circuit it left out)."""
    result = freeze_sweep(mha_model, builders.random_tokens(), progress=False)
    result.frozen["qk"][1, 2] = float("nan")
    result.frozen["both"] = torch.full_like(result.frozen["ov"], float("nan"))
    return result


def test_round_trip_keeps_every_field(swept, tmp_path):
    folder = swept.save(tmp_path / "sweep")
    assert folder == tmp_path / "sweep" and folder.is_dir()
    loaded = tl_circuits.load(folder)
    assert type(loaded) is SweepResult
    assert_same_result(loaded, swept)
    for circuit in swept.frozen:
        torch.testing.assert_close(loaded.effect[circuit], swept.effect[circuit], rtol=0, atol=0, equal_nan=True)
    assert loaded.top_heads(3, "ov") == swept.top_heads(3, "ov")


def test_the_files_hold_what_the_format_says(swept, tmp_path):
    """Read back without tl_circuits: safetensors for the numbers, json for the rest (tl_circuits/results_io.py)."""
    folder = swept.save(tmp_path / "sweep")
    tensors = load_file(str(folder / "tensors.safetensors"))
    record = json.loads((folder / "result.json").read_text())
    assert record["format"] == "tl_circuits.result" and record["version"] == 1 and record["kind"] == "SweepResult"
    fields = record["fields"]
    assert fields["frozen"] == {"grid": ["qk", "ov", "both"]} and fields["clean_per_sample"] == {"none": True}
    assert fields["replacement"] == {"value": "zero"} and fields["settings"] == {"value": swept.settings}
    assert torch.isnan(tensors["frozen/0"][1, 2]) and torch.isnan(tensors["frozen/2"]).all()
    assert set(tensors) == {f"frozen/{i}" for i in range(3)} | {f"per_draw_effect/{i}" for i in range(2)}


def test_nan_and_infinite_metrics_survive(tmp_path):
    result = SweepResult(clean=float("nan"), frozen={"ov": torch.tensor([[float("-inf"), 1.0], [float("nan"), 0.0]],
                                                                         dtype=torch.float64)},
                         replacement="mean", metric_name="logit_diff", settings={})
    assert_same_result(SweepResult.load(result.save(tmp_path / "odd")), result)


def test_plot_works_on_a_loaded_result(swept, tmp_path):
    loaded = SweepResult.load(swept.save(tmp_path / "sweep"))
    figure, expected = loaded.plot(), swept.plot()
    assert figure is not None and len(figure.axes) == len(expected.axes)


def test_bad_save_targets(swept, tmp_path):
    with pytest.raises(ValueError, match="writes a folder"):
        swept.save(tmp_path / "run.json")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        swept.save(tmp_path / "a_file")
    unsaveable = SweepResult(clean=1.0, frozen=dict(swept.frozen), replacement="zero", metric_name="loss",
                             settings={"metric": len})
    with pytest.raises(TypeError, match="JSON values"):
        unsaveable.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_per_sample_round_trip_keeps_the_new_tensors(mha_model, tmp_path):
    tokens = builders.random_tokens(4, 10, seed=3)
    result = freeze_sweep(mha_model, tokens, circuits=("qk", "ov", "both"), replacement="noise", n_draws=2,
                          per_sample=True, progress=False)
    result.per_sample_effect["ov"][1, 0, 0] = float("nan")
    loaded = SweepResult.load(result.save(tmp_path / "ps"))
    assert_same_result(loaded, result)
    assert loaded.per_sample_effect["qk"].shape == (4, 2, 4) and loaded.per_draw_effect["both"].shape == (2, 2, 4)
    # the loaded result is testable, with the same numbers, and its test saves and loads too
    ours, theirs = loaded.test(n_bootstrap=99, progress=False), result.test(n_bootstrap=99, progress=False)
    for circuit in ours.p_value:
        torch.testing.assert_close(ours.p_value[circuit], theirs.p_value[circuit], equal_nan=True)
    back = tl_circuits.load(ours.save(tmp_path / "ps_test"))
    assert type(back) is SweepTestResult
    assert_same_result(back, ours)
    assert back.null_hypothesis == ours.null_hypothesis and back.to_dataframe().equals(ours.to_dataframe())


# ----- the file pair of earlier versions, still read ------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_old_file_pairs_still_load(swept, mha_model, tmp_path, version):
    per_sample = freeze_sweep(mha_model, builders.random_tokens(4, 10, seed=3), per_sample=True, progress=False)
    for name, result in (("means", swept), ("per_sample", per_sample)):
        tensors_file, metadata_file = write_sweep_pair(result, tmp_path / name, version=version)
        for path in (tmp_path / name, tensors_file, str(metadata_file)):   # the stem or either file
            loaded = tl_circuits.load(path)
            if version == 2:
                assert_same_result(loaded, result)
            else:  # version 1 held the batch means only
                assert_same_result(loaded, result, skip=("clean_per_sample", "per_sample_effect", "per_draw_effect"))
                assert loaded.per_sample_effect is None and loaded.per_draw_effect is None
    assert sweep_result_files("a/b.c") == (Path("a/b.c.safetensors"), Path("a/b.c.json"))


def test_missing_old_files_are_named(swept, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.*does not exist"):
        SweepResult.load(tmp_path / "nothing")
    _, metadata_file = write_sweep_pair(swept, tmp_path / "sweep")
    metadata_file.unlink()
    with pytest.raises(FileNotFoundError, match="sweep.json is missing"):
        SweepResult.load(tmp_path / "sweep")


def test_corrupt_old_files_are_a_clear_error(swept, tmp_path):
    tensors_file, metadata_file = write_sweep_pair(swept, tmp_path / "sweep")
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
