"""The attribution sweep: every head's QK and OV freeze effect estimated to first order, then checked (§1.9).

:func:`attribution_sweep` takes :func:`tl_circuits.freeze_sweep`'s arguments and returns its result shape (an
:class:`~tl_circuits.freezing.attribution_result.AttributionResult`, a ``SweepResult``), at the cost of one clean
forward, one reference forward (RESAMPLE) and one backward pass instead of a forward per (circuit, head):

1. **estimate** (:mod:`~tl_circuits.freezing.first_order`): Σ ∂metric/∂z · (z frozen − z clean) per head; for QK
   the frozen pattern is computed exactly (AtP*'s fix), so only what follows the pattern is linearised;
2. **verify** (``verify=k``): the k cells of each circuit with the largest |estimate| are run exactly and their
   exact effects replace the estimates in ``effect`` (``estimate`` keeps both side by side);
3. **bound** (``missed_confidence=c``): AtP*'s subset sampling bounds the effect any unverified cell could have.

How good the estimates are, per model and replacement, is measured in docs/attribution.md: use the exact sweep
where it is affordable, and ``verify`` whatever is reported.

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")
>>> tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
>>> result = attribution_sweep(model, tokens, replacement="zero", verify=2, progress=False)
>>> result.n_verified
{'qk': 2, 'ov': 2}
>>> result.settings["sweep"], result.estimate["qk"].shape
('attribution', torch.Size([2, 4]))

A padded batch (sample 0 left-padded), layer 1 only, as :func:`tl_circuits.freeze_sweep` takes them:

>>> mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]] + [[1] * 12] * 3)
>>> result = attribution_sweep(model, tokens, attention_mask=mask, layers=[1], progress=False)
>>> result.settings["attention_mask"], result.estimate["ov"][0].isnan().all().item()
(True, True)
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

from jaxtyping import Int
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.defaults import SEED
from tl_circuits.freezing.attribution_checks import MISSED_GROUPS, missed_effect_bound, n_to_verify, verify_top
from tl_circuits.freezing.attribution_result import ESTIMATE_NOTE, AttributionResult
from tl_circuits.freezing.first_order import attribution_inputs, check_attribution_replacement, first_order_pass
from tl_circuits.freezing.options import Circuit, parse_option
from tl_circuits.freezing.references import ReferenceLike
from tl_circuits.freezing.sweep import Metric, PerSampleMetric, default_metric
from tl_circuits.interference.inputs import check_mask, prepare_loss
from tl_circuits.models.spec import check_tokens, model_spec
from tl_circuits.models.types import Model
from tl_circuits.selection import resolve_selection

__all__ = ["attribution_sweep"]


def attribution_sweep(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    metric: Optional[Union[Metric, PerSampleMetric]] = None,
    *,
    circuits: Sequence[Union[str, Circuit]] = ("qk", "ov"),
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    replacement: str = "zero",
    reference: Optional[ReferenceLike] = None,
    per_sample: bool = False,
    verify: Union[int, float] = 0,
    missed_confidence: Optional[float] = None,
    missed_groups: int = MISSED_GROUPS,
    qk_alpha: float = 1.0,
    seed: Optional[int] = SEED,
    memory_budget_gb: float = defaults.MEMORY_BUDGET_GB,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    loss_mask: Optional[Int[Tensor, "batch pos"]] = None,
    reference_attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> AttributionResult:
    """First-order estimates of every head's freeze effect, the top cells verified exactly (module docstring).

    Args:
        tokens, metric, circuits, per_sample, memory_budget_gb, chunk_size, progress: as
            :func:`tl_circuits.freeze_sweep`.
        layers, heads: the cells estimated, ``layers × heads`` (``None``: all), as :func:`tl_circuits.freeze_sweep`'s
            (docs/spec.md §0.7): the grids keep their shape, NaN outside the selection; only selected cells are
            verified and bounded; ``settings["selection"]`` records it.
        replacement, reference: ``"zero"``, ``"mean"``, ``"resample"`` (a clean/corrupted pair per sample:
            ``reference`` = the corrupted tokens or cache, row i for sample i) or ``"identity"`` (QK); NOISE, a random
            replacement, is refused.
        verify: cells of each circuit to run exactly, the largest |estimate| first: a count, or a fraction of the
            cells (``0.1``: the top 10%). Their exact effects replace the estimates in ``effect``.
        missed_confidence: if given (e.g. 0.95), bound the unverified cells' effects by subset sampling at this
            confidence for all of them at once (:func:`~tl_circuits.freezing.attribution_checks.missed_effect_bound`,
            ``missed_groups`` groups a round, ``seed``).
        qk_alpha: 1 (default): AtP*'s exact frozen pattern; 0: plain attribution patching (softmax linearised);
            in between: the logit-space path of :func:`~tl_circuits.freezing.first_order.qk_path_delta`.
        attention_mask, loss_mask, reference_attention_mask: as :func:`tl_circuits.freeze_sweep`'s, with its checks
            and errors: the padding every forward and backward runs with (the clean run, the RESAMPLE reference run
            with ``reference_attention_mask``, the verification and the bound), and the predictions the default
            metric scores (its masked per-sample loss, docs/spec.md §2.1).
    """
    spec = model_spec(model)
    check_tokens(spec, tokens)
    swept = [parse_option(Circuit, c, "circuit") for c in circuits]
    if not swept:
        raise ValueError("circuits is empty: name at least one of 'qk', 'ov', 'both'")
    parsed = check_attribution_replacement(replacement)
    selection = resolve_selection(spec, layers, heads)
    n_verify = n_to_verify(verify, len(selection.layers) * len(selection.heads))
    metric_name = getattr(metric, "__name__", "metric") if metric is not None else "loss"
    loss = {"scored": f"metric {metric_name}"}
    if metric is not None and loss_mask is not None:
        raise ValueError("loss_mask says what the default metric scores; a metric of your own gets the logits only "
                         "and would ignore it: score the predictions you want inside your metric, or drop the metric")
    # once: RESAMPLE runs the reference here, with its padding, for the selected layers
    mask, reference = attribution_inputs(model, spec, tokens, parsed, swept, reference, attention_mask,
                                         reference_attention_mask, selection.layers)
    if metric is None:
        loss, metric = _default_loss(tokens, mask, loss_mask, per_sample)
    estimated = first_order_pass(model, tokens, metric, circuits=swept, replacement=parsed, reference=reference,
                                 per_sample=per_sample, qk_alpha=qk_alpha, attention_mask=mask,
                                 layers=selection.layers, heads=selection.heads)
    if per_sample:
        clean = float(estimated.clean.nanmean())
        per_sample_estimate = estimated.estimate
        estimate = {c: e.nanmean(0) for c, e in per_sample_estimate.items()}
    else:
        clean, per_sample_estimate, estimate = float(estimated.clean), None, estimated.estimate
    batch, n_pos = tokens.shape
    settings = dict(sweep="attribution", estimate=ESTIMATE_NOTE, circuits=[c.value for c in swept],
                    qk_method="exact pattern (AtP*)" if qk_alpha == 1 else f"logit path, alpha={qk_alpha}",
                    qk_alpha=qk_alpha, batch=batch, n_pos=n_pos, per_sample=per_sample, verify=verify,
                    verified_cells=[], seed=seed, loss=loss, attention_mask=mask is not None,
                    **({} if layers is None and heads is None else {"selection": selection.to_dict()}))
    result = AttributionResult(
        clean=clean, frozen={}, replacement=parsed.value, metric_name=metric_name, settings=settings,
        clean_per_sample=estimated.clean if per_sample else None,
        estimate=estimate, per_sample_estimate=per_sample_estimate)
    if n_verify:
        result = verify_top(result, model, tokens, n_verify, metric=metric, reference=reference,
                            memory_budget_gb=memory_budget_gb, chunk_size=chunk_size, progress=progress,
                            attention_mask=mask)
    if missed_confidence is not None:
        result = missed_effect_bound(result, model, tokens, metric=metric, reference=reference, attention_mask=mask,
                                     confidence=missed_confidence, groups=missed_groups, seed=seed,
                                     memory_budget_gb=memory_budget_gb, chunk_size=chunk_size, progress=progress)
    return result


def _default_loss(tokens: Tensor, mask: Optional[Tensor], loss_mask: Optional[Tensor],
                  per_sample: bool) -> tuple[dict, Metric]:
    """The default metric (:func:`tl_circuits.freezing.sweep.default_metric`, masks checked) and its description for
    the settings, as :func:`tl_circuits.freeze_sweep`'s."""
    scored = prepare_loss(tokens, check_mask(tokens, mask, "tokens"), loss_mask, None, "tokens")
    return scored.describe(), default_metric(tokens, per_sample, mask, scored.loss_mask)
