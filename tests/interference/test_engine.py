"""The streaming engine against independent references: freezes active during per-sample gradients (a plain
per-sample backward loop over one batched frozen forward), use_attn_result models, spilling, save/load."""

from __future__ import annotations

import math

import pytest
import torch

import tl_circuits
from tests import builders
from tests.reference import (
    DAMP,
    assert_rows_match,
    assert_scores_close,
    brute_force,
    frozen_batch_loop,
    loop_reference,
    quiet_config,
)
from tests.saved_results import assert_same_value, write_interference_result_folder
from tl_circuits import GradientConfig, InterferenceConfig, InterferenceResult, compute_interference, freeze
from tl_circuits.interference.gradients import per_sample_gradients
from tl_circuits.models.spec import model_spec

QUIET = dict(progress=False)


@pytest.mark.parametrize("circuit", ["qk", "ov", "both"])
def test_gradients_under_a_noise_freeze_equal_the_frozen_batch_loop(model, circuit):
    """Defect: per_sample_gradients under a NOISE freeze failed inside vmap. The factored engine runs the batch
    forward itself; under NOISE the noise is drawn per chunk, so one chunk holds the whole batch here."""
    tokens = builders.random_tokens(4, 9, seed=5)
    kwargs = dict(heads=[(0, 1), (1, 0)], circuit=circuit, replacement="noise", seed=11)
    with freeze(model, **kwargs):
        grads = per_sample_gradients(model, tokens, config=GradientConfig(chunk_size=4, **QUIET))
    assert_rows_match(grads, frozen_batch_loop(model, tokens, **kwargs))


def test_direct_engine_under_a_noise_freeze_is_a_clear_error(mha_model):
    tokens = builders.random_tokens(2, 8)
    with freeze(mha_model, [(0, 0)], "ov", "noise"):
        with pytest.raises(ValueError, match="method='factored'"):
            per_sample_gradients(mha_model, tokens, config=GradientConfig(method="direct", **QUIET))


@pytest.mark.parametrize("circuit", ["qk", "ov", "both"])
def test_gradients_under_a_per_sample_resample_freeze(model, circuit):
    """Defect: a RESAMPLE reference with the run's batch size was refused in chunks. Each chunk now takes its
    own reference rows; chunks of 2 over 5 samples equal one batched frozen forward."""
    tokens = builders.random_tokens(5, 9, seed=6)
    reference = builders.random_tokens(5, 9, seed=7)
    kwargs = dict(heads=[(0, 0), (1, 1)], circuit=circuit, replacement="resample", reference=reference)
    with freeze(model, **kwargs):
        grads = per_sample_gradients(model, tokens, config=GradientConfig(chunk_size=2, **QUIET))
    assert_rows_match(grads, frozen_batch_loop(model, tokens, **kwargs))


@pytest.mark.needs_hooked_transformer  # use_attn_result is a HookedTransformerConfig flag
@pytest.mark.parametrize("variant", ["signed", "unsigned"])
def test_compute_interference_on_a_use_attn_result_model(variant):
    """Defect: compute_interference refused use_attn_result=True naming an engine the user never chose."""
    model = builders.hooked(use_attn_result=True)
    tokens_a, tokens_b = builders.random_tokens(3, 8, seed=8), builders.random_tokens(2, 8, seed=9)
    result = compute_interference(model, tokens_a, tokens_b,
                                  config=quiet_config(variant=variant, chunk_size=2, **DAMP))
    expected = brute_force(model_spec(model), loop_reference(model, tokens_a), loop_reference(model, tokens_b),
                           variant, "sum", "a", False)
    assert_scores_close(result.scores, expected)


@pytest.mark.needs_hooked_transformer  # hook_result exists with use_attn_result (HookedTransformer)
def test_a_hook_at_hook_result_is_a_clear_error():
    model = builders.hooked(use_attn_result=True)
    tokens = builders.random_tokens(2, 8)
    model.blocks[0].attn.hook_result.add_hook(lambda x, hook: x * 2)
    try:
        with pytest.raises(ValueError, match="hook_result"):
            compute_interference(model, tokens, tokens, progress=False)
    finally:
        model.reset_hooks()


def spill_folders(path):
    return [p for p in path.iterdir() if p.name.startswith("tl_circuits_spill_")]


def test_spilled_run_equals_held_run_and_leaves_no_files(mha_model, tmp_path):
    tokens_a, tokens_b = builders.random_tokens(4, 9, seed=1), builders.random_tokens(3, 9, seed=2)
    cfg = quiet_config(fisher_source="pooled", chunk_size=2, spill_dir=str(tmp_path), **DAMP)
    held = compute_interference(mha_model, tokens_a, tokens_b, config=cfg)
    spilled = compute_interference(mha_model, tokens_a, tokens_b, config=cfg.replace(max_held_samples=2))
    assert not held.settings["plan"]["spill"] and spilled.settings["plan"]["spill"]
    assert held.settings["plan"]["n_gradient_evaluations"] == spilled.settings["plan"]["n_gradient_evaluations"] == 7
    for block in held.scores:
        torch.testing.assert_close(spilled.scores[block], held.scores[block], rtol=1e-6, atol=0)
    assert spill_folders(tmp_path) == []


