"""One loss per task in the command's report (issue #21 item 3): its freeze sweep, its interference map, the pooled
matrix behind the permutation test and the conflict test all score the same counted predictions, the bundled tasks'
``scored`` positions. References: ``compute_interference`` called directly with the tasks' loss masks, and the
per-sample loss written by hand (a plain masked cross-entropy of the model's logits). Each test also checks that the
all-token convention gives clearly different numbers, so a command that went back to all-token losses fails."""

from __future__ import annotations

import json
import statistics

import numpy as np
import torch

from tests.cli.helpers import json_grid
from tl_circuits import InterferenceConfig, compute_interference


def hand_masked_losses(model, tokens, counted) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy over ``counted`` predictions (position p: token p + 1)."""
    with torch.no_grad():
        logits = model(tokens)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), tokens[:, 1:], reduction="none")
    weight = counted[:, :-1].double()
    return (nll * weight).sum(1) / weight.sum(1)


def test_the_map_and_the_pooled_tests_use_the_scored_loss(bundled_report):
    """The report's map (and the permutation test's observed statistic, from the pooled matrix) equal
    compute_interference with loss_mask_a/_b = the tasks' scored masks, and not the all-token map."""
    out, model = bundled_report["out"], bundled_report["model"]
    batch_a, batch_b, masked = bundled_report["batch_a"], bundled_report["batch_b"], bundled_report["interference"]
    all_tokens = compute_interference(model, batch_a.tokens, batch_b.tokens, attention_mask_a=batch_a.attention_mask,
                                      attention_mask_b=batch_b.attention_mask,
                                      config=InterferenceConfig(variant="signed", fisher_source="pooled"),
                                      progress=False)
    data = json.loads((out / "report.json").read_text())
    for block in "QKVO":
        reported = np.array(json_grid(data["interference"]["mean"][block]))
        observed = np.array(json_grid(data["statistics"]["observed"][block]))
        scale = float(masked.mean[block].abs().max())
        np.testing.assert_allclose(reported, masked.mean[block].numpy(), rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(observed, reported, rtol=1e-5, atol=1e-6 * scale)
    difference = max(float((masked.mean[b] - all_tokens.mean[b]).abs().max() / masked.mean[b].abs().max())
                     for b in "QKVO")
    assert difference > 0.1  # the two conventions are far apart here, so the comparison above can tell them apart


def test_the_sweep_scores_the_same_predictions_as_the_gradients(bundled_report):
    """The sweep's clean loss is the hand-written scored loss (not the all-token one), and the sweep, the map, the
    permutation and the conflict test each record the same counted predictions per task."""
    out, model = bundled_report["out"], bundled_report["model"]
    data = json.loads((out / "report.json").read_text())
    for key, batch in (("A", bundled_report["batch_a"]), ("B", bundled_report["batch_b"])):
        real = torch.ones_like(batch.tokens) if batch.attention_mask is None else batch.attention_mask
        valid = torch.zeros_like(batch.scored)
        valid[:, :-1] = (real[:, :-1] > 0) & (real[:, 1:] > 0)
        scored = hand_masked_losses(model, batch.tokens, batch.scored).mean().item()
        every_token = hand_masked_losses(model, batch.tokens, valid).mean().item()
        assert abs(scored - every_token) > 0.05  # the two losses differ, so the next line tells them apart
        assert abs(data["sweep"][key]["clean"] - scored) < 1e-4 * abs(scored)
        counts = batch.scored.sum(1).tolist()
        expected = {"min": min(counts), "median": statistics.median(counts), "max": max(counts), "total": sum(counts)}
        loss = data["settings"]["loss"][key]
        assert loss["scored"] == "loss mask" and loss["loss_mask"] is True
        assert loss["counted_predictions"] == expected
        assert data["sweep"][key]["settings"]["loss"]["counted_predictions"] == expected
        for recorded in (data["interference"]["settings"]["loss"], data["statistics"]["loss"],
                         data["conflict"]["test"]["loss"]):
            assert recorded[key.lower()]["counted_predictions"] == expected
