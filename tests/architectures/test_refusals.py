"""What tl_circuits refuses on a TransformerBridge, with errors naming the architecture and the problem."""

from __future__ import annotations

import pytest
import torch

from tests.architectures import zoo
from tl_circuits import GradientConfig, freeze, model_spec, per_sample_gradients
from tl_circuits.models.layout import check_projection_shape

pytest.importorskip("transformer_lens.model_bridge")


def test_an_attention_bridge_outside_the_known_families_is_refused_naming_it():
    """CodeGen's TransformerLens bridge has its own attention class, whose scores tl_circuits has not checked."""
    model = zoo.refused_bridge(pytest)
    with pytest.raises(NotImplementedError, match="CodeGenForCausalLM.*CodeGenAttention.*families"):
        model_spec(model)
    with pytest.raises(NotImplementedError, match="CodeGenForCausalLM"):
        freeze(model, [(0, 0)], "ov", "zero")


def test_functional_call_is_refused_and_the_bridge_is_untouched():
    model = zoo.bridge("GPTNeoXForCausalLM")
    tokens = zoo.tokens(2, 6)
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="functional_call.*GPTNeoXForCausalLM.*factored"):
        per_sample_gradients(model, tokens, config=GradientConfig(method="direct", progress=False))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][0]) and p.data_ptr() == before[name][1], name


def test_a_projection_of_unexpected_shape_is_refused_naming_the_layer():
    """E.g. a q_proj twice as wide (a gated query) does not split into heads of d_head."""
    with pytest.raises(NotImplementedError, match="Qwen3Next layer 1: the Q projection weight has shape"):
        check_projection_shape(torch.zeros(64, 32), "Q", "linear", heads=4, d_model=32, d_head=8,
                               where="Qwen3Next layer 1")
    check_projection_shape(torch.zeros(32, 64), "O", "conv1d", heads=8, d_model=64, d_head=4, where="GPT-2")
