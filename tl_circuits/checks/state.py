"""What a call must leave as it found it, recorded and compared: :func:`model_state`, :func:`state_differences`
and the context manager :func:`assert_model_unchanged`.

A record holds every parameter (values, ``requires_grad``, its ``.grad`` object and values, its storage, dtype,
device), every buffer (values), every hook (torch module hooks of every kind, which is where TransformerLens hook points
keep theirs, and torch's global module hooks; not the output-capturing hooks transformers installs on its modules
for itself, once), each module's train/eval mode, and optionally the outputs on some tokens.
It copies every parameter and buffer, so it costs one model's memory.

>>> import torch
>>> from tl_circuits.testing import tiny_model, tiny_tokens
>>> model = tiny_model("GPT2LMHeadModel")
>>> with assert_model_unchanged(model, tiny_tokens()):
...     _ = model(tiny_tokens())                         # running it changes nothing
>>> with assert_model_unchanged(model):                  # doctest: +ELLIPSIS
...     _ = model.blocks[0].attn.hook_pattern.add_hook(lambda pattern, hook: pattern)
Traceback (most recent call last):
...
AssertionError: the model changed inside assert_model_unchanged (1 difference):
  hook added: blocks.0.attn.hook_pattern forward hook...
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from jaxtyping import Int
from torch import Tensor
from torch.nn.modules import module as torch_module

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.models.types import Model

__all__ = ["ModelState", "assert_model_unchanged", "model_state", "state_differences"]

_HOOK_DICTS = {"_forward_hooks": "forward hook", "_forward_pre_hooks": "forward pre-hook",
               "_backward_hooks": "backward hook", "_backward_pre_hooks": "backward pre-hook"}
_TRANSFORMERS_CAPTURE = "transformers.utils.output_capturing"
_GLOBAL_HOOKS = {"_global_forward_hooks": "forward hook", "_global_forward_pre_hooks": "forward pre-hook",
                 "_global_backward_hooks": "backward hook", "_global_backward_pre_hooks": "backward pre-hook"}


@dataclass(frozen=True)
class ParameterRecord:
    value: Tensor
    requires_grad: bool
    grad: Optional[Tensor]          # the .grad object itself (its identity is part of the state)
    grad_value: Optional[Tensor]    # and a copy of its values
    data_ptr: int


@dataclass(frozen=True)
class ModelState:
    """One record of a model (see the module docstring); compare two with :func:`state_differences`."""

    parameters: dict[str, ParameterRecord]
    buffers: dict[str, Tensor]
    hooks: frozenset            # (module name, kind, handle id); "<global>" for torch's global module hooks
    training: dict[str, bool]
    outputs: Optional[Tensor]


def _copy(t: Tensor) -> Tensor:
    return t.detach().clone()


def _modules(model: Model) -> dict[str, torch.nn.Module]:
    """Every submodule once, under its shortest name (a bridge reaches the HF modules by two paths, e.g.
    ``blocks.0.attn`` and ``blocks.0._original_component.attn``)."""
    names: dict[int, tuple[str, torch.nn.Module]] = {}
    aliases = getattr(model, "hook_dict", {}).items()  # a bridge's hook points also go by their HookedTransformer names
    for name, module in [*model.named_modules(remove_duplicate=False), *aliases]:
        if id(module) not in names or len(name) < len(names[id(module)][0]):
            names[id(module)] = (name, module)
    return dict(names.values())


def _library_machinery(hook: object) -> bool:
    """Hooks transformers installs on its own modules the first time outputs are captured (attention weights,
    hidden states), once, and keeps: part of the HF model, whoever triggered them."""
    return getattr(hook, "__module__", None) == _TRANSFORMERS_CAPTURE


def _run(model: Model, tokens: Tensor) -> Tensor:
    """``model(tokens)`` without gradients, leaving the global RNGs as they were (dropout in train mode)."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return _copy(model(tokens))


