"""The text of ``report.md``: what was run, the figures, the top heads and the top conflicting sample pairs.

>>> import pandas as pd
>>> print(markdown_table(pd.DataFrame({"head": [3], "z": [-2.51234], "note": ["a|b"]}),
...                      {"head": "head", "z": "z", "note": "note"}))
| head | z | note |
|---|---|---|
| 3 | -2.512 | a\\|b |
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import pandas as pd
import torch

from tl_circuits.cli.pipeline import Analysis
from tl_circuits.cli.headlines import headlines
from tl_circuits.cli.task_input import TaskInput
from tl_circuits.selection import format_indices
from tl_circuits.cli.tables import (
    circuit_comparison_table,
    known_roles,
    top_conflicts_table,
    top_heads_by_freeze,
    top_heads_by_interference,
    top_pairs_table,
)
from tl_circuits.freezing.attribution_result import AttributionResult

FREEZE_ROWS_SHOWN = 5  # per task, in report.md (the JSON keeps top_k)


def markdown_table(frame: pd.DataFrame, columns: dict[str, str], formats: Optional[dict[str, str]] = None) -> str:
    """A Markdown table of ``frame``'s ``columns`` (name -> header); floats as ``.4g`` unless ``formats`` says."""
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


def _header(analysis: Analysis) -> list[str]:
    cfg, stats, info = analysis.config, analysis.statistics, analysis.model_info
    a, b = analysis.task_a, analysis.task_b
    total = analysis.timings.get("total_s", math.nan)
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
        "**Scored:** each sample's loss is its mean next-token cross-entropy over its counted predictions, the same "
        "in the freeze sweep and in the per-sample gradients behind the interference map, the permutation test and "
        "the conflict test (report.json: `settings.loss`). "
        f"Task A: {scored_text(a)}. Task B: {scored_text(b)}.",
        "",
        f"Settings: freeze replacement {cfg.replacement.upper()}; interference variant `{cfg.variant}` with the pooled "
        f"Fisher, `{cfg.interference.normalization}` normalisation; {_permutations_text(stats)} "
        f"(one-sided `{cfg.alternative}`), {cfg.correction.upper()} "
        f"at α = {cfg.alpha}; {cfg.n_bootstrap} bootstrap resamples; seed {cfg.seed}. "
        f"Analysis time {total:.1f} s ({_stage_text(analysis.timings)}).",
    ]
    if info.get("known_heads_text"):
        lines += ["", f"Known heads of this model (from its training metadata): {info['known_heads_text']}."]
    return lines


def _spread(values: torch.Tensor) -> str:
    """``"3"`` or ``"1–4 (mean 2.2)"``."""
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}–{high} (mean {values.double().mean():.3g})"


def scored_text(task: TaskInput) -> str:
    """What a task's loss counts, in words, with the counts per sample (prompt and completion tokens of
    prompt -> completion tasks)."""
    text = f"{task.counted}, {_spread(task.n_counted)} per sample"
    completion = task.completion_lengths
    if task.prompt_lengths is not None and completion is not None:
        text += f" (prompt {_spread(task.prompt_lengths)} tokens, completion {_spread(completion)} tokens)"
    return text


def _permutations_text(stats) -> str:
    """How many label permutations the test used (the default is screened: docs/spec.md §4.3)."""
    if stats.n_permutations_screen is None:
        return f"{stats.n_permutations} label permutations"
    return (f"{stats.n_permutations} label permutations for the cells whose p on the first "
            f"{stats.n_permutations_screen} is ≤ 2α, {stats.n_permutations_screen} for the others")


def _stage_text(timings: Mapping[str, float]) -> str:
    """``"loading 1.2 s, sweep A 0.5 s, ..."`` from the per-stage wall times."""
    names = dict(load_s="loading", sweep_a_s="sweep A", sweep_b_s="sweep B", interference_s="gradients and scores",
                 statistics_s="statistics")
    return ", ".join(f"{names[key]} {timings[key]:.1f} s" for key in names if key in timings)


