"""A padded, loss-masked sweep (docs/spec.md §1.7, §2.1) against a hand loop: each sample trimmed to its tokens and
run alone, frozen with ``tl_circuits.freeze`` (or patched by hand from its own corrupted row), its loss a Python loop
over the counted positions. The padding must be ignored by the forward (the frozen pattern), not only the metric.
"""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tests.architectures import zoo
from tests.reference import hand_masked_nll
from tl_circuits import freeze, freeze_sweep
from tl_circuits.models import model_spec

QUIET = dict(progress=False)


def padded_task(n: int = 4, pos: int = 10, seed: int = 1):
    tokens, mask = builders.padded_tokens(n, pos, seed, right_from=7)
    loss_mask = torch.zeros_like(tokens)
    loss_mask[:, 4:7] = 1
    loss_mask[0, 2] = 1
    loss_mask[1, 1] = 1  # padding: ignored
    return tokens, mask, loss_mask


def alone(model, tokens, mask, loss_mask, i, hooks=()):
    """Sample i's masked loss, trimmed to its tokens and run alone (no padding anywhere), with forward ``hooks``."""
    kept = mask[i].nonzero().flatten()
    sample = tokens[i][kept]
    with torch.no_grad():
        logits = model.run_with_hooks(sample[None], fwd_hooks=list(hooks))[0]
    return float(hand_masked_nll(loss_mask)(logits, sample, i, kept))


