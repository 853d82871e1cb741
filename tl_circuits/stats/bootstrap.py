"""Bootstrap confidence intervals of each cell's A×B mean, resampling task A and task B independently.

Resamples are drawn exactly as ``scipy.stats.bootstrap`` draws them for ``data=(A, B)`` from the same
``numpy.random.Generator``, and the percentile and BCa formulas are scipy's (the multi-sample jackknife for
the acceleration), so the intervals equal ``scipy.stats.bootstrap``'s (tested). Every cell of a block uses
the same resamples, and its bootstrap distribution comes from one batched product (the *block bootstrap*
below: one block of cells at a time, not a bootstrap of blocks of samples). Degenerate cells (a constant
bootstrap distribution) give a NaN BCa interval with a warning, as in scipy.

>>> m = torch.rand(8, 8, 1, 1, generator=torch.Generator().manual_seed(0))
>>> bootstrap_ci({"Q": m}, 4, n_resamples=99, method="percentile", progress=False)
BootstrapCI(method='percentile', confidence_level=0.95, n_resamples=99, blocks=['Q'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.special import ndtr, ndtri
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.interference import memory
from tl_circuits.stats.reduction import PreparedBlock, ReductionWorkspace, bilinear, prepare_block
from tl_circuits.stats.validation import (
    CI_METHODS,
    TIE_EPS,
    Grid,
    Labels,
    Scores,
    check_choice,
    check_int,
    check_open_unit,
    check_scores,
    numpy_rng,
    progress_bar,
    resolve_labels,
    resolve_memory_budget_gb,
    warn_degenerate,
    warn_missing,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tqdm import tqdm

__all__ = ["BootstrapCI", "bootstrap_ci", "block_bootstrap_interval", "draw_resamples", "interval_from_resamples"]


@dataclass(frozen=True, repr=False)
class BootstrapCI:
    """Per-cell bootstrap confidence intervals (``low``/``high``: block -> [L, H]) and their settings."""

    low: Grid
    high: Grid
    standard_error: Grid
    method: str
    confidence_level: float
    n_resamples: int

    def __repr__(self) -> str:
        return (f"BootstrapCI(method={self.method!r}, confidence_level={self.confidence_level}, "
                f"n_resamples={self.n_resamples}, blocks={list(self.low)})")


def _quantile_linear(sorted_values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hyndman–Fan type 7 ('linear', numpy's and scipy.stats.quantile's default) with one q per row."""
    n = sorted_values.shape[-1]
    jg = q * n + (1 - q)
    j = np.floor(jg) - 1
    g = jg % 1
    g = np.where(j < 0, 0.0, g)
    lo = np.clip(j, 0, n - 1)
    hi = np.clip(j + 1, 0, n - 1)
    bad = ~np.isfinite(q) | (q < 0) | (q > 1)
    lo = np.where(bad, 0, lo).astype(np.int64)
    hi = np.where(bad, 0, hi).astype(np.int64)
    out = ((1 - g) * np.take_along_axis(sorted_values, lo[..., None], -1)[..., 0]
           + g * np.take_along_axis(sorted_values, hi[..., None], -1)[..., 0])
    return np.where(bad, np.nan, out)


