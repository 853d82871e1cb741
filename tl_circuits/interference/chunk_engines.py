"""The two per-sample gradient engines, one chunk of samples at a time (docs/spec.md §2; the module docstring of
:mod:`tl_circuits.interference.gradients` says how they differ and why they agree): :func:`factor_chunks` (one
batched forward/backward against zero perturbations at the attention hooks: gradient factors) and
:func:`direct_chunks` (``functional_call`` + ``vmap(grad(loss))``, HookedTransformer only).
:func:`tl_circuits.interference.gradients.gradient_chunks` chooses between them.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from tl_circuits.freezing.rows import BatchRows
from tl_circuits.interference.factors import GradientFactors, PerSampleGradients
from tl_circuits.interference.inputs import TaskLoss, group_inputs, group_samples, sample_groups, scatter_groups
from tl_circuits.models.spec import BLOCKS, ModelSpec, functional_logits, model_logits, register_factor_hooks
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.freezing.api import FreezeHandle


def _factor_chunk(model: Model, spec: ModelSpec, tokens: Tensor, mask: Tensor, loss: TaskLoss,
                  samples: Tensor, positions: slice, layers: Sequence[int]) -> tuple[dict, Tensor]:
    """One batched forward/backward of rows ``samples`` (at ``positions``) of the task:
    ``({"xQ0": inputs, "Q0": output grads, "z0": z, ...}, losses)`` of ``layers``. The layers below the lowest of
    ``layers`` run without autograd and the residual stream entering it is detached, so the backward stops there
    and nothing below it is kept for it."""
    state: dict = {"eps": {}, "captured": {}}

    def hooks_of(layer: int):
        def perturb(block: str, output: Tensor) -> Tensor:
            eps = torch.zeros_like(output, requires_grad=True)  # d(sum of losses)/d eps = each sample's own
            state["eps"][f"{block}{layer}"] = eps
            return output + eps

        def capture_input(block: str, x: Tensor) -> None:
            state["captured"][f"x{block}{layer}"] = x.detach()

        def capture_z(z: Tensor) -> None:
            state["captured"][f"z{layer}"] = z.detach()

        return perturb, capture_input, capture_z

    lowest = min(layers)

    def start_autograd(x: Tensor, hook) -> Tensor:
        state["differentiated"] = True
        torch.set_grad_enabled(True)  # undone when the forward's no_grad context exits
        return x.detach()

    handles = []
    try:
        for layer in layers:
            handles += register_factor_hooks(model, spec, layer, *hooks_of(layer))
        # Below the lowest selected layer nothing is differentiated: those layers run without autograd (the
        # model's parameters require grad, so a graph would keep their activations until the forward passes the
        # cut), and autograd starts at the residual entering it. After the caller's hooks: exact, as every
        # perturbation lies above it.
        cut = [(spec.resid_pre_hook(lowest), start_autograd)] if lowest > 0 else []
        with torch.set_grad_enabled(lowest == 0), model.hooks(fwd_hooks=cut):  # type: ignore[arg-type]
            logits = model_logits(model, spec, tokens, mask if spec.masks_under_vmap else None)
        if cut and not state.get("differentiated"):
            raise RuntimeError(f"the forward never reached {cut[0][0]}, where the gradient of layers {list(layers)} "
                               "starts")
        with torch.enable_grad():
            losses = loss.losses(logits, tokens, mask, loss.rows(mask, samples, positions), samples.to(mask.device))
            keys = list(state["eps"])
            grads = torch.autograd.grad(losses.sum(), [state["eps"][k] for k in keys], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    found = dict(state["captured"])
    for key, g in zip(keys, grads):
        found[key] = torch.zeros_like(state["eps"][key]) if g is None else g
    return found, losses.detach()


def sample_chunks(n: int, chunk: int) -> list[slice]:
    """The chunks of ``n`` samples, ``chunk`` at a time: the sample shards a distributed run hands out."""
    return [slice(start, min(n, start + chunk)) for start in range(0, n, chunk)]


def factor_chunks(model: Model, spec: ModelSpec, tokens: Tensor, mask: Tensor, loss: TaskLoss, chunk: int,
                  include_biases: bool, chunks: Optional[Sequence[slice]] = None,
                  freezes: Sequence["FreezeHandle"] = (),
                  layers: Optional[Sequence[int]] = None) -> Iterator[tuple[slice, GradientFactors, Tensor]]:
    """Yield ``(samples, GradientFactors, losses)`` chunk by chunk (the ``"factored"`` engine); ``chunks``: only
    these sample slices (default: all, ``chunk`` at a time); ``freezes`` are told each forward's rows; ``layers``:
    only these layers' factors (default all; the factors' spec is then
    :meth:`~tl_circuits.models.spec.ModelSpec.of_layers`)."""
    n, n_pos = tokens.shape
    layers = list(range(spec.n_layers)) if layers is None else list(layers)
    factor_spec = spec if len(layers) == spec.n_layers else spec.of_layers(len(layers))
    for sl in chunks if chunks is not None else sample_chunks(n, chunk):
        parts, loss_parts = [], []
        for rows, positions in sample_groups(spec, mask[sl]):
            t, m = group_inputs(tokens[sl], mask[sl], rows, positions)
            samples = group_samples(sl, rows)
            with ExitStack() as told:
                for handle in freezes:
                    told.enter_context(handle.on_rows(BatchRows(samples, n)))
                found, losses = _factor_chunk(model, spec, t, m, loss, samples, positions, layers)
            parts.append((rows, positions, found))
            loss_parts.append((rows, positions, {"loss": losses}))
        found = scatter_groups(parts, sl.stop - sl.start, n_pos)  # padding: zero inputs and gradients
        losses = scatter_groups(loss_parts, sl.stop - sl.start, None)["loss"]

        def stack(key: str) -> Tensor:
            return torch.stack([found.pop(key.format(layer)) for layer in layers], 1).float()

        inputs = {"Q": stack("xQ{}")}
        for block in "KV":
            x = stack("x" + block + "{}")
            inputs[block] = next((y for y in inputs.values() if torch.equal(x, y)), x)
        out_grads: dict[str, Tensor] = {b: stack(b + "{}") for b in BLOCKS}
        yield sl, GradientFactors(inputs, out_grads, stack("z{}"), factor_spec, include_biases), losses


def direct_chunks(model: Model, spec: ModelSpec, tokens: Tensor, mask: Tensor, loss: TaskLoss, chunk: int,
                  include_biases: bool, chunks: Optional[Sequence[slice]] = None,
                  ) -> Iterator[tuple[slice, PerSampleGradients, Tensor]]:
    """Yield ``(samples, PerSampleGradients, losses)``: ``vmap(grad)`` w.r.t. the attention weights themselves."""
    try:
        names = spec.attention_param_names(include_biases)
    except ValueError as missing:  # a bridge around projections without biases (LLaMA)
        raise ValueError(f"method='direct' differentiates bias parameters, and {missing}; the default "
                         "method='factored' gives bias gradients without a parameter") from None
    all_params = dict(model.named_parameters())
    params = {name: all_params[name].detach() for name in names}
    model_mask = spec.masks_under_vmap  # else the padding is trimmed and the model sees no mask

    def sample_loss(p, t, m, counted, index):
        logits = functional_logits(model, spec, p, t[None], m[None] if model_mask else None)
        value = loss.losses(logits, t[None], m[None], counted[None], index[None])[0]
        return value, value.detach()

    grad_fn = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0))
    for sl in chunks if chunks is not None else sample_chunks(tokens.shape[0], chunk):
        parts = []
        for rows, positions in sample_groups(spec, mask[sl]):
            with torch.no_grad():  # grad() ignores the outer no_grad; no autograd graph is kept around it
                t, m = group_inputs(tokens[sl], mask[sl], rows, positions)
                samples = group_samples(sl, rows).to(m.device)
                try:
                    raw, losses = grad_fn(params, t, m, loss.rows(m, samples, positions), samples)
                except RuntimeError as error:
                    if "randomness" in str(error):
                        raise ValueError("method='direct' runs the model under torch.func.vmap, where random "
                                         "ops (a NOISE freeze) cannot run; use method='factored'") from error
                    raise
            parts.append((rows, positions, {**raw, "_losses": losses}))
        raw = scatter_groups(parts, sl.stop - sl.start, None)
        losses = raw.pop("_losses")
        per_block: dict[str, Tensor] = {}
        for block in BLOCKS:  # per-head rows in float32, freeing the raw gradients as we go
            keys = [spec.param_name(layer, block) for layer in range(spec.n_layers)]
            if include_biases and block != "O":
                keys += [spec.param_name(layer, block, bias=True) for layer in range(spec.n_layers)]
            per_block[block] = spec.per_head(raw, block, include_biases).float()
            for key in keys:
                del raw[key]
        yield sl, PerSampleGradients(per_block, spec, include_biases), losses
