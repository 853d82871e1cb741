"""The report's tables (pandas DataFrames, written as its CSV files and listed in report.json).

- :func:`sweep_table` (``sweep.csv``): task, task_name, circuit, layer, head, ``clean_loss``, ``frozen_loss``
  (the loss with that head's circuit frozen) and ``effect = frozen_loss − clean_loss``; ``number``: ``"exact"``, or
  ``"estimate"`` for an attribution sweep's unverified first-order estimate.
- :func:`interference_table` (``interference.csv``): per (block, layer, head) the map's mean and every statistic.
- :func:`top_heads_by_freeze`, :func:`top_heads_by_interference`, :func:`top_conflicts_table`,
  :func:`top_pairs_table`, :func:`samples_table`.

"Most conflicting" is most negative first for the signed variant, largest first otherwise, NaN last:

>>> import numpy as np
>>> conflict_order(np.array([0.5, -2.0, np.nan, -1.0]), "signed").tolist()
[1, 3, 0, 2]
>>> conflict_order(np.array([0.5, -2.0, np.nan, -1.0]), "unsigned").tolist()
[0, 3, 1, 2]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tl_circuits.cli.pipeline import Analysis
from tl_circuits.freezing.attribution_result import AttributionResult
from tl_circuits.freezing.sweep import SweepResult

SWEEP_COLUMNS = ["task", "task_name", "circuit", "layer", "head", "clean_loss", "frozen_loss", "effect"]
SWEEP_TEST_COLUMNS = ["ci_low", "ci_high", "p_value", "q_value_bh", "q_value_by", "significant",
                      "std_between_samples", "n_samples"]


def sweep_table(analysis: Analysis) -> pd.DataFrame:
    """Long table of both sweeps, one row per (task, circuit, layer, head), with the paired test of each cell
    (:data:`SWEEP_TEST_COLUMNS`, from :meth:`tl_circuits.SweepResult.test`); NaN where a circuit was not swept."""
    rows = []
    for key, sweep in analysis.sweeps.items():
        name = analysis.tasks[key].name
        test = analysis.sweep_tests.get(key)
        for circuit, frozen in sweep.frozen.items():
            n_heads = frozen.shape[1]
            # effect in float64 of the float32 loss, as report.json's, so the two files agree exactly
            for flat, loss in enumerate(frozen.detach().cpu().flatten().tolist()):
                layer, head = divmod(flat, n_heads)
                row = dict(task=key.upper(), task_name=name, circuit=circuit, layer=layer, head=head,
                           clean_loss=sweep.clean, frozen_loss=loss, effect=loss - sweep.clean)
                row.update(_test_cells(test, circuit, layer, head))
                row["number"] = _number(sweep, circuit, layer, head)
                rows.append(row)
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS + SWEEP_TEST_COLUMNS + ["number"])


def _number(sweep: SweepResult, circuit: str, layer: int, head: int) -> str:
    """What a cell's effect is: ``"exact"`` (a freeze), ``"estimate"`` (an attribution sweep's first-order estimate,
    not verified) or ``"not run"``."""
    if not isinstance(sweep, AttributionResult):
        return "exact"
    if circuit not in sweep.verified:
        return "not run"
    return "exact" if bool(sweep.verified[circuit][layer, head]) else "estimate"


def _test_cells(test: Any, circuit: str, layer: int, head: int) -> dict[str, float]:
    """The sweep test's values of one cell (NaN when the circuit was not tested or the field is absent)."""
    out = {}
    for name in SWEEP_TEST_COLUMNS:
        grid = getattr(test, name, None) if test is not None else None
        value = grid[circuit][layer, head].item() if grid is not None and circuit in grid else math.nan
        out[name] = float(value)
    return out


def circuit_comparison_table(analysis: Analysis, k: int) -> pd.DataFrame:
    """Per task, the k heads with the largest |effect| in any circuit: the QK, OV and BOTH effects, the interaction
    BOTH − (QK + OV) with its interval and q-value, and a ``verdict`` from which circuits the test shows."""
    rows = []
    roles = known_roles(analysis)
    for key, test in analysis.sweep_tests.items():
        if "interaction" not in test.mean_effect:
            continue
        effects = torch.stack([test.mean_effect[c] for c in ("qk", "ov", "both")])       # [3, L, H]
        size = torch.nan_to_num(effects.abs(), nan=-1.0).amax(0)
        n_heads = size.shape[1]
        for flat in size.flatten().argsort(descending=True)[:k].tolist():
            layer, head = divmod(flat, n_heads)
            shown = {c: bool(test.significant[c][layer, head]) for c in ("qk", "ov", "both")}
            low, high = (test.ci_low, test.ci_high) if test.ci_low is not None else (None, None)
            rows.append(dict(
                task=key.upper(), layer=layer, head=head,
                **{c: float(test.mean_effect[c][layer, head]) for c in ("qk", "ov", "both")},
                interaction=float(test.mean_effect["interaction"][layer, head]),
                interaction_interval=(f"[{float(low['interaction'][layer, head]):.3g}, "
                                      f"{float(high['interaction'][layer, head]):.3g}]" if low and high else ""),
                interaction_q=float(test.q_value_bh["interaction"][layer, head]),
                verdict=_verdict(shown, bool(test.significant["interaction"][layer, head])),
                known_role=roles.get((layer, head), "")))
    return pd.DataFrame(rows)


