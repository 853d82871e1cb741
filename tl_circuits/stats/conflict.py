"""Do the tasks conflict in this head? A test of the expected A × B signed score (docs/spec.md §4.1).

For every (block, layer, head) cell, with ``s_ij`` the signed score of sample ``i`` of task A and ``j`` of
task B (Σ g_i g_j / F̃ over the head's slice), the test is of

    H0: E[s_ij] ≥ 0   (the tasks' Fisher-normalised mean gradients are not opposed in this head)
    H1: E[s_ij] < 0   (they conflict)

for independent draws of A and B. This is not the label-permutation test
(:func:`tl_circuits.permutation_test`), whose null is "the tasks use the head the same way": two tasks whose
mean gradients are orthogonal are exchangeable under neither, but they do not conflict, and this test is
calibrated there.

The statistic is the two-sample U-statistic ``Ū = mean_ij s_ij``. Its variance comes from the Hoeffding
projections: with row means ``r_i = mean_j s_ij`` and column means ``c_j = mean_i s_ij``,
``se² = var(r)/n_A + var(c)/n_B`` (sample variances; this also counts the small residual term, so it errs on the
conservative side). ``T = Ū / se`` is referred to Student's t with Welch–Satterthwaite degrees of freedom; the
interval is ``Ū ± t_{df} · se``. Calibration at the boundary (E = 0 with non-zero, orthogonal task means),
heteroscedastic and small unbalanced samples, and power against planted conflict are checked by simulation
(``tests/stats/test_conflict.py``).

>>> import torch
>>> gen = torch.Generator().manual_seed(0)
>>> a, b = torch.randn(20, 8, generator=gen), torch.randn(25, 8, generator=gen)
>>> a[:, 0] += 1.0; b[:, 0] -= 1.0                     # opposed mean gradients in one direction: conflict
>>> scores = {"O": torch.einsum("id,jd->ij", a, b)[:, :, None, None]}
>>> res = conflict_test(scores)
>>> bool(res.significant["O"][0, 0]), res.estimate["O"][0, 0] < 0
(True, tensor(True))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats as sps
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.deprecation import deprecated_alias
from tl_circuits.models.types import Model
from tl_circuits.results_io import SavedResult
from tl_circuits.stats.pvalues import family_decisions, tail_p_value
from tl_circuits.stats.validation import check_choice, check_open_unit

NULL_HYPOTHESIS = "E[s_ij] >= 0: the tasks' Fisher-normalised mean gradients are not opposed in this head"
"""H0 of the default, one-sided test (``alternative="less"``); :attr:`ConflictTestResult.null_hypothesis` names the
null and the alternative of any result."""
HYPOTHESES = {
    "less": (NULL_HYPOTHESIS, "E[s_ij] < 0: the tasks conflict in this head"),
    "greater": ("E[s_ij] <= 0: the tasks' Fisher-normalised mean gradients are not aligned in this head",
                "E[s_ij] > 0: the tasks' mean gradients are aligned (transfer)"),
    "two-sided": ("E[s_ij] = 0: the tasks' Fisher-normalised mean gradients are orthogonal in this head",
                  "E[s_ij] != 0: opposed or aligned"),
}
"""``alternative`` -> (H0, H1) in words."""
ALTERNATIVES = tuple(HYPOTHESES)
CORRECTIONS = ("bh", "by", "none")

Grid = dict[str, Float[Tensor, "n_layers heads"]]


@dataclass(frozen=True)
class ConflictTestResult(SavedResult):
    """Per (block, layer, head): the conflict test of the expected A × B signed score.

    Attributes:
        estimate: ``Ū``, the mean signed score over all pairs (negative: conflict).
        std_error, statistic, df: ``se``, ``T = Ū/se`` and the Welch–Satterthwaite degrees of freedom.
        p_value: one-sided for ``"less"`` (H0: E ≥ 0, the default), ``"greater"``, or two-sided
            (``min(1, 2·min(p_less, p_greater))``, the package's one rule). ``pvalue`` is its deprecated alias.
        q_value_bh, q_value_by: FDR q-values over every finite cell of every block.
        significant: the ``correction``'s adjusted p-value ≤ ``alpha``.
        ci_low, ci_high: the two-sided ``confidence_level`` interval of E[s_ij].
        null_hypothesis: what is tested (H0 and the alternative), in words.
        loss: what each task's per-sample loss scored (``settings["loss"]`` of the engine, docs/spec.md §2.1) when
            the scores came from :func:`interference_conflict_test` or an ``InterferenceResult`` that records it.

    ``save(folder)`` / :func:`tl_circuits.load` keep it on disk (:mod:`tl_circuits.results_io`).
    """

    estimate: Grid
    std_error: Grid
    statistic: Grid
    df: Grid
    p_value: Grid
    q_value_bh: Grid
    q_value_by: Grid
    significant: dict[str, Tensor]
    ci_low: Grid
    ci_high: Grid
    alpha: float
    alternative: str
    correction: str
    confidence_level: float
    n_a: int
    n_b: int
    loss: Optional[dict] = None

    pvalue = deprecated_alias("pvalue", "p_value")

    @property
    def null_hypothesis(self) -> str:
        """H0 and H1 of every cell's ``p_value`` (they depend on ``alternative``), in words."""
        null, alternative = HYPOTHESES[self.alternative]
        return f"H0: {null}. H1 ({self.alternative}): {alternative}"

    @property
    def blocks(self) -> list[str]:
        return list(self.estimate)

    def to_dataframe(self) -> Any:
        """One row per (block, layer, head) with every per-cell field."""
        import pandas as pd

        rows = []
        fields = ("estimate", "std_error", "statistic", "df", "p_value", "q_value_bh", "q_value_by", "ci_low",
                  "ci_high", "significant")
        for block in self.blocks:
            n_layers, n_heads = self.estimate[block].shape
            for layer in range(n_layers):
                for head in range(n_heads):
                    row = {"block": block, "layer": layer, "head": head}
                    row.update({f: getattr(self, f)[block][layer, head].item() for f in fields})
                    rows.append(row)
        return pd.DataFrame(rows)


def _scores_of(scores: Any) -> Mapping[str, Tensor]:
    """``{block: [N_A, N_B, L, H]}`` from a mapping or an InterferenceResult (which must be signed)."""
    if hasattr(scores, "scores") and hasattr(scores, "n_a"):
        raise TypeError("the conflict test takes the A x B scores, not the pooled matrix: use "
                        "PooledScores.conflict_test() (or conflict_test(pooled.interference()))")
    if hasattr(scores, "scores") and hasattr(scores, "config"):
        variant = scores.config.variant
        if variant != "signed":
            raise ValueError(f"the conflict test is a test of the signed score (negative = conflict); this "
                             f"InterferenceResult is {variant!r}: rerun with variant='signed'")
        return scores.scores
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("scores must be a non-empty mapping block -> [N_A, N_B, n_layers, heads] or an "
                        f"InterferenceResult, got {type(scores).__name__}")
    return scores


def conflict_test(
    scores: Union[Mapping[str, Float[Tensor, "n_a n_b n_layers heads"]], Any],
    *,
    alternative: str = "less",
    alpha: float = defaults.ALPHA,
    correction: str = "bh",
    confidence_level: float = defaults.CONFIDENCE_LEVEL,
) -> ConflictTestResult:
    """Test, per (block, layer, head), H0 "the expected A × B signed score is ≥ 0" against "< 0" (module docstring).

    Args:
        scores: ``{block: [N_A, N_B, n_layers, heads]}`` signed A × B scores, or a signed
            :class:`~tl_circuits.InterferenceResult`.
        alternative: ``"less"`` (default: conflict), ``"greater"`` or ``"two-sided"``.
        alpha: the level of ``significant``.
        correction: ``"bh"`` (default), ``"by"`` or ``"none"``: which p-values decide ``significant``.
        confidence_level: of the two-sided interval.
    Returns:
        :class:`ConflictTestResult`. Cells with any non-finite score, or with no spread at all (se = 0), are
        NaN (with a warning), never a silent 0.
    """
    check_choice("alternative", alternative, ALTERNATIVES)
    check_choice("correction", correction, CORRECTIONS)
    alpha = check_open_unit("alpha", alpha)
    confidence_level = check_open_unit("confidence_level", confidence_level)
    blocks = _scores_of(scores)
    shapes = {b: tuple(s.shape) for b, s in blocks.items()}
    if any(len(s) != 4 for s in shapes.values()) or len({s[:2] for s in shapes.values()}) != 1:
        raise ValueError("every block's scores must be [N_A, N_B, n_layers, heads] with the same N_A, N_B; "
                         f"got {shapes}")
    n_a, n_b = next(iter(shapes.values()))[:2]
    if n_a < 2 or n_b < 2:
        raise ValueError(f"the conflict test needs at least 2 samples per task, got n_a={n_a}, n_b={n_b}")
    out: dict[str, dict[str, Tensor]] = {k: {} for k in ("estimate", "std_error", "statistic", "df", "p_value",
                                                         "ci_low", "ci_high")}
    n_bad = n_cells = 0
    t_crit_q = 0.5 + confidence_level / 2
    for block, s in blocks.items():
        x = s.detach().double().cpu()
        missing = ~torch.isfinite(x).all(0).all(0)
        rows, cols = x.mean(1), x.mean(0)  # [N_A, L, H], [N_B, L, H]
        estimate = x.mean((0, 1))
        var_a, var_b = rows.var(0, unbiased=True) / n_a, cols.var(0, unbiased=True) / n_b
        se = (var_a + var_b).sqrt()
        degenerate = ~(se > 0)
        bad = missing | degenerate
        df = (var_a + var_b) ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))
        statistic = estimate / se
        t = statistic.numpy()
        dfn = df.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            p_less, p_greater = (torch.from_numpy(np.asarray(tail, dtype=np.float64))
                                 for tail in (sps.t.cdf(t, dfn), sps.t.sf(t, dfn)))
            half = sps.t.ppf(t_crit_q, dfn) * se.numpy()
        values = {"estimate": estimate, "std_error": se, "statistic": statistic, "df": df,
                  "p_value": tail_p_value(p_less, p_greater, alternative),
                  "ci_low": estimate - torch.from_numpy(half), "ci_high": estimate + torch.from_numpy(half)}
        for name, v in values.items():
            keep_estimate = name == "estimate"  # the mean itself is defined when only the spread is 0
            mask = missing if keep_estimate else bad
            out[name][block] = v.masked_fill(mask, float("nan"))
        n_bad += int(bad.sum())
        n_cells += bad.numel()
    if n_bad:
        warnings.warn(f"{n_bad} of {n_cells} cells have non-finite scores or no spread (se = 0): their p-values "
                      "are NaN", RuntimeWarning, stacklevel=2)
    decisions = family_decisions(out["p_value"], correction, alpha)
    return ConflictTestResult(estimate=out["estimate"], std_error=out["std_error"], statistic=out["statistic"],
                              df=out["df"], p_value=out["p_value"], q_value_bh=decisions.q_value_bh,
                              q_value_by=decisions.q_value_by, significant=decisions.significant,
                              ci_low=out["ci_low"], ci_high=out["ci_high"], alpha=alpha,
                              alternative=alternative, correction=correction, confidence_level=confidence_level,
                              n_a=n_a, n_b=n_b, loss=getattr(scores, "settings", {}).get("loss"))


