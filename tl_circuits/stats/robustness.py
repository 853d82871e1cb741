"""How much to trust a cell's A × B mean: which samples drive it, and how stable the ranking of cells is.

Both work on the A × B scores ``{block: [N_A, N_B, n_layers, heads]}`` (an interference map's ``scores``), whose
cell mean is ``Ū = mean_ij s_ij``:

- :func:`cell_drivers` — the leave-one-out influence of every sample on every cell mean, in closed form:
  removing sample ``i`` of task A moves the mean by ``Ū − Ū_{−i} = (r_i − Ū) / (N_A − 1)`` with ``r_i`` its row
  mean (``c_j``, column means, for task B). It also removes the ``top`` samples that pull the mean most towards
  conflict (from each task) and reports the share of the estimate that is left: a share near 0, or of the other sign,
  means a handful of samples make the cell.
- :func:`rank_stability` — the bootstrap (A and B resampled independently, as :func:`tl_circuits.bootstrap_ci`)
  of the ranking of all cells of all blocks by their mean, most conflicting (lowest) first: each cell's observed
  rank, a percentile interval of its rank, and how often it is among the top ``k``.

>>> import torch
>>> s = torch.zeros(4, 3, 1, 1); s[0] = -9.0          # one sample of A makes the whole (negative) mean
>>> drivers = cell_drivers({"O": s}, top=1)
>>> drivers.top_a["O"][0, 0].tolist(), abs(drivers.share_left["O"][0, 0].item()), bool(drivers.dominated["O"][0, 0])
([0], 0.0, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.stats.bootstrap import draw_resamples
from tl_circuits.stats.reduction import bilinear
from tl_circuits.stats.validation import check_choice, check_int, check_open_unit, numpy_rng

Grid = dict[str, Float[Tensor, "n_layers heads"]]
ScoresAB = Mapping[str, Float[Tensor, "n_a n_b n_layers heads"]]

DOMINANCE_SHARE = 0.5
"""A cell is *dominated* when removing its ``top`` most conflict-driving samples of each task leaves less than this
share of its estimate (or flips its sign)."""


def _check_ab(scores: ScoresAB) -> tuple[int, int]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("scores must be a non-empty mapping block -> [N_A, N_B, n_layers, heads]")
    shapes = {b: tuple(s.shape) for b, s in scores.items()}
    if any(len(s) != 4 for s in shapes.values()) or len({s[:2] for s in shapes.values()}) != 1:
        raise ValueError(f"every block must be [N_A, N_B, n_layers, heads] with the same N_A, N_B; got {shapes}")
    n_a, n_b = next(iter(shapes.values()))[:2]
    if n_a < 2 or n_b < 2:
        raise ValueError(f"needs at least 2 samples per task, got n_a={n_a}, n_b={n_b}")
    return n_a, n_b


@dataclass(frozen=True)
class CellDrivers:
    """Per (block, layer, head) cell: the samples that drive its A × B mean (module docstring).

    Attributes:
        influence_a, influence_b: ``{block: [N_A | N_B, L, H]}``, ``Ū − Ū_{−i}``: how much sample i moves the
            mean (negative: it pulls the cell towards conflict).
        top_a, top_b: ``{block: [L, H, top]}`` sample indices (positions in task A / B) with the most negative
            influence, most negative first; -1 where no sample moves the mean (every influence 0).
        estimate: ``Ū``; ``estimate_without_top``: the mean with ``top_a`` and ``top_b`` removed.
        share_left: ``estimate_without_top / estimate`` (NaN where the estimate is 0 or not finite).
        dominated: ``share_left < DOMINANCE_SHARE`` (a few samples make the cell; includes a sign flip).
    """

    influence_a: dict[str, Tensor]
    influence_b: dict[str, Tensor]
    top_a: dict[str, Tensor]
    top_b: dict[str, Tensor]
    estimate: Grid
    estimate_without_top: Grid
    share_left: Grid
    dominated: dict[str, Tensor]
    top: int


def cell_drivers(scores: ScoresAB, *, top: int = 3) -> CellDrivers:
    """Leave-one-out influence of each sample on each cell's mean, and the cell without its ``top`` drivers.

    ``top`` samples are removed from *each* task (at most N − 1). Cells with a non-finite score are NaN throughout
    (their ``top_*`` indices are -1 and ``dominated`` is False).
    """
    n_a, n_b = _check_ab(scores)
    top = check_int("top", top, 1)
    k_a, k_b = min(top, n_a - 1), min(top, n_b - 1)
    out: dict[str, dict[str, Tensor]] = {name: {} for name in ("influence_a", "influence_b", "top_a", "top_b",
                                                                "estimate", "estimate_without_top", "share_left",
                                                                "dominated")}
    for block, s in scores.items():
        x = s.detach().double().cpu()
        missing = ~torch.isfinite(x).all(0).all(0)                              # [L, H]
        x = x.masked_fill(missing, 0.0)
        rows, cols, estimate = x.mean(1), x.mean(0), x.mean((0, 1))            # [N_A, L, H], [N_B, L, H], [L, H]
        influence_a = (rows - estimate) / (n_a - 1)
        influence_b = (cols - estimate) / (n_b - 1)
        top_a = influence_a.argsort(0)[:k_a].movedim(0, -1)                   # [L, H, k_a], most negative first
        top_b = influence_b.argsort(0)[:k_b].movedim(0, -1)
        keep_a = torch.ones_like(rows, dtype=torch.bool).movedim(0, -1).scatter(-1, top_a, False)  # [L, H, N_A]
        keep_b = torch.ones_like(cols, dtype=torch.bool).movedim(0, -1).scatter(-1, top_b, False)
        kept = torch.einsum("ijlh,lhi,lhj->lh", x, keep_a.double(), keep_b.double())
        without = kept / ((n_a - k_a) * (n_b - k_b))
        share = torch.where(estimate != 0, without / estimate, torch.nan)
        nan = float("nan")
        # a cell whose samples all score the same (e.g. a head with zero gradients) has no drivers
        flat = (influence_a.abs().amax(0) == 0) & (influence_b.abs().amax(0) == 0)
        top_a, top_b = top_a.masked_fill(flat[..., None], -1), top_b.masked_fill(flat[..., None], -1)
        out["influence_a"][block] = influence_a.masked_fill(missing, nan)
        out["influence_b"][block] = influence_b.masked_fill(missing, nan)
        out["top_a"][block] = top_a.masked_fill(missing[..., None], -1)
        out["top_b"][block] = top_b.masked_fill(missing[..., None], -1)
        out["estimate"][block] = estimate.masked_fill(missing, nan)
        out["estimate_without_top"][block] = without.masked_fill(missing, nan)
        out["share_left"][block] = share.masked_fill(missing, nan)
        out["dominated"][block] = torch.nan_to_num(share, nan=1.0).lt(DOMINANCE_SHARE) & ~missing
    return CellDrivers(top=top, **out)


@dataclass(frozen=True)
class RankStability:
    """Bootstrap stability of the ranking of all cells by their A × B mean, lowest (most conflicting) first.

    Attributes:
        rank: ``{block: [L, H]}`` observed rank over all finite cells of all blocks (1 = most conflicting: the
            lowest mean, or the highest with ``order="highest"``).
        rank_low, rank_high: the percentile ``confidence_level`` interval of the cell's rank over resamples.
        top_k_frequency: share of resamples in which the cell is among the ``k`` lowest.
        k, n_resamples, confidence_level: settings.
    """

    rank: Grid
    rank_low: Grid
    rank_high: Grid
    top_k_frequency: Grid
    k: int
    n_resamples: int
    confidence_level: float


def bootstrap_cell_means(scores: ScoresAB, idx_a: Int[Tensor, "r n_a"], idx_b: Int[Tensor, "r n_b"],
                         scratch_gb: float = defaults.STATS_WORKSPACE_GB) -> dict[str, Tensor]:
    """``{block: [R, L·H]}``: every cell's A × B mean on each resample (rows ``idx_a[r]``, columns ``idx_b[r]``)."""
    n_a, n_b = _check_ab(scores)
    ones = torch.ones(1, dtype=torch.float64)
    count_a = torch.zeros(idx_a.shape[0], n_a, dtype=torch.float64).scatter_add_(1, idx_a, ones.expand_as(idx_a))
    count_b = torch.zeros(idx_b.shape[0], n_b, dtype=torch.float64).scatter_add_(1, idx_b, ones.expand_as(idx_b))
    out = {}
    for block, s in scores.items():
        x = s.detach().double().cpu()
        flat = x.reshape(n_a, n_b, -1)
        out[block] = bilinear(count_a, flat, count_b, scratch_gb) / (n_a * n_b)
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """Rank (1 = lowest) along the last axis; NaN values get NaN and do not take a rank."""
    order = np.argsort(np.where(np.isnan(values), np.inf, values), axis=-1, kind="stable")
    ranks = np.empty_like(values)
    np.put_along_axis(ranks, order, np.arange(1, values.shape[-1] + 1, dtype=values.dtype)
                      * np.ones_like(values), axis=-1)
    return np.where(np.isnan(values), np.nan, ranks)


