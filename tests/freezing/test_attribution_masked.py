"""A padded attribution sweep and a layer/head subset (docs/spec.md §1.9, §1.7, §0.7) against independent references:
the exact sweep with the same masks (verification), each sample trimmed to its tokens and estimated alone (padding
adds nothing), the unpadded full-grid run (a selection's cells), and freeze_sweep's own refusals.
The convergence of padded estimates to the exact effect is in test_attribution.py.
"""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tests.architectures import zoo
from tl_circuits import attribution_sweep, freeze_sweep

QUIET = dict(progress=False)


def padded_task(seed: int = 1):
    """4 samples of 10 positions: sample 1 left-padded by 3, sample 2 right-padded from 7; their corrupted twins
    padded the same way; a loss mask counting a few predictions (some on padding: ignored)."""
    tokens, mask = builders.padded_tokens(4, 10, seed, right_from=7)
    corrupted = builders.random_tokens(4, 10, seed=seed + 10)
    loss_mask = torch.zeros_like(tokens)
    loss_mask[:, 4:7] = 1
    loss_mask[1, 1] = 1  # padding: ignored
    return tokens, mask, corrupted, loss_mask


@pytest.mark.parametrize("replacement", ["resample", "zero"])
def test_verified_cells_equal_the_padded_exact_sweep(model, replacement):
    """verify=k on a padded batch: the verified cells hold freeze_sweep(..., attention_mask=, loss_mask=, cells=)'s
    per-sample effects exactly (the same exact sweep, the same masks), the rest are estimates."""
    tokens, mask, corrupted, loss_mask = padded_task()
    reference = corrupted if replacement == "resample" else None
    result = attribution_sweep(model, tokens, replacement=replacement, reference=reference, per_sample=True,
                               verify=3, attention_mask=mask, loss_mask=loss_mask, **QUIET)
    cells = [tuple(cell) for cell in result.settings["verified_cells"]]
    assert len(cells) == 6 and result.settings["attention_mask"] is True
    exact = freeze_sweep(model, tokens, circuits=("qk", "ov"), replacement=replacement, reference=reference,
                         per_sample=True, attention_mask=mask, loss_mask=loss_mask, cells=cells, **QUIET)
    assert result.clean == exact.clean
    for circuit in ("qk", "ov"):
        verified = result.verified[circuit]
        torch.testing.assert_close(result.per_sample_effect[circuit][:, verified],
                                   exact.per_sample_effect[circuit][:, verified], rtol=0, atol=0)
        torch.testing.assert_close(result.exact[circuit][verified], exact.effect[circuit][verified], rtol=0, atol=0)
        assert torch.isnan(result.exact[circuit][~verified]).all()
        torch.testing.assert_close(result.per_sample_effect[circuit][:, ~verified],
                                   result.per_sample_estimate[circuit][:, ~verified].double())
    assert result.settings["loss"] == exact.settings["loss"]


def test_missed_bound_runs_with_the_padding(mha_model):
    """The bound's clean run is the sweep's (else check_same_clean refuses): it runs with the mask."""
    tokens, mask, corrupted, loss_mask = padded_task()
    result = attribution_sweep(mha_model, tokens, replacement="resample", reference=corrupted, verify=2,
                               missed_confidence=0.9, attention_mask=mask, loss_mask=loss_mask, **QUIET)
    assert result.missed["qk"].n_unverified == 8 - 2 and result.missed["ov"].bound >= 0
    with pytest.raises(ValueError, match="clean metric"):  # the same bound without the mask: another clean metric
        result.bound_missed(mha_model, tokens, reference=corrupted, **QUIET)


def trimmed(tokens, mask, i):
    return tokens[i][mask[i].bool()][None]


@pytest.mark.parametrize("replacement", ["resample", "zero"])
def test_a_padded_samples_estimate_is_that_sample_alone_unpadded(model, replacement):
    """Each padded sample's per-sample estimate equals an attribution sweep of that sample alone, trimmed to its
    tokens (its corrupted twin trimmed alike): the padding is masked in the forward (keys), gets no gradient, and the
    models under test number positions from the first valid token (HookedTransformer: its offset position ids;
    bridges: position ids from the attention mask), so left padding holds too."""
    tokens, mask, corrupted, _ = padded_task(seed=3)
    reference = corrupted if replacement == "resample" else None
    padded = attribution_sweep(model, tokens, replacement=replacement, reference=reference, per_sample=True,
                               attention_mask=mask, **QUIET)
    for i in range(4):
        alone = attribution_sweep(model, trimmed(tokens, mask, i), replacement=replacement,
                                  reference=None if reference is None else trimmed(corrupted, mask, i),
                                  per_sample=True, **QUIET)
        torch.testing.assert_close(padded.clean_per_sample[i], alone.clean_per_sample[0], rtol=1e-5, atol=1e-6)
        for circuit in ("qk", "ov"):  # float32 activations, reductions over other shapes
            torch.testing.assert_close(padded.per_sample_estimate[circuit][i], alone.per_sample_estimate[circuit][0],
                                       rtol=1e-4, atol=1e-6, msg=lambda m: f"sample {i} {circuit}: {m}")


