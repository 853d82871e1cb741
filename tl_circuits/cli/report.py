"""The whole analysis of two tasks on one model, and the report folder the ``tl-circuits`` command writes.

:func:`run_analysis` runs, on task A and task B:

1. **Freeze sweeps** — :func:`tl_circuits.freeze_sweep` over every head, QK and OV circuits, on each task's batch.
   Metric: the mean next-token cross-entropy over the task's *scored* positions (all scored tokens of the batch
   pooled; for file tasks every real token after the first), so the effect is the change of the loss on what
   the task is about. ``effect = loss with the head's circuit frozen − clean loss`` (positive: the head helps).
2. **Interference** — per-sample gradients of the attention weights of A ∪ B, the *pooled* diagonal Fisher,
   and the pooled pairwise score matrix (:func:`tl_circuits.pooled_pairwise_scores`), computed once. Its
   A × B block is the interference map: identical to :func:`tl_circuits.compute_interference` with
   ``fisher_source="pooled"`` (tested), so the map and its statistics share one normaliser.
3. **Statistics** — :func:`tl_circuits.permutation_test` on that same pooled matrix (task labels exchangeable;
   one-sided towards conflict: ``"less"`` for the signed variant, ``"greater"`` otherwise), BH/BY q-values,
   max-stat and cluster-mass family-wise p-values, bootstrap (BCa) intervals of each cell's mean.

Note: the per-sample loss behind the gradients is SPEC §2's token mean over *all* valid positions of a sample
(the gradient stage has no scored-position mask); only the sweep metric is restricted to scored positions.

:func:`write_report` writes the report folder via a hidden temporary sibling directory that is renamed into
place only when every file is written (``report.md`` last), so an interrupted or failed run never leaves a
complete-looking report; an earlier report at the same path is replaced only on success.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_circuits.freezing.references import compute_mean_activations
from tl_circuits.interference.engine import InterferenceConfig, InterferenceResult
from tl_circuits.models.spec import BLOCKS, model_spec
from tl_circuits.stats.model_test import pooled_pairwise_scores
from tl_circuits.stats.permutation import InterferenceTestResult, permutation_test
from tl_circuits.freezing.sweep import SweepResult, freeze_sweep
from tl_circuits.bundled import tasks
from tl_circuits.cli.task_files import TaskInput
from tl_circuits.bundled.tasks import TaskBatch

REPORT_MARKER = "tl-circuits report"
TASK_KEYS = ("a", "b")
CIRCUITS = ("qk", "ov")
REPLACEMENTS = ("zero", "mean")
FILES = {
    "report.md": "this summary",
    "report.json": "every number below, settings, timings and warnings (NaN written as null)",
    "sweep.csv": "freeze sweep: task, circuit, layer, head, loss with the head frozen, effect (= frozen − clean)",
    "interference.csv": "per (block, layer, head): interference mean over A×B pairs and its statistics",
    "top_conflicts.csv": "the most conflicting (sample pair, block, layer, head) cells",
    "top_pairs.csv": "the most conflicting sample pairs (score summed over blocks, layers and heads)",
    "samples.csv": "every sample: task, id, length, preview",
    "freeze_effect.png": "freeze effect per circuit and task (layer × head)",
    "interference.png": "interference mean per block, non-significant cells hatched",
    "interference_z.png": "standardised statistic z per block, non-significant cells hatched",
}


class ReportOutputError(ValueError):
    """The output path cannot take a report (the message says why)."""


@dataclass
class AnalysisConfig:
    """Settings of :func:`run_analysis` (recorded in the report).

    Attributes:
        variant: interference variant (``"signed"``: negative = conflicting gradients; ``"unsigned"``,
            ``"symmetric"``), see :class:`tl_circuits.InterferenceConfig`.
        replacement: freeze replacement of the sweep, ``"zero"`` or ``"mean"`` (mean over the task's own batch).
        n_permutations: label permutations; ``None`` (default): ``max(1000, ⌈2 · n_cells / alpha⌉)``, so the
            smallest attainable p-value, ``1 / (1 + n_permutations)``, is below a Bonferroni threshold
            ``alpha / n_cells`` and a single real effect can reach significance (n_cells: all (block, layer, head)).
        n_bootstrap, alpha, correction: as :func:`tl_circuits.permutation_test`.
        top_k: rows in the report's top-heads and top-pairs tables.
        seed: permutations, bootstrap and (through the caller) the bundled task samples.
        memory_budget_gb: for the per-sample gradients and pairwise scores.
        progress: tqdm progress bars.
    """

    variant: str = "signed"
    replacement: str = "zero"
    n_permutations: Optional[int] = None
    n_bootstrap: int = 1000
    alpha: float = 0.05
    correction: str = "bh"
    top_k: int = 10
    seed: int = 0
    memory_budget_gb: float = 2.0
    progress: bool = True

    def permutations_for(self, n_cells: int) -> int:
        """The number of permutations used for ``n_cells`` tested cells (see ``n_permutations``)."""
        if self.n_permutations is not None:
            return self.n_permutations
        return max(1000, math.ceil(2 * n_cells / self.alpha))

    @property
    def alternative(self) -> str:
        """The direction of conflict: more negative (signed) or larger (unsigned, symmetric) than the null."""
        return "less" if self.variant == "signed" else "greater"


@dataclass
class Analysis:
    """Everything :func:`write_report` needs."""

    model_info: dict[str, Any]
    task_a: TaskInput
    task_b: TaskInput
    sweeps: dict[str, SweepResult]
    interference: InterferenceResult
    statistics: InterferenceTestResult
    config: AnalysisConfig
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> dict[str, TaskInput]:
        return {"a": self.task_a, "b": self.task_b}


# ----- the analysis -------------------------------------------------------------------------------------

def scored_loss_metric(task: TaskInput, device) -> Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]:
    """``logits -> mean next-token cross-entropy over the task's scored positions`` (freeze_sweep's metric),
    pooled over every scored position of the batch (:func:`tl_circuits.bundled.tasks.scored_loss`)."""
    batch = TaskBatch(task.tokens.to(device), task.scored.to(device), task.name)

    def scored_loss(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        return tasks.scored_loss(logits, batch)

    return scored_loss


def run_sweep(model, task: TaskInput, config: AnalysisConfig) -> SweepResult:
    """QK and OV freeze sweep of every head on one task's batch (metric: :func:`scored_loss_metric`)."""
    device = next(model.parameters()).device
    tokens = task.tokens.to(device)
    reference = None
    if config.replacement == "mean":
        reference = compute_mean_activations(model, tokens, progress=config.progress)
    circuits = CIRCUITS
    if model_spec(model).qk_mask_source is None:  # a native TransformerBridge on TransformerLens 3.x
        circuits = tuple(c for c in CIRCUITS if c != "qk")
        warnings.warn("QK freezes are not available on this model (a TransformerLens-native bridge before "
                      "TransformerLens 4 discards attention-pattern edits): the QK sweep is left out (NaN)")
    result = freeze_sweep(model, tokens, scored_loss_metric(task, device), circuits=circuits,
                          replacement=config.replacement, reference=reference, seed=config.seed,
                          progress=config.progress)
    shape = next(iter(result.frozen.values())).shape
    result.frozen = {c: result.frozen[c] if c in result.frozen else torch.full(shape, float("nan")) for c in CIRCUITS}
    return result