def test_spill_folder_is_removed_when_the_run_fails(mha_model, tmp_path):
    tokens = builders.random_tokens(3, 8)
    broken = builders.mha_under_test()
    with torch.no_grad():
        builders.attention_param(broken, 1, "V")[0, 0] = math.nan  # NaN gradients: it raises after the gradient pass
    cfg = InterferenceConfig(max_held_samples=1, spill_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not finite"):
        compute_interference(broken, tokens, tokens, config=cfg, progress=False)
    assert spill_folders(tmp_path) == []


def test_result_save_load_round_trip(mha_model, tmp_path):
    tokens_a, tokens_b = builders.random_tokens(3, 8, seed=3), builders.random_tokens(2, 8, seed=4)
    result = compute_interference(mha_model, tokens_a, tokens_b, ids_a=["x", "y", "z"], ids_b=[10, 11],
                                  config=InterferenceConfig(variant="unsigned"), progress=False)
    result.scores["Q"][0, 1, 0, 0] = math.nan  # missing data survives the round trip
    for loaded in (tl_circuits.load(result.save(tmp_path / "run")),
                   InterferenceResult.load(write_interference_result_folder(result, tmp_path / "old"))):
        assert type(loaded) is InterferenceResult
        assert loaded.ids_a == ["x", "y", "z"] and loaded.ids_b == [10, 11]
        assert loaded.config == result.config and loaded.settings == result.settings
        assert_same_value(loaded.scores, result.scores, "scores")
        assert_same_value(loaded.fisher.per_block, result.fisher.per_block, "fisher")
        assert (loaded.fisher.n_samples, loaded.fisher.source) == (result.fisher.n_samples, result.fisher.source)
        assert loaded.top_conflicts(3) == result.top_conflicts(3)
        loaded.plot()


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="not a saved InterferenceResult: it has no result.json"):
        InterferenceResult.load(tmp_path)
    (tmp_path / "scores.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FileNotFoundError, match="settings.json is missing"):
        InterferenceResult.load(tmp_path)
    (tmp_path / "settings.json").write_text("{}")
    with pytest.raises(ValueError, match="damaged|not an InterferenceResult"):
        InterferenceResult.load(tmp_path)


@pytest.mark.parametrize("spill", [False, True])
def test_a_store_of_some_layers_keeps_exactly_those(spill, tmp_path):
    """A store of layers 1-2 of 3 (a rank's share) gives back, for those layers, what a store of every layer gives,
    and refuses the layers it does not hold by name."""
    from tl_circuits.interference.factors import GradientFactors
    from tl_circuits.interference.store import FactorStore
    from tl_circuits.models.spec import ModelSpec

    spec = ModelSpec(3, 2, 1, 4, 2, 10, 8, True, False)
    factors = GradientFactors.zeros(spec, 2, 5)
    gen = torch.Generator().manual_seed(0)
    for t in [*factors.out_grads.values(), factors.inputs["Q"], factors.z]:
        t.copy_(torch.randn(t.shape, generator=gen))
    with FactorStore(spec, 4, 5) as every, FactorStore(spec, 4, 5, layers=slice(1, 3), spill=spill,
                                                       directory=str(tmp_path)) as some:
        every.put(2, factors)
        some.put(2, factors)
        assert some.spilled == spill and some.nbytes * 3 == every.nbytes * 2
        for block in "QKVO":
            want = every.get(slice(0, 4), slice(1, 3), block=block).rows(block)
            got = some.get(slice(0, 4), slice(1, 3), block=block).rows(block)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert want[2:].abs().sum() > 0 and want[:2].abs().sum() == 0  # samples 2-3 were put
        with pytest.raises(ValueError, match="layers 0..1 are not all held by this store .it holds 1..2"):
            some.get(slice(0, 4), slice(0, 2))


def test_the_plan_of_a_rank_is_made_for_its_layers():
    """A rank that scores 6 of 12 layers gets at most 6 layers per contraction, and holds factors that one process
    of the same budget would spill."""
    from tl_circuits.interference import memory
    from tl_circuits.models.spec import ModelSpec

    spec = ModelSpec(12, 12, 12, 768, 64, 1000, 64, False, False)
    total = 128 * memory.factor_bytes_per_sample(spec, 64)
    kwargs = dict(n_left=64, n_right=64, n_samples=128, engine_per_sample=10**8, budget_gb=6.0)
    one = memory.plan_run(spec, factor_bytes=total, **kwargs)
    rank = memory.plan_run(spec, factor_bytes=total // 2, n_layers_held=6, **kwargs)
    assert one.spill and not rank.spill
    few = dict(kwargs, n_left=4, n_right=4, n_samples=8)  # small operands: many layers per contraction
    assert memory.plan_run(spec, factor_bytes=total // 16, **few).layer_group == 10
    assert memory.plan_run(spec, factor_bytes=total // 32, n_layers_held=6, **few).layer_group == 6
