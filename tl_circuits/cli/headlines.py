"""The report's headlines: one answer per question, each with the evidence it rests on.

1. **Which heads does each task need?** The freeze effect is normalised twice: by the task's clean loss
   (``relative_to_clean = effect / clean loss``, as asked of a report) and by the room the model has to get worse,
   the gap from its clean loss to chance (``relative_effect = effect / (ln d_vocab − clean loss)``: 1 = the freeze
   makes the task as bad as uniform guessing). A well-trained model's clean loss is near 0, so the first ratio runs
   into the thousands for any real effect; the second is what decides. A (circuit, head) is *needed* by a task when
   ``relative_effect ≥ NEEDED_RELATIVE`` and, where the sweep kept per-sample effects, the paired test of "the
   freeze changes the loss" rejects (q ≤ α). A model no better than chance on a task (clean ≥ ln d_vocab) needs no
   head for it (NaN).
2. **Which heads do the tasks share?** The (layer, head)s needed by both tasks, in any circuit.
3. **Where do the tasks conflict?** The cells the conflict test (:func:`tl_circuits.conflict_test`; H0: the expected
   A × B signed score is ≥ 0) rejects at the report's correction and α.
4. **Is the sign forced?** The joint-optimum diagnostic cos(ḡ_A, ḡ_B) (:func:`tl_circuits.fisher_cosines`): near −1 in
   most cells means the model sits at an optimum of both tasks, where opposed task-mean gradients — and so a
   negative map and a conflict test that rejects wherever gradients are not tiny — are forced by construction.

>>> joint_optimum_sentence(torch.tensor([-0.99, -0.98, -0.97, 0.1])).split(" (")[0]
'3 of 4 cells have cos(ḡ_A, ḡ_B) < −0.9'
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tl_circuits.cli.analysis import Analysis
from tl_circuits.cli.tables import known_roles, sweep_table

NEEDED_RELATIVE = 0.1
"""A freeze that raises the task's loss by at least this share of the gap from clean loss to chance makes the head
*needed*."""
OPPOSED_COSINE = -0.9
"""cos(ḡ_A, ḡ_B) below this counts as "opposed" in the joint-optimum diagnostic."""
FORCED_SHARE = 0.5
"""When more than this share of the cells is opposed, the report says the sign of the map is forced."""
SHOWN = 5


def needed_table(analysis: Analysis) -> pd.DataFrame:
    """Every (task, circuit, layer, head) the task needs (module docstring), largest relative effect first.

    Columns: those of :func:`tl_circuits.cli.tables.sweep_table` (with the paired test's interval and q-values),
    ``relative_to_clean``, ``relative_effect`` and ``known_role``.
    """
    table = sweep_table(analysis)
    chance = math.log(int(analysis.model_info.get("d_vocab") or 0) or math.nan)
    gap = chance - table["clean_loss"]
    table["relative_to_clean"] = table["effect"] / table["clean_loss"].where(table["clean_loss"] > 0)
    table["relative_effect"] = table["effect"] / gap.where(gap > 0)
    needed = table["relative_effect"] >= NEEDED_RELATIVE
    tested = table["significant"].notna()
    # with a paired test, the effect must also be shown (q <= alpha); interaction rows are not in sweep.csv
    needed &= ~tested | (table["significant"] == 1.0)
    out = table[needed.fillna(False)].copy()
    roles = known_roles(analysis)
    out["known_role"] = [roles.get((int(l), int(h)), "") for l, h in zip(out["layer"], out["head"])]
    return out.sort_values(["task", "relative_effect"], ascending=[True, False], kind="stable").reset_index(drop=True)


def shared_table(needed: pd.DataFrame) -> pd.DataFrame:
    """The (layer, head)s that both tasks need, with each task's circuits and largest relative effect."""
    rows = []
    by_task = {task: part for task, part in needed.groupby("task")}
    if {"A", "B"} <= set(by_task):
        heads_a = set(zip(by_task["A"]["layer"], by_task["A"]["head"]))
        heads_b = set(zip(by_task["B"]["layer"], by_task["B"]["head"]))
        for layer, head in sorted(heads_a & heads_b):
            row: dict[str, object] = dict(layer=int(layer), head=int(head))
            for task in ("A", "B"):
                part = by_task[task]
                part = part[(part["layer"] == layer) & (part["head"] == head)]
                row[f"circuits_{task.lower()}"] = "+".join(part["circuit"].str.upper())
                row[f"relative_effect_{task.lower()}"] = float(part["relative_effect"].max())
            rows.append(row)
    return pd.DataFrame(rows, columns=["layer", "head", "circuits_a", "relative_effect_a", "circuits_b",
                                       "relative_effect_b"])


def _heads_text(frame: pd.DataFrame) -> str:
    """``L0H0 (OV 36%, QK 19%; previous_token), ...``: heads by their largest share, each with its circuits."""
    if frame.empty:
        return "none"
    parts = []
    for (layer, head), part in frame.groupby(["layer", "head"], sort=False):
        shares = ", ".join(f"{c.upper()} {100 * r:.0f}%" for c, r in zip(part["circuit"], part["relative_effect"]))
        role = part["known_role"].iloc[0] if "known_role" in part else ""
        parts.append((float(part["relative_effect"].max()), f"L{layer}H{head} ({shares}{'; ' + role if role else ''})"))
    parts.sort(key=lambda item: -item[0])
    more = f" and {len(parts) - SHOWN} more heads" if len(parts) > SHOWN else ""
    return ", ".join(text for _, text in parts[:SHOWN]) + more


def joint_optimum_sentence(task_mean_cosine: Tensor) -> str:
    """What the joint-optimum diagnostic says about the sign of the map (module docstring, question 4)."""
    values = task_mean_cosine[torch.isfinite(task_mean_cosine)].double()
    if values.numel() == 0:
        return "The joint-optimum diagnostic is undefined (no cell has non-zero task-mean gradients)."
    opposed = int((values < OPPOSED_COSINE).sum())
    text = (f"{opposed} of {values.numel()} cells have cos(ḡ_A, ḡ_B) < {OPPOSED_COSINE:g} "
            f"(median {float(values.median()):.2f}).".replace("-", "−"))
    if opposed > FORCED_SHARE * values.numel():
        text += (" The two tasks' mean gradients point in opposite directions almost everywhere, which is what an "
                 "optimum of both tasks forces (their weighted sum is ≈ 0 there). So a negative map, and a conflict "
                 "test that rejects wherever the gradients are not tiny, are expected for this model: compare heads "
                 "by the size of their scores and cosines, not by their sign.")
    else:
        text += " The sign of the map is not forced by a joint optimum: negative cells are a finding."
    return text


def conflict_rows(analysis: Analysis) -> pd.DataFrame:
    """The cells the conflict test rejects, most negative estimate first (empty for an unsigned variant)."""
    from tl_circuits.cli.tables import interference_table

    table = interference_table(analysis)
    if analysis.evidence.conflict is None:
        return table.iloc[0:0]
    hits = table[table["conflict_significant"] == True]  # noqa: E712 - NaN-safe for the object column
    return hits.iloc[np.argsort(hits["mean"].to_numpy(), kind="stable")].reset_index(drop=True)


def headlines(analysis: Analysis) -> list[str]:
    """The report's headline bullets (Markdown)."""
    needed = needed_table(analysis)
    chance = math.log(int(analysis.model_info.get("d_vocab") or 0) or math.nan)
    lines = []
    for key, task in analysis.tasks.items():
        part = needed[needed["task"] == key.upper()]
        evidence = ("; the paired sign-flip test shows each effect (q ≤ "
                    f"{analysis.config.alpha})" if key in analysis.sweep_tests else "")
        lines.append(f"- **Heads task {key.upper()} ({task.name}) needs:** {_heads_text(part)} — freezing each "
                     f"takes the task at least {100 * NEEDED_RELATIVE:.0f}% of the way from its clean loss "
                     f"{analysis.sweeps[key].clean:.3g} to chance (ln d_vocab = {chance:.3g}){evidence}.")
    shared = shared_table(needed)
    shared_text = ", ".join(f"L{r.layer}H{r.head} (A: {r.circuits_a}, B: {r.circuits_b})"
                            for r in shared.head(SHOWN).itertuples()) or "none"
    lines.append(f"- **Heads both tasks need:** {shared_text}.")
    cfg = analysis.config
    if analysis.evidence.conflict is None:
        lines.append(f"- **Where the tasks conflict:** not tested — the conflict test is about the sign of the "
                     f"`signed` score, and this report uses `{cfg.variant}`.")
    else:
        hits = conflict_rows(analysis)
        n_cells = int(sum(torch.isfinite(g).sum() for g in analysis.evidence.conflict.p_value.values()))
        level = 100 * analysis.evidence.conflict.confidence_level
        cells = ", ".join(f"{r.block} L{r.layer}H{r.head} (mean {r.mean:.3g}, {level:.0f}% CI "
                          f"[{r.conflict_ci_low:.3g}, {r.conflict_ci_high:.3g}])"
                          for r in hits.head(SHOWN).itertuples())
        lines.append(f"- **Where the tasks conflict:** {len(hits)} of {n_cells} cells reject H0 \"E[A × B signed "
                     f"score] ≥ 0\" ({cfg.correction.upper()} q ≤ {cfg.alpha})" + (f": {cells}." if cells else "."))
        cosine = torch.cat([g.flatten() for g in analysis.evidence.cosines.task_mean_cosine.values()])  # type: ignore[union-attr]
        lines.append(f"- **Is the sign forced?** {joint_optimum_sentence(cosine)}")
    dominated = sum(int(d.sum()) for d in analysis.evidence.drivers.dominated.values())
    if dominated:
        lines.append(f"- **Caution:** {dominated} cells are dominated by a few samples (removing the "
                     f"{analysis.evidence.drivers.top} most conflict-driving samples of each task leaves less than "
                     "half of their mean); see the drivers columns of `interference.csv`.")
    return lines
