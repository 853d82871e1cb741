"""First-order estimates of every head's freeze effect from one forward and one backward pass (docs/spec.md §1.9).

A freeze changes a head's output ``z`` and nothing upstream of it. Linearising the metric in ``z`` gives

    estimate[c][l, h] = Σ_{pos, d} ∂metric/∂z_{l,h} · (z_{l,h} frozen − z_{l,h} clean)

where the gradient is taken once, at the clean run, for every head. What differs between circuits is the frozen z:

- **OV** (and BOTH, whose z write comes after the pattern's): z frozen is the OV replacement
  (:meth:`LayerFreeze.frozen_z`): attribution patching at ``hook_z``. GQA siblings are untouched: z is per query head.
- **QK** (AtP*'s fix): the head's pattern under the frozen queries *and* keys is computed exactly, softmax
  included, by the freeze's own code (:meth:`LayerFreeze.frozen_pattern`: the architecture's scale, soft-cap,
  position bias and mask), and ``z frozen = P_frozen · v`` (v of the head's KV head). As z is linear in the pattern,
  this equals ∂metric/∂pattern · (P_frozen − P_clean): linear from the pattern onward only.

``qk_alpha`` walks the QK path in logit space, ``P_α = softmax((1 − α)·log P_clean + α·log P_frozen)``, and
scales by 1/α: ``qk_alpha=1`` is the AtP* estimate above, ``qk_alpha → 0`` is plain attribution patching, the
softmax linearised (``J_softmax · Δscores``, with Δscores = log P_frozen − log P_clean up to each row's constant).

``graddrop=True`` adds AtP*'s GradDrop ranking score (unsigned): with L − 1 more backward passes, each zeroing the
gradient through one layer's residual contributions (``hook_attn_out``, ``hook_mlp_out``),
``score(l, h) = 1/(L − 1) · Σ_{ℓ ≠ l} |estimate with layer ℓ's gradient dropped|`` (dropping a layer before l changes
nothing), of the batch estimates: large where paths through different later layers cancel in the plain estimate.

Per-sample estimates come from the same backward: samples are independent rows of the batch, so the gradient of
the sum of per-sample metrics at row i is sample i's own gradient.

Padding (``attention_mask``) is :func:`tl_circuits.freeze_sweep`'s: the clean forward and backward run with the mask,
the frozen pattern is the freeze's own (which reads the padding from the live scores or pattern; a delegating
bridge cannot see it, so a padded QK-ZERO/MEAN there is refused, :func:`~tl_circuits.freezing.sweep_inputs.
check_padded_qk`), and a padded position's z gets no gradient (nothing valid reads it), so padding adds nothing.

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")
>>> tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
>>> out = first_order_pass(model, tokens, None, circuits=["qk", "ov"], replacement="zero", per_sample=True)
>>> out.estimate["qk"].shape, out.clean.shape   # [N, n_layers, n_heads] per sample, and each sample's metric
(torch.Size([3, 2, 4]), torch.Size([3]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits.freezing.hooks import Hook, LayerFreeze
from tl_circuits.freezing.options import (
    Circuit,
    FreezeSpec,
    GradientMode,
    Replacement,
    check_qk_freezable,
    check_replacement_fits,
    parse_option,
)
from tl_circuits.freezing.references import PreparedReference, ReferenceLike, prepare_reference
from tl_circuits.freezing.stacked import evaluate_metric
from tl_circuits.freezing.sweep import default_metric
from tl_circuits.freezing.sweep_inputs import check_padded_qk, check_resample_masks
from tl_circuits.interference.inputs import check_mask
from tl_circuits.models.spec import ModelSpec, model_spec
from tl_circuits.models.types import Model
from tl_circuits.selection import resolve_selection

__all__ = ["FirstOrderPass", "attribution_inputs", "first_order_pass", "prepare_attribution_reference",
           "qk_path_delta"]

ATTRIBUTION_REPLACEMENTS = (Replacement.ZERO, Replacement.MEAN, Replacement.RESAMPLE, Replacement.IDENTITY)
_LOG_FLOOR = 1e-30  # log of a pattern entry that underflowed to 0 (an unmasked key): a very negative logit


@dataclass
class FirstOrderPass:
    """What one clean forward and backward give (:func:`first_order_pass`).

    ``estimate[circuit]``: ``[N, n_layers, n_heads]`` per sample (``per_sample=True``) or ``[n_layers, n_heads]``
    for a batch metric (float64); ``clean``: the clean metric, ``[N]`` or a scalar (float64, CPU);
    ``frozen_patterns[layer]``: the QK-frozen pattern of every head ``[N, n_heads, q, k]`` (when QK is estimated).
    """

    estimate: dict[str, Tensor]
    clean: Tensor
    frozen_patterns: dict[int, Tensor]
    graddrop: Optional[dict[str, Tensor]] = None


def prepare_attribution_reference(model: Model, spec: ModelSpec, replacement: Replacement,
                                  reference: Optional[ReferenceLike],
                                  reference_mask: Optional[Int[Tensor, "batch pos"]] = None,
                                  layers: Optional[Sequence[int]] = None) -> PreparedReference:
    """The reference every circuit's estimate reads, prepared once (RESAMPLE: one reference forward, with
    ``reference_mask``, for the patterns and z of ``layers`` (default: every layer); MEAN: a ``MeanActivations``)."""
    layers = range(spec.n_layers) if layers is None else layers
    both = FreezeSpec(tuple((layer, 0) for layer in layers), Circuit.BOTH, replacement, GradientMode.STOPGRAD)
    return prepare_reference(model, spec, both, reference, layers, reference_mask)


def attribution_inputs(model: Model, spec: ModelSpec, tokens: Tensor, replacement: Replacement,
                       circuits: Sequence[Circuit], reference: Union[PreparedReference, ReferenceLike],
                       attention_mask: Optional[Tensor], reference_attention_mask: Optional[Tensor],
                       layers: Optional[Sequence[int]] = None) -> tuple[Optional[Tensor], PreparedReference]:
    """The checked padding mask (``None``: unpadded) and the prepared reference, with :func:`tl_circuits.freeze_sweep`'s
    checks and errors: RESAMPLE reference tokens padded as their clean rows
    (:func:`~tl_circuits.freezing.sweep_inputs.check_resample_masks`, run with that padding), and no padded QK freeze a
    bridge cannot mask (:func:`~tl_circuits.freezing.sweep_inputs.check_padded_qk`)."""
    mask = None if attention_mask is None else check_mask(tokens, attention_mask, "tokens")
    reference_mask = check_resample_masks(tokens, mask, [reference], reference_attention_mask, replacement)
    check_padded_qk(spec, mask, circuits, replacement)
    prepared = prepare_attribution_reference(model, spec, replacement, reference, reference_mask,  # type: ignore
                                             layers)
    return mask, prepared


def check_attribution_replacement(replacement: Union[str, Replacement]) -> Replacement:
    """The replacement parsed; NOISE (a random replacement, not one activation to linearise towards) is refused."""
    parsed = parse_option(Replacement, replacement, "replacement")
    if parsed not in ATTRIBUTION_REPLACEMENTS:
        raise ValueError(f"the attribution sweep estimates {', '.join(r.value for r in ATTRIBUTION_REPLACEMENTS)} "
                         f"freezes; got {parsed.value!r} (a random replacement: use freeze_sweep)")
    return parsed


def first_order_pass(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    metric: Optional[Callable[[Tensor], Tensor]],
    *,
    circuits: Sequence[Union[str, Circuit]],
    replacement: Union[str, Replacement],
    reference: Union[PreparedReference, ReferenceLike] = None,
    per_sample: bool = False,
    qk_alpha: float = 1.0,
    graddrop: bool = False,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    reference_attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
) -> FirstOrderPass:
    """First-order estimates of every head's freeze effect for ``circuits`` (module docstring).

    ``metric``: ``logits -> scalar`` (or ``[batch]`` with ``per_sample=True``); None: the mean next-token loss
    (per sample: each sample's; with an ``attention_mask``: :func:`tl_circuits.freezing.sweep.default_metric`'s
    masked per-sample loss). ``reference``: as :func:`tl_circuits.freeze` (or already prepared by
    :func:`prepare_attribution_reference`: prepared again, which only picks its tensors). ``attention_mask``,
    ``reference_attention_mask``, ``layers``, ``heads``: as :func:`tl_circuits.freeze_sweep` (estimates NaN outside
    the selected cells). The model's parameters get no gradient (``torch.autograd.grad`` at zero-valued probes added
    to every selected layer's ``hook_z``), and every hook is removed on exit. ``graddrop``: also AtP*'s GradDrop
    ranking score (module docstring).
    """
    spec = model_spec(model)
    selection = resolve_selection(spec, layers, heads)
    swept = [parse_option(Circuit, c, "circuit") for c in circuits]
    replacement = check_attribution_replacement(replacement)
    if not 0 <= qk_alpha <= 1:
        raise ValueError(f"qk_alpha must be in [0, 1] (1: the exact frozen pattern, AtP*), got {qk_alpha}")
    for circuit in swept:
        check_replacement_fits(replacement, circuit)
        check_qk_freezable(spec, circuit)
    mask, reference = attribution_inputs(model, spec, tokens, replacement, swept, reference, attention_mask,
                                         reference_attention_mask, selection.layers)
    if metric is None:
        metric = default_metric(tokens, per_sample, mask)
    qk = Circuit.QK in swept
    ov = Circuit.OV in swept or Circuit.BOTH in swept
    records: dict[tuple[int, str], Tensor] = {}
    probes: dict[int, Tensor] = {}
    dropped: list[Optional[int]] = [None]  # GradDrop: the layer whose residual contributions pass no gradient
    hooks = _recording_hooks(model, spec, replacement, reference, qk, ov, records, probes, selection.layers)
    if graddrop:
        hooks += _graddrop_hooks(spec, dropped)
    masked = {} if mask is None else {"attention_mask": mask}  # no keyword without a mask, as freeze_sweep
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
        logits = model(tokens, **masked)
        value = metric(logits)
        clean = evaluate_metric(lambda _: value, logits, per_sample)
        del logits
        total = torch.where(torch.isfinite(value), value, torch.zeros_like(value)).sum() if per_sample else value
        estimate = _estimates(spec, swept, total, probes, records, qk_alpha, clean, per_sample, retain=graddrop)
        drop_scores = None
        if graddrop:  # AtP*'s GradDrop (module docstring)
            plain = _batch(estimate, per_sample)
            drop_scores = {c: torch.zeros_like(e) for c, e in plain.items()}
            for layer in range(1, spec.n_layers):
                dropped[0] = layer
                with_drop = _batch(_estimates(spec, swept, total, probes, records, qk_alpha, clean, per_sample,
                                              retain=layer < spec.n_layers - 1), per_sample)
                for c, grid in with_drop.items():
                    drop_scores[c][:layer] += grid[:layer].abs()   # the heads upstream of the dropped layer
            own = torch.arange(spec.n_layers, dtype=torch.float64)[:, None]  # layers before a head's own: unchanged
            drop_scores = {c: (g + own * plain[c].abs()) / max(1, spec.n_layers - 1) if spec.n_layers > 1
                           else plain[c].abs() for c, g in drop_scores.items()}
    if not selection.is_full:  # NaN outside the selected cells (the "O" block: the selected query heads)
        unselected = ~selection.cells(spec)["O"]
        estimate = {c: e.masked_fill(unselected.to(e.device), float("nan")) for c, e in estimate.items()}
        if drop_scores is not None:
            drop_scores = {c: e.masked_fill(unselected.to(e.device), float("nan")) for c, e in drop_scores.items()}
    patterns = {layer: records[(layer, "pattern_frozen")] for layer in selection.layers if qk}
    return FirstOrderPass(estimate=estimate, clean=clean, frozen_patterns=patterns, graddrop=drop_scores)


def _batch(estimate: dict[str, Tensor], per_sample: bool) -> dict[str, Tensor]:
    """Batch estimates [L, H]: the mean over finite samples of per-sample estimates (or as they are)."""
    return {c: e.nanmean(0) if per_sample else e for c, e in estimate.items()}


def _estimates(spec, swept, total, probes, records, qk_alpha, clean, per_sample, retain: bool) -> dict[str, Tensor]:
    """One backward of ``total`` to the z probes, and every circuit's estimate from it."""
    layers = sorted(probes)
    grads = torch.autograd.grad(total, [probes[layer] for layer in layers], allow_unused=True, retain_graph=retain)
    dz = {layer: torch.zeros_like(probes[layer]) if g is None else g.detach() for layer, g in zip(layers, grads)}
    some = next(iter(dz.values()))
    missing = torch.full((some.shape[0], spec.n_heads), float("nan"), dtype=torch.float64, device=some.device)
    estimate = {}
    for circuit in swept:  # a layer without a probe (not selected): NaN
        rows = [_layer_estimate(spec, circuit, layer, dz[layer], records, qk_alpha) if layer in dz else missing
                for layer in range(spec.n_layers)]
        grid = torch.stack(rows, dim=1)                                                  # [N, L, H]
        if per_sample:
            grid = torch.where(torch.isfinite(clean)[:, None, None], grid, float("nan"))
        estimate[circuit.value] = grid if per_sample else grid.sum(0)
    return estimate