def model_state(model: Model, tokens: Optional[Int[Tensor, "batch pos"]] = None, *,
                warm_up: bool = False) -> ModelState:
    """Record ``model`` now: parameters, buffers, hooks, modes, and ``model(tokens)`` when ``tokens`` is given
    (run first, without gradients).

    ``warm_up``: without ``tokens``, run the model once on one token first. A ``TransformerBridge`` wires some of
    its own hooks on its first forward; a record taken before that would see them as added by whatever ran next.
    """
    device = next(model.parameters()).device
    outputs = None
    if tokens is not None:
        outputs = _run(model, tokens.to(device))
    elif warm_up:
        _run(model, torch.zeros(1, 1, dtype=torch.long, device=device))
    parameters = {name: ParameterRecord(_copy(p), p.requires_grad, p.grad,
                                        None if p.grad is None else _copy(p.grad), p.data_ptr())
                  for name, p in model.named_parameters()}
    modules = _modules(model)
    hooks = {(name, kind, key) for name, module in modules.items() for attr, kind in _HOOK_DICTS.items()
             for key, hook in getattr(module, attr, {}).items() if not _library_machinery(hook)}
    hooks |= {("<global>", kind, key) for attr, kind in _GLOBAL_HOOKS.items()
              for key in getattr(torch_module, attr, {})}
    return ModelState(
        parameters=parameters, buffers={name: _copy(b) for name, b in model.named_buffers()},
        hooks=frozenset(hooks),
        training={name: module.training for name, module in modules.items()}, outputs=outputs)


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    """Bit-for-bit equal values (NaN equal to NaN), same dtype, shape and device."""
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _change(a: Tensor, b: Tensor) -> str:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return f"{a.dtype} {tuple(a.shape)} {a.device} -> {b.dtype} {tuple(b.shape)} {b.device}"
    if a.is_floating_point():
        return f"max |change| {(a.double() - b.double()).abs().nan_to_num(nan=float('inf')).max().item():.3g}"
    return f"{int((a != b).sum())} entries changed"


def _named_set_changes(what: str, before: set, after: set) -> list[str]:
    return ([f"{what} added: {name}" for name in sorted(after - before)]
            + [f"{what} removed: {name}" for name in sorted(before - after)])


def _parameter_differences(before: ModelState, after: ModelState) -> list[str]:
    out = _named_set_changes("parameter", set(before.parameters), set(after.parameters))
    for name in sorted(set(before.parameters) & set(after.parameters)):
        old, new = before.parameters[name], after.parameters[name]
        if not _same(old.value, new.value):
            out.append(f"parameter {name}: values changed ({_change(old.value, new.value)})")
        if old.requires_grad != new.requires_grad:
            out.append(f"parameter {name}: requires_grad {old.requires_grad} -> {new.requires_grad}")
        if new.grad is not old.grad or not _same(old.grad_value, new.grad_value):
            out.append(f"parameter {name}: .grad changed ({'set' if old.grad is None else 'replaced or written'})")
        if new.data_ptr != old.data_ptr:
            out.append(f"parameter {name}: storage replaced")
    return out


def state_differences(before: ModelState, after: ModelState) -> list[str]:
    """What differs between two records of one model, one line each (empty: nothing)."""
    out = _parameter_differences(before, after)
    out += _named_set_changes("buffer", set(before.buffers), set(after.buffers))
    out += [f"buffer {name}: values changed ({_change(before.buffers[name], after.buffers[name])})"
            for name in sorted(set(before.buffers) & set(after.buffers))
            if not _same(before.buffers[name], after.buffers[name])]
    out += [f"hook added: {module or '<model>'} {kind} (handle {key})"
            for module, kind, key in sorted(after.hooks - before.hooks)]
    out += [f"hook removed: {module or '<model>'} {kind} (handle {key})"
            for module, kind, key in sorted(before.hooks - after.hooks)]
    out += [f"mode of {name or '<model>'}: {'train' if before.training[name] else 'eval'} -> "
            f"{'train' if after.training[name] else 'eval'}"
            for name in sorted(set(before.training) & set(after.training))
            if before.training[name] != after.training[name]]
    if before.outputs is not None and after.outputs is not None and not _same(before.outputs, after.outputs):
        out.append(f"outputs on the given tokens changed ({_change(before.outputs, after.outputs)})")
    return out


@contextmanager
def assert_model_unchanged(model: Model, tokens: Optional[Int[Tensor, "batch pos"]] = None) -> Iterator[ModelState]:
    """Context manager: record ``model`` on entry (:func:`model_state`, which runs the model once first; yielded),
    again on a normal exit, and raise
    ``AssertionError`` listing every difference (parameters and their ``.grad``/storage, buffers, hooks left on or
    removed, train/eval mode of any module, and the outputs on ``tokens`` when given). Not a statistical check:
    comparisons are exact. An exception raised inside the block propagates unchecked.
    """
    before = model_state(model, tokens, warm_up=True)
    yield before
    differences = state_differences(before, model_state(model, tokens))
    if differences:
        lines = "\n  ".join(differences)
        raise AssertionError(f"the model changed inside assert_model_unchanged ({len(differences)} "
                             f"difference{'s' if len(differences) > 1 else ''}):\n  {lines}")