def run_interference(model, task_a: TaskInput, task_b: TaskInput,
                     config: AnalysisConfig) -> tuple[InterferenceResult, InterferenceTestResult]:
    """The pooled pairwise matrix once; its A × B block as the map, all of it for the permutation test."""
    device = next(model.parameters()).device
    icfg = InterferenceConfig(variant=config.variant, fisher_source="pooled",
                              memory_budget_gb=config.memory_budget_gb, progress=config.progress)
    pooled, n_a = pooled_pairwise_scores(model, task_a.tokens.to(device), task_b.tokens.to(device),
                                         attention_mask_a=task_a.attention_mask.to(device),
                                         attention_mask_b=task_b.attention_mask.to(device), config=icfg)
    spec = model_spec(model)
    cross = {block: scores[:n_a, n_a:].clone() for block, scores in pooled.items()}
    settings = dict(n_a=n_a, n_b=task_b.n_samples, fisher_n_samples=n_a + task_b.n_samples, fisher_source="pooled",
                    n_layers=spec.n_layers, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, grouped=spec.grouped,
                    params_per_head={b: spec.n_params_per_head(b, icfg.include_biases) for b in BLOCKS})
    interference = InterferenceResult(cross, list(task_a.ids), list(task_b.ids), icfg.resolved(), settings)
    n_cells = sum(scores.shape[2] * scores.shape[3] for scores in pooled.values())
    statistics = permutation_test(pooled, n_a, n_permutations=config.permutations_for(n_cells),
                                  alternative=config.alternative,
                                  alpha=config.alpha, correction=config.correction, seed=config.seed,
                                  n_bootstrap=config.n_bootstrap, progress=config.progress)
    return interference, statistics