def block_bootstrap_interval(prep: PreparedBlock, labels: Tensor, idx_a: Tensor, idx_b: Tensor, *, method: str,
                             confidence_level: float,
                             scratch_gb: float = defaults.STATS_WORKSPACE_GB, bar: Optional[tqdm] = None,
                             workspace: Optional[ReductionWorkspace] = None
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, standard_error)`` per cell ``[C]`` of one prepared block, as scipy.stats.bootstrap computes
    them; ``idx_a``/``idx_b`` are :func:`draw_resamples`' index draws (positions within task A / task B)."""
    device = prep.centered.device
    lab = labels.to(device)
    sub = prep.centered[lab][:, ~lab]                      # [n_a, n_b, C], centred (shift-invariant)
    n_a, n_b, _ = sub.shape
    ones = torch.ones(1, dtype=sub.dtype)
    count_a = torch.zeros(idx_a.shape[0], n_a, dtype=sub.dtype).scatter_add_(1, idx_a, ones.expand_as(idx_a))
    count_b = torch.zeros(idx_b.shape[0], n_b, dtype=sub.dtype).scatter_add_(1, idx_b, ones.expand_as(idx_b))
    theta_b = bilinear(count_a, sub, count_b, scratch_gb, bar, workspace) / (n_a * n_b)  # [R, C] centred
    total = sub.sum((0, 1))
    theta_hat = total / (n_a * n_b)
    mu = prep.mu
    theta_b_np = (theta_b + mu).cpu().numpy().T                                     # [C, R]
    theta_hat_np = (theta_hat + mu).cpu().numpy()
    # the jackknife of each sample separately (scipy's multi-sample BCa): leave out A_i, leave out B_j
    jack_a = ((total - sub.sum(1)) / ((n_a - 1) * n_b)).cpu().numpy()              # [n_a, C]
    jack_b = ((total - sub.sum(0)) / (n_a * (n_b - 1))).cpu().numpy()              # [n_b, C]
    return interval_from_resamples(theta_b_np, theta_hat_np, prep.scale.cpu().numpy(), [(jack_a, None), (jack_b, None)],
                                   method=method, confidence_level=confidence_level)


