"""Every architecture of the support table (tests/architectures/zoo.py), bridged by TransformerLens itself,
against references that use nothing of tl_circuits (tests/architectures/references.py):

- every circuit × replacement of a freeze equals the unwrapped HF model with that head's attention
  probabilities (QK) or its z before the output projection (OV) edited by hand, and every other head — GQA and
  multi-query siblings included — is bit-identical to the clean run;
- per-sample gradients equal a per-sample ``loss.backward()`` loop on the HF model, rows sliced by hand from its
  own (fused or split) projection gradients, padded samples included;
- ``compute_interference``, ``freeze_sweep`` and the rest run, and leave the bridge as it was (parameters, storage,
  ``.grad``, ``requires_grad``, hooks, mode, outputs).

Requires a TransformerLens with ``TransformerBridge`` (3.x and 4.x; CI runs it on 4.3.0).
"""

from __future__ import annotations

import pytest
import torch

from tests.architectures import references, zoo
from tests.reference import assert_same_state, model_state
from tl_circuits import (
    GradientConfig,
    compute_interference,
    compute_mean_activations,
    freeze,
    freeze_sweep,
    model_spec,
    per_sample_gradients,
)

pytest.importorskip("transformer_lens.model_bridge")

QUIET = dict(progress=False)
LAYER, HEAD, SEED = 1, 1, 3
NAMES = list(zoo.ARCHS)
CASES = [(c, r) for c in ("qk", "ov", "both") for r in ("zero", "mean", "noise", "resample", "identity")
         if not (r == "identity" and c != "qk")]


def _bridge_run(model, tokens, circuit=None, replacement=None, reference=None):
    names = [f"blocks.{layer}.attn.{hook}" for layer in (0, 1) for hook in ("hook_pattern", "hook_z")]
    with torch.no_grad():
        if circuit is None:
            return model.run_with_cache(tokens, names_filter=lambda n: n in names)
        with freeze(model, [(LAYER, HEAD)], circuit, replacement, reference=reference, seed=SEED):
            return model.run_with_cache(tokens, names_filter=lambda n: n in names)


def _assert_siblings_identical(clean, frozen, circuit, what):
    """Layer 0 entirely, and every other head of the frozen layer, bit-identical (their pattern and z)."""
    for key in clean:
        layer = int(key.split(".")[1])
        head_dim = 1 if key.endswith("hook_pattern") else 2
        others = [h for h in range(zoo.N_HEADS) if layer != LAYER or h != HEAD]
        index = torch.tensor(others)
        assert torch.equal(clean[key].index_select(head_dim, index), frozen[key].index_select(head_dim, index)), \
            f"{what}: {key} changed in a head that was not frozen"


@pytest.mark.parametrize("name", zoo.params(pytest))
def test_every_freeze_equals_hand_edited_hf_attention(name):
    model, hf = zoo.bridge(name), zoo.build(name)
    spec = model_spec(model)
    kv_head = spec.kv_head(HEAD)
    tokens, ref_tokens = zoo.tokens(3, 8, seed=1), zoo.tokens(3, 8, seed=2)
    _, ref_records, ref_z = references.run(hf, name, ref_tokens)
    clean_hf = references.run(hf, name, tokens)[0]
    clean_logits, clean_cache = _bridge_run(model, tokens)
    torch.testing.assert_close(clean_logits, clean_hf, rtol=1e-4, atol=1e-4)
    means = compute_mean_activations(model, ref_tokens, **QUIET)
    for circuit, replacement in CASES:
        generator = torch.Generator().manual_seed(SEED)  # the freeze's noise: QK draws (q, then k) before OV (z)
        qk = {LAYER: references.qk_edit(replacement, HEAD, kv_head, ref_records[LAYER], generator)}
        ov = {LAYER: references.ov_edit(replacement, HEAD, ref_z[LAYER], generator)}
        by_hand = references.run(hf, name, tokens, qk if circuit != "ov" else None, ov if circuit != "qk" else None)[0]
        reference = {"mean": means, "resample": ref_tokens}.get(replacement)
        ours, cache = _bridge_run(model, tokens, circuit, replacement, reference)
        what = f"{name} {circuit}-{replacement}"
        torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4, msg=what)
        assert not torch.allclose(by_hand, clean_hf, atol=1e-3), f"{what} changed nothing"
        _assert_siblings_identical(clean_cache, cache, circuit, what)


def _padded(tokens):
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return mask


