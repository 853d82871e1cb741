"""The report's freeze stage: per-sample QK, OV and BOTH sweeps of every head, their paired tests, and pictures.

For each task, :func:`run_freeze_stage` runs :func:`tl_circuits.freeze_sweep` with ``per_sample=True`` over the
circuits ``qk``, ``ov`` and ``both`` (the whole head; not for ZERO, where BOTH = OV exactly), scoring each
sample's mean next-token loss on its *scored* positions (:func:`tl_circuits.bundled.tasks.scored_loss` with
``per_sample=True``). The effect of a head is the mean over samples of (frozen − clean) — every sample weighs the
same, whatever its number of scored tokens.
Then :meth:`tl_circuits.SweepResult.test` (two-sided sign-flip test of "the freeze leaves the loss unchanged",
bootstrap intervals, BH/BY q-values over every (circuit, layer, head) cell and the interaction BOTH − (QK + OV)),
and the attention patterns of the top QK heads on the first sample, clean beside frozen.

``--sweep attribution`` (or ``auto`` on a model whose exact sweep would take more than a few minutes,
:func:`chosen_sweep`) runs :func:`tl_circuits.attribution_sweep` instead: first-order estimates of every cell, the
top :data:`VERIFY_SHARE` of each circuit by |estimate| verified exactly, and the missed-effect bound of the rest at
:data:`MISSED_CONFIDENCE`; the report marks which numbers are estimates (docs/attribution.md).

A TransformerLens-native bridge on TransformerLens 3.x cannot freeze QK (it discards pattern edits): there only OV
is swept, QK and BOTH are NaN, and the pattern picture says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_circuits.bundled import tasks
from tl_circuits.bundled.tasks import TaskBatch
from tl_circuits.cli.task_files import TaskInput
from tl_circuits.freezing.attribution import attribution_sweep
from tl_circuits.freezing.references import compute_mean_activations
from tl_circuits.freezing.sweep import SweepResult, freeze_sweep
from tl_circuits.freezing.sweep_stats import SweepTestResult
from tl_circuits.models.spec import model_spec
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure

    from tl_circuits.cli.analysis import AnalysisConfig

CIRCUITS = ("qk", "ov", "both")
SWEEPS = ("auto", "exact", "attribution")
VERIFY_SHARE = 0.1  # the attribution sweep verifies this share of each circuit's cells exactly
MISSED_CONFIDENCE = 0.95  # confidence of its missed-effect bound (all unverified cells at once)
AUTO_EXACT_FLOPS = 1e13  # "auto": the exact sweep up to about this many FLOPs (a few minutes on a CPU)
PATTERN_HEADS = 3  # top QK heads shown clean beside frozen
SWEEP_ALTERNATIVE = "two-sided"  # "the freeze changes the loss", either way


@dataclass
class FreezeStage:
    """One task's sweep, its test and its pattern picture."""

    sweep: SweepResult
    test: SweepTestResult
    patterns: Any  # a matplotlib Figure


def per_sample_scored_loss(task: TaskInput, device: Union[str, torch.device]):
    """``logits -> [batch]``: each sample's mean next-token cross-entropy over its scored positions (NaN where a
    sample has none)."""
    batch = TaskBatch(task.tokens.to(device), task.scored.to(device), task.name)

    def scored_loss(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        return tasks.scored_loss(logits, batch, per_sample=True)

    return scored_loss


def swept_circuits(model: Model, replacement: str = "mean") -> tuple[str, ...]:
    """The circuits to sweep: all of :data:`CIRCUITS`; without BOTH for ZERO (a zero OV makes the head write nothing,
    so BOTH = OV exactly and the interaction is −QK by construction); only OV on a native TL 3.x bridge."""
    if model_spec(model).qk_mask_source is None:
        warnings.warn("QK freezes are not available on this model (a TransformerLens-native bridge before "
                      "TransformerLens 4 discards attention-pattern edits): the QK and BOTH sweeps are left out "
                      "(NaN)", stacklevel=3)
        return ("ov",)
    return ("qk", "ov") if replacement == "zero" else CIRCUITS


def run_freeze_stage(model: Model, task: TaskInput, config: AnalysisConfig) -> FreezeStage:
    """Per-sample sweep of every head on one task, its paired test and its pattern picture (module docstring)."""
    device = next(model.parameters()).device
    tokens = task.tokens.to(device)
    budget = config.interference.memory_budget_gb
    reference = compute_mean_activations(model, tokens, memory_budget_gb=budget, progress=config.progress) \
        if config.replacement == "mean" else None
    circuits = swept_circuits(model, config.replacement)
    metric = per_sample_scored_loss(task, device)
    if chosen_sweep(model, tokens, len(circuits), config.sweep) == "attribution":
        sweep: SweepResult = attribution_sweep(
            model, tokens, metric, circuits=circuits, per_sample=True, replacement=config.replacement,
            reference=reference, verify=VERIFY_SHARE, missed_confidence=MISSED_CONFIDENCE, seed=config.seed,
            memory_budget_gb=budget, progress=config.progress)
        sweep.settings["sweep_chosen_by"] = config.sweep
    else:
        sweep = freeze_sweep(model, tokens, metric, circuits=circuits, per_sample=True,
                             replacement=config.replacement, reference=reference, seed=config.seed,
                             memory_budget_gb=budget, progress=config.progress)
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
