"""Uncertainty of a per-sample freeze sweep: every head's mean effect with a bootstrap interval, a paired
sign-flip test, BH/BY q-values over all tested cells, and the QK × OV interaction (docs/spec.md §1.8).

>>> import torch
>>> from tl_circuits.freezing.sweep import SweepResult
>>> g = torch.Generator().manual_seed(0)
>>> effect = torch.randn(12, 2, 2, generator=g) * 0.1
>>> effect[:, 1, 0] += 1.0                                   # one head clearly matters
>>> result = SweepResult(clean=2.0, frozen={"qk": 2.0 + effect.mean(0)}, replacement="zero", metric_name="loss",
...                      clean_per_sample=torch.full((12,), 2.0), per_sample_effect={"qk": effect})
>>> res = result.test(n_bootstrap=999)
>>> res.significant["qk"].nonzero().tolist(), res.exact
([[1, 0]], True)
>>> list(res.to_dataframe().columns[:5])
['circuit', 'layer', 'head', 'mean_effect', 'ci_low']
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.deprecation import deprecated_function
from tl_circuits.results_io import SavedResult
from tl_circuits.stats.paired import paired_bootstrap_ci, sign_flip_test
from tl_circuits.stats.pvalues import family_decisions, warn_at_floor
from tl_circuits.stats.validation import (
    ALTERNATIVES,
    CI_METHODS,
    Grid,
    check_choice,
    check_int,
    check_open_unit,
    flatten_cells,
    split_cells,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure
    from pandas import DataFrame

    from tl_circuits.freezing.sweep import SweepResult

__all__ = ["INTERACTION", "SWEEP_NULL_HYPOTHESIS", "SweepTestResult", "interaction_effect", "sweep_test"]

INTERACTION = "interaction"
"""The extra circuit key of :func:`sweep_test` when "qk", "ov" and "both" were swept: BOTH − (QK + OV)."""
SWEEP_CORRECTIONS = ("bh", "by", "none")
SWEEP_NULL_HYPOTHESIS = (
    "for each (circuit, layer, head): freezing that head's circuit leaves the metric unchanged in the sense that "
    "each sample's effect (frozen minus clean metric) is symmetric about 0, independently of the other samples, "
    "so the mean per-sample effect is 0; for 'interaction': each sample's BOTH - (QK + OV) effect is symmetric "
    "about 0 (the QK and OV freezes add up)")
SWEEP_ALTERNATIVES = {
    "two-sided": "the freeze changes the metric, in either direction",
    "greater": "the freeze raises the metric (for a loss: the head helps)",
    "less": "the freeze lowers the metric (for a loss: the head hurts)",
}
"""What each ``alternative`` of :func:`sweep_test` looks for; the default is two-sided (a head may help or hurt)."""


@dataclass(frozen=True, repr=False)
class SweepTestResult(SavedResult):
    """Per circuit (and ``"interaction"``), [n_layers, n_heads] grids of a freeze sweep's paired test.

    ``mean_effect``: mean per-sample effect over the finite samples (= the sweep's ``effect``); ``ci_low`` /
    ``ci_high``: its bootstrap interval over samples (None with ``n_bootstrap=0``); ``std_between_samples``: the
    per-sample effects' standard deviation (ddof 1); ``std_between_draws``: the std (ddof 1) of the draws'
    batch-mean effects (NaN for one draw); ``p_value``: the sign-flip test of :attr:`null_hypothesis`;
    ``q_value_bh`` / ``q_value_by``: over every finite cell of every grid; ``significant``: the ``correction``'s
    adjusted p ≤ ``alpha``; ``n_samples``: finite samples per cell. ``save(folder)`` / :func:`tl_circuits.load`
    keep it on disk (:mod:`tl_circuits.results_io`).
    """

    mean_effect: Grid
    ci_low: Optional[Grid]
    ci_high: Optional[Grid]
    std_between_samples: Grid
    std_between_draws: Grid
    p_value: Grid
    q_value_bh: Grid
    q_value_by: Grid
    significant: dict[str, Tensor]
    n_samples: Grid
    alpha: float
    alternative: str
    correction: str
    n_permutations: int
    exact: bool
    n_bootstrap: int
    ci_method: str
    confidence_level: float
    seed: Optional[int]
    n_draws: int
    metric_name: str
    replacement: str

    @property
    def null_hypothesis(self) -> str:
        """What each cell's p-value tests, with the alternative it looks for."""
        return f"H0: {SWEEP_NULL_HYPOTHESIS}. H1 ({self.alternative}): {SWEEP_ALTERNATIVES[self.alternative]}"

    @property
    def circuits(self) -> list[str]:
        return list(self.mean_effect)

    def __repr__(self) -> str:
        n_sig = {c: int(s.sum()) for c, s in self.significant.items()}
        return (f"SweepTestResult(circuits={self.circuits}, significant={n_sig}, alpha={self.alpha}, "
                f"correction={self.correction!r}, alternative={self.alternative!r}, "
                f"n_permutations={self.n_permutations}, exact={self.exact})")

    def to_dataframe(self) -> DataFrame:
        """One row per (circuit, layer, head) with every grid as a column and the settings repeated."""
        import pandas as pd

        grid_names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), dict)]
        scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in grid_names}
        rows = []
        for circuit, values in self.mean_effect.items():
            n_layers, n_heads = values.shape
            for layer in range(n_layers):
                for head in range(n_heads):
                    row = dict(circuit=circuit, layer=layer, head=head)
                    for name in grid_names:
                        grid = getattr(self, name)
                        value = grid[circuit][layer, head].item()
                        row[name] = bool(value) if name == "significant" else value
                    rows.append({**row, **scalars})
        return pd.DataFrame(rows)

    def plot(self, title: Optional[str] = None) -> Figure:
        """Heatmap of the mean effect per circuit (diverging, centred at 0); non-significant cells hatched."""
        from tl_circuits.plotting import plot_blocks

        return plot_blocks(self.mean_effect, masks=self.significant, blocks=self.circuits, signed=True,
                           colorbar_label=f"Δ {self.metric_name}",
                           title=title or (f"{self.replacement.upper()} freeze effect on {self.metric_name} "
                                           f"(hatched: not significant, {self.correction.upper()} q > {self.alpha})"))