def interval_from_resamples(theta_b: np.ndarray, theta_hat: np.ndarray, scale: np.ndarray,
                            jackknives: Sequence[Tuple[np.ndarray, Optional[np.ndarray]]], *, method: str,
                            confidence_level: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, standard_error)`` per cell from its bootstrap distribution, as ``scipy.stats.bootstrap``
    computes them: the one percentile / BCa implementation of the package (the paired and the two-sample
    bootstraps both end here).

    Args:
        theta_b: ``[C, R]`` the statistic on each resample (sorted in place here; NaN sorts last).
        theta_hat: ``[C]`` the statistic on the data; scale: ``[C]`` the scale of the tie tolerance (values within
            ``TIE_EPS`` machine epsilons of ``theta_hat`` count as ties, half below).
        jackknives: BCa only: per sample group, ``(jack [k, C], weights)``: the leave-one-out statistics, and
            ``None`` (all k samples count) or a 0/1 ``[k, C]`` mask of the samples a cell has (``k`` then per cell).
        method: ``"percentile"`` or ``"bca"``; confidence_level: of the two-sided interval.
    """
    theta_b.sort(axis=-1)
    alpha = (1 - confidence_level) / 2
    if method == "percentile":
        q = np.broadcast_to(np.array([alpha, 1 - alpha]), (theta_b.shape[0], 2))
    else:
        tol = TIE_EPS * np.finfo(theta_b.dtype).eps * np.maximum(np.abs(theta_hat), scale)
        below = (theta_b < (theta_hat - tol)[:, None]).sum(-1)
        at_or_below = (theta_b <= (theta_hat + tol)[:, None]).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            # z0: share of bootstrap values below theta_hat (ties count half)
            z0 = ndtri((below + at_or_below) / (2 * theta_b.shape[1]))
            num, den = 0.0, 0.0
            for jack, weights in jackknives:
                if weights is None:
                    k = jack.shape[0]
                    u = (k - 1) * (jack.mean(0) - jack)
                else:
                    k = weights.sum(0)
                    u = (k - 1) * ((jack * weights).sum(0) / k - jack) * weights
                num = num + (u ** 3).sum(0) / k ** 3
                den = den + (u ** 2).sum(0) / k ** 2
            a_hat = num / (6 * den ** 1.5)
            z_alpha = ndtri(alpha)
            n1 = z0 + z_alpha
            n2 = z0 - z_alpha
            q = np.stack([ndtr(z0 + n1 / (1 - a_hat * n1)), ndtr(z0 + n2 / (1 - a_hat * n2))], -1)
    ci = _quantile_linear(theta_b[:, None, :], q)                                  # [C, 2]
    se = theta_b.std(axis=-1, ddof=1)
    return ci[:, 0], ci[:, 1], se


def draw_resamples(rng: np.random.Generator, n_a: int, n_b: int, n_resamples: int) -> Tuple[Tensor, Tensor]:
    """Index resamples ``[R, n_a]`` and ``[R, n_b]``: the same draws, in the same order, as
    ``scipy.stats.bootstrap(data=(A, B), batch=None, rng=rng)``.

    >>> idx_a, idx_b = draw_resamples(np.random.default_rng(0), 3, 4, 5)
    >>> tuple(idx_a.shape), tuple(idx_b.shape)
    ((5, 3), (5, 4))
    """
    idx_a = torch.from_numpy(rng.integers(0, n_a, (n_resamples, n_a)))
    idx_b = torch.from_numpy(rng.integers(0, n_b, (n_resamples, n_b)))
    return idx_a, idx_b


def bootstrap_ci(pooled_scores: Scores, n_a: Labels, *, n_resamples: int = defaults.N_BOOTSTRAP,
                 confidence_level: float = defaults.CONFIDENCE_LEVEL, method: str = "bca",
                 seed: Union[int, np.random.Generator, None] = defaults.SEED, dtype: torch.dtype = torch.float64,
                 memory_budget_gb: float = defaults.MEMORY_BUDGET_GB, progress: bool = True,
                 memory_budget: Optional[float] = None) -> BootstrapCI:
    """Two-sided bootstrap interval of each cell's A×B mean, resampling A and B independently.

    Resamples are index draws ``rng.integers(0, n_A, (R, n_A))`` then ``rng.integers(0, n_B, (R, n_B))`` from
    ``numpy.random.default_rng(seed)`` — what ``scipy.stats.bootstrap(data=(A, B), ...)`` draws — and all cells
    use the same resamples; the bootstrap distribution of every cell comes from one batched product. Percentile
    and BCa (with scipy's multi-sample jackknife acceleration) follow ``scipy.stats.bootstrap`` exactly.
    Needs at least 2 samples per task. ``memory_budget_gb``: what the call may allocate, in GB (``memory_budget``,
    in bytes, is its deprecated predecessor); ``progress``: a tqdm progress bar.

    >>> m = torch.rand(10, 10, 1, 2, generator=torch.Generator().manual_seed(0))
    >>> ci = bootstrap_ci({"Q": m}, 5, n_resamples=999, progress=False)
    >>> bool((ci.low["Q"] <= ci.high["Q"]).all())
    True
    """
    scores, n = check_scores(pooled_scores)
    labels = resolve_labels(n_a, n)
    k = int(labels.sum())
    if k < 2 or n - k < 2:
        raise ValueError(f"bootstrap intervals need at least 2 samples per task, got n_a={k}, n_b={n - k}")
    n_resamples = check_int("n_resamples", n_resamples, 1)
    confidence_level = check_open_unit("confidence_level", confidence_level)
    check_choice("method", method, CI_METHODS)
    memory_budget_gb = resolve_memory_budget_gb(memory_budget_gb, memory_budget)
    idx_a, idx_b = draw_resamples(numpy_rng(seed), k, n - k, n_resamples)
    cells = [int(x.shape[2] * x.shape[3]) for x in scores.values()]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    scratch_gb = memory.statistics_scratch_gb(
        memory_budget_gb, memory.statistics_held_bytes(n, cells, itemsize, n_resamples=n_resamples),
        n * max(cells) * itemsize)
    lows, highs, ses, n_missing, n_cells, degenerate = {}, {}, {}, 0, 0, 0
    workspace = ReductionWorkspace()
    with progress_bar(len(scores) * n_resamples, "bootstrap", progress) as bar:
        for block, x in scores.items():
            prep = prepare_block(x, dtype)
            low, high, se = block_bootstrap_interval(
                prep, labels, idx_a, idx_b, method=method, confidence_level=confidence_level,
                scratch_gb=scratch_gb, bar=bar, workspace=workspace)
            missing = prep.missing.cpu().numpy()
            degenerate += int(np.sum(~missing & ~(np.isfinite(low) & np.isfinite(high))))
            for arr in (low, high, se):
                arr[missing] = np.nan
            lows[block] = torch.from_numpy(low).reshape(prep.shape)
            highs[block] = torch.from_numpy(high).reshape(prep.shape)
            ses[block] = torch.from_numpy(se).reshape(prep.shape)
            n_missing += int(missing.sum())
            n_cells += missing.size
    warn_missing(n_missing, n_cells, "intervals")
    warn_degenerate(degenerate, method)
    return BootstrapCI(lows, highs, ses, method, confidence_level, n_resamples)
