"""Exact checks of an attribution sweep: verification of its top cells, and the bound on what it missed (§1.9).

- :func:`verify_top` runs the exact sweep (:func:`tl_circuits.freeze_sweep` with ``cells=``) on the k cells of each
  circuit with the largest |estimate| and records their exact effects beside the estimates.
- :func:`missed_effect_bound` is AtP*'s subset sampling: in each of ``rounds`` rounds the unverified cells of a
  circuit are split at random into ``groups`` groups, each group is frozen together (one stacked copy each), and the
  largest |joint effect| bounds any unverified cell's effect at a stated confidence
  (:class:`~tl_circuits.freezing.attribution_result.MissedEffectBound`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits import defaults
from tl_circuits.defaults import SEED
from tl_circuits.freezing.attribution_result import AttributionResult, MissedEffectBound
from tl_circuits.freezing.first_order import attribution_inputs
from tl_circuits.freezing.options import Circuit, Replacement
from tl_circuits.freezing.stacked import DrawSettings, clean_run, evaluate_metric, joint_draw
from tl_circuits.freezing.sweep import default_metric, freeze_sweep
from tl_circuits.interference import memory
from tl_circuits.models.spec import ModelSpec, model_spec
from tl_circuits.models.types import Model
from tl_circuits.selection import selected_cells

__all__ = ["MISSED_GROUPS", "VERIFY_TOLERANCE", "check_same_clean", "missed_effect_bound", "n_to_verify",
           "selected_grid", "top_cells", "verify_top"]

MISSED_GROUPS = 4
"""Groups per round of :func:`missed_effect_bound` (each round costs this many stacked copies)."""
VERIFY_TOLERANCE = 1e-4
"""Largest relative difference between the clean metric of the sweep and of its verification (else: different
tokens, metric or model)."""


def n_to_verify(k: Union[int, float], n_cells: int) -> int:
    """Cells to verify per circuit: an int k (at most ``n_cells``), or a fraction in (0, 1] of ``n_cells``, rounded up.

    >>> n_to_verify(3, 144), n_to_verify(0.1, 144), n_to_verify(0, 8)
    (3, 15, 0)
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0 or (isinstance(k, float) and k > 1):
        raise ValueError(f"verify must be a number of cells (int >= 0) or a fraction in (0, 1], got {k!r}")
    return min(n_cells, math.ceil(k * n_cells) if isinstance(k, float) else k)


def top_cells(estimate: dict[str, Tensor], k: int, exclude: Optional[dict[str, Tensor]] = None,
              eligible: Optional[Tensor] = None) -> list[tuple[str, int, int]]:
    """The ``k`` cells of each circuit with the largest |estimate| (NaN last) among the ``eligible`` ones (bool
    [n_layers, n_heads]; ``None``: all), as (circuit, layer, head), minus the cells ``exclude`` marks."""
    cells = []
    for circuit, grid in estimate.items():
        n_heads = grid.shape[1]
        score = torch.nan_to_num(grid.abs().cpu(), nan=-1.0)
        if eligible is not None:
            score = score.masked_fill(~eligible, -2.0)
        order = score.flatten().argsort(descending=True, stable=True)[:k]
        for index in order.tolist():
            layer, head = divmod(index, n_heads)
            if eligible is not None and not bool(eligible[layer, head]):
                continue
            if exclude is None or not bool(exclude[circuit][layer, head]):
                cells.append((circuit, layer, head))
    return cells


def selected_grid(result: AttributionResult, spec: ModelSpec) -> Tensor:
    """The cells a result covers (bool [n_layers, n_heads]): its ``settings["selection"]`` (docs/spec.md §0.7), or
    every cell."""
    cells = selected_cells(result.settings, spec)
    return torch.ones(spec.n_layers, spec.n_heads, dtype=torch.bool) if cells is None else cells["O"]


def _selection_arguments(result: AttributionResult) -> dict:
    """``layers=`` and ``heads=`` of a result's selection, for :func:`tl_circuits.freeze_sweep` (none: all cells)."""
    recorded = result.settings.get("selection")
    return {} if not recorded else dict(layers=recorded["layers"], heads=recorded["heads"])


def check_same_clean(result: AttributionResult, clean: float, what: str) -> None:
    """Raise ``ValueError`` if a check's clean metric is not the sweep's (other tokens, metric or model)."""
    if not abs(clean - result.clean) <= VERIFY_TOLERANCE * max(1.0, abs(result.clean)):
        raise ValueError(f"the {what}'s clean metric {clean:.6g} differs from the attribution sweep's "
                         f"{result.clean:.6g}: check with the sweep's own tokens, metric and model")


