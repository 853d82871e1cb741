"""The report's freeze stage: per-sample QK, OV and BOTH sweeps of every head, their paired tests, and pictures.

For each task, :func:`run_freeze_stage` runs :func:`tl_circuits.freeze_sweep` with ``per_sample=True`` over the
circuits ``qk``, ``ov`` and ``both`` (the whole head; not for ZERO, where BOTH = OV exactly), with the task's
``attention_mask`` and ``loss_mask``: its default metric scores each sample's mean next-token loss over its counted
predictions, the per-sample loss of the interference's gradients (docs/spec.md §2.1), so the sweep and the map are
about one loss. The effect of a head is the mean over samples of (frozen − clean) — every sample weighs the
same, whatever its number of scored tokens.
Then :meth:`tl_circuits.SweepResult.test` (two-sided sign-flip test of "the freeze leaves the loss unchanged",
bootstrap intervals, BH/BY q-values over every (circuit, layer, head) cell and the interaction BOTH − (QK + OV)),
and the attention patterns of the top QK heads on the first sample, clean beside frozen.

``--sweep attribution`` (or ``auto`` on a model whose exact sweep would take more than a few minutes,
:func:`chosen_sweep`) runs :func:`tl_circuits.attribution_sweep` instead, with the same padding, loss mask and
``--layers``/``--heads``: first-order estimates of every (selected) cell, the top :data:`VERIFY_SHARE` of each circuit
by |estimate| verified exactly, and the missed-effect bound of the rest at :data:`MISSED_CONFIDENCE`; the report marks
which numbers are estimates (docs/attribution.md).

A TransformerLens-native bridge on TransformerLens 3.x cannot freeze QK (it discards pattern edits): there only OV
is swept, QK and BOTH are NaN, and the pattern picture says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.cli.task_files import TaskInput
from tl_circuits.freezing.attribution import attribution_sweep
from tl_circuits.freezing.references import compute_mean_activations
from tl_circuits.freezing.sweep import SweepResult, freeze_sweep
from tl_circuits.freezing.sweep_stats import SweepTestResult
from tl_circuits.models.spec import model_spec
from tl_circuits.models.types import Model
from tl_circuits.parallel.group import World

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure

    from tl_circuits.cli.pipeline import AnalysisConfig

CIRCUITS = ("qk", "ov", "both")
SWEEPS = ("auto", "exact", "attribution")
VERIFY_SHARE = 0.1  # the attribution sweep verifies this share of each circuit's cells exactly
MISSED_CONFIDENCE = 0.95  # confidence of its missed-effect bound (all unverified cells at once)
AUTO_EXACT_FLOPS = 1e13  # "auto": the exact sweep up to about this many FLOPs (a few minutes on a CPU)
SCREEN_WARNING = (
    "the attribution sweep's first-order estimates find most, not all, of the largest effects: on the models of "
    "docs/attribution.md they found 71-100% of the true top-10% QK cells and 29-100% of the OV cells (MEAN, "
    "RESAMPLE). Verified cells are exact and the rest are bounded, but an unverified effect stays an estimate; "
    "--sweep exact where it is affordable")
ZERO_SCREEN_WARNING = (
    "the attribution sweep screens ZERO freezes least well: on the models of docs/attribution.md its estimates found "
    "only 25-87% of the true top-10% OV cells (MEAN: 29-100%, QK: 50-100%). Verified cells are exact and the rest "
    "are bounded, but a large unverified effect stays an estimate; use --replacement mean, or --sweep exact")
PATTERN_HEADS = 3  # top QK heads shown clean beside frozen
SWEEP_ALTERNATIVE = "two-sided"  # "the freeze changes the loss", either way


@dataclass
class FreezeStage:
    """One task's sweep, its test and its pattern picture."""

    sweep: SweepResult
    test: SweepTestResult
    patterns: Any  # a matplotlib Figure


def swept_circuits(model: Model, replacement: str = "mean") -> tuple[str, ...]:
    """The circuits to sweep: all of :data:`CIRCUITS`; without BOTH for ZERO (a zero OV makes the head write nothing,
    so BOTH = OV exactly and the interaction is −QK by construction); only OV on a native TL 3.x bridge."""
    if model_spec(model).qk_mask_source is None:
        warnings.warn("QK freezes are not available on this model (a TransformerLens-native bridge before "
                      "TransformerLens 4 discards attention-pattern edits): the QK and BOTH sweeps are left out "
                      "(NaN)", stacklevel=3)
        return ("ov",)
    return ("qk", "ov") if replacement == "zero" else CIRCUITS