def _freeze_section(analysis: Analysis, role: dict[str, str]) -> list[str]:
    test = next(iter(analysis.sweep_tests.values()), None)
    top = top_heads_by_freeze(analysis, min(analysis.config.top_k, FREEZE_ROWS_SHOWN))
    top["interval"] = [f"[{lo:.3g}, {hi:.3g}]" if lo == lo else "NaN" for lo, hi in zip(top["ci_low"], top["ci_high"])]
    tested = "" if test is None else (
        f" Each effect is the mean over samples of (frozen − clean); its {100 * test.confidence_level:.0f}% bootstrap "
        f"interval is over samples, and a paired sign-flip test ({test.n_permutations} sign flips"
        f"{', exact' if test.exact else ''}; H0: each sample's effect is symmetric about 0) gives p and "
        f"{test.correction.upper()} q over every (circuit, layer, head) cell of both circuits and the interaction.")
    lines = [
        "",
        "## Freeze sweep",
        "",
        "Each head's QK circuit (what decides its attention pattern), OV circuit (what it moves) or both (the whole "
        "head) is frozen in turn; the effect is the change of each sample's mean next-token loss on the task's "
        "scored positions (frozen loss − clean loss; positive: the head helps the task)." + tested,
        "",
        "![freeze effect](freeze_effect.png)",
        "",
        "Clean loss: " + ", ".join(f"task {k.upper()} {s.clean:.4f}" for k, s in analysis.sweeps.items()) + ".",
        "",
        "Top heads by freeze effect (|Δ loss|):",
        "",
        markdown_table(top, {"task": "task", "circuit": "circuit", "layer": "layer", "head": "head",
                             "effect": "Δ loss", "interval": "interval", "q_value_bh": "q (BH)",
                             "frozen_loss": "loss frozen", "number": "number", **role}),
    ]
    lines[4:4] = _attribution_lines(analysis)
    return lines + _circuit_comparison(analysis, role) + _pattern_lines(analysis)


def _attribution_lines(analysis: Analysis) -> list[str]:
    """What an attribution sweep's numbers are: estimates except where verified, and the bound on the rest."""
    lines = []
    for key, sweep in analysis.sweeps.items():
        if not isinstance(sweep, AttributionResult):
            continue
        counts = ", ".join(f"{c.upper()} {n} of {sweep.verified[c].numel()}" for c, n in sweep.n_verified.items())
        bounds = "; ".join(str(bound) for bound in sweep.missed.values())
        lines += ["", f"**Task {key.upper()}: attribution sweep.** Effects marked *estimate* are first-order "
                  "estimates (AtP*: the head's frozen pattern exact, linear from there; docs/attribution.md), not "
                  f"freezes; the cells with the largest |estimate| were verified exactly ({counts}) and are marked "
                  f"*exact*. Tests of estimated cells test the estimate. Missed-effect bound: {bounds or 'none'}. How "
                  "well such estimates rank heads was measured against the exact sweep (docs/attribution.md): top-10% "
                  "recall 0.71–1.00 for QK and 0.29–1.00 for OV under MEAN and RESAMPLE, lower under ZERO."]
    return lines


def _circuit_comparison(analysis: Analysis, role: dict[str, str]) -> list[str]:
    table = circuit_comparison_table(analysis, FREEZE_ROWS_SHOWN)
    if table.empty:
        if analysis.config.replacement != "zero":
            return []
        return ["", "QK, OV or the whole head? Not compared under ZERO: a zero OV makes the head write nothing, so "
                "freezing the whole head equals freezing its OV, and the interaction BOTH − (QK + OV) is −QK by "
                "construction. Run with `--replacement mean` to compare the circuits."]
    return [
        "",
        "QK, OV or the whole head? Per task, the heads with the largest effect in any circuit: the three effects, the "
        "interaction BOTH − (QK + OV) with its interval (≠ 0: freezing both is not the sum of freezing each), and "
        "what the tests support (*QK-specific*: QK shown, OV not; *OV-specific*: the reverse; *both*: each alone "
        "shown; *whole head only*: only BOTH shown).",
        "",
        markdown_table(table, {"task": "task", "layer": "layer", "head": "head", "qk": "Δ QK", "ov": "Δ OV",
                               "both": "Δ BOTH", "interaction": "interaction", "interaction_interval": "interval",
                               "interaction_q": "q (BH)", "verdict": "evidence", **role}),
    ]