def run_analysis(model, task_a: TaskInput, task_b: TaskInput, config: AnalysisConfig,
                 model_info: Optional[dict] = None, announce: Callable[[str], None] = lambda message: None) -> Analysis:
    """Sweeps on both tasks, interference of A × B, and its statistics (module docstring)."""
    if config.replacement not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {config.replacement!r}")
    timings, sweeps = {}, {}
    for key, task in (("a", task_a), ("b", task_b)):
        announce(f"freeze sweep on task {key.upper()} ({task.name}, {task.n_samples} samples)")
        start = time.perf_counter()
        sweeps[key] = run_sweep(model, task, config)
        timings[f"sweep_{key}_s"] = time.perf_counter() - start
    announce(f"per-sample gradients, pooled Fisher, pairwise scores and permutation test "
             f"({task_a.n_samples} × {task_b.n_samples} samples)")
    start = time.perf_counter()
    interference, statistics = run_interference(model, task_a, task_b, config)
    timings["interference_and_statistics_s"] = time.perf_counter() - start
    return Analysis(dict(model_info or {}), task_a, task_b, sweeps, interference, statistics, config, timings)


# ----- tables --------------------------------------------------------------------------------------------

def _grid_list(grid: Tensor) -> list:
    """A tensor as nested lists with NaN/inf as None (strict JSON)."""
    values = grid.detach().cpu().double().numpy() if grid.dtype != torch.bool else grid.cpu().numpy()
    if values.dtype == bool:
        return values.tolist()
    return [[v if math.isfinite(v) else None for v in row] for row in values.tolist()]


