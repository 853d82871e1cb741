"""The head sweep against TransformerLens patching and against one full frozen forward per head."""

import pytest
import torch
from transformer_lens import patching

from tests import builders
from tl_circuits import freeze, freeze_sweep, model_spec



def test_resample_sweep_equals_tl_patching(model):
    clean, corrupted = builders.random_tokens(3, 10, seed=1), builders.random_tokens(3, 10, seed=2)
    _, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: logits[:, -1, 5].mean()  # noqa: E731
    result = freeze_sweep(model, corrupted, metric, replacement="resample", reference=clean_cache, progress=False)
    expected_qk = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, clean_cache, metric)
    expected_ov = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    torch.testing.assert_close(result.frozen["qk"], expected_qk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.frozen["ov"], expected_ov, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("replacement", ["zero", "mean", "identity"])
@pytest.mark.parametrize("chunk_size", [None, 6])
def test_sweep_equals_one_frozen_forward_per_head(model, replacement, chunk_size):
    spec = model_spec(model)
    tokens = builders.random_tokens(3, 10, seed=1)
    reference = builders.random_tokens(6, 10, seed=3) if replacement == "mean" else None
    circuits = ("qk",) if replacement == "identity" else ("qk", "ov")
    result = freeze_sweep(model, tokens, circuits=circuits, replacement=replacement, reference=reference,
                          chunk_size=chunk_size, progress=False)
    clean = float(model(tokens, return_type="loss"))
    assert result.clean == pytest.approx(clean, abs=1e-6)
    for circuit in circuits:
        for layer in range(spec.n_layers):
            for head in range(spec.n_heads):
                with torch.no_grad(), freeze(model, [(layer, head)], circuit, replacement, reference=reference):
                    expected = float(model(tokens, return_type="loss"))
                assert result.frozen[circuit][layer, head] == pytest.approx(expected, abs=1e-5)
                assert result.effect[circuit][layer, head] == pytest.approx(expected - clean, abs=1e-5)


@pytest.mark.needs_hooked_transformer  # restarting from a cached resid_pre is start_at_layer, HookedTransformer only
def test_sweep_reuses_the_clean_prefix(mha_model, tokens):
    """Layer 0 runs once (the clean run): every frozen run restarts from a cached resid_pre."""
    fired = []
    mha_model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: fired.append(act.shape[0]))
    mha_model.add_hook("blocks.1.hook_resid_pre", lambda act, hook: fired.append(-act.shape[0]))
    try:
        freeze_sweep(mha_model, tokens, progress=False)
    finally:
        mha_model.reset_hooks()
    assert fired.count(tokens.shape[0]) == 1
    assert sum(1 for f in fired if f > 0) == 2  # clean run + the stacked layer-0 pass


def test_sweep_result_helpers(mha_model, tokens):
    result = freeze_sweep(mha_model, tokens, progress=False)
    frame = result.to_dataframe()
    assert len(frame) == 2 * 2 * 4 and set(frame.circuit) == {"qk", "ov"}
    layer, head, effect = result.top_heads(1, "ov")[0]
    assert abs(effect) == pytest.approx(float(result.effect["ov"].abs().max()))
    assert result.plot() is not None


def test_sweep_bad_input(mha_model, tokens):
    with pytest.raises(ValueError, match="IDENTITY"):
        freeze_sweep(mha_model, tokens, replacement="identity", progress=False)
    with pytest.raises(ValueError, match="circuits is empty"):
        freeze_sweep(mha_model, tokens, circuits=(), progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        freeze_sweep(mha_model, tokens + 1000, progress=False)
    with pytest.raises(ValueError, match="noise_scale"):
        freeze_sweep(mha_model, tokens, replacement="noise", noise_scale=-1.0, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        freeze_sweep(mha_model, tokens, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="memory_budget_gb"):
        freeze_sweep(mha_model, tokens, memory_budget_gb=0, progress=False)
    with pytest.raises(ValueError, match="unknown circuit"):
        freeze_sweep(mha_model, tokens, circuits=("qv",), progress=False)


def test_the_budget_sizes_the_stacked_passes(mha_model):
    """memory_budget_gb is what the sweep may allocate: it sets the rows of a stacked forward (the numbers do not
    change); chunk_size sets them directly, and max_batch_rows is its deprecated name."""
    from tl_circuits.deprecation import TLCircuitsDeprecationWarning
    from tl_circuits.interference import memory

    spec = model_spec(mha_model)
    tokens = builders.random_tokens(3, 10, seed=1)
    whole = freeze_sweep(mha_model, tokens, progress=False)
    six_rows = 6.5 * memory.forward_row_bytes(spec, 10) / 2**30       # 6 rows and a half: 6 whole ones
    small = freeze_sweep(mha_model, tokens, memory_budget_gb=six_rows, progress=False)
    assert small.settings["rows_per_pass"] == 6 and whole.settings["rows_per_pass"] > 6
    with pytest.warns(TLCircuitsDeprecationWarning, match="max_batch_rows= is deprecated; use chunk_size="):
        old = freeze_sweep(mha_model, tokens, max_batch_rows=6, progress=False)
    assert old.settings["rows_per_pass"] == 6
    for circuit in whole.frozen:
        torch.testing.assert_close(small.frozen[circuit], whole.frozen[circuit], rtol=1e-5, atol=1e-6)
        assert torch.equal(old.frozen[circuit], small.frozen[circuit])
    with pytest.warns(UserWarning, match="holds the whole batch"):
        freeze_sweep(mha_model, tokens, memory_budget_gb=six_rows / 3, progress=False)