def verify_top(result: AttributionResult, model: Model, tokens: Tensor, k: Union[int, float], *, metric=None,
               reference=None, memory_budget_gb: float = defaults.MEMORY_BUDGET_GB, chunk_size: Optional[int] = None,
               progress: bool = True, attention_mask: Optional[Tensor] = None,
               reference_attention_mask: Optional[Tensor] = None) -> AttributionResult:
    """``result`` with the top ``k`` cells of each circuit by |estimate| (``k``: a count, or a fraction of the
    selected cells) run exactly (:func:`tl_circuits.freeze_sweep` with ``cells=``, per sample if the result is): a new
    result, whose ``effect`` is exact there. ``tokens``, ``metric``, ``reference`` and the masks must be the sweep's;
    a clean metric that differs from the sweep's is a ``ValueError``."""
    eligible = selected_grid(result, model_spec(model))
    cells = top_cells(result.estimate, n_to_verify(k, int(eligible.sum())), exclude=result.verified,
                      eligible=eligible)
    if not cells:
        return result
    per_sample = result.per_sample_estimate is not None
    exact = freeze_sweep(model, tokens, metric, circuits=list(result.estimate), replacement=result.replacement,
                         reference=reference, per_sample=per_sample, memory_budget_gb=memory_budget_gb,
                         chunk_size=chunk_size, cells=cells, progress=progress, attention_mask=attention_mask,
                         reference_attention_mask=reference_attention_mask, **_selection_arguments(result))
    check_same_clean(result, exact.clean, "verification")
    verified = {c: m.clone() for c, m in result.verified.items()}
    exact_grid = {c: g.clone() for c, g in result.exact.items()}
    per_sample_exact = None if not per_sample else {
        c: (result.per_sample_exact or {}).get(c, torch.full(g.shape, float("nan"), dtype=torch.float64)).clone()
        for c, g in (result.per_sample_estimate or {}).items()}
    for circuit, layer, head in cells:
        verified[circuit][layer, head] = True
        exact_grid[circuit][layer, head] = exact.effect[circuit][layer, head]
        if per_sample_exact is not None and exact.per_sample_effect is not None:
            per_sample_exact[circuit][:, layer, head] = exact.per_sample_effect[circuit][:, layer, head]
    settings = dict(result.settings, verified_cells=[[c, l, h] for c in verified
                                                     for l, h in verified[c].nonzero().tolist()])
    return dataclasses.replace(result, frozen={}, per_sample_effect=None, verified=verified, exact=exact_grid,
                               per_sample_exact=per_sample_exact, settings=settings)


def missed_effect_bound(result: AttributionResult, model: Model, tokens: Tensor, *, metric=None, reference=None,
                        confidence: float = 0.95, rounds: Optional[int] = None, groups: int = MISSED_GROUPS,
                        seed: Optional[int] = SEED, memory_budget_gb: float = defaults.MEMORY_BUDGET_GB,
                        chunk_size: Optional[int] = None, progress: bool = True,
                        attention_mask: Optional[Tensor] = None,
                        reference_attention_mask: Optional[Tensor] = None) -> AttributionResult:
    """``result`` with ``missed[circuit]``: AtP*'s subset-sampling bound on the unverified (selected) cells' effects.

    ``rounds`` (default: the fewest with ``1 − n_unverified · 2^−rounds ≥ confidence``) random splits of each
    circuit's unverified cells into ``groups`` groups; each group is frozen together, one stacked copy per group,
    restarting at its first layer. See :class:`~tl_circuits.freezing.attribution_result.MissedEffectBound` for the
    statement and its assumption. ``tokens``, ``metric``, ``reference`` and the masks (as
    :func:`tl_circuits.freeze_sweep`'s) must be the sweep's.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an integer >= 1, got {groups!r}")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"rounds must be an integer >= 1 or None, got {rounds!r}")
    spec = model_spec(model)
    per_sample = result.per_sample_estimate is not None
    replacement = Replacement(result.replacement)
    circuits = [Circuit(c) for c in result.verified]
    eligible = selected_grid(result, spec)
    mask, prepared = attribution_inputs(model, spec, tokens, replacement, circuits, reference, attention_mask,
                                        reference_attention_mask, eligible.any(1).nonzero().flatten().tolist())
    metric = metric if metric is not None else default_metric(tokens, per_sample, mask)
    rng = np.random.default_rng(seed)
    plan = {}
    for circuit, verified in result.verified.items():
        unverified = [tuple(cell) for cell in (~verified & eligible).nonzero().tolist()]
        if not unverified:
            continue
        n_rounds = rounds or max(1, math.ceil(math.log2(len(unverified) / (1 - confidence))))
        n_groups = min(groups, len(unverified))
        splits = [np.array_split(rng.permutation(len(unverified)), n_groups) for _ in range(n_rounds)]
        plan[circuit] = (unverified, n_rounds, n_groups, [[unverified[i] for i in part] for s in splits for part in s])
    batch, n_pos = tokens.shape
    rows = chunk_size or max(batch, memory.rows_for_budget(memory.forward_row_bytes(spec, n_pos), memory_budget_gb))
    copies = max(1, rows // batch)
    missed = dict(result.missed)
    n_passes = sum(math.ceil(len(p[3]) / copies) for p in plan.values())
    with torch.no_grad(), tqdm(total=n_passes, desc="missed-effect bound", disable=not progress) as bar:
        clean_logits, run_layer, _ = clean_run(model, spec, tokens, mask)
        clean = evaluate_metric(metric, clean_logits, per_sample)
        del clean_logits
        check_same_clean(result, float(clean.nanmean() if per_sample else clean), "missed-effect bound")
        for circuit, (unverified, n_rounds, n_groups, group_cells) in plan.items():
            draw = DrawSettings(replacement, {Circuit(circuit): prepared}, 0.0, None)
            groups_of = [(Circuit(circuit), cells) for cells in group_cells]
            values = joint_draw(model, spec, batch, run_layer, metric, groups_of, draw, per_sample, copies, bar)
            joint = (values - clean[:, None]).nanmean(0) if per_sample else values - clean
            missed[circuit] = MissedEffectBound(
                circuit=circuit, bound=float(joint.abs().max()), n_unverified=len(unverified), rounds=n_rounds,
                groups=n_groups, confidence_per_cell=1 - 2.0 ** -n_rounds,
                confidence_all=max(0.0, 1 - len(unverified) * 2.0 ** -n_rounds), joint_effects=joint.tolist(),
                group_cells=[[list(cell) for cell in cells] for cells in group_cells], seed=seed)
    return dataclasses.replace(result, frozen={}, per_sample_effect=None, missed=missed)