def rank_stability(scores: ScoresAB, *, k: int = 10, n_resamples: int = defaults.N_BOOTSTRAP,
                   confidence_level: float = defaults.CONFIDENCE_LEVEL,
                   seed: Union[int, np.random.Generator, None] = defaults.SEED,
                   order: str = "lowest") -> RankStability:
    """Bootstrap the ranking of every (block, layer, head) cell by its A × B mean (``order``: ``"lowest"`` first,
    the signed variant's conflict; ``"highest"`` first for unsigned scores).

    Resamples are :func:`tl_circuits.stats.bootstrap.draw_resamples` from ``numpy.random.default_rng(seed)`` (the
    draws of :func:`tl_circuits.bootstrap_ci` with the same seed). Cells with non-finite scores take no rank (NaN).

    >>> import torch
    >>> s = torch.randn(30, 30, 1, 3, generator=torch.Generator().manual_seed(0))
    >>> s[..., 0] -= 5.0                                  # head 0 conflicts clearly
    >>> res = rank_stability({"O": s}, k=1, n_resamples=200)
    >>> res.rank["O"][0].tolist()[0], res.top_k_frequency["O"][0, 0].item()
    (1.0, 1.0)
    """
    _check_ab(scores)
    check_choice("order", order, ("lowest", "highest"))
    if order == "highest":
        scores = {block: -s for block, s in scores.items()}
    k = check_int("k", k, 1)
    n_resamples = check_int("n_resamples", n_resamples, 1)
    confidence_level = check_open_unit("confidence_level", confidence_level)
    n_a, n_b = next(iter(scores.values())).shape[:2]
    idx_a, idx_b = draw_resamples(numpy_rng(seed), n_a, n_b, n_resamples)
    boot = bootstrap_cell_means(scores, idx_a, idx_b)
    blocks = list(scores)
    sizes = [boot[b].shape[1] for b in blocks]
    missing = np.concatenate([(~torch.isfinite(scores[b].detach().cpu()).all(0).all(0)).reshape(-1).numpy()
                              for b in blocks])
    observed = np.concatenate([scores[b].detach().double().cpu().mean((0, 1)).reshape(-1).numpy() for b in blocks])
    resampled = torch.cat([boot[b] for b in blocks], 1).numpy()             # [R, cells]
    observed[missing], resampled[:, missing] = np.nan, np.nan
    rank, boot_ranks = _ranks(observed), _ranks(resampled)
    tail = (1 - confidence_level) / 2
    low = np.quantile(boot_ranks, tail, axis=0)
    high = np.quantile(boot_ranks, 1 - tail, axis=0)
    frequency = np.where(missing, np.nan, (boot_ranks <= k).mean(0))
    out: dict[str, Grid] = {"rank": {}, "rank_low": {}, "rank_high": {}, "top_k_frequency": {}}
    start = 0
    for block, size in zip(blocks, sizes):
        shape = scores[block].shape[2:]
        for name, values in (("rank", rank), ("rank_low", low), ("rank_high", high), ("top_k_frequency", frequency)):
            out[name][block] = torch.from_numpy(np.ascontiguousarray(values[start:start + size])).reshape(shape)
        start += size
    return RankStability(k=k, n_resamples=n_resamples, confidence_level=confidence_level, **out)