@pytest.mark.parametrize("name", zoo.params(pytest))
def test_gradients_equal_a_backward_loop_on_the_hf_model(name):
    model, hf = zoo.bridge(name), zoo.build(name)
    tokens = zoo.tokens(3, 8, seed=4)
    mask = _padded(tokens)
    biases = references.has_qkv_biases(name, hf)
    ours = per_sample_gradients(model, tokens, mask, GradientConfig(include_biases=biases, **QUIET))
    samples = [tokens[i][mask[i].bool()] for i in range(tokens.shape[0])]
    expected = references.gradient_loop(name, hf, samples, biases)
    for block in "QKVO":
        torch.testing.assert_close(ours.per_block[block], expected[block], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name} {block}: {m}")
        if expected[block].shape[2] > 1:  # heads are distinguishable: a head mix-up cannot pass
            assert (expected[block][:, :, 0] - expected[block][:, :, 1]).abs().amax() > 1e-3


@pytest.mark.parametrize("name", zoo.params(pytest))
def test_interference_and_sweep_run_and_leave_the_bridge_unchanged(name):
    model = zoo.bridge(name)
    tokens, ref_tokens = zoo.tokens(3, 8, seed=1), zoo.tokens(3, 8, seed=2)
    a, b = zoo.tokens(3, 6, seed=5), zoo.tokens(2, 6, seed=6)
    results = {}
    calls = {
        "freeze": lambda: _bridge_run(model, tokens, "both", "resample", ref_tokens),
        "straight-through freeze + gradients": lambda: _straight_through_gradients(model, a),
        "gradients": lambda: per_sample_gradients(model, a, _padded(a), GradientConfig(**QUIET)),
        "direct refused": lambda: pytest.raises(ValueError, per_sample_gradients, model, a,
                                                config=GradientConfig(method="direct", **QUIET)),
        "interference": lambda: results.setdefault("interference", compute_interference(
            model, a, b, **QUIET)),
        "sweep": lambda: results.setdefault("sweep", freeze_sweep(model, tokens, **QUIET)),
    }
    model.run_with_cache(tokens)  # TransformerLens adds some hooks lazily, at the first forward and run_with_cache
    for what, call in calls.items():
        before = model_state(model, tokens)
        call()
        assert_same_state(before, model_state(model, tokens), f"{name} {what}")
    for block in "QKVO":
        assert torch.isfinite(results["interference"].scores[block]).all()
    sweep = results["sweep"]
    for circuit in ("qk", "ov"):  # one cell of the sweep against the freeze it stands for
        with torch.no_grad(), freeze(model, [(LAYER, HEAD)], circuit, "zero"):
            loss = model(tokens, return_type="loss")
        torch.testing.assert_close(sweep.frozen[circuit][LAYER, HEAD], loss, rtol=1e-5, atol=1e-5)
        assert sweep.effect[circuit].abs().amax() > 1e-4


def _straight_through_gradients(model, tokens):
    with freeze(model, [(LAYER, HEAD)], "both", "zero", preserve_gradients=True):
        grads = per_sample_gradients(model, tokens, config=GradientConfig(**QUIET))
    assert grads.per_block["Q"][:, LAYER, HEAD].abs().amax() > 0  # W_Q of the frozen head still learns


def test_reference_guard_names_the_layer_when_nothing_was_captured():
    """Drift guard (issue #20): a layer whose attention the HF reference did not see is a clear failure."""
    with pytest.raises(AssertionError, match=r"captured no attention probabilities for layer 1 \(transformers "):
        references.check_records({0: {}}, n_layers=2)


@pytest.mark.parametrize("name", ["FalconForCausalLM", "BloomForCausalLM"])
def test_reference_guard_fails_when_hf_attention_differs_from_the_hand_one(name):
    """The hand attention of the fused families is checked against HF's own at every layer: an HF model that
    computes something else from its q/k/v (here: its fused projection output changed after the reference read
    it) stops the reference with a message naming the layer, instead of giving a wrong reference."""
    hf = zoo.build(name, seed=0)
    tokens = torch.randint(0, zoo.D_VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    assert references.run(hf, name, tokens)[1].keys() == {0, 1}  # unchanged model: the guard passes
    fused = references.attention_module(hf, 1).query_key_value
    with torch.no_grad(), references._hooked_patch(hf, name, {}, {}):
        handle = fused.register_forward_hook(lambda module, args, out: out * 1.5)  # after the reference's hook
        try:
            with pytest.raises(AssertionError, match=rf"hand attention of layer 1 does not reproduce {name}'s own"):
                hf(tokens)
        finally:
            handle.remove()
