"""The stacked forward passes of one sweep draw: every (circuit, head) variant of a layer in one batch.

Freezing a head in layer l cannot change anything before layer l, so a draw restarts each layer's variants
from the clean run's ``resid_pre_l`` (:func:`clean_run`): a HookedTransformer by ``start_at_layer=l``, a
``TransformerBridge`` by calling its blocks l..L-1 directly (:mod:`tl_circuits.models.bridge_forward`; TL 4.3's
``start_at_layer`` still runs the earlier blocks). A bridge that cannot be restarted (the TransformerLens-native
bridge, logit post-processing outside ``unembed``: ``restart_problem``) runs the whole model, with the same
numbers and more work. Copy j of the stacked batch freezes one
head in its own rows ``[j·batch, (j+1)·batch)`` only, so a layer is one forward pass (or a few, within the
row budget). :func:`joint_draw` stacks copies that each freeze a *group* of cells together (the attribution
sweep's missed-effect bound), restarting at the group's first layer. The metric is applied to each copy's rows of
those same logits, whether it returns a scalar (batch metric) or one value per sample (``per_sample``): per-sample
values cost no extra forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from tl_circuits.freezing.hooks import Hook, LayerFreeze, freeze_generator
from tl_circuits.freezing.options import Circuit, GradientMode, Replacement
from tl_circuits.freezing.references import PreparedReference
from tl_circuits.models.bridge_forward import prepare_restart, restart_problem
from tl_circuits.models.spec import ModelSpec
from tl_circuits.models.types import Model
from tl_circuits.parallel.sweep import SweepShare


@dataclass(frozen=True)
class DrawSettings:
    """What one draw of a sweep freezes with: the replacement, each circuit's prepared reference, the NOISE
    scale and the draw's NOISE seed (None unless NOISE; every rank's the same, see :func:`item_noise_seed`)."""

    replacement: Replacement
    references: dict[Circuit, PreparedReference]
    noise_scale: float
    noise_seed: Optional[int]


def item_noise_seed(draw_seed: int, layer: int, pass_index: int) -> int:
    """The seed of the NOISE generator of one sweep item (``layer``'s stacked pass ``pass_index``) of a draw.

    Each item has its own stream, so the noise an item draws does not depend on which items ran before it, or
    on which rank runs it: a sweep split over ranks draws exactly the single-process noise (docs/spec.md §1.7).

    >>> item_noise_seed(0, 1, 0) == item_noise_seed(0, 1, 0), item_noise_seed(0, 1, 0) == item_noise_seed(0, 0, 1)
    (True, False)
    """
    state = np.random.SeedSequence((draw_seed, layer, pass_index)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63, a valid torch seed


def evaluate_metric(metric: Callable[[Tensor], Tensor], logits: Tensor, per_sample: bool) -> Tensor:
    """``metric(logits)`` checked: a scalar (batch metric) or ``[batch]`` (``per_sample``), as float64 on CPU.

    >>> evaluate_metric(lambda lg: lg.sum((1, 2)), torch.ones(3, 2, 4), per_sample=True).tolist()
    [8.0, 8.0, 8.0]
    >>> evaluate_metric(lambda lg: lg.sum((1, 2)), torch.ones(3, 2, 4), per_sample=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the metric must return a scalar (got shape (3,)); for a per-sample metric ... pass per_sample=True
    """
    value = torch.as_tensor(metric(logits)).detach()
    batch = logits.shape[0]
    if per_sample:
        if tuple(value.shape) != (batch,):
            raise ValueError(f"with per_sample=True the metric must return one value per sample, shape ({batch},); "
                             f"got shape {tuple(value.shape)}")
    elif value.numel() != 1:
        raise ValueError(f"the metric must return a scalar (got shape {tuple(value.shape)}); for a per-sample "
                         "metric logits -> [batch] pass per_sample=True")
    return value.double().cpu().reshape(batch if per_sample else ())


LayerRunner = Callable[[int, int], Tensor]
"""``(layer, copies) -> logits`` of ``copies`` stacked copies of the clean batch, restarted at ``layer``."""


def clean_run(model: Model, spec: ModelSpec, tokens: Tensor,
              attention_mask: Optional[Tensor] = None) -> tuple[Tensor, LayerRunner, str]:
    """The clean logits of ``tokens``, a :data:`LayerRunner` restarting from each layer's clean ``resid_pre``,
    and the name of the route it takes (``settings["restart"]`` of a sweep). ``attention_mask`` (0/1, padding)
    is given to every forward, the restarted ones included (repeated for the stacked copies).

    Call under ``torch.no_grad()``; the runner's forwards see whatever hooks are active when it is called.
    """
    def masked(copies: int) -> dict:  # no keyword without a mask: an unpadded sweep calls the model as before
        return {} if attention_mask is None else {"attention_mask": attention_mask.repeat(copies, 1)}

    if spec.starts_at_layer:
        names = {spec.resid_pre_hook(layer) for layer in range(spec.n_layers)}
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names, **masked(1))

        def from_cache(layer: int, copies: int) -> Tensor:
            return model(cache[spec.resid_pre_hook(layer)].repeat(copies, 1, 1), start_at_layer=layer,
                         **masked(copies))
        return torch.as_tensor(logits), from_cache, "start_at_layer"
    if spec.kind == "bridge" and restart_problem(model) is None:
        restart = prepare_restart(model, tokens, attention_mask)  # records the mask each block is called with
        assert restart.logits is not None

        def from_blocks(layer: int, copies: int) -> Tensor:
            return restart.run_from_layer(restart.resid_pre[layer].repeat(copies, 1, 1), layer)
        return restart.logits, from_blocks, "blocks"

    def whole_model(layer: int, copies: int) -> Tensor:  # layers before `layer` recompute the clean values
        return model(tokens.repeat(copies, 1), **masked(copies))
    return model(tokens, **masked(1)), whole_model, "full forward"


def sweep_draw(
    model: Model,
    spec: ModelSpec,
    batch: int,
    run_layer: LayerRunner,
    metric: Callable[[Tensor], Tensor],
    passes: Sequence[Sequence[list[tuple[Circuit, int]]]],
    draw: DrawSettings,
    per_sample: bool,
    bar,
    share: Optional[SweepShare] = None,
    layers: Optional[Sequence[int]] = None,
) -> dict[str, Tensor]:
    """The frozen metric of every (circuit, layer, head) for one draw: circuit -> [L, H] (or [N, L, H] per sample).

    ``run_layer``: from :func:`clean_run`; ``passes[layer]``: the (circuit, head) copies stacked in each forward of
    that layer. Cells not run stay NaN.
    ``share``: under a process group, which (layer, pass) items this rank runs (:class:`SweepShare`; the caller
    merges the grids). ``layers``: the layers swept (default all; each restarts from its own ``resid_pre``).
    """
    circuits = dict.fromkeys(c for layer_passes in passes for chunk in layer_passes for c, _ in chunk)
    lead = (batch,) if per_sample else ()
    frozen = {c.value: torch.full((*lead, spec.n_layers, spec.n_heads), float("nan"), dtype=torch.float64)
              for c in circuits}
    for layer in range(spec.n_layers) if layers is None else layers:
        for pass_index, chunk in enumerate(passes[layer]):
            if share is not None and not share.take(layer, chunk):
                continue
            generator = (None if draw.noise_seed is None else
                         freeze_generator(model, item_noise_seed(draw.noise_seed, layer, pass_index)))
            hooks = _stacked_hooks(model, spec, [(circuit, ((layer, head),)) for circuit, head in chunk], batch,
                                   draw, generator)
            with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]  # TransformerLens wants a list of its union
                logits = run_layer(layer, len(chunk))
            for j, (circuit, head) in enumerate(chunk):
                frozen[circuit.value][..., layer, head] = evaluate_metric(
                    metric, logits[j * batch:(j + 1) * batch], per_sample)
            del logits
            bar.update()
    return frozen


def joint_draw(
    model: Model,
    spec: ModelSpec,
    batch: int,
    run_layer: LayerRunner,
    metric: Callable[[Tensor], Tensor],
    groups: Sequence[tuple[Circuit, Sequence[tuple[int, int]]]],
    draw: DrawSettings,
    per_sample: bool,
    copies_per_pass: int,
    bar,
) -> Tensor:
    """The metric with each group's (layer, head) cells frozen *together* (one stacked copy per group):
    ``[n_groups]``, or ``[N, n_groups]`` per sample. Each pass restarts at the first layer any of its groups
    freezes; ``copies_per_pass`` groups share a forward."""
    values = torch.full((*((batch,) if per_sample else ()), len(groups)), float("nan"), dtype=torch.float64)
    for pass_index, start in enumerate(range(0, len(groups), copies_per_pass)):
        chunk = list(groups[start:start + copies_per_pass])
        first = min(layer for _, cells in chunk for layer, _ in cells)
        generator = (None if draw.noise_seed is None else
                     freeze_generator(model, item_noise_seed(draw.noise_seed, first, pass_index)))
        with model.hooks(fwd_hooks=_stacked_hooks(model, spec, chunk, batch, draw, generator)):  # type: ignore[arg-type]
            logits = run_layer(first, len(chunk))
        for j in range(len(chunk)):
            values[..., start + j] = evaluate_metric(metric, logits[j * batch:(j + 1) * batch], per_sample)
        del logits
        bar.update()
    return values


def _tile(reference, copies: int):
    """Repeat a RESAMPLE reference (hook name -> [batch, ...]) for the stacked copies."""
    if not isinstance(reference, dict):
        return reference  # MEAN references broadcast over the batch
    return {name: t if t.shape[0] == 1 else t.repeat(copies, *([1] * (t.ndim - 1))) for name, t in reference.items()}


def _stacked_hooks(model, spec, copies: Sequence[tuple[Circuit, Sequence[tuple[int, int]]]], batch,
                   draw: DrawSettings, generator: Optional[torch.Generator]) -> list[Hook]:
    """Hooks freezing copy j's ``(circuit, cells)`` -- its (layer, head) cells together -- in rows
    ``[j*batch, (j+1)*batch)`` of a stacked batch."""
    hooks = []
    # (circuit, layer) in order of first appearance, then by layer: a layer's NOISE draws keep the copies' order
    keys = sorted(dict.fromkeys((circuit, layer) for circuit, cells in copies for layer, _ in cells),
                  key=lambda key: key[1])
    for circuit, layer in keys:
        heads = sorted({h for c, cells in copies if c == circuit for l, h in cells if l == layer})
        row_mask = torch.zeros(len(copies) * batch, len(heads), dtype=torch.bool)
        for j, (c, cells) in enumerate(copies):
            for l, h in cells:
                if c == circuit and l == layer:
                    row_mask[j * batch:(j + 1) * batch, heads.index(h)] = True
        layer_freeze = LayerFreeze(model, spec, layer, heads, circuit, draw.replacement, GradientMode.STOPGRAD,
                                   _tile(draw.references[circuit], len(copies)), float(draw.noise_scale),
                                   generator, row_mask)
        hooks.extend(layer_freeze.hooks())
    return hooks