def _graddrop_hooks(spec: ModelSpec, dropped: list[Optional[int]]) -> list[Hook]:
    """Hooks that zero, in a backward pass, the gradient through the residual contributions of layer ``dropped[0]``."""
    hooks: list[Hook] = []
    for layer in range(spec.n_layers):
        def gate(activation: Tensor, hook, layer: int = layer) -> Optional[Tensor]:
            if not activation.requires_grad:
                return None
            passed = activation.view_as(activation)  # returned, so the gated tensor is the one the forward uses
            passed.register_hook(lambda grad: grad * 0 if dropped[0] == layer else grad)
            return passed
        hooks += [(name, gate) for name in spec.block_output_hooks(layer)]
    return hooks


def _recording_hooks(model, spec, replacement, reference, qk: bool, ov: bool, records: dict,
                     probes: dict, layers: Sequence[int]) -> list[Hook]:
    """Read-only hooks recording each of ``layers``' clean pattern, v, z and frozen values, and the z probes."""
    hooks: list[Hook] = []
    heads = list(range(spec.n_heads))
    for layer in layers:
        def record(kind: str, value: Tensor, layer: int = layer) -> None:
            records[(layer, f"{kind}_frozen")] = value

        def keep(kind: str, layer: int = layer):
            def hook(activation: Tensor, hook) -> None:
                records[(layer, kind)] = activation.detach()
            return hook

        def probe(z: Tensor, hook, layer: int = layer) -> Tensor:
            records[(layer, "z")] = z.detach()
            probes[layer] = torch.zeros_like(z, requires_grad=True)
            return z + probes[layer]

        if qk:
            hooks += LayerFreeze(model, spec, layer, heads, Circuit.QK, replacement, GradientMode.STOPGRAD,
                                 reference, 0.0, None).reading_hooks(record)
            hooks += [(spec.hook_name(layer, "v"), keep("v")), (spec.hook_name(layer, "pattern"), keep("pattern"))]
        if ov:
            hooks += LayerFreeze(model, spec, layer, heads, Circuit.OV, replacement, GradientMode.STOPGRAD,
                                 reference, 0.0, None).reading_hooks(record)
        hooks.append((spec.hook_name(layer, "z"), probe))
    return hooks


