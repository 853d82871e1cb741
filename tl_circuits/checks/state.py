"""What a call must leave as it found it on a model, recorded and compared: :func:`model_state`, :func:`state_changes`.

A :class:`ModelState` holds the model's outputs on some tokens, every parameter (value, ``requires_grad``, the
``.grad`` object, storage), every buffer (value, storage), the number of torch and TransformerLens hooks, and the
train/eval mode of every module. :func:`state_changes` lists, in words, what differs between two records (an empty
list: nothing). :func:`tl_circuits.sanity_check` uses them for its "model unchanged" check, and the tests use them
after every public call.

TransformerLens adds some torch hooks of its own lazily, at a model's first forward (and at its first
``run_with_cache``): :func:`model_state` runs its forward *before* counting hooks, so a first record is comparable
with later ones.

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")
>>> tokens = torch.tensor([[1, 2, 3, 4]])
>>> before = model_state(model, tokens)
>>> state_changes(before, model_state(model, tokens))
[]
>>> handle = model.blocks[0].register_forward_hook(lambda module, args, out: None)
>>> state_changes(before, model_state(model, tokens))
['torch hooks: 1 more than before']
>>> handle.remove()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_circuits.models.types import Model

__all__ = ["ModelState", "model_state", "state_changes"]


@dataclass(frozen=True)
class ModelState:
    """One record of a model (:func:`model_state`)."""

    outputs: Tensor  # the model's outputs on the tokens given, detached
    parameters: dict[str, tuple[Tensor, bool, Any, int]]  # name -> (value, requires_grad, .grad object, data_ptr)
    buffers: dict[str, tuple[Tensor, int]]  # name -> (value, data_ptr)
    torch_hooks: int  # forward, forward-pre and backward hooks of every module
    lens_hooks: int  # TransformerLens HookPoint forward and backward hooks
    training: tuple[bool, ...]  # every module's train/eval flag, in module order


def _count_torch_hooks(model: Model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def _count_lens_hooks(model: Model) -> int:
    hook_points = {id(hp): hp for hp in model.hook_dict.values()}.values()  # a bridge's aliases name one point twice
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in hook_points)


def model_state(model: Model, tokens: Tensor) -> ModelState:
    """Record ``model`` (module docstring): its forward on ``tokens`` runs first (no gradient), then the rest."""
    with torch.no_grad():
        outputs = model(tokens)
    outputs = (outputs if isinstance(outputs, Tensor) else torch.as_tensor(outputs)).detach().clone()
    parameters = {name: (p.detach().clone(), p.requires_grad, p.grad, p.data_ptr())
                  for name, p in model.named_parameters()}
    buffers = {name: (b.detach().clone(), b.data_ptr()) for name, b in model.named_buffers()}
    return ModelState(outputs, parameters, buffers, _count_torch_hooks(model), _count_lens_hooks(model),
                      tuple(m.training for m in model.modules()))


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and values (NaN where the other is NaN counts as equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool(torch.equal(a, b))


def state_changes(before: ModelState, after: ModelState) -> list[str]:
    """What differs between two records of one model, one line per difference (empty: nothing changed)."""
    out = []
    if not _same(before.outputs, after.outputs):
        out.append("outputs on the same tokens changed")
    for what, old, new in (("torch hooks", before.torch_hooks, after.torch_hooks),
                           ("TransformerLens hooks", before.lens_hooks, after.lens_hooks)):
        if new != old:
            out.append(f"{what}: {abs(new - old)} {'more' if new > old else 'fewer'} than before")
    if before.training != after.training:
        flipped = sum(a != b for a, b in zip(before.training, after.training))
        out.append(f"train/eval mode changed ({flipped} modules)" if len(before.training) == len(after.training)
                   else "the set of modules changed")
    if before.parameters.keys() != after.parameters.keys():
        out.append(f"parameters added or removed: {sorted(before.parameters.keys() ^ after.parameters.keys())}")
    for name in [n for n in before.parameters if n in after.parameters]:
        (value, requires_grad, grad, ptr), (new_value, new_requires_grad, new_grad, new_ptr) = (
            before.parameters[name], after.parameters[name])
        if not _same(value, new_value):
            out.append(f"parameter {name} changed")
        if requires_grad != new_requires_grad:
            out.append(f"parameter {name}: requires_grad {requires_grad} -> {new_requires_grad}")
        if new_grad is not grad:
            out.append(f"parameter {name}: .grad changed")
        if new_ptr != ptr:
            out.append(f"parameter {name}: storage changed")
    if before.buffers.keys() != after.buffers.keys():
        out.append(f"buffers added or removed: {sorted(before.buffers.keys() ^ after.buffers.keys())}")
    for name in [n for n in before.buffers if n in after.buffers]:
        (value, ptr), (new_value, new_ptr) = before.buffers[name], after.buffers[name]
        if not _same(value, new_value):
            out.append(f"buffer {name} changed")
        if new_ptr != ptr:
            out.append(f"buffer {name}: storage changed")
    return out
