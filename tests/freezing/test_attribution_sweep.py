"""attribution_sweep: the exact sweep's result shape, verification of its top cells (freeze_sweep ``cells=``), the
missed-effect bound (groups frozen together by hand as the reference), and saving (docs/spec.md §1.9)."""

from __future__ import annotations

import math

import pytest
import torch

from tests import builders
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

from tl_circuits import AttributionResult, SweepResult, attribution_sweep, freeze, freeze_sweep, load
from tl_circuits.freezing.attribution_checks import n_to_verify, top_cells
from tl_circuits.freezing.first_order import first_order_pass


@pytest.fixture(scope="module")
def tokens():
    return builders.random_tokens(3, 8, seed=20)


@pytest.fixture(scope="module")
def corrupted():
    return builders.random_tokens(3, 8, seed=21)


def test_freeze_sweep_cells_are_the_whole_sweeps_cells(mha_model, tokens):
    """``cells=``: those cells equal the whole sweep's (stacked differently: float32 rounding), the rest are NaN."""
    cells = [("ov", 1, 2), ("qk", 0, 3), ("ov", 0, 0)]
    whole = freeze_sweep(mha_model, tokens, circuits=("qk", "ov"), progress=False)
    some = freeze_sweep(mha_model, tokens, circuits=("qk", "ov"), cells=cells, progress=False)
    for circuit in ("qk", "ov"):
        ran = torch.zeros(whole.frozen[circuit].shape, dtype=torch.bool)
        for c, layer, head in cells:
            ran[layer, head] |= c == circuit
        torch.testing.assert_close(some.frozen[circuit][ran], whole.frozen[circuit][ran], rtol=1e-6, atol=1e-6)
        assert torch.isnan(some.frozen[circuit][~ran]).all()
    assert some.settings["cells"] == [["qk", 0, 3], ["ov", 0, 0], ["ov", 1, 2]]  # by layer, circuit, head
    assert whole.settings["cells"] is None


@pytest.mark.parametrize("cells, error, match", [
    ([("both", 0, 0)], ValueError, "not among the swept circuits"),
    ([(0, 0)], ValueError, "triple"),
    ([("qk", 5, 0)], IndexError, "layer 5 out of range"),
    ([], ValueError, "cells is empty"),
])
def test_bad_cells_are_named(mha_model, tokens, cells, error, match):
    with pytest.raises(error, match=match):
        freeze_sweep(mha_model, tokens, circuits=("qk", "ov"), cells=cells, progress=False)


@pytest.mark.filterwarnings("ignore:with 3 samples the exact sign-flip test")
def test_verify_runs_the_top_cells_exactly(mha_model, tokens, corrupted):
    """verify=k: each circuit's k largest |estimate| cells hold their exact effect (the whole exact sweep's), every
    other cell its estimate; the estimates stay beside them; per-sample effects follow."""
    result = attribution_sweep(mha_model, tokens, replacement="resample", reference=corrupted, per_sample=True,
                               verify=3, progress=False)
    exact = freeze_sweep(mha_model, tokens, replacement="resample", reference=corrupted, per_sample=True,
                         progress=False)
    estimate = first_order_pass(mha_model, tokens, None, circuits=["qk", "ov"], replacement="resample",
                                reference=corrupted, per_sample=True).estimate
    for circuit in ("qk", "ov"):
        batch_estimate = estimate[circuit].mean(0)
        chosen = batch_estimate.abs().flatten().argsort(descending=True)[:3]
        mask = torch.zeros(batch_estimate.numel(), dtype=torch.bool)
        mask[chosen] = True
        mask = mask.view(batch_estimate.shape)
        assert torch.equal(result.verified[circuit], mask)
        torch.testing.assert_close(result.estimate[circuit], batch_estimate)
        torch.testing.assert_close(result.effect[circuit][mask], exact.effect[circuit][mask], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.effect[circuit][~mask], batch_estimate[~mask].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.per_sample_effect[circuit][:, mask],
                                   exact.per_sample_effect[circuit][:, mask], rtol=1e-5, atol=1e-6)
        assert torch.isnan(result.exact[circuit][~mask]).all()
    table = result.to_dataframe()
    assert {"estimate", "exact", "verified"} <= set(table.columns) and table.verified.sum() == 6
    assert result.n_verified == {"qk": 3, "ov": 3} and "first-order" in repr(result)
    assert "first-order estimates" in result.settings["estimate"]
    tested = result.test(n_bootstrap=0)  # the paired test runs on the mixed grid
    assert tested.p_value["qk"].shape == (2, 4)


def test_verify_refuses_another_batch(mha_model, tokens):
    result = attribution_sweep(mha_model, tokens, progress=False)
    with pytest.raises(ValueError, match="differs from the attribution sweep's"):
        result.verify(mha_model, builders.random_tokens(3, 8, seed=99), 1, progress=False)