def interaction_effect(per_sample_effect: dict[str, Tensor]) -> Tensor:
    """Per-sample BOTH − (QK + OV): how far freezing both circuits departs from the sum of freezing each.

    >>> e = {"qk": torch.ones(2, 1, 1), "ov": 2 * torch.ones(2, 1, 1), "both": 4 * torch.ones(2, 1, 1)}
    >>> interaction_effect(e).flatten().tolist()
    [1.0, 1.0]
    """
    missing = [c for c in ("qk", "ov", "both") if c not in per_sample_effect]
    if missing:
        raise ValueError(f"the interaction needs the 'qk', 'ov' and 'both' sweeps; missing {missing}")
    return per_sample_effect["both"] - (per_sample_effect["qk"] + per_sample_effect["ov"])


def _nan_std(x: Tensor, dim: int) -> Tensor:
    """Standard deviation (ddof 1) over the finite entries along ``dim``; NaN with fewer than 2."""
    valid = torch.isfinite(x)
    n = valid.sum(dim)
    filled = torch.where(valid, x, 0.0)
    mean = filled.sum(dim) / n.clamp(min=1)
    sq = torch.where(valid, (x - mean.unsqueeze(dim)) ** 2, 0.0).sum(dim)
    return torch.where(n >= 2, (sq / (n - 1).clamp(min=1)).sqrt(), float("nan"))


def _test_grids(result: SweepResult) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """circuit -> per-sample effects [N', L, H] (samples with a finite clean metric) and per-draw effects."""
    if result.per_sample_effect is None or result.clean_per_sample is None:
        raise ValueError("test() needs per-sample effects: run freeze_sweep(..., per_sample=True)")
    keep = torch.isfinite(result.clean_per_sample)
    if int(keep.sum()) < 1:
        raise ValueError("every sample has a NaN clean metric: nothing to test")
    per_sample = {c: e[keep].double() for c, e in result.per_sample_effect.items()}
    per_draw = {c: e.double() for c, e in (result.per_draw_effect or {}).items()}
    if all(c in per_sample for c in ("qk", "ov", "both")):
        per_sample[INTERACTION] = interaction_effect(per_sample)
        if per_draw:
            per_draw[INTERACTION] = interaction_effect(per_draw)
    return per_sample, per_draw