@pytest.mark.parametrize("replacement", ["zero", "identity"])
def test_masked_per_sample_sweep_equals_a_hand_loop(model, replacement):
    tokens, mask, loss_mask = padded_task()
    spec = model_spec(model)
    circuits = ("qk",) if replacement == "identity" else ("qk", "ov")
    result = freeze_sweep(model, tokens, circuits=circuits, replacement=replacement, per_sample=True,
                          attention_mask=mask, loss_mask=loss_mask, chunk_size=8, **QUIET)
    clean = torch.tensor([alone(model, tokens, mask, loss_mask, i) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(result.clean_per_sample, clean, rtol=1e-5, atol=1e-5)
    for circuit in circuits:
        for layer in range(spec.n_layers):
            for head in range(spec.n_heads):
                frozen = []
                for i in range(4):
                    with freeze(model, [(layer, head)], circuit, replacement):
                        frozen.append(alone(model, tokens, mask, loss_mask, i))
                torch.testing.assert_close(result.per_sample_effect[circuit][:, layer, head],
                                           torch.tensor(frozen, dtype=torch.float64) - clean, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{circuit} L{layer}H{head}: {m}")
    assert result.settings["attention_mask"] and result.settings["loss"]["scored"] == "loss mask"
    assert result.settings["loss"]["counted_predictions"]["total"] == 4 + 3 + 2 + 3


def test_the_batch_metric_is_the_mean_of_per_sample_means(mha_model):
    """``per_sample=False`` with masks: the mean over samples of each sample's token mean (not a token mean)."""
    tokens, mask, loss_mask = padded_task()
    kwargs = dict(attention_mask=mask, loss_mask=loss_mask, **QUIET)
    batch = freeze_sweep(mha_model, tokens, **kwargs)
    per_sample = freeze_sweep(mha_model, tokens, per_sample=True, **kwargs)
    clean = [alone(mha_model, tokens, mask, loss_mask, i) for i in range(4)]
    assert batch.clean == pytest.approx(sum(clean) / 4, abs=1e-5)
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(batch.effect[circuit], per_sample.effect[circuit], rtol=0, atol=2e-6)


def test_padding_alone_changes_nothing(mha_model):
    """Padded samples with a mask give the per-sample effects of the unpadded batch (every sample as long)."""
    tokens = builders.random_tokens(3, 8, seed=4)
    padded = torch.cat([torch.zeros(3, 2, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), torch.ones_like(tokens)], dim=1)
    plain = freeze_sweep(mha_model, tokens, per_sample=True, **QUIET)
    masked = freeze_sweep(mha_model, padded, per_sample=True, attention_mask=mask, **QUIET)
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(masked.per_sample_effect[circuit], plain.per_sample_effect[circuit], rtol=1e-4,
                                   atol=1e-5)


def test_per_sample_resample_equals_patching_each_sample_from_its_own_row(model):
    """Sample i patched from its own corrupted row i (same padding), by hand: the corrupted row's pattern (QK) or
    z (OV) of the head written into the clean run of that sample alone."""
    tokens, mask, loss_mask = padded_task(seed=2)
    corrupted = builders.random_tokens(4, 10, seed=9)
    spec = model_spec(model)
    result = freeze_sweep(model, tokens, replacement="resample", reference=corrupted, per_sample=True,
                          attention_mask=mask, loss_mask=loss_mask, **QUIET)
    clean = torch.tensor([alone(model, tokens, mask, loss_mask, i) for i in range(4)], dtype=torch.float64)
    for circuit, kind, head_dim in (("qk", "pattern", 1), ("ov", "z", 2)):
        for layer in range(spec.n_layers):
            name = spec.hook_name(layer, kind)
            caches = []
            for i in range(4):
                with torch.no_grad():
                    _, cache = model.run_with_cache(corrupted[i][mask[i].bool()][None], names_filter=[name])
                caches.append(cache[name])
            for head in range(spec.n_heads):
                def patch(act, hook, ref, head=head):
                    act = act.clone()
                    index = [slice(None)] * act.ndim
                    index[head_dim] = head
                    act[tuple(index)] = ref[tuple(index)]
                    return act
                frozen = [alone(model, tokens, mask, loss_mask, i,
                                [(name, lambda a, hook, r=caches[i]: patch(a, hook, r))]) for i in range(4)]
                torch.testing.assert_close(result.per_sample_effect[circuit][:, layer, head],
                                           torch.tensor(frozen, dtype=torch.float64) - clean, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{circuit} L{layer}H{head}: {m}")


def test_full_forward_route_takes_the_mask():
    """A bridge that cannot restart at a layer (native) runs the whole model per variant, with the mask."""
    model = builders.native_bridge(0)
    tokens, mask, loss_mask = padded_task()
    result = freeze_sweep(model, tokens, circuits=("ov",), per_sample=True, attention_mask=mask, loss_mask=loss_mask,
                          **QUIET)
    assert result.settings["restart"] == "full forward"
    clean = torch.tensor([alone(model, tokens, mask, loss_mask, i) for i in range(4)], dtype=torch.float64)
    for layer, head in ((0, 1), (1, 3)):
        frozen = []
        for i in range(4):
            with freeze(model, [(layer, head)], "ov", "zero"):
                frozen.append(alone(model, tokens, mask, loss_mask, i))
        torch.testing.assert_close(result.per_sample_effect["ov"][:, layer, head],
                                   torch.tensor(frozen, dtype=torch.float64) - clean, rtol=1e-4, atol=1e-5)


# ----- errors ------------------------------------------------------------------------------------------------------

def test_resample_length_mismatch_names_the_sample(mha_model):
    tokens, mask, _ = padded_task()
    corrupted = builders.random_tokens(4, 10, seed=9)
    corrupted_mask = mask.clone()
    corrupted_mask[3, :1] = 0  # sample 3's corrupted prompt is one token shorter
    with pytest.raises(ValueError, match=r"samples \[3\]: a clean sample and its RESAMPLE reference row differ in "
                                         r"length \(sample 3: 10 valid tokens, its reference row 9\)"):
        freeze_sweep(mha_model, tokens, replacement="resample", reference=corrupted, attention_mask=mask,
                     reference_attention_mask=corrupted_mask, **QUIET)
    corrupted_mask = mask.clone()
    corrupted_mask[2] = mask[2].flip(0)  # right padding turned into left padding
    with pytest.raises(ValueError, match=r"samples \[2\]: .* padded differently"):
        freeze_sweep(mha_model, tokens, replacement="resample", reference=corrupted, attention_mask=mask,
                     reference_attention_mask=corrupted_mask, **QUIET)


def test_resample_references_must_be_per_sample_with_padding(mha_model):
    tokens, mask, _ = padded_task()
    with pytest.raises(ValueError, match="per-sample corrupted batch of the clean shape"):
        freeze_sweep(mha_model, tokens, replacement="resample", reference=tokens[:1], attention_mask=mask, **QUIET)
    with pytest.raises(ValueError, match="reference_attention_mask is the padding of RESAMPLE reference tokens"):
        freeze_sweep(mha_model, tokens, attention_mask=mask, reference_attention_mask=mask, **QUIET)


def test_sweep_loss_mask_errors(mha_model):
    tokens, mask, loss_mask = padded_task()
    loss_mask[2] = 0
    with pytest.raises(ValueError, match=r"samples \[2\] of tokens have no counted prediction"):
        freeze_sweep(mha_model, tokens, attention_mask=mask, loss_mask=loss_mask, **QUIET)
    with pytest.raises(ValueError, match="attention mask of tokens has shape"):
        freeze_sweep(mha_model, tokens, attention_mask=mask[:, :5], **QUIET)
    with pytest.raises(ValueError, match="a metric of your own gets the logits only"):
        freeze_sweep(mha_model, tokens, lambda logits: logits.mean(), loss_mask=loss_mask, **QUIET)


def test_padded_qk_sweep_on_a_delegating_bridge_is_refused():
    model = zoo.bridge("GPTJForCausalLM")
    tokens = zoo.tokens(2, 6)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="padded QK-ZERO sweep is not exact on this bridge"):
        freeze_sweep(model, tokens, attention_mask=mask, **QUIET)
    freeze_sweep(model, tokens, circuits=("ov",), attention_mask=mask, **QUIET)  # OV sees no padding: runs
