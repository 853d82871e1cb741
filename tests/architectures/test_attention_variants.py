"""Attention variants whose QK freezes keep what the architecture adds to q·k (docs/spec.md §1.4), against
patterns computed by hand:

- ALiBi on a HookedTransformer (``positional_embedding_type="alibi"``): QK-ZERO is the softmax of the position
  bias, QK-MEAN the softmax of the mean q·k plus that bias (the BLOOM bridge is covered in
  test_architectures.py, against HF's own ALiBi);
- straight-through QK freezes on q/k-normalised bridges (OLMo-2, Qwen3) and on a delegating bridge (GPT-J, the
  z route): the forward is the frozen one and W_Q/W_K get the gradient HF gives when the pattern is
  ``frozen + (orig − orig.detach())``, through the q/k norm.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import builders
from tests.architectures import references, zoo
from tl_circuits import GradientConfig, compute_mean_activations, freeze, per_sample_gradients

LAYER, HEAD = 1, 2


def _alibi_by_hand(n_heads: int, n_pos: int) -> torch.Tensor:
    """[heads, q, k]: −slope_h · (q − k), slope_h = 2^(−8(h+1)/H) (Press et al., H a power of 2)."""
    slopes = torch.tensor([2 ** (-8 * (h + 1) / n_heads) for h in range(n_heads)])
    distance = torch.arange(n_pos)[:, None] - torch.arange(n_pos)[None, :]
    return -slopes[:, None, None] * distance.clamp(min=0)


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[-1]
    return scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


@pytest.mark.needs_hooked_transformer  # an ALiBi HookedTransformer
def test_alibi_qk_freezes_keep_the_position_bias():
    model = builders.hooked(positional_embedding_type="alibi")
    tokens, ref_tokens = builders.random_tokens(2, 8, seed=1), builders.random_tokens(4, 8, seed=2)
    bias = _alibi_by_hand(model.cfg.n_heads, 8)[HEAD]
    name = f"blocks.{LAYER}.attn.hook_pattern"
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens)
        with freeze(model, [(LAYER, HEAD)], "qk", "zero"):
            _, zero = model.run_with_cache(tokens)
        torch.testing.assert_close(zero[name][:, HEAD], _causal_softmax(bias).expand(2, -1, -1))
        assert not torch.allclose(zero[name][:, HEAD], _causal_softmax(torch.zeros(8, 8)))  # not uniform

        _, ref = model.run_with_cache(ref_tokens)
        q = ref[f"blocks.{LAYER}.attn.hook_q"][:, :, HEAD].mean(0)
        k = ref[f"blocks.{LAYER}.attn.hook_k"][:, :, HEAD].mean(0)
        expected = _causal_softmax(q @ k.T / math.sqrt(model.cfg.d_head) + bias)
        with freeze(model, [(LAYER, HEAD)], "qk", "mean", reference=compute_mean_activations(model, ref_tokens,
                                                                                            progress=False)):
            _, mean = model.run_with_cache(tokens)
        torch.testing.assert_close(mean[name][:, HEAD], expected.expand(2, -1, -1), rtol=1e-5, atol=1e-6)
    others = [h for h in range(model.cfg.n_heads) if h != HEAD]
    assert torch.equal(mean[name][:, others], clean[name][:, others])


def _straight_through_edit(head: int, kv_head: int):
    """HF's probabilities of ``head`` replaced by QK-ZERO's, with the original's gradient (straight-through)."""
    zero = references.qk_edit("zero", head, kv_head)

    def edit(record):
        orig = record["probs"]
        frozen = zero(record)
        return frozen.detach() + (orig - orig.detach())
    return edit


@pytest.mark.parametrize("name", ["Olmo2ForCausalLM", "Qwen3ForCausalLM", "GPTJForCausalLM"])
def test_straight_through_qk_gradients_flow_through_the_qk_norm(name):
    model, hf = zoo.bridge(name), zoo.build(name)
    tokens = zoo.tokens(2, 8, seed=3)
    with freeze(model, [(LAYER, 1)], "qk", "zero", preserve_gradients=True):
        ours = per_sample_gradients(model, tokens, config=GradientConfig(progress=False))
    kv_head = 1 // (zoo.N_HEADS // zoo.ARCHS[name].n_kv_heads)
    expected = {b: [] for b in "QK"}
    for i in range(tokens.shape[0]):  # the HF model with the straight-through edit, one sample at a time
        hf.zero_grad(set_to_none=True)
        with references._eager_patch(hf, {LAYER: _straight_through_edit(1, kv_head)}, {}):
            hf(tokens[i:i + 1], labels=tokens[i:i + 1]).loss.backward()
        for block in "QK":
            expected[block].append(references.hand_rows(name, hf, LAYER, block, False))
    for block in "QK":
        torch.testing.assert_close(ours.per_block[block][:, LAYER], torch.stack(expected[block]), rtol=1e-4, atol=1e-5)
    assert ours.per_block["Q"][:, LAYER, 1].abs().amax() > 1e-4  # the frozen head's W_Q still gets a gradient