def test_missed_bound_groups_are_frozen_together(mha_model, tokens):
    """Each joint effect equals freezing that group's cells together with ``freeze`` by hand; the bound is their
    largest |value|; rounds follow the requested confidence."""
    result = attribution_sweep(mha_model, tokens, replacement="zero", verify=2, missed_confidence=0.9,
                               missed_groups=2, progress=False)
    clean = float(freeze_sweep(mha_model, tokens, cells=[("qk", 0, 0)], progress=False).clean)
    for circuit, bound in result.missed.items():
        n = int((~result.verified[circuit]).sum())
        assert bound.n_unverified == n == 6 and bound.groups == 2
        assert bound.rounds == math.ceil(math.log2(n / 0.1))
        assert bound.confidence_all == pytest.approx(1 - n * 2.0 ** -bound.rounds) and bound.confidence_all >= 0.9
        assert len(bound.joint_effects) == len(bound.group_cells) == 2 * bound.rounds
        assert bound.bound == max(abs(x) for x in bound.joint_effects)
        for cells, joint in list(zip(bound.group_cells, bound.joint_effects))[:2]:
            assert all(not bool(result.verified[circuit][l, h]) for l, h in cells)
            with freeze(mha_model, [tuple(c) for c in cells], circuit, "zero"), torch.no_grad():
                frozen = float(lm_cross_entropy_loss(mha_model(tokens), tokens))  # the sweep's default metric
            assert joint == pytest.approx(frozen - clean, rel=1e-4, abs=1e-5)
    assert "symmetric about 0" in result.missed["qk"].assumption and "no unverified cell" in str(result.missed["qk"])


def test_save_and_load_keep_every_field(mha_model, tokens, corrupted, tmp_path):
    result = attribution_sweep(mha_model, tokens, replacement="resample", reference=corrupted, per_sample=True,
                               verify=0.25, missed_confidence=0.5, progress=False)
    folder = result.save(tmp_path / "attr")
    loaded = load(folder)   # the folder says what it is
    assert type(loaded) is AttributionResult and type(AttributionResult.load(folder)) is AttributionResult
    for name in ("estimate", "verified", "exact", "per_sample_estimate", "per_sample_exact", "per_sample_effect",
                 "frozen", "per_draw_effect"):
        for circuit, grid in (getattr(result, name) or {}).items():
            back = getattr(loaded, name)[circuit]
            assert back.dtype == grid.dtype and torch.equal(grid.nan_to_num(7.0), back.nan_to_num(7.0)), (name, circuit)
    assert loaded.missed == result.missed and loaded.settings == result.settings
    assert torch.equal(loaded.clean_per_sample, result.clean_per_sample) and loaded.clean == result.clean
    # a reader that knows only exact sweeps refuses estimates rather than take them for freeze effects
    with pytest.raises(ValueError, match="holds a saved AttributionResult, not a SweepResult"):
        SweepResult.load(folder)
    exact = freeze_sweep(mha_model, tokens, progress=False).save(tmp_path / "exact")
    with pytest.raises(ValueError, match="holds a saved SweepResult, not a AttributionResult"):
        AttributionResult.load(exact)
    assert type(load(exact)) is SweepResult


def test_options_are_checked(mha_model, tokens):
    with pytest.raises(ValueError, match="verify must be"):
        attribution_sweep(mha_model, tokens, verify=1.5, progress=False)
    with pytest.raises(ValueError, match="random replacement"):
        attribution_sweep(mha_model, tokens, replacement="noise", progress=False)
    with pytest.raises(ValueError, match="circuits is empty"):
        attribution_sweep(mha_model, tokens, circuits=(), progress=False)
    assert n_to_verify(0.5, 8) == 4 and n_to_verify(20, 8) == 8
    grid = {"ov": torch.tensor([[0.1, -3.0], [float("nan"), 2.0]])}
    assert top_cells(grid, 2) == [("ov", 0, 1), ("ov", 1, 1)]


def test_loss_mask_scores_the_chosen_predictions(mha_model, tokens):
    """With a loss mask, estimates equal those of a hand-written masked loss (log_softmax and gather, each sample's
    mean over its counted predictions), and the verified cells equal freeze_sweep's exact effects under that mask."""
    loss_mask = torch.zeros_like(tokens)
    loss_mask[:, 3:6] = 1
    loss_mask[1, 2] = 1

    def masked_loss(logits):  # loss_mask[i, p]: the prediction of token p + 1 from position p
        logp = logits[:, :-1].double().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        counted = loss_mask[:, :-1].double()
        return -(logp * counted).sum(1) / counted.sum(1)

    result = attribution_sweep(mha_model, tokens, per_sample=True, loss_mask=loss_mask, verify=1.0, progress=False)
    by_hand = first_order_pass(mha_model, tokens, masked_loss, circuits=["qk", "ov"], replacement="zero",
                               per_sample=True)
    exact = freeze_sweep(mha_model, tokens, per_sample=True, loss_mask=loss_mask, progress=False)
    assert result.settings["loss"]["counted_predictions"]["total"] == 10
    for circuit in ("qk", "ov"):
        torch.testing.assert_close(result.per_sample_estimate[circuit], by_hand.estimate[circuit], rtol=1e-5,
                                   atol=1e-7)
        torch.testing.assert_close(result.effect[circuit], exact.effect[circuit], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_mask says what the default metric scores"):
        attribution_sweep(mha_model, tokens, masked_loss, loss_mask=loss_mask, progress=False)