def interference_conflict_test(
    model: Model,
    tokens_a: Int[Tensor, "n_a pos_a"],
    tokens_b: Int[Tensor, "n_b pos_b"],
    *,
    attention_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    attention_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_mask_a: Optional[Int[Tensor, "n_a pos_a"]] = None,
    loss_mask_b: Optional[Int[Tensor, "n_b pos_b"]] = None,
    loss_fn_a: Optional[Callable[..., Tensor]] = None,
    loss_fn_b: Optional[Callable[..., Tensor]] = None,
    config: Optional[Any] = None,
    progress: Optional[bool] = None,
    **test_kwargs: Any,
) -> ConflictTestResult:
    """The conflict test end to end: signed A × B scores under the pooled Fisher, streamed through the engine
    (:func:`tl_circuits.compute_interference`, whose ``loss_mask_*``/``loss_fn_*`` say what each task scores),
    then :func:`conflict_test` (``test_kwargs``: alternative, alpha, correction, confidence_level). ``config``'s
    variant and Fisher source are set by :func:`conflict_config`; ``progress``: ``None`` (default) is
    ``config.progress``."""
    from tl_circuits.interference.engine import compute_interference

    result = compute_interference(model, tokens_a, tokens_b, attention_mask_a=attention_mask_a,
                                  attention_mask_b=attention_mask_b, loss_mask_a=loss_mask_a, loss_mask_b=loss_mask_b,
                                  loss_fn_a=loss_fn_a, loss_fn_b=loss_fn_b, config=conflict_config(config),
                                  progress=progress)
    return result.conflict_test(**test_kwargs)


def conflict_config(config: Optional[Any] = None) -> Any:
    """The :class:`~tl_circuits.InterferenceConfig` of the conflict test: ``config`` (default the defaults) with
    the signed variant and the pooled Fisher.

    >>> cfg = conflict_config()
    >>> cfg.variant, cfg.fisher_source
    ('signed', 'pooled')
    """
    from tl_circuits.interference.config import InterferenceConfig

    return (config or InterferenceConfig()).replace(variant="signed", fisher_source="pooled")