# ----- layer and head subsets --------------------------------------------------------------------------------------

def test_a_selection_keeps_the_full_runs_cells_and_is_nan_elsewhere(model):
    """layers=/heads=: the selected cells equal the full run's exactly (one forward and backward, the same numbers),
    every other cell NaN; only selected cells are verified and bounded; settings["selection"] records it."""
    tokens, mask, corrupted, loss_mask = padded_task(seed=5)
    kwargs = dict(replacement="resample", reference=corrupted, per_sample=True, attention_mask=mask,
                  loss_mask=loss_mask, **QUIET)
    full = attribution_sweep(model, tokens, **kwargs)
    some = attribution_sweep(model, tokens, layers=[1], heads=[0, 2], verify=1, missed_confidence=0.5, **kwargs)
    chosen = torch.zeros(full.estimate["qk"].shape, dtype=torch.bool)
    chosen[1, [0, 2]] = True
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(some.per_sample_estimate[circuit][:, chosen],
                                   full.per_sample_estimate[circuit][:, chosen], rtol=0, atol=0)
        assert torch.isnan(some.per_sample_estimate[circuit][:, ~chosen]).all()
        assert torch.isnan(some.estimate[circuit][~chosen]).all()
        assert (some.verified[circuit] & ~chosen).sum() == 0 and some.n_verified[circuit] == 1
        assert some.missed[circuit].n_unverified == 1
        assert all(cell[0] == 1 and cell[1] in (0, 2) for group in some.missed[circuit].group_cells for cell in group)
    assert some.settings["selection"] == {"layers": [1], "heads": [0, 2]} and "selection" not in full.settings
    fraction = attribution_sweep(model, tokens, layers=[1], heads=[0, 2], verify=0.5, **kwargs)
    assert fraction.n_verified == {"qk": 1, "ov": 1}  # half of the 2 selected cells, not of all 8


# ----- errors: freeze_sweep's -------------------------------------------------------------------------------------

def test_mismatched_reference_padding_is_refused_as_freeze_sweep_refuses(mha_model):
    tokens, mask, corrupted, _ = padded_task()
    shorter = mask.clone()
    shorter[3, :1] = 0
    for sweep in (attribution_sweep, freeze_sweep):
        with pytest.raises(ValueError, match=r"samples \[3\]: a clean sample and its RESAMPLE reference row differ in "
                                             r"length \(sample 3: 10 valid tokens, its reference row 9\)"):
            sweep(mha_model, tokens, replacement="resample", reference=corrupted, attention_mask=mask,
                  reference_attention_mask=shorter, **QUIET)
    flipped = mask.clone()
    flipped[2] = mask[2].flip(0)
    with pytest.raises(ValueError, match=r"samples \[2\]: .* padded differently"):
        attribution_sweep(mha_model, tokens, replacement="resample", reference=corrupted, attention_mask=mask,
                          reference_attention_mask=flipped, **QUIET)
    with pytest.raises(ValueError, match="per-sample corrupted batch of the clean shape"):
        attribution_sweep(mha_model, tokens, replacement="resample", reference=corrupted[:1], attention_mask=mask,
                          **QUIET)
    with pytest.raises(ValueError, match="reference_attention_mask is the padding of RESAMPLE reference tokens"):
        attribution_sweep(mha_model, tokens, attention_mask=mask, reference_attention_mask=mask, **QUIET)
    with pytest.raises(ValueError, match="attention mask of tokens has shape"):
        attribution_sweep(mha_model, tokens, attention_mask=mask[:, :5], **QUIET)


def test_padded_qk_zero_on_a_delegating_bridge_is_refused():
    """GPT-J's attention is Hugging Face's (the z route): the frozen pattern cannot see the padding."""
    model = zoo.bridge("GPTJForCausalLM")
    tokens = zoo.tokens(2, 6)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    for replacement in ("zero", "mean"):
        reference = tokens if replacement == "mean" else None
        with pytest.raises(ValueError, match=f"padded QK-{replacement.upper()} sweep is not exact on this bridge"):
            attribution_sweep(model, tokens, replacement=replacement, reference=reference, attention_mask=mask,
                              **QUIET)
    ov = attribution_sweep(model, tokens, circuits=("ov",), attention_mask=mask, **QUIET)  # OV sees no padding
    assert torch.isfinite(ov.estimate["ov"]).all()
