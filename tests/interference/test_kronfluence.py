"""Parity with kronfluence 1.0.1 (an independent implementation of Fisher-normalised pairwise gradient scores):
its diagonal, empirical-Fisher pairwise scores per module equal ours summed over the module's heads (signed variant,
Fisher of task A, absolute damping only), unmasked and with Hugging Face ``labels`` (-100 = no loss), kronfluence's
own convention for which tokens a loss counts.

kronfluence runs the Hugging Face LLaMA (GQA) itself, right-padded with its attention mask; we run a bridge around
a copy with the same weights. Installed in one CI leg with ``pip install --no-deps kronfluence==1.0.1 einconv
opt-einsum`` (pinned in that leg's constraints); skipped where it is not installed.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests import builders
from tl_circuits import GradientConfig, InterferenceConfig, compute_interference, loss_mask_from_labels

kronfluence = pytest.importorskip("kronfluence")

DAMPING = 1e-6
PROJECTIONS = {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj"}


def task(n: int, seed: int, masked: bool):
    """Right-padded tokens, their attention mask and HF labels (the prompt's first 4 tokens and padding -100)."""
    tokens = builders.random_tokens(n, 10, seed=seed)
    mask = torch.ones_like(tokens)
    for i in range(n):
        mask[i, 10 - i % 3:] = 0  # 0, 1 or 2 padding tokens
    labels = tokens.masked_fill(mask == 0, -100)
    if masked:
        labels[:, :4] = -100
        labels[1, 6] = -100
    return tokens, mask, labels


def kronfluence_scores(train, query) -> dict[str, torch.Tensor]:
    """{"Q0": [n_train, n_query], ...}: kronfluence's per-module pairwise scores, transposed to (train, query)."""
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, Task
    from kronfluence.analyzer import prepare_model
    from torch.utils.data import TensorDataset

    hf = builders.hf_llama_model(0)
    n_layers = hf.config.num_hidden_layers
    tracked = [f"model.layers.{layer}.self_attn.{p}" for layer in range(n_layers) for p in PROJECTIONS.values()]

    def per_sample_losses(batch, model):
        tokens, mask, labels = batch
        logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]  # HF's shift: the logits at p are scored against labels[:, p + 1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=-100, reduction="none").view(targets.shape)
        return nll.sum(1) / (targets != -100).sum(1)  # each sample's token mean over its labelled tokens

    class Masked(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return per_sample_losses(batch, model).sum()

        def compute_measurement(self, batch, model):
            return per_sample_losses(batch, model).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch[1]

    import tempfile

    model = prepare_model(hf, Masked())
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("parity", model, Masked(), cpu=True, disable_tqdm=True, output_dir=folder)
        analyzer.fit_all_factors("f", TensorDataset(*train), per_device_batch_size=len(train[0]),
                                 factor_args=FactorArguments(strategy="diagonal", use_empirical_fisher=True))
        analyzer.compute_pairwise_scores("s", "f", TensorDataset(*query), TensorDataset(*train),
                                         per_device_query_batch_size=len(query[0]),
                                         per_device_train_batch_size=len(train[0]),
                                         score_args=ScoreArguments(damping_factor=DAMPING,
                                                                   compute_per_module_scores=True))
        scores = analyzer.load_pairwise_scores("s")
    inverse = {v: k for k, v in PROJECTIONS.items()}
    out = {}
    for name, s in scores.items():  # [n_query, n_train] per module
        layer, proj = re.match(r"model\.layers\.(\d+)\.self_attn\.(\w+)", name).groups()
        out[f"{inverse[proj]}{layer}"] = s.double().T
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_pairwise_scores_equal_kronfluence(masked):
    train, query = task(5, seed=1, masked=masked), task(4, seed=2, masked=masked)
    theirs = kronfluence_scores(train, query)
    cfg = InterferenceConfig(gradients=GradientConfig(progress=False), variant="signed", fisher_source="a",
                             damping_abs=DAMPING, damping_rel=0.0)
    (tokens_a, mask_a, labels_a), (tokens_b, mask_b, labels_b) = train, query
    result = compute_interference(builders.llama_bridge(0), tokens_a, tokens_b, attention_mask_a=mask_a,
                                  attention_mask_b=mask_b, loss_mask_a=loss_mask_from_labels(labels_a, tokens_a),
                                  loss_mask_b=loss_mask_from_labels(labels_b, tokens_b), config=cfg)
    assert result.settings["loss"]["a"]["counted_predictions"]["total"] == int((labels_a[:, 1:] != -100).sum())
    scale = max(float(s.abs().max()) for s in theirs.values())
    for key, expected in theirs.items():
        ours = result.scores[key[0]][:, :, int(key[1:])].double().sum(-1)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{key}: {m}")
    if masked:  # the mask matters: the unmasked loss gives other scores
        plain = compute_interference(builders.llama_bridge(0), tokens_a, tokens_b, attention_mask_a=mask_a,
                                     attention_mask_b=mask_b, config=cfg)
        assert not torch.allclose(plain.scores["Q"].double().sum(-1)[..., 0], theirs["Q0"], rtol=1e-2)
