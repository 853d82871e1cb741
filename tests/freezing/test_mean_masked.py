"""MEAN references of padded reference tokens (compute_mean_activations(attention_mask=), docs/spec.md §1.3) against
a hand mean: each sample trimmed to its tokens and run alone (run_with_cache), its activations put back at their
padded positions, and a Python loop averaging, per position, the samples valid there."""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tl_circuits import compute_mean_activations
from tl_circuits.models import model_spec

MODELS = [pytest.param(m, marks=pytest.mark.needs_hooked_transformer) if m.startswith("hooked") else m
          for m in builders.FLOAT64_MODELS]  # a HookedTransformer (TL < 4) and GPT-2 / LLaMA-GQA bridges


def padded_reference():
    """5 samples of 9 positions: sample 1 left-padded by 3, sample 2 right-padded from 6, sample 4 left-padded by 1;
    every sample padded at the last position, so no sample is valid there."""
    tokens, mask = builders.padded_tokens(5, 9, seed=11, right_from=6)
    mask[4, :1] = 0
    mask[:, -1] = 0
    return tokens, mask


def hand_means(model, tokens, mask):
    """{(kind, layer): [pos, head, d_head]} per-position means over valid samples (None where no sample is valid),
    and the mean over every valid (sample, position), from each sample run alone, unpadded."""
    spec = model_spec(model)
    names = {(kind, layer): hook for layer in range(spec.n_layers)
             for kind, hook in (("q", spec.query_hook(layer)), ("k", spec.key_hook(layer)),
                                ("z", spec.hook_name(layer, "z")))}
    placed = {key: {} for key in names}  # key -> {(sample, position): activation [head, d_head]}
    for i in range(tokens.shape[0]):
        kept = mask[i].nonzero().flatten().tolist()
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[i, kept][None], names_filter=lambda n: n in names.values())
        for key, hook in names.items():
            for j, position in enumerate(kept):
                placed[key][(i, position)] = cache[hook][0, j]
    per_position, overall = {}, {}
    for key, values in placed.items():
        overall[key] = torch.stack(list(values.values())).mean(0)
        per_position[key] = [torch.stack([values[(i, t)] for i in range(tokens.shape[0]) if (i, t) in values]).mean(0)
                             if any((i, t) in values for i in range(tokens.shape[0])) else None
                             for t in range(tokens.shape[1])]
    return per_position, overall


@pytest.mark.parametrize("which", MODELS)
def test_masked_mean_is_the_mean_over_valid_positions(which):
    model = builders.padded_float64_model(which)  # float32 LLaMA: rtol 1e-5 still holds for a batch vs one sample
    spec = model_spec(model)
    tokens, mask = padded_reference()
    per_position, overall = hand_means(model, tokens, mask)
    means = compute_mean_activations(model, tokens, attention_mask=mask, chunk_size=2, progress=False)
    flat = compute_mean_activations(model, tokens, attention_mask=mask, per_position=False, progress=False)
    assert means.valid_per_position.tolist() == [3, 4, 4, 5, 5, 5, 4, 4, 0] and means.n_samples == 5
    for (kind, layer), rows in per_position.items():
        got = getattr(means, kind)[layer]
        for t, expected in enumerate(rows):  # the last position: no valid sample, the mean over every valid one
            torch.testing.assert_close(got[t], overall[(kind, layer)] if expected is None else expected,
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind} layer {layer} position {t}: {m}")
        torch.testing.assert_close(getattr(flat, kind)[layer], overall[(kind, layer)], rtol=1e-5, atol=1e-6)
    assert means.k[0].shape[-2] == spec.n_kv_heads


def test_an_all_ones_mask_changes_nothing(mha_model):
    tokens = builders.random_tokens(4, 8, seed=12)
    for per_position in (True, False):
        plain = compute_mean_activations(mha_model, tokens, per_position=per_position, progress=False)
        ones = compute_mean_activations(mha_model, tokens, per_position=per_position, progress=False,
                                        attention_mask=torch.ones_like(tokens))
        for layer in plain.z:
            torch.testing.assert_close(ones.z[layer], plain.z[layer])
            torch.testing.assert_close(ones.q[layer], plain.q[layer])


def test_bad_masks_are_named(mha_model):
    tokens = builders.random_tokens(2, 6, seed=13)
    with pytest.raises(ValueError, match="attention mask of reference tokens has shape"):
        compute_mean_activations(mha_model, tokens, attention_mask=torch.ones(2, 5), progress=False)
    with pytest.raises(ValueError, match="masks every position"):
        compute_mean_activations(mha_model, tokens, attention_mask=torch.zeros_like(tokens), progress=False)
    with pytest.raises(ValueError, match="only 0 and 1"):
        compute_mean_activations(mha_model, tokens, attention_mask=2 * torch.ones_like(tokens), progress=False)