def sweep_reference(model: Model, task: TaskInput, replacement: str, progress: bool = False,
                    memory_budget_gb: float = defaults.MEMORY_BUDGET_GB) -> Any:
    """The sweep's reference: MEAN: the task's mean activations over its valid tokens (its padding left out);
    RESAMPLE: its corrupted twins (row ``i`` patches sample ``i``); None for ZERO."""
    device = next(model.parameters()).device
    if replacement == "mean":
        return compute_mean_activations(model, task.tokens.to(device), memory_budget_gb=memory_budget_gb,
                                        progress=progress, attention_mask=task.attention_mask.to(device))
    if replacement == "resample":
        if task.corrupted is None:
            raise ValueError(f"RESAMPLE needs each sample's corrupted twin; task {task.name!r} has none")
        return task.corrupted.to(device)
    return None


def sweep_reference_mask(task: TaskInput, replacement: str, device: torch.device) -> Optional[Tensor]:
    """The padding of RESAMPLE's corrupted twins (a twin is padded as its clean sample); None otherwise."""
    return task.attention_mask.to(device) if replacement == "resample" else None


def run_freeze_stage(model: Model, task: TaskInput, config: AnalysisConfig,
                     world: Optional[World] = None) -> FreezeStage:
    """Per-sample sweep of every head on one task, its paired test and its pattern picture (module docstring);
    ``world``: the ranks the sweep is shared over (``None``: this process alone)."""
    device = next(model.parameters()).device
    tokens = task.tokens.to(device)
    budget = config.interference.memory_budget_gb
    reference = sweep_reference(model, task, config.replacement, config.progress, budget)
    circuits = swept_circuits(model, config.replacement)
    mask = task.attention_mask.to(device)
    # both sweeps take the task's padding, loss mask and layer/head subset with one meaning (docs/spec.md §1.7, §1.9)
    masks: dict[str, Any] = dict(attention_mask=mask, loss_mask=task.loss_mask.to(device),
                                 reference_attention_mask=sweep_reference_mask(task, config.replacement, device))
    if chosen_sweep(model, tokens, len(circuits), config.sweep) == "attribution":
        # the estimates fall short of the accuracy goal in places (docs/attribution.md): every screen says so
        warnings.warn(ZERO_SCREEN_WARNING if config.replacement == "zero" else SCREEN_WARNING, UserWarning,
                      stacklevel=2)
        sweep: SweepResult = attribution_sweep(
            model, tokens, circuits=circuits, layers=config.layers, heads=config.heads, per_sample=True,
            replacement=config.replacement, reference=reference, verify=VERIFY_SHARE,
            missed_confidence=MISSED_CONFIDENCE, seed=config.seed, memory_budget_gb=budget, progress=config.progress,
            **masks)
        sweep.settings["sweep_chosen_by"] = config.sweep
    else:
        # the default metric: the per-sample loss of the interference's gradients, on the same counted predictions
        sweep = freeze_sweep(model, tokens, circuits=circuits, layers=config.layers, heads=config.heads,
                             per_sample=True, replacement=config.replacement, reference=reference, seed=config.seed,
                             memory_budget_gb=budget, progress=config.progress, world=world, **masks)
    correction = config.correction if config.correction in ("bh", "by", "none") else "bh"
    test = sweep.test(alpha=config.alpha, alternative=SWEEP_ALTERNATIVE, n_bootstrap=config.n_bootstrap,
                      correction=correction, seed=config.seed, progress=config.progress)
    shape = next(iter(sweep.frozen.values())).shape
    sweep.frozen = {c: sweep.frozen.get(c, torch.full(shape, float("nan"))) for c in CIRCUITS}
    if "qk" in circuits:
        patterns = sweep.plot_patterns(model, tokens, k=min(PATTERN_HEADS, shape[0] * shape[1]),
                                       reference=reference, tokenizer=getattr(model, "tokenizer", None))
    else:
        patterns = _no_patterns()
    return FreezeStage(sweep, test, patterns)


def exact_sweep_flops(model: Model, tokens: Tensor, n_circuits: int) -> float:
    """Rough FLOPs of the exact sweep: 2 × parameters × tokens per forward, times its forward-equivalents (each of the
    ``n_circuits`` × H copies of layer l runs layers l..L−1: (L + 1) / 2 per head on average, as whole forwards)."""
    spec = model_spec(model)
    n_params = sum(p.numel() for p in model.parameters())
    forwards = n_circuits * spec.n_heads * (spec.n_layers + 1) / 2
    return 2.0 * n_params * tokens.numel() * forwards


def chosen_sweep(model: Model, tokens: Tensor, n_circuits: int, sweep: str, limit: float = AUTO_EXACT_FLOPS) -> str:
    """``"exact"`` or ``"attribution"``: as asked, or for ``"auto"`` the exact sweep unless
    :func:`exact_sweep_flops` exceeds ``limit``."""
    if sweep != "auto":
        return sweep
    return "exact" if exact_sweep_flops(model, tokens, n_circuits) <= limit else "attribution"


def _no_patterns() -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, "no QK freeze on this model: no pattern pictures", ha="center", va="center")
    return fig