def _pattern_lines(analysis: Analysis) -> list[str]:
    lines = ["", "Attention of the top QK heads on each task's first sample, clean beside QK-frozen:", ""]
    for key in analysis.sweeps:
        lines += [f"![attention patterns, task {key.upper()}](patterns_{key}.png)", ""]
    return lines[:-1]


def _interference_section(analysis: Analysis, role: dict[str, str], conflict: str) -> list[str]:
    cfg = analysis.config
    hatching = ("hatched: the conflict test does not reject" if analysis.evidence.conflict is not None
                else "hatched: the label-permutation test does not reject")
    return [
        "",
        "## Interference between task A and task B",
        "",
        f"Mean over all A × B sample pairs of the `{cfg.variant}` interference score per block (Q, K, V, O) and "
        f"head (K and V per KV head).{_sign_sentence(analysis)} Most conflicted block: "
        f"**{analysis.interference.most_conflicted_block}**.",
        "",
        f"![interference](interference.png) ({hatching})",
    ] + _conflict_subsection(analysis, role, conflict) + _permutation_subsection(analysis, role, conflict)


def _conflict_subsection(analysis: Analysis, role: dict[str, str], conflict: str) -> list[str]:
    cfg, test = analysis.config, analysis.evidence.conflict
    if test is None:
        return ["", "The conflict test is a test of the sign of the `signed` score; it is not run for "
                f"`{cfg.variant}`."]
    ranking = analysis.evidence.ranking
    table = top_heads_by_interference(analysis, cfg.top_k)
    table["ci"] = [f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(table["conflict_ci_low"], table["conflict_ci_high"])]
    table["rank_interval"] = [f"{r:.0f} [{lo:.0f}, {hi:.0f}]" if r == r else "NaN"
                              for r, lo, hi in zip(table["rank"], table["rank_low"], table["rank_high"])]
    table["conflict"] = ["yes" if s is True or s == 1.0 else "no" for s in table["conflict_significant"]]
    table["dominated"] = ["yes" if d is True or d == 1.0 else "" for d in table["dominated"]]
    return [
        "",
        "### Where the tasks conflict (conflict test)",
        "",
        f"Per cell, H0: *the expected A × B signed score is ≥ 0* (the tasks' Fisher-normalised mean gradients are "
        f"not opposed in this head) against *< 0*; a U-statistic t-test over the A × B pairs "
        f"({cfg.correction.upper()} q ≤ {cfg.alpha} marks a conflict). Beside it: the "
        f"{100 * test.confidence_level:.0f}% interval of the mean, the cosine of the two task-mean gradients "
        "cos(ḡ_A, ḡ_B) (≈ −1: exactly opposed), the "
        "mean Fisher-metric cosine of the sample pairs and the share of pairs below 0 (both comparable across "
        f"heads), the cell's rank among all cells with its bootstrap interval and how often it is in the top "
        f"{ranking.k} ({ranking.n_resamples} resamples), and the samples whose removal moves the mean most towards "
        "0 (leave-one-out; *dominated*: without them less than half of the mean is left).",
        "",
        f"Top cells by mean ({conflict}):",
        "",
        markdown_table(table, {"block": "block", "layer": "layer", "head": "head", "mean": "mean score",
                               "ci": "interval", "conflict_p": "p", "conflict_q_bh": "q (BH)", "conflict": "conflict",
                               "task_mean_cosine": "cos(ḡ_A, ḡ_B)", "mean_cosine": "mean pair cos",
                               "fraction_negative_pairs": "pairs < 0", "rank_interval": "rank [interval]",
                               "top_k_frequency": f"in top {ranking.k}", "drivers_a": "drivers A",
                               "drivers_b": "drivers B", "dominated": "dominated", **role},
                       {"fraction_negative_pairs": ".2f", "top_k_frequency": ".2f", "task_mean_cosine": ".2f",
                        "mean_cosine": ".2f"}),
    ]