def sweep_test(result: SweepResult, *, alpha: float = defaults.ALPHA, alternative: str = "two-sided",
               n_permutations: Optional[int] = None, n_bootstrap: int = defaults.N_BOOTSTRAP,
               confidence_level: float = defaults.CONFIDENCE_LEVEL, ci_method: str = "bca", correction: str = "bh",
               seed: Optional[int] = defaults.SEED, progress: bool = True) -> SweepTestResult:
    """Paired test, interval and q-value of every (circuit, layer, head) of a per-sample sweep.

    Null hypothesis (per cell): see :data:`SWEEP_NULL_HYPOTHESIS`. The statistic is the mean per-sample effect;
    its null distribution flips the sign of each sample's effect (:func:`tl_circuits.stats.paired.sign_flip_test`,
    one shared set of flips for every cell; exact enumeration when ``2^N ≤ n_permutations``). When "qk", "ov"
    and "both" were all swept, the per-sample interaction BOTH − (QK + OV) is tested too, as circuit
    ``"interaction"``. BH and BY q-values run over every finite cell of every circuit (interaction included).
    Samples whose clean metric is NaN are left out (``freeze_sweep`` warned); a cell's NaN samples are left out of it.

    Args:
        alpha: level of ``significant``; alternative: ``"two-sided"`` (default: a head may help or hurt),
            ``"greater"`` (the freeze raises the metric: a loss-reducing head) or ``"less"``; two-sided p-values
            follow the package's one rule, ``min(1, 2·min(p_less, p_greater))``.
        n_permutations: random sign patterns; default
            :func:`tl_circuits.defaults.default_n_permutations` of the number of tested cells and ``alpha``
            (so BH can flag a lone cell). Warns when Monte Carlo p-values sit at their floor (``1/(1+B)``,
            two-sided ``2/(1+B)``), or when an exact test's floor is too coarse for BH to flag one cell.
        n_bootstrap: resamples of the interval (0, or fewer than 2 samples: none, and ``ci_low`` is None);
            ci_method ``"bca"`` or ``"percentile"``.
        correction: which adjusted p decides ``significant``: ``"bh"``, ``"by"`` or ``"none"``.
        seed: the sign flips' and the bootstrap's seed.
        progress: a tqdm progress bar over the sign patterns.
    """
    check_choice("alternative", alternative, ALTERNATIVES)
    check_choice("correction", correction, SWEEP_CORRECTIONS)
    check_choice("ci_method", ci_method, CI_METHODS)
    alpha = check_open_unit("alpha", alpha)
    confidence_level = check_open_unit("confidence_level", confidence_level)
    n_bootstrap = check_int("n_bootstrap", n_bootstrap, 0)
    per_sample, per_draw = _test_grids(result)
    shapes = {c: tuple(e.shape[1:]) for c, e in per_sample.items()}
    flat = flatten_cells(per_sample, lead=1)                                          # [N, cells]
    n_cells = flat.shape[1]
    if n_permutations is None:
        n_permutations = defaults.default_n_permutations(n_cells, alpha)
    flip = sign_flip_test(flat, alternative=alternative, n_permutations=n_permutations, seed=seed, progress=progress)
    p_value = split_cells(flip.p_value, shapes)
    warn_at_floor(flip.p_value, flip.n_permutations, alternative, exact=flip.exact, alpha=alpha, stacklevel=4)
    ci_low = ci_high = None
    if n_bootstrap and flat.shape[0] >= 2:
        ci = paired_bootstrap_ci(flat, n_resamples=n_bootstrap, confidence_level=confidence_level,
                                 method=ci_method, seed=seed)
        ci_low, ci_high = split_cells(ci.low, shapes), split_cells(ci.high, shapes)
    decisions = family_decisions(p_value, correction, alpha)
    n_draws = next(iter(per_draw.values())).shape[0] if per_draw else 1
    return SweepTestResult(
        mean_effect=split_cells(flip.statistic, shapes), ci_low=ci_low, ci_high=ci_high,
        std_between_samples={c: _nan_std(e, 0) for c, e in per_sample.items()},
        std_between_draws={c: _nan_std(per_draw[c], 0) if c in per_draw else torch.full(s, float("nan"))
                           for c, s in shapes.items()},
        p_value=p_value, q_value_bh=decisions.q_value_bh, q_value_by=decisions.q_value_by,
        significant=decisions.significant,
        n_samples=split_cells(flip.n_samples, shapes), alpha=alpha, alternative=alternative, correction=correction,
        n_permutations=flip.n_permutations, exact=flip.exact, n_bootstrap=n_bootstrap if ci_low is not None else 0,
        ci_method=ci_method, confidence_level=confidence_level, seed=seed, n_draws=n_draws,
        metric_name=result.metric_name, replacement=result.replacement)


def __getattr__(name: str) -> Any:
    if name == "test_sweep":  # renamed: pytest collected it from any test module that imported it
        return deprecated_function("tl_circuits.freezing.sweep_stats.test_sweep", sweep_test,
                                   "tl_circuits.freezing.sweep_stats.sweep_test (or SweepResult.test)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
