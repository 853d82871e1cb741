"""The report folder: figures, ``report.json``, the CSVs and ``report.md``, written all or nothing.

:func:`write_report` writes the folder via a hidden temporary sibling directory that is renamed into place only
when every file is written (``report.md`` last), so an interrupted or failed run never leaves a
complete-looking report; an earlier report at the same path is replaced only on success.

report.json is strict JSON: NaN and infinities are written as ``null``.

>>> import math, torch
>>> json_value({"p": math.nan, "grid": torch.tensor([[1.0, float("inf")]]), "n": 3})
{'p': None, 'grid': [[1.0, None]], 'n': 3}
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from tl_circuits.cli.analysis import CIRCUITS, Analysis
from tl_circuits.cli.headlines import needed_table, shared_table
from tl_circuits.cli.markdown import report_markdown
from tl_circuits.cli.tables import (
    freeze_tests_table,
    interference_table,
    samples_table,
    sweep_table,
    top_conflicts_table,
    top_heads_by_freeze,
    top_heads_by_interference,
    top_pairs_table,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure

REPORT_MARKER = "tl-circuits report"
FILES = {
    "report.md": "this summary",
    "report.json": "every number below, settings, timings and warnings (NaN written as null)",
    "sweep.csv": "freeze sweep: task, circuit (qk, ov, both), layer, head, clean_loss, frozen_loss (the loss with "
                 "the head's circuit frozen), effect (= frozen_loss − clean_loss, the mean over samples), and its "
                 "paired test: bootstrap interval, sign-flip p, q (BH/BY), significant, spread, samples",
    "freeze_tests.csv": "the sweep tests of both tasks, every field, with the QK × OV interaction "
                        "BOTH − (QK + OV) as circuit 'interaction'",
    "interference.csv": "per (block, layer, head): interference mean over A×B pairs; the label-permutation test "
                        "(p_value, q_value_bh, significant: the tasks use the head differently); the conflict test "
                        "(conflict_*: H0 E[A×B signed score] >= 0); Fisher-metric cosines; rank stability; "
                        "leave-one-out drivers",
    "top_conflicts.csv": "the most conflicting (sample pair, block, layer, head) cells",
    "top_pairs.csv": "the most conflicting sample pairs (score summed over blocks, layers and heads)",
    "samples.csv": "every sample: task, id, length, preview",
    "freeze_effect.png": "freeze effect per circuit and task (layer × head); cells whose effect the paired test "
                         "does not show hatched",
    "patterns_a.png": "task A: attention patterns of the top QK heads on its first sample, clean beside frozen",
    "patterns_b.png": "task B: the same",
    "interference.png": "interference mean per block; hatched where the conflict test does not reject (signed "
                        "variant) or the permutation test does not (otherwise)",
    "interference_z.png": "label-permutation statistic z per block, cells the permutation test does not mark hatched",
}
"""Every file of a report folder, with what it holds (report.md lists them too)."""


class ReportOutputError(ValueError):
    """The output path cannot take a report (the message says why)."""


# ----- figures ---------------------------------------------------------------------------------------------

def freeze_figure(analysis: Analysis) -> Figure:
    """Task × circuit panels of the sweep effects (the swept circuits only) on one scale centred at 0."""
    from tl_circuits.plotting import plot_blocks

    values, titles, masks = {}, {}, {}
    # only the circuits that were swept (ZERO leaves BOTH out: it equals OV there)
    shown = [c for c in CIRCUITS if any(bool(torch.isfinite(s.effect[c]).any()) for s in analysis.sweeps.values())]
    shown = shown or list(CIRCUITS[:1])
    for key, sweep in analysis.sweeps.items():
        test = analysis.sweep_tests.get(key)
        for circuit in shown:
            panel = f"{key}:{circuit}"
            values[panel] = sweep.effect[circuit]
            titles[panel] = f"task {key.upper()} ({analysis.tasks[key].name}): {circuit.upper()} frozen"
            masks[panel] = (test.significant[circuit] if test is not None and circuit in test.significant
                            else torch.zeros_like(values[panel], dtype=torch.bool))
    replacement = analysis.config.replacement.upper()
    return plot_blocks(values, titles=titles, ncols=len(shown), shared_scale=True, signed=True, masks=masks,
                       colorbar_label="Δ loss on scored positions",
                       title=f"Freeze effect ({replacement}): frozen loss − clean loss\n"
                             "hatched: the paired sign-flip test does not show an effect (q > α)")


def interference_figures(analysis: Analysis) -> dict[str, Any]:
    """The interference mean and the statistic z per block, non-significant cells hatched."""
    from tl_circuits.plotting import plot_blocks

    cfg, stats, conflict = analysis.config, analysis.statistics, analysis.evidence.conflict
    rule = (f"hatched: the tasks' samples are not marked as different ({stats.correction.upper()} q > {stats.alpha}, "
            f"label permutations, one-sided '{stats.alternative}')")
    direction = "negative = conflict" if cfg.variant == "signed" else "larger = more interference"
    if conflict is not None:
        mask, mean_rule = conflict.significant, (f"hatched: no conflict shown (conflict test, H0 E[score] ≥ 0, "
                                                 f"{conflict.correction.upper()} q > {conflict.alpha})")
    else:
        mask, mean_rule = stats.significant, rule
    mean = plot_blocks(analysis.interference.mean, masks=mask, ncols=2,
                       signed=True if cfg.variant == "signed" else None,
                       colorbar_label=f"mean {cfg.variant} score",
                       title=f"Interference A × B ({cfg.variant}, pooled Fisher; {direction})\n{mean_rule}")
    z = plot_blocks(stats.z, masks=stats.significant, signed=True, ncols=2, colorbar_label="z vs. label permutations",
                    title=f"Label-permutation statistic z = (observed − null mean) / null SD\n{rule}")
    return {"interference.png": mean, "interference_z.png": z}


def write_figures(analysis: Analysis, directory: Path) -> None:
    """The report's PNGs into ``directory``."""
    import matplotlib.pyplot as plt

    figures = {"freeze_effect.png": freeze_figure(analysis), **interference_figures(analysis), **analysis.figures}
    for name, fig in figures.items():
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)