def _json_value(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _json_value(x.item())
    if isinstance(x, dict):
        return {str(k): _json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_value(v) for v in x]
    if isinstance(x, Tensor):
        return _grid_list(x) if x.ndim == 2 else _json_value(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def sweep_table(analysis: Analysis):
    """Long table of both sweeps: task, task_name, circuit, layer, head, metric, effect."""
    import pandas as pd

    frames = []
    for key, sweep in analysis.sweeps.items():
        frame = sweep.to_dataframe()
        frame.insert(0, "task_name", analysis.tasks[key].name)
        frame.insert(0, "task", key.upper())
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def interference_table(analysis: Analysis):
    """One row per (block, layer, head): the map's mean over A × B pairs and every statistic of the cell."""
    frame = analysis.statistics.to_dataframe()
    means = analysis.interference.mean
    frame.insert(3, "head_kind", ["kv" if b in ("K", "V") else "query" for b in frame["block"]])
    frame.insert(4, "mean", [float(means[b][l, h]) for b, l, h in zip(frame["block"], frame["layer"], frame["head"])])
    return frame


def _conflict_order(values: np.ndarray, variant: str) -> np.ndarray:
    """Indices from most to least conflicting (most negative first for signed), NaN last."""
    key = values if variant == "signed" else -values
    return np.argsort(np.where(np.isfinite(key), key, np.inf), kind="stable")


def _known_roles(analysis: Analysis) -> dict[tuple[int, int], str]:
    """(layer, query head) -> the role the model's metadata gives it (bundled models), e.g. "induction"."""
    roles = {}
    for role, heads in (analysis.model_info.get("known_heads") or {}).items():
        for layer, head in heads:
            roles[(int(layer), int(head))] = ", ".join(filter(None, [roles.get((int(layer), int(head))), role]))
    return roles


def _role_column(frame, roles: dict, kv_blocks_are_grouped: bool = False) -> list[str]:
    """Known role of each row's head; K/V rows under GQA index KV heads, which have no query-head role."""
    out = []
    for _, row in frame.iterrows():
        grouped_kv = kv_blocks_are_grouped and row.get("block") in ("K", "V")
        out.append("" if grouped_kv else roles.get((int(row["layer"]), int(row["head"])), ""))
    return out


def top_heads_by_interference(analysis: Analysis, k: int):
    """The k (block, layer, head) cells with the most conflicting mean, with their statistics and known role."""
    table = interference_table(analysis)
    order = _conflict_order(table["mean"].to_numpy(), analysis.config.variant)[:k]
    top = table.iloc[order].reset_index(drop=True)
    grouped = bool(analysis.interference.settings.get("grouped", False))
    top["known_role"] = _role_column(top, _known_roles(analysis), grouped)
    return top


def top_heads_by_freeze(analysis: Analysis, k: int):
    """Per task, the k (circuit, layer, head) with the largest |effect|, with their known role."""
    import pandas as pd

    table = sweep_table(analysis)
    parts = [part.iloc[np.argsort(-part["effect"].abs().to_numpy(), kind="stable")[:k]]
             for _, part in table.groupby("task", sort=True)]
    top = pd.concat(parts, ignore_index=True)
    top["known_role"] = _role_column(top, _known_roles(analysis))
    return top


def top_conflicts_table(analysis: Analysis):
    import pandas as pd

    rows = [dict(rank=r + 1, **c._asdict()) for r, c in enumerate(analysis.interference.top_conflicts(analysis.config.top_k))]
    return pd.DataFrame(rows, columns=["rank", "id_a", "id_b", "block", "layer", "head", "score"])


def top_pairs_table(analysis: Analysis):
    """Sample pairs ranked by their score summed over blocks, layers and heads (K/V per KV head, once each)."""
    import pandas as pd

    result = analysis.interference
    per_block = {b: result.scores[b].double().nansum(dim=(2, 3)) for b in result.blocks}
    total = sum(per_block.values()).numpy()
    order = _conflict_order(total.ravel(), analysis.config.variant)[:analysis.config.top_k]
    n_b = total.shape[1]
    rows = []
    for rank, flat in enumerate(order.tolist(), start=1):
        i, j = divmod(flat, n_b)
        cells = {b: result.scores[b][i, j] for b in result.blocks}
        block, layer, head, value = _dominant_cell(cells, analysis.config.variant)
        rows.append(dict(rank=rank, id_a=result.ids_a[i], id_b=result.ids_b[j], total=float(total[i, j]),
                         **{f"total_{b}": float(per_block[b][i, j]) for b in result.blocks},
                         top_block=block, top_layer=layer, top_head=head, top_score=value,
                         preview_a=analysis.task_a.previews[i], preview_b=analysis.task_b.previews[j]))
    return pd.DataFrame(rows)


def _dominant_cell(cells: dict[str, Tensor], variant: str) -> tuple[str, int, int, float]:
    """The (block, layer, head, score) of a pair that conflicts most."""
    best = None
    for block, grid in cells.items():
        values = grid.double().numpy()
        flat = _conflict_order(values.ravel(), variant)[0]
        value = float(values.ravel()[flat])
        better = best is None or (value < best[3] if variant == "signed" else value > best[3])
        if math.isfinite(value) and better:
            layer, head = divmod(int(flat), values.shape[1])
            best = (block, layer, head, value)
    return best if best is not None else ("", -1, -1, math.nan)


def samples_table(analysis: Analysis):
    import pandas as pd

    rows = []
    for key, task in analysis.tasks.items():
        lengths = task.attention_mask.sum(1).tolist()
        rows += [dict(task=key.upper(), task_name=task.name, id=i, n_tokens=int(n), preview=p)
                 for i, n, p in zip(task.ids, lengths, task.previews)]
    return pd.DataFrame(rows)


# ----- figures ---------------------------------------------------------------------------------------------

def freeze_figure(analysis: Analysis):
    """2 × 2 panels (task × circuit) of the sweep effects on one scale centred at 0."""
    from tl_circuits.plotting import plot_blocks

    values, titles = {}, {}
    for key, sweep in analysis.sweeps.items():
        for circuit in CIRCUITS:
            panel = f"{key}:{circuit}"
            values[panel] = sweep.effect[circuit]
            titles[panel] = f"task {key.upper()} ({analysis.tasks[key].name}): {circuit.upper()} frozen"
    replacement = analysis.config.replacement.upper()
    return plot_blocks(values, titles=titles, ncols=len(CIRCUITS), shared_scale=True, signed=True,
                       colorbar_label="Δ loss on scored positions",
                       title=f"Freeze effect ({replacement}): loss with the head's circuit frozen − clean loss")


def interference_figures(analysis: Analysis) -> dict[str, Any]:
    """The interference mean and the statistic z per block, non-significant cells hatched."""
    from tl_circuits.plotting import plot_blocks

    cfg, stats = analysis.config, analysis.statistics
    rule = f"hatched: not significant ({stats.correction.upper()} q > {stats.alpha}, one-sided '{stats.alternative}')"
    direction = "negative = conflict" if cfg.variant == "signed" else "larger = more interference"
    mean = plot_blocks(analysis.interference.mean, masks=stats.significant, ncols=2,
                       signed=True if cfg.variant == "signed" else None,
                       colorbar_label=f"mean {cfg.variant} score",
                       title=f"Interference A × B ({cfg.variant}, pooled Fisher; {direction})\n{rule}")
    z = plot_blocks(stats.z, masks=stats.significant, signed=True, ncols=2, colorbar_label="z vs. label permutations",
                    title=f"Interference statistic z = (observed − null mean) / null SD\n{rule}")
    return {"interference.png": mean, "interference_z.png": z}


def write_figures(analysis: Analysis, directory: Path) -> None:
    import matplotlib.pyplot as plt

    figures = {"freeze_effect.png": freeze_figure(analysis), **interference_figures(analysis)}
    for name, fig in figures.items():
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)


# ----- JSON, CSV and Markdown ----------------------------------------------------------------------------

def report_data(analysis: Analysis) -> dict[str, Any]:
    """Everything in report.json (strict JSON: NaN as null)."""
    stats, result = analysis.statistics, analysis.interference
    sweeps = {}
    for key, sweep in analysis.sweeps.items():
        # effect in float64, as sweep.csv (SweepResult.to_dataframe) computes it, so the two files agree exactly
        effect = {circuit: values.double() - sweep.clean for circuit, values in sweep.frozen.items()}
        sweeps[key.upper()] = dict(task_name=analysis.tasks[key].name, metric=sweep.metric_name, clean=sweep.clean,
                                   replacement=sweep.replacement, frozen=sweep.frozen, effect=effect,
                                   settings=sweep.settings)
    grids = {name: getattr(stats, name) for name in ("observed", "null_mean", "null_std", "z", "effect_size",
                                                      "p_value", "q_value_bh", "q_value_by", "p_maxstat",
                                                      "p_cluster", "ci_low", "ci_high", "significant")
             if getattr(stats, name) is not None}
    tasks = {key.upper(): dict(name=t.name, source=t.source, n_samples=t.n_samples, n_positions=int(t.tokens.shape[1]),
                               n_scored=int(t.scored.sum()), ids=t.ids, notes=t.notes)
             for key, t in analysis.tasks.items()}
    data = dict(
        tool=REPORT_MARKER,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=analysis.model_info,
        tasks=tasks,
        settings=asdict(analysis.config) | dict(alternative=analysis.config.alternative),
        timings_s=analysis.timings,
        warnings=analysis.warnings,
        sweep=sweeps,
        interference=dict(variant=result.config.variant, reduction=result.config.reduction,
                          fisher_source=result.config.fisher_source, mean=result.mean,
                          block_means=result.block_means(), most_conflicted_block=result.most_conflicted_block,
                          settings=result.settings),
        statistics=dict(settings=stats.settings, **grids),
        top_heads_by_freeze=top_heads_by_freeze(analysis, analysis.config.top_k).to_dict("records"),
        top_heads_by_interference=top_heads_by_interference(analysis, analysis.config.top_k).to_dict("records"),
        top_conflicts=top_conflicts_table(analysis).to_dict("records"),
        top_pairs=top_pairs_table(analysis).to_dict("records"),
        files=FILES,
    )
    return _json_value(data)


def _md_table(frame, columns: dict[str, str], formats: Optional[dict[str, str]] = None) -> str:
    """A Markdown table of ``frame``'s ``columns`` (name -> header)."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = []
        for name in columns:
            value = row[name]
            if isinstance(value, (float, np.floating)):
                cells.append("NaN" if not math.isfinite(value) else format(value, formats.get(name, ".4g")))
            else:
                cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(analysis: Analysis) -> str:
    """report.md: what was run, the figures, the top heads and the top conflicting sample pairs."""
    cfg, stats, info = analysis.config, analysis.statistics, analysis.model_info
    a, b = analysis.task_a, analysis.task_b
    conflict = ("most negative first; negative = conflicting gradients" if cfg.variant == "signed"
                else "largest first")
    n_sig = {block: int(s.sum()) for block, s in stats.significant.items()}
    role = {"known_role": "known role"} if _known_roles(analysis) else {}
    lines = [
        "# tl-circuits report",
        "",
        f"**Model:** `{info.get('name', '?')}` ({info.get('source', '?')}) — {info.get('n_layers')} layers × "
        f"{info.get('n_heads')} heads ({info.get('n_kv_heads')} KV heads), d_model {info.get('d_model')}, "
        f"vocabulary {info.get('d_vocab')}. {info.get('description', '')}".rstrip(),
        "",
        f"**Task A:** {a.name} — {a.n_samples} samples × {a.tokens.shape[1]} positions ({a.source}).  ",
        f"**Task B:** {b.name} — {b.n_samples} samples × {b.tokens.shape[1]} positions ({b.source}).",
        "",
        f"Settings: freeze replacement {cfg.replacement.upper()}; interference variant `{cfg.variant}` with the pooled "
        f"Fisher; {stats.n_permutations} label permutations (one-sided `{cfg.alternative}`), {cfg.correction.upper()} "
        f"at α = {cfg.alpha}; {cfg.n_bootstrap} bootstrap resamples; seed {cfg.seed}. "
        f"Analysis time {sum(analysis.timings.values()):.1f} s (loading, sweeps, gradients, statistics).",
    ]
    if info.get("known_heads_text"):
        lines += ["", f"Known heads of this model (from its training metadata): {info['known_heads_text']}."]
    lines += [
        "",
        "## Freeze sweep",
        "",
        "Each head's QK circuit (what decides its attention pattern) or OV circuit (what it moves) is frozen in "
        "turn; the effect is the change of the mean next-token loss on the task's scored positions "
        "(positive: the head helps the task).",
        "",
        "![freeze effect](freeze_effect.png)",
        "",
        "Clean loss: " + ", ".join(f"task {k.upper()} {s.clean:.4f}" for k, s in analysis.sweeps.items()) + ".",
        "",
        "Top heads by freeze effect (|Δ loss|):",
        "",
        _md_table(top_heads_by_freeze(analysis, min(cfg.top_k, 5)),
                  {"task": "task", "circuit": "circuit", "layer": "layer", "head": "head", "effect": "Δ loss",
                   "metric": "loss frozen", **role}),
        "",
        "## Interference between task A and task B",
        "",
        f"Mean over all A × B sample pairs of the `{cfg.variant}` interference score per block (Q, K, V, O) and "
        f"head (K and V per KV head).{_sign_sentence(analysis)} A cell is *significant* when its A × B mean is "
        f"{'lower' if cfg.alternative == 'less' else 'higher'} than random relabelings of the pooled samples give "
        f"(task labels exchangeable; {cfg.correction.upper()} q ≤ {cfg.alpha}): the tasks interact there differently "
        "from samples of one mixed population — which does not by itself make the mean "
        f"{'negative' if cfg.alternative == 'less' else 'large'}. Hatched cells are not significant. "
        "Significant cells per block: " + ", ".join(f"{blk} {n}" for blk, n in n_sig.items())
        + f". Most conflicted block: **{analysis.interference.most_conflicted_block}**.",
        "",
        "![interference](interference.png)",
        "",
        "![interference z](interference_z.png)",
        "",
        f"Top heads by interference ({conflict}):",
        "",
        _md_table(top_heads_by_interference(analysis, cfg.top_k),
                  {"block": "block", "layer": "layer", "head": "head", "mean": "mean score", "z": "z",
                   "p_value": "p", "q_value_bh": "q (BH)", "p_maxstat": "p (max-stat)", "significant": "significant",
                   **role}),
        "",
        "## Top conflicting sample pairs",
        "",
        f"Pairs ranked by their score summed over all blocks, layers and heads ({conflict}), with the cell that "
        "contributes most:",
        "",
        _md_table(top_pairs_table(analysis),
                  {"rank": "#", "id_a": "sample A", "id_b": "sample B", "total": "total score",
                   "top_block": "block", "top_layer": "layer", "top_head": "head", "top_score": "cell score",
                   "preview_a": "A preview", "preview_b": "B preview"}),
        "",
        "Top conflicting (pair, block, layer, head) cells:",
        "",
        _md_table(top_conflicts_table(analysis),
                  {"rank": "#", "id_a": "sample A", "id_b": "sample B", "block": "block", "layer": "layer",
                   "head": "head", "score": "score"}),
    ]
    notes = a.notes + b.notes + analysis.warnings
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "## Files", ""] + [f"- `{name}` — {what}" for name, what in FILES.items()]
    return "\n".join(lines) + "\n"


def _sign_sentence(analysis: Analysis) -> str:
    """How many cells have a negative mean (signed variant: the tasks' gradients oppose there)."""
    if analysis.config.variant != "signed":
        return ""
    means = torch.cat([m.flatten() for m in analysis.interference.mean.values()])
    negative, total = int((means < 0).sum()), int(torch.isfinite(means).sum())
    return (f" {negative} of {total} cells have a negative mean (on average the two tasks' gradients oppose "
            "there); positive means are aligned gradients.")


def write_report_files(analysis: Analysis, directory: Path) -> None:
    """Every report file into ``directory`` (which must exist), ``report.md`` last."""
    sweep_table(analysis).to_csv(directory / "sweep.csv", index=False)
    interference_table(analysis).to_csv(directory / "interference.csv", index=False)
    top_conflicts_table(analysis).to_csv(directory / "top_conflicts.csv", index=False)
    top_pairs_table(analysis).to_csv(directory / "top_pairs.csv", index=False)
    samples_table(analysis).to_csv(directory / "samples.csv", index=False)
    (directory / "report.json").write_text(json.dumps(report_data(analysis), indent=1, allow_nan=False))
    write_figures(analysis, directory)
    (directory / "report.md").write_text(report_markdown(analysis), encoding="utf-8")


# ----- the report folder, all or nothing -----------------------------------------------------------------

def is_report_directory(path: Path) -> bool:
    """Whether ``path`` holds a report written by this module (so it may be replaced)."""
    try:
        return json.loads((path / "report.json").read_text()).get("tool") == REPORT_MARKER
    except (OSError, ValueError, AttributeError):
        return False


def check_output_path(out: Path) -> None:
    """Raise ReportOutputError unless ``out`` is absent, an empty directory, or an earlier report."""
    if out.exists() and not out.is_dir():
        raise ReportOutputError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_report_directory(out):
        raise ReportOutputError(f"output directory {out} exists, is not empty and is not a tl-circuits report; "
                                "choose another --out")


def write_report(analysis: Analysis, out, write_files: Callable[[Analysis, Path], None] = write_report_files) -> Path:
    """Write the report folder ``out`` atomically: files go to a hidden sibling, renamed into place at the end.

    On any failure the partial directory is removed and an earlier report at ``out`` is left as it was.
    """
    out = Path(out)
    check_output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_files(analysis, partial)
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``, replacing an earlier report only once the new one is complete."""
    os.chmod(partial, 0o755)  # mkdtemp makes it private; a report is an ordinary folder
    if not out.exists():
        partial.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        partial.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