def _layer_estimate(spec: ModelSpec, circuit: Circuit, layer: int, dz: Tensor, records: dict,
                    qk_alpha: float) -> Float[Tensor, "batch head"]:
    """One layer's per-sample estimates ``[N, n_heads]``: Σ_{pos, d} dz · Δz, in float64."""
    if circuit == Circuit.QK:
        v = records[(layer, "v")]
        kv = torch.tensor([spec.kv_head(h) for h in range(spec.n_heads)], device=v.device)
        delta_pattern = qk_path_delta(records[(layer, "pattern")], records[(layer, "pattern_frozen")], qk_alpha)
        delta_z = einops.einsum(delta_pattern, v.index_select(2, kv).double(),
                                "batch head q k, batch k head d -> batch q head d")
    else:  # OV and BOTH: the OV write replaces z whatever the pattern
        delta_z = records[(layer, "z_frozen")].double() - records[(layer, "z")].double()
    return einops.einsum(dz.double(), delta_z, "batch pos head d, batch pos head d -> batch head")


def qk_path_delta(clean: Float[Tensor, "batch head q k"], frozen: Float[Tensor, "batch head q k"],
                  alpha: float) -> Float[Tensor, "batch head q k"]:
    """``(P_α − P_clean) / α`` in float64, with ``P_α = softmax((1 − α) log P_clean + α log P_frozen)`` over the keys
    either pattern allows; α = 1: ``P_frozen − P_clean`` exactly; α = 0: the limit, ``J_softmax(P_clean) · Δlogits``.

    >>> clean, frozen = torch.tensor([[[[0.5, 0.5]]]]), torch.tensor([[[[0.9, 0.1]]]])
    >>> [round(x, 4) for x in qk_path_delta(clean, frozen, 1.0).flatten().tolist()]
    [0.4, -0.4]
    >>> [round(x, 4) for x in qk_path_delta(clean, frozen, 0.0).flatten().tolist()]   # 0.25 · log 9 · (1, -1)
    [0.5493, -0.5493]
    """
    clean, frozen = clean.double(), frozen.double()
    if alpha == 1:
        return frozen - clean
    allowed = (clean > 0) | (frozen > 0)
    delta_logits = torch.where(allowed, frozen.clamp_min(_LOG_FLOOR).log() - clean.clamp_min(_LOG_FLOOR).log(), 0.0)
    if alpha == 0:  # the softmax Jacobian at P_clean applied to Δlogits (a row's constant drops out)
        return clean * (delta_logits - (clean * delta_logits).sum(-1, keepdim=True))
    logits = clean.clamp_min(_LOG_FLOOR).log() + alpha * delta_logits
    path = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    path = torch.where(torch.isnan(path), torch.zeros_like(path), path)  # fully masked rows
    return (path - clean) / alpha