def _family(cfg) -> str:
    """The report's note of a layer/head selection: what the families hold."""
    if cfg.layers is None and cfg.heads is None:
        return ""
    layers = "all" if cfg.layers is None else format_indices(cfg.layers)
    heads = "all" if cfg.heads is None else format_indices(cfg.heads)
    return (f" Only layers {layers} and heads {heads} were swept, scored and tested (under GQA, K/V: the KV heads "
            "those heads read): the multiple-testing families hold these cells only; the rest is NaN, not 0.")


def _permutation_subsection(analysis: Analysis, role: dict[str, str], conflict: str) -> list[str]:
    cfg, stats = analysis.config, analysis.statistics
    n_sig = {block: int(s.sum()) for block, s in stats.significant.items()}
    return [
        "",
        "### Where the tasks use a head differently (label-permutation test)",
        "",
        f"A cell is marked when its A × B mean is {'lower' if cfg.alternative == 'less' else 'higher'} than random "
        f"relabelings of the pooled samples give ({stats.n_permutations} permutations; {cfg.correction.upper()} "
        f"q ≤ {cfg.alpha}). H0: *task labels are exchangeable* — the two tasks' samples interact in this head like "
        "samples of one mixed population. Rejecting says the tasks use the head differently, not that they conflict: "
        "two tasks with orthogonal mean gradients are rejected here but not by the conflict test. "
        "Marked cells per block: " + ", ".join(f"{blk} {n}" for blk, n in n_sig.items()) + "." + _family(cfg),
        "",
        "![interference z](interference_z.png) (standardised statistic z; hatched: not marked)",
        "",
        f"Top heads by interference ({conflict}):",
        "",
        markdown_table(top_heads_by_interference(analysis, cfg.top_k),
                       {"block": "block", "layer": "layer", "head": "head", "mean": "mean score", "z": "z",
                        "p_value": "p", "q_value_bh": "q (BH)", "p_value_maxstat": "p (max-stat)",
                        "significant": "differs", **role}),
    ]


def _pairs_section(analysis: Analysis, conflict: str) -> list[str]:
    return [
        "",
        "## Top conflicting sample pairs",
        "",
        f"Pairs ranked by their score summed over all blocks, layers and heads ({conflict}), with the cell that "
        "contributes most:",
        "",
        markdown_table(top_pairs_table(analysis),
                       {"rank": "#", "id_a": "sample A", "id_b": "sample B", "total": "total score",
                        "top_block": "block", "top_layer": "layer", "top_head": "head", "top_score": "cell score",
                        "preview_a": "A preview", "preview_b": "B preview"}),
        "",
        "Top conflicting (pair, block, layer, head) cells:",
        "",
        markdown_table(top_conflicts_table(analysis),
                       {"rank": "#", "id_a": "sample A", "id_b": "sample B", "block": "block", "layer": "layer",
                        "head": "head", "score": "score"}),
    ]


def report_markdown(analysis: Analysis, files: Mapping[str, str]) -> str:
    """report.md; ``files`` (name -> what it holds) is the report folder's listing, shown at the end."""
    conflict = ("most negative first; negative = conflicting gradients" if analysis.config.variant == "signed"
                else "largest first")
    role = {"known_role": "known role"} if known_roles(analysis) else {}
    lines = (_header(analysis) + ["", "## Headlines", ""] + headlines(analysis) + _freeze_section(analysis, role)
             + _interference_section(analysis, role, conflict) + _pairs_section(analysis, conflict))
    notes = (list(analysis.model_info.get("notes", [])) + analysis.task_a.notes + analysis.task_b.notes
             + analysis.warnings)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "## Files", ""] + [f"- `{name}` — {what}" for name, what in files.items()]
    return "\n".join(lines) + "\n"


def _sign_sentence(analysis: Analysis) -> str:
    """How many cells have a negative mean (signed variant: the tasks' gradients oppose there)."""
    if analysis.config.variant != "signed":
        return ""
    means = torch.cat([m.flatten() for m in analysis.interference.mean.values()])
    negative, total = int((means < 0).sum()), int(torch.isfinite(means).sum())
    return (f" {negative} of {total} cells have a negative mean (on average the two tasks' gradients oppose "
            "there); positive means are aligned gradients.")
