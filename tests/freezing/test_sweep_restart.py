"""The sweep restarts a TransformerBridge at each layer (blocks called directly, tl_circuits.models.bridge_forward)
instead of running the whole model per layer: every cell still equals the freeze it stands for, run as one full
forward of the bridge with that head frozen (``freeze`` + ``model(tokens)``), on every architecture of the
support table (ZERO on the representatives by default, the rest under ``-m slow``)."""

from __future__ import annotations

import pytest
import torch

from tests.architectures import zoo
from tl_circuits import compute_mean_activations, freeze, freeze_sweep

pytest.importorskip("transformer_lens.model_bridge")

QUIET = dict(progress=False)


def _per_sample_loss(model, tokens, **freeze_args):
    with torch.no_grad():
        if not freeze_args:
            logits = model(tokens)
        else:
            with freeze(model, **freeze_args):
                logits = model(tokens)
    log_probs = logits[:, :-1].double().log_softmax(-1)
    return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0].mean(-1)


# ZERO on the representatives by default; MEAN and RESAMPLE (references tiled over the stacked copies) and the
# other architectures under -m slow
CASES = [pytest.param(name, replacement, marks=[pytest.mark.slow]
                      if replacement != "zero" or name not in zoo.REPRESENTATIVES else [])
         for name in zoo.ARCHS for replacement in ("zero", "mean", "resample")]


@pytest.mark.parametrize("name, replacement", CASES)
def test_restarted_sweep_equals_one_full_frozen_forward_per_cell(name, replacement):
    model = zoo.bridge(name)
    tokens, other = zoo.tokens(3, 8, seed=11), zoo.tokens(3, 8, seed=12)
    reference = {"zero": None, "mean": compute_mean_activations(model, other), "resample": other}[replacement]
    result = freeze_sweep(model, tokens, replacement=replacement, reference=reference, per_sample=True, **QUIET)
    assert result.settings["restart"] == "blocks"
    clean = _per_sample_loss(model, tokens)
    torch.testing.assert_close(result.clean_per_sample, clean, rtol=1e-5, atol=1e-6)
    for circuit in ("qk", "ov"):
        for layer in range(2):
            for head in range(zoo.N_HEADS):
                frozen = _per_sample_loss(model, tokens, heads=[(layer, head)], circuit=circuit,
                                          replacement=replacement, reference=reference)
                torch.testing.assert_close(result.per_sample_effect[circuit][:, layer, head], frozen - clean,
                                           rtol=1e-4, atol=1e-5, msg=f"{name} {circuit} L{layer}H{head}")


def test_the_sweep_names_its_restart_route():
    from tests import builders

    assert freeze_sweep(zoo.bridge("GPT2LMHeadModel"), zoo.tokens(2, 6), **QUIET).settings["restart"] == "blocks"
    # the TransformerLens-native bridge calls its blocks with more than the residual: the whole model runs
    # (OV only: TransformerLens 3.x's native bridge discards pattern edits)
    native = freeze_sweep(builders.native_bridge(), builders.random_tokens(2, 6), circuits=["ov"], **QUIET)
    assert native.settings["restart"] == "full forward"
    if builders.HAS_HOOKED_TRANSFORMER:
        hooked = freeze_sweep(builders.mha(), builders.random_tokens(2, 6), **QUIET)
        assert hooked.settings["restart"] == "start_at_layer"
