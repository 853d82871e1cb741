"""tl_circuits.checks.state: every kind of change to a model is reported, in words, and nothing else is."""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tl_circuits.checks import model_state, state_changes


def _first_float_buffer(model):
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and buffer.numel() and bool(torch.isfinite(buffer).all()):
            return name, buffer
    return None, None


def _change_buffer(model):
    name, buffer = _first_float_buffer(model)
    if buffer is None:
        pytest.skip("this model has no floating-point buffer")
    buffer.add_(1.0)
    return f"buffer {name} changed"


def _change_value(model):
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.add_(1.0)
    return f"parameter {name} changed"


def _change_requires_grad(model):
    name, param = next(iter(model.named_parameters()))
    param.requires_grad_(not param.requires_grad)
    return f"parameter {name}: requires_grad"


def _change_grad(model):
    name, param = next(iter(model.named_parameters()))
    param.grad = torch.zeros_like(param)
    return f"parameter {name}: .grad changed"


def _change_storage(model):
    name, param = next(iter(model.named_parameters()))
    param.data = param.data.clone()
    return f"parameter {name}: storage changed"


def _torch_hook(model):
    model.register_forward_pre_hook(lambda module, args: None)
    return "torch hooks: 1 more than before"


def _lens_hook(model):
    model.hook_dict["blocks.0.attn.hook_z"].add_hook(lambda z, hook: None)  # (a torch hook underneath, too)
    return "TransformerLens hooks: 1 more than before"


def _train_mode(model):
    model.train()
    return "train/eval mode changed"


def _new_buffer(model):
    model.register_buffer("extra", torch.zeros(1))
    return "buffers added or removed: ['extra']"


@pytest.mark.parametrize("change", [_change_value, _change_requires_grad, _change_grad, _change_storage,
                                    _change_buffer, _new_buffer, _torch_hook, _lens_hook, _train_mode])
def test_each_change_is_reported(change):
    model = builders.gqa_under_test() if change is _change_buffer else builders.mha_under_test()  # rotary buffers
    tokens = builders.random_tokens(batch=2, pos=6)
    before = model_state(model, tokens)
    assert state_changes(before, model_state(model, tokens)) == []  # a first record is comparable (lazy hooks)
    phrase = change(model)
    changes = state_changes(before, model_state(model, tokens))
    assert any(phrase in line for line in changes), changes
    if change in (_change_requires_grad, _change_grad, _change_storage, _torch_hook, _new_buffer):
        assert len(changes) == 1, changes  # values and outputs are as they were
