"""Restarting a TransformerBridge at a layer (tl_circuits.models.bridge_forward) equals its full forward, for
every architecture of the support table, padded or not, with variants stacked along the batch, and under a
freeze (the restarted blocks fire every hook)."""

from __future__ import annotations

import pytest
import torch

from tests.architectures import zoo
from tl_circuits import freeze
from tl_circuits.models.bridge_forward import prepare_restart, restart_problem, run_from_layer

pytest.importorskip("transformer_lens.model_bridge")


@pytest.mark.parametrize("name", zoo.params(pytest))
def test_restart_equals_the_full_forward(name):
    model = zoo.bridge(name)
    tokens = zoo.tokens(2, 8, seed=1)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding: the recorded mask is what the restarted blocks use
    assert restart_problem(model) is None
    with torch.no_grad():
        full, cache = model.run_with_cache(tokens, attention_mask=mask,
                                           names_filter=lambda n: n.endswith("hook_resid_pre"))
        other, other_cache = model.run_with_cache(zoo.tokens(2, 8, seed=2), attention_mask=mask,
                                                  names_filter=lambda n: n.endswith("hook_resid_pre"))
        restart = prepare_restart(model, tokens, mask)
        for layer in range(2):
            resid, other_resid = (c[f"blocks.{layer}.hook_resid_pre"] for c in (cache, other_cache))
            torch.testing.assert_close(restart.run_from_layer(resid, layer), full, rtol=1e-5, atol=1e-5)
            # three variants of the batch stacked along it, each with the recorded mask of its samples
            stacked = restart.run_from_layer(torch.cat([resid, other_resid, resid]), layer)
            torch.testing.assert_close(stacked, torch.cat([full, other, full]), rtol=1e-5, atol=1e-5)
        with freeze(model, [(1, 1)], "qk", "zero"):
            frozen = model(tokens, attention_mask=mask)
            restarted = restart.run_from_layer(cache["blocks.1.hook_resid_pre"], 1)
        torch.testing.assert_close(restarted, frozen, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(frozen, full, atol=1e-3)
        # the one-call form records its own forward
        torch.testing.assert_close(run_from_layer(model, cache["blocks.1.hook_resid_pre"], 1, tokens, mask), full,
                                   rtol=1e-5, atol=1e-5)


def test_native_bridges_cannot_restart():
    from tl_circuits import load_bundled_model

    model = load_bundled_model("induction-2l", as_bridge=True)
    assert "native" in restart_problem(model)
    with pytest.raises(NotImplementedError, match="cannot restart.*native"):
        prepare_restart(model, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of the recorded batch"):
        restart = prepare_restart(zoo.bridge("GPT2LMHeadModel"), zoo.tokens(2, 6))
        restart.run_from_layer(torch.zeros(3, 6, zoo.D_MODEL), 1)
