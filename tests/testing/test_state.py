"""assert_model_unchanged / model_state: every kind of change a call could leave behind is caught and named, and
what leaves the model as it was (running it, a freeze used as a context manager) passes."""

from __future__ import annotations

import pytest
import torch

from tests import builders
from tl_circuits import freeze
from tl_circuits.testing import assert_model_unchanged, model_state, state_differences

TOKENS = builders.random_tokens(2, 6, seed=1)


@pytest.fixture
def bridge():
    return builders.mha_under_test(seed=3)


def _weight(model) -> torch.nn.Parameter:
    return builders.embedding_weight(model)


def changeable(buffer: torch.Tensor) -> bool:
    return buffer.is_floating_point() and bool(buffer.isfinite().all())


CHANGES = {
    "values": (lambda m: _weight(m).data.add_(1e-3), r"parameter .*: values changed \(max \|change\| 0.001\)"),
    "requires_grad": (lambda m: _weight(m).requires_grad_(False), r"requires_grad True -> False"),
    "grad": (lambda m: m(TOKENS).sum().backward(), r"\.grad changed \(set\)"),
    "storage": (lambda m: setattr(_weight(m), "data", _weight(m).data.clone()), r"storage replaced"),
    "lens hook": (lambda m: m.blocks[1].attn.hook_z.add_hook(lambda z, hook: z),
                  r"hook added: blocks\.1\.attn\.hook_z forward hook"),
    "torch hook": (lambda m: m.blocks[0].register_forward_pre_hook(lambda mod, args: None),
                   r"hook added: blocks\.0 forward pre-hook"),
    "global hook": (lambda m: torch.nn.modules.module.register_module_forward_hook(lambda *a: None),
                    r"hook added: <global> forward hook"),
    "mode": (lambda m: m.blocks[0].train(), r"mode of blocks\.0: eval -> train"),
    # a finite buffer: adding 1 to HookedTransformer's IGNORE (-inf) would change nothing
    "buffer": (lambda m: next(b for _, b in m.named_buffers() if changeable(b)).add_(1.0),
               r"buffer .*: values changed"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_change_is_caught_and_named(bridge, change):
    make, message = CHANGES[change]
    if change == "buffer" and not any(changeable(b) for _, b in bridge.named_buffers()):
        pytest.skip("this model has no finite floating-point buffer")
    handles = []
    with pytest.raises(AssertionError, match=message) as caught:
        with assert_model_unchanged(bridge):
            handles.append(make(bridge))
    assert "the model changed inside assert_model_unchanged" in str(caught.value)
    for handle in handles:  # global hooks outlive the model: remove what the test added
        if hasattr(handle, "remove"):
            handle.remove()


def test_outputs_on_given_tokens_are_compared(bridge):
    """A change that touches no parameter, buffer, hook or mode (a replaced forward) still shows in the outputs."""
    original = bridge.forward
    with pytest.raises(AssertionError, match="outputs on the given tokens changed"):
        with assert_model_unchanged(bridge, TOKENS):
            bridge.forward = lambda *args, **kwargs: original(*args, **kwargs) + 1.0
    del bridge.forward


def test_what_leaves_the_model_as_it_was_passes(bridge):
    with assert_model_unchanged(bridge, TOKENS) as before:
        bridge(TOKENS)
        with freeze(bridge, [(0, 1), (1, 2)], "both", "zero"):
            bridge(TOKENS)
        handle = freeze(bridge, [(1, 0)], "ov", "mean", reference=TOKENS)
        handle.remove()
    assert state_differences(before, model_state(bridge, TOKENS)) == []


def test_an_exception_inside_propagates_unchecked(bridge):
    with pytest.raises(KeyError, match="boom"):
        with assert_model_unchanged(bridge):
            _weight(bridge).data.add_(1.0)
            raise KeyError("boom")


def test_the_first_forward_of_a_bridge_is_not_a_change():
    """A TransformerBridge wires some hooks of its own on its first forward: the record is taken after one."""
    fresh = builders.mha_under_test(seed=4)
    with assert_model_unchanged(fresh):
        fresh(TOKENS)