def _verdict(shown: dict[str, bool], interaction: bool) -> str:
    if shown["qk"] and shown["ov"]:
        text = "both"
    elif shown["qk"]:
        text = "QK-specific"
    elif shown["ov"]:
        text = "OV-specific"
    elif shown["both"]:
        text = "whole head only"
    else:
        text = "no effect shown"
    return text + ("; non-additive" if interaction else "")


def freeze_tests_table(analysis: Analysis) -> pd.DataFrame:
    """Every cell of both tasks' sweep tests, the QK × OV ``interaction`` included (``freeze_tests.csv``)."""
    frames = []
    for key, test in analysis.sweep_tests.items():
        frame = test.to_dataframe()
        frame.insert(0, "task", key.upper())
        frame.insert(1, "task_name", analysis.tasks[key].name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def interference_table(analysis: Analysis) -> pd.DataFrame:
    """One row per (block, layer, head): the map's mean over A × B pairs and every statistic of the cell.

    The label-permutation test's columns are as :meth:`tl_circuits.InterferenceTestResult.to_dataframe` names them
    (``p_value``, ``q_value_bh``, ``significant``, ...: "the tasks use this head differently"); the conflict test's
    and the other evidence's (:func:`evidence_columns`) follow.
    """
    frame = analysis.statistics.to_dataframe()
    means = analysis.interference.mean
    frame.insert(3, "head_kind", ["kv" if b in ("K", "V") else "query" for b in frame["block"]])
    frame.insert(4, "mean", [float(means[b][l, h]) for b, l, h in zip(frame["block"], frame["layer"], frame["head"])])
    cells = list(zip(frame["block"], frame["layer"], frame["head"]))
    for name, values in evidence_columns(analysis, cells).items():
        frame[name] = values
    return frame


def evidence_columns(analysis: Analysis, cells: list[tuple[str, int, int]]) -> dict[str, list]:
    """Per cell: the conflict test (``conflict_*``; NaN for an unsigned variant), the Fisher-metric cosines, the
    rank stability and the leave-one-out drivers (sample ids of A / B, joined by ``;``)."""
    evidence = analysis.evidence
    grids: dict[str, Any] = {}
    test = evidence.conflict
    for name, field in (("conflict_se", "std_error"), ("conflict_ci_low", "ci_low"), ("conflict_ci_high", "ci_high"),
                        ("conflict_p", "p_value"), ("conflict_q_bh", "q_value_bh"), ("conflict_q_by", "q_value_by"),
                        ("conflict_significant", "significant")):
        grids[name] = getattr(test, field) if test is not None else None
    cosines = evidence.cosines
    for name, field in (("mean_cosine", "mean_cosine"), ("fraction_negative_pairs", "fraction_negative"),
                        ("task_mean_cosine", "task_mean_cosine")):
        grids[name] = getattr(cosines, field) if cosines is not None else None
    ranking, drivers = evidence.ranking, evidence.drivers
    grids.update(rank=ranking.rank, rank_low=ranking.rank_low, rank_high=ranking.rank_high,
                 top_k_frequency=ranking.top_k_frequency, share_left_without_drivers=drivers.share_left,
                 dominated=drivers.dominated)
    columns: dict[str, list] = {}
    for name, grid in grids.items():
        columns[name] = [math.nan if grid is None else grid[b][l, h].item() for b, l, h in cells]
    ids = {"a": analysis.interference.ids_a, "b": analysis.interference.ids_b}
    for key, top in (("a", drivers.top_a), ("b", drivers.top_b)):
        columns[f"drivers_{key}"] = [";".join(str(ids[key][i]) for i in top[b][l, h].tolist() if i >= 0)
                                     for b, l, h in cells]
    return columns


def conflict_order(values: np.ndarray, variant: str) -> np.ndarray:
    """Indices from most to least conflicting (most negative first for signed), NaN last."""
    key = values if variant == "signed" else -values
    return np.argsort(np.where(np.isfinite(key), key, np.inf), kind="stable")


def known_roles(analysis: Analysis) -> dict[tuple[int, int], str]:
    """(layer, query head) -> the role the model's metadata gives it (bundled models), e.g. "induction"."""
    roles: dict[tuple[int, int], str] = {}
    for role, heads in (analysis.model_info.get("known_heads") or {}).items():
        for layer, head in heads:
            cell = (int(layer), int(head))
            roles[cell] = ", ".join(filter(None, [roles.get(cell), role]))
    return roles


def _role_column(frame: pd.DataFrame, roles: dict, kv_blocks_are_grouped: bool = False) -> list[str]:
    """Known role of each row's head; K/V rows under GQA index KV heads, which have no query-head role."""
    out = []
    for _, row in frame.iterrows():
        grouped_kv = kv_blocks_are_grouped and row.get("block") in ("K", "V")
        out.append("" if grouped_kv else roles.get((int(row["layer"]), int(row["head"])), ""))
    return out


def top_heads_by_interference(analysis: Analysis, k: int) -> pd.DataFrame:
    """The k (block, layer, head) cells with the most conflicting mean, with their statistics and known role."""
    table = interference_table(analysis)
    order = conflict_order(table["mean"].to_numpy(), analysis.config.variant)[:k]
    top = table.iloc[order].reset_index(drop=True)
    grouped = bool(analysis.interference.settings.get("grouped", False))
    top["known_role"] = _role_column(top, known_roles(analysis), grouped)
    return top


def top_heads_by_freeze(analysis: Analysis, k: int) -> pd.DataFrame:
    """Per task, the k (circuit, layer, head) with the largest |effect|, with their known role."""
    table = sweep_table(analysis)
    parts = [part.iloc[np.argsort(-part["effect"].abs().to_numpy(), kind="stable")[:k]]
             for _, part in table.groupby("task", sort=True)]
    top = pd.concat(parts, ignore_index=True)
    top["known_role"] = _role_column(top, known_roles(analysis))
    return top


def top_conflicts_table(analysis: Analysis) -> pd.DataFrame:
    """The ``top_k`` most conflicting (sample pair, block, layer, head) cells."""
    conflicts = analysis.interference.top_conflicts(analysis.config.top_k)
    rows = [dict(rank=r + 1, **c._asdict()) for r, c in enumerate(conflicts)]
    return pd.DataFrame(rows, columns=["rank", "id_a", "id_b", "block", "layer", "head", "score"])


def top_pairs_table(analysis: Analysis) -> pd.DataFrame:
    """Sample pairs ranked by their score summed over blocks, layers and heads (K/V per KV head, once each)."""
    result = analysis.interference
    per_block = {b: result.scores[b].double().nansum(dim=(2, 3)) for b in result.blocks}
    total = np.zeros(next(iter(per_block.values())).shape)
    for grid in per_block.values():
        total = total + grid.numpy()
    order = conflict_order(np.ravel(total), analysis.config.variant)[:analysis.config.top_k]
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
    """The (block, layer, head, score) of a pair that conflicts most; NaN score if every cell is NaN."""
    best = None
    for block, grid in cells.items():
        values = grid.double().numpy()
        flat = conflict_order(values.ravel(), variant)[0]
        value = float(values.ravel()[flat])
        better = best is None or (value < best[3] if variant == "signed" else value > best[3])
        if math.isfinite(value) and better:
            layer, head = divmod(int(flat), values.shape[1])
            best = (block, layer, head, value)
    return best if best is not None else ("", -1, -1, math.nan)


def samples_table(analysis: Analysis) -> pd.DataFrame:
    """Every sample: task, task_name, id, number of real tokens, counted predictions (the loss's terms), prompt and
    completion tokens (prompt -> completion tasks; empty otherwise), preview."""
    rows = []
    for key, task in analysis.tasks.items():
        lengths = task.attention_mask.sum(1).tolist()
        counted = task.n_counted.tolist()
        prompts = task.prompt_lengths.tolist() if task.prompt_lengths is not None else [None] * task.n_samples
        completion = task.completion_lengths
        completions = completion.tolist() if completion is not None else [None] * task.n_samples
        rows += [dict(task=key.upper(), task_name=task.name, id=i, n_tokens=int(n), n_counted=int(c), n_prompt=np_,
                      n_completion=nc, preview=p)
                 for i, n, c, np_, nc, p in zip(task.ids, lengths, counted, prompts, completions, task.previews)]
    frame = pd.DataFrame(rows)
    for column in ("n_prompt", "n_completion"):
        frame[column] = frame[column].astype("Int64")  # whole numbers, empty where the task has no prompt
    return frame
