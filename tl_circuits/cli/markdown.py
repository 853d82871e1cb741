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

from tl_circuits.cli.analysis import Analysis
from tl_circuits.cli.tables import (
    known_roles,
    top_conflicts_table,
    top_heads_by_freeze,
    top_heads_by_interference,
    top_pairs_table,
)

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
        f"Settings: freeze replacement {cfg.replacement.upper()}; interference variant `{cfg.variant}` with the pooled "
        f"Fisher; {stats.n_permutations} label permutations (one-sided `{cfg.alternative}`), {cfg.correction.upper()} "
        f"at α = {cfg.alpha}; {cfg.n_bootstrap} bootstrap resamples; seed {cfg.seed}. "
        f"Analysis time {total:.1f} s ({_stage_text(analysis.timings)}).",
    ]
    if info.get("known_heads_text"):
        lines += ["", f"Known heads of this model (from its training metadata): {info['known_heads_text']}."]
    return lines


def _stage_text(timings: Mapping[str, float]) -> str:
    """``"loading 1.2 s, sweep A 0.5 s, ..."`` from the per-stage wall times."""
    names = dict(load_s="loading", sweep_a_s="sweep A", sweep_b_s="sweep B", interference_s="gradients and scores",
                 statistics_s="statistics")
    return ", ".join(f"{names[key]} {timings[key]:.1f} s" for key in names if key in timings)


def _freeze_section(analysis: Analysis, role: dict[str, str]) -> list[str]:
    return [
        "",
        "## Freeze sweep",
        "",
        "Each head's QK circuit (what decides its attention pattern) or OV circuit (what it moves) is frozen in "
        "turn; the effect is the change of the mean next-token loss on the task's scored positions "
        "(frozen loss − clean loss; positive: the head helps the task).",
        "",
        "![freeze effect](freeze_effect.png)",
        "",
        "Clean loss: " + ", ".join(f"task {k.upper()} {s.clean:.4f}" for k, s in analysis.sweeps.items()) + ".",
        "",
        "Top heads by freeze effect (|Δ loss|):",
        "",
        markdown_table(top_heads_by_freeze(analysis, min(analysis.config.top_k, FREEZE_ROWS_SHOWN)),
                       {"task": "task", "circuit": "circuit", "layer": "layer", "head": "head", "effect": "Δ loss",
                        "frozen_loss": "loss frozen", **role}),
    ]


def _interference_section(analysis: Analysis, role: dict[str, str], conflict: str) -> list[str]:
    cfg, stats = analysis.config, analysis.statistics
    n_sig = {block: int(s.sum()) for block, s in stats.significant.items()}
    return [
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
        markdown_table(top_heads_by_interference(analysis, cfg.top_k),
                       {"block": "block", "layer": "layer", "head": "head", "mean": "mean score", "z": "z",
                        "p_value": "p", "q_value_bh": "q (BH)", "p_maxstat": "p (max-stat)",
                        "significant": "significant", **role}),
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
    lines = (_header(analysis) + _freeze_section(analysis, role) + _interference_section(analysis, role, conflict)
             + _pairs_section(analysis, conflict))
    notes = analysis.task_a.notes + analysis.task_b.notes + analysis.warnings
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