# ----- JSON ------------------------------------------------------------------------------------------------

def _grid_list(grid: Tensor) -> list:
    """A tensor as nested lists with NaN/inf as None (strict JSON)."""
    values = grid.detach().cpu().double().numpy() if grid.dtype != torch.bool else grid.cpu().numpy()
    if values.dtype == bool:
        return values.tolist()
    return [[v if math.isfinite(v) else None for v in row] for row in values.tolist()]


def json_value(x: Any) -> Any:
    """``x`` with tensors, numpy scalars and paths as plain JSON values, and NaN/inf as None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return json_value(x.item())
    if isinstance(x, dict):
        return {str(k): json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_value(v) for v in x]
    if isinstance(x, Tensor):
        return _grid_list(x) if x.ndim == 2 else json_value(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def report_data(analysis: Analysis) -> dict[str, Any]:
    """Everything in report.json (strict JSON: NaN as null)."""
    stats, result = analysis.statistics, analysis.interference
    sweeps = {}
    for key, sweep in analysis.sweeps.items():
        # effect in float64, as sweep.csv computes it, so the two files agree exactly
        effect = {circuit: values.double() - sweep.clean for circuit, values in sweep.frozen.items()}
        test = analysis.sweep_tests.get(key)
        tested = {} if test is None else dict(
            null_hypothesis=test.null_hypothesis, alternative=test.alternative, correction=test.correction,
            alpha=test.alpha, n_permutations=test.n_permutations, exact=test.exact, n_bootstrap=test.n_bootstrap,
            **{name: getattr(test, name) for name in ("mean_effect", "ci_low", "ci_high", "p_value", "q_value_bh",
                                                      "q_value_by", "significant", "std_between_samples")})
        sweeps[key.upper()] = dict(task_name=analysis.tasks[key].name, metric=sweep.metric_name, clean=sweep.clean,
                                   replacement=sweep.replacement, frozen=sweep.frozen, effect=effect,
                                   settings=sweep.settings, test=tested)
    grids = {name: getattr(stats, name) for name in ("observed", "null_mean", "null_std", "z", "effect_size",
                                                      "p_value", "q_value_bh", "q_value_by", "p_value_maxstat",
                                                      "p_value_cluster", "ci_low", "ci_high", "significant")
             if getattr(stats, name) is not None}
    tasks = {key.upper(): dict(name=t.name, source=t.source, n_samples=t.n_samples, n_positions=int(t.tokens.shape[1]),
                               n_scored=int(t.scored.sum()), ids=t.ids, notes=t.notes)
             for key, t in analysis.tasks.items()}
    data = dict(
        tool=REPORT_MARKER,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=analysis.model_info,
        tasks=tasks,
        settings=analysis.config.to_dict(n_permutations_used=stats.n_permutations),
        timings_s=analysis.timings,
        warnings=analysis.warnings,
        duplicates=analysis.duplicates,
        sweep=sweeps,
        interference=dict(variant=result.config.variant, normalization=result.config.normalization,
                          reduction=result.config.reduction,
                          fisher_source=result.config.fisher_source, mean=result.mean,
                          block_means=result.block_means(), most_conflicted_block=result.most_conflicted_block,
                          settings=result.settings),
        statistics=dict(settings=stats.settings, null_hypothesis="task labels are exchangeable (the tasks use the "
                                                                  "head the same way)", **grids),
        conflict=_evidence_data(analysis),
        headlines=dict(needed=needed_table(analysis).to_dict("records"),
                       shared=shared_table(needed_table(analysis)).to_dict("records")),
        top_heads_by_freeze=top_heads_by_freeze(analysis, analysis.config.top_k).to_dict("records"),
        top_heads_by_interference=top_heads_by_interference(analysis, analysis.config.top_k).to_dict("records"),
        top_conflicts=top_conflicts_table(analysis).to_dict("records"),
        top_pairs=top_pairs_table(analysis).to_dict("records"),
        files=FILES,
    )
    return json_value(data)


def _evidence_data(analysis: Analysis) -> dict[str, Any]:
    """The conflict test, cosines, rank stability and drivers as report.json holds them (grids per block)."""
    evidence = analysis.evidence
    data: dict[str, Any] = {}
    if evidence.conflict is not None:
        test = evidence.conflict
        data["test"] = dict(null_hypothesis=test.null_hypothesis, alternative=test.alternative, alpha=test.alpha,
                            correction=test.correction, confidence_level=test.confidence_level,
                            **{name: getattr(test, name) for name in ("estimate", "std_error", "statistic", "df",
                                                                      "p_value", "q_value_bh", "q_value_by",
                                                                      "significant", "ci_low", "ci_high")})
    if evidence.cosines is not None:
        cos = evidence.cosines
        data["cosines"] = dict(mean_cosine=cos.mean_cosine, fraction_negative=cos.fraction_negative,
                               task_mean_cosine=cos.task_mean_cosine)
    ranking, drivers = evidence.ranking, evidence.drivers
    data["rank_stability"] = dict(k=ranking.k, n_resamples=ranking.n_resamples,
                                  confidence_level=ranking.confidence_level, rank=ranking.rank,
                                  rank_low=ranking.rank_low, rank_high=ranking.rank_high,
                                  top_k_frequency=ranking.top_k_frequency)
    data["drivers"] = dict(top=drivers.top, share_left=drivers.share_left, dominated=drivers.dominated)
    return data


def write_report_files(analysis: Analysis, directory: Path) -> None:
    """Every report file into ``directory`` (which must exist), ``report.md`` last."""
    sweep_table(analysis).to_csv(directory / "sweep.csv", index=False)
    freeze_tests_table(analysis).to_csv(directory / "freeze_tests.csv", index=False)
    interference_table(analysis).to_csv(directory / "interference.csv", index=False)
    top_conflicts_table(analysis).to_csv(directory / "top_conflicts.csv", index=False)
    top_pairs_table(analysis).to_csv(directory / "top_pairs.csv", index=False)
    samples_table(analysis).to_csv(directory / "samples.csv", index=False)
    (directory / "report.json").write_text(json.dumps(report_data(analysis), indent=1, allow_nan=False))
    write_figures(analysis, directory)
    (directory / "report.md").write_text(report_markdown(analysis, FILES), encoding="utf-8")


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


def write_report(analysis: Analysis, out: os.PathLike | str,
                 write_files: Callable[[Analysis, Path], None] = write_report_files) -> Path:
    """Write the report folder ``out`` atomically: files go to a hidden sibling, renamed into place at the end.

    On any failure the partial directory is removed and an earlier report at ``out`` is left as it was.
    """
    target = Path(out)
    check_output_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write_files(analysis, partial)
        _move_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


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
