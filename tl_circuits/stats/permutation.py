"""The permutation test of task-label exchangeability for every (block, layer, head) cell (docs/spec.md §4).

Stages, each in its own module: check the input (:mod:`~tl_circuits.stats.validation`), prepare each block
once (:mod:`~tl_circuits.stats.reduction`), the observed statistic and its null under random or given
relabelings (:mod:`~tl_circuits.stats.null`), p-values here, the multiple-comparison corrections
(:mod:`~tl_circuits.stats.corrections`), bootstrap intervals (:mod:`~tl_circuits.stats.bootstrap`), and the
result (:mod:`~tl_circuits.stats.result`). The definitions of every output are in :mod:`tl_circuits.stats`.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> scores = {"Q": torch.rand(12, 12, 2, 3, generator=g), "K": torch.rand(12, 12, 2, 1, generator=g)}
>>> res = permutation_test(scores, 6, n_permutations=199, n_bootstrap=0, progress=False)
>>> res.p_value["Q"].shape, res.p_value["K"].shape
(torch.Size([2, 3]), torch.Size([2, 1]))
>>> bool(((res.p_value["Q"] >= 1 / 200) & (res.p_value["Q"] <= 1)).all())
True
>>> list(res.to_dataframe().columns[:4])
['block', 'layer', 'head', 'observed']
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.interference import memory
from tl_circuits.parallel.group import agreed_int, current_world
from tl_circuits.stats.bootstrap import block_bootstrap_interval, draw_resamples
from tl_circuits.stats.corrections import cluster_mass_correction, default_cluster_threshold, maxstat_correction
from tl_circuits.stats.null import exact_null_sd, random_relabelings, relabeled_statistic
from tl_circuits.stats.pvalues import family_decisions, p_value_floor, tail_p_value, warn_at_floor
from tl_circuits.stats.reduction import PreparedBlock, ReductionWorkspace, prepare_block
from tl_circuits.stats.result import InterferenceTestResult
from tl_circuits.stats.validation import (
    ALTERNATIVES,
    CI_METHODS,
    CORRECTIONS,
    TIE_EPS,
    Labels,
    Scores,
    Seed,
    check_choice,
    check_int,
    check_open_unit,
    check_relabelings,
    check_scores,
    count_cells,
    flatten_cells,
    numpy_rng,
    progress_bar,
    resolve_labels,
    resolve_memory_budget_gb,
    torch_generator,
    warn_degenerate,
    warn_missing,
)

__all__ = ["permutation_test", "p_value_floor", "InterferenceTestResult"]


def _test_block(prep: PreparedBlock, labels: Tensor, perms: Tensor, alternative: str, scratch_gb: float,
                bar, workspace: ReductionWorkspace) -> Dict[str, Tensor]:
    """Every per-cell quantity of one block, flat over its cells ``[C]`` (nulls ``[P, C]``), not yet masked."""
    n_permutations = perms.shape[0]
    t_obs = relabeled_statistic(prep.centered, labels[None], scratch_gb=scratch_gb, bar=bar, split=False)[0]
    t_null = relabeled_statistic(prep.centered, perms, scratch_gb=scratch_gb, bar=bar, workspace=workspace)  # [P, C]
    sd = exact_null_sd(prep, int(labels.sum()), labels.shape[0] - int(labels.sum()))
    observed = t_obs + prep.mu
    eps = torch.finfo(prep.centered.dtype).eps
    # ties: within TIE_EPS·eps of the larger of |T_obs| and the cell's scale, so equal splits never round apart
    gamma = TIE_EPS * eps * torch.maximum(observed.abs(), prep.scale)
    hits_greater = (t_null >= t_obs - gamma).sum(0).double()
    hits_less = (t_null <= t_obs + gamma).sum(0).double()
    p = _p_from_hits(hits_greater, hits_less, n_permutations, alternative)
    degenerate = sd <= TIE_EPS * eps * prep.scale
    safe_sd = torch.where(degenerate, torch.ones_like(sd), sd)
    safe_pairs = torch.where(prep.sd_pairs > 0, prep.sd_pairs, torch.ones_like(prep.sd_pairs))
    return {"observed": observed, "null_mean": prep.mu, "null_std": sd,
            "z": torch.where(degenerate, 0.0, t_obs / safe_sd),
            "effect_size": torch.where(prep.sd_pairs > 0, t_obs / safe_pairs, 0.0), "p_value": p,
            "z_null": torch.where(degenerate, 0.0, t_null / safe_sd),
            "tolerance": torch.where(degenerate, 0.0, gamma / safe_sd), "null": t_null + prep.mu,
            "t_obs": t_obs, "gamma": gamma, "hits_greater": hits_greater, "hits_less": hits_less}


def _p_from_hits(hits_greater: Tensor, hits_less: Tensor, n_permutations: int, alternative: str) -> Tensor:
    """``(1 + hits) / (1 + P)`` per tail, then the one rule of :func:`~tl_circuits.stats.pvalues.tail_p_value`."""
    return tail_p_value((1 + hits_less) / (1 + n_permutations), (1 + hits_greater) / (1 + n_permutations),
                        alternative)


def _refine_block(prep: PreparedBlock, cells: Dict[str, Tensor], more: Tensor, refine: Tensor, n_total: int,
                  alternative: str, scratch_gb: float, workspace: ReductionWorkspace) -> Tensor:
    """The p-values of the ``refine`` cells ``[C]`` over all ``n_total`` relabelings: the screen's hits plus those
    of the ``more`` relabelings, counted on those cells only; other cells keep the screen's p."""
    p = cells["p_value"].clone()
    index = refine.nonzero().flatten()
    if index.numel() == 0 or more.shape[0] == 0:
        return p
    sub = prep.centered.index_select(2, index.to(prep.centered.device))
    t_null = relabeled_statistic(sub, more, scratch_gb=scratch_gb, workspace=workspace)  # [P_more, C_refine]
    t_obs, gamma = cells["t_obs"][index], cells["gamma"][index]
    hits_greater = cells["hits_greater"][index] + (t_null >= t_obs - gamma).sum(0).double()
    hits_less = cells["hits_less"][index] + (t_null <= t_obs + gamma).sum(0).double()
    p[index] = _p_from_hits(hits_greater, hits_less, n_total, alternative).to(p.dtype)
    return p


def permutation_test(
    pooled_scores: Scores,
    n_a: Labels,
    *,
    n_permutations: Optional[int] = None,
    alternative: Optional[str] = None,
    variant: str = defaults.VARIANT,
    screen: bool = True,
    alpha: float = defaults.ALPHA,
    correction: str = "bh",
    seed: Seed = defaults.SEED,
    permutations: Optional[Bool[Tensor, "n_permutations n"]] = None,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    ci_method: str = "bca",
    confidence_level: float = defaults.CONFIDENCE_LEVEL,
    cluster_threshold: Optional[float] = None,
    connectivity: int = 4,
    dtype: torch.dtype = torch.float64,
    memory_budget_gb: float = defaults.MEMORY_BUDGET_GB,
    progress: bool = True,
    memory_budget: Optional[float] = None,
) -> InterferenceTestResult:
    """Permutation test of task-label exchangeability for every (block, layer, head) cell, with corrections.

    H0 (every cell): the task labels are exchangeable; the alternative is named by ``alternative`` (the result's
    ``null_hypothesis`` says both in words).

    Args:
        pooled_scores: block -> [N, N, n_layers, n_heads_B] pooled pairwise scores (see :mod:`tl_circuits.stats`).
        n_a: int (first ``n_a`` pooled samples are task A) or a bool vector [N] (True = task A).
        n_permutations: random relabelings (>= 1), drawn uniformly with group sizes kept (with replacement,
            so the identity may appear — the p-value stays valid). ``None`` (default):
            :func:`tl_circuits.defaults.default_n_permutations` of all (block, layer, head) cells and
            ``alpha``, so that ``2 / (1 + P) ≤ alpha / m`` and BH can flag a lone cell. The number used is
            the result's ``n_permutations``. Ignored when ``permutations`` is given.
        alternative: ``"less"``, ``"greater"`` or ``"two-sided"`` (``min(1, 2·min(p_less, p_greater))``, the
            package's one rule: :func:`~tl_circuits.stats.pvalues.tail_p_value`). ``None`` (default): the direction
            of conflict for ``variant`` (:func:`tl_circuits.defaults.conflict_alternative`): ``"less"`` for signed
            scores (negative = conflict), ``"greater"`` for unsigned and symmetric ones.
        variant: what the scores are (``"signed"``, the default variant, ``"unsigned"``, ``"symmetric"``); it only
            sets the default ``alternative``.
        screen: screen the cells (default True; recorded in the result's settings). With random relabelings and
            P > ``defaults.SCREEN_PERMUTATIONS`` (1000), every cell is tested on the first 1000 of the P
            relabelings, and only cells whose screen p-value is ≤ c = ``SCREEN_MARGIN · alpha`` (2α) are continued
            on all P. A continued cell's p-value is exactly what all P give; a stopped cell keeps its screen p
            (> c). Both are valid (P(p ≤ u) ≤ u: below c only continued cells reach, with the full test's p; above c
            the event lies inside the screen's), and the cells BH, BY or "none" flag at ``alpha`` are those of the
            unscreened test unless a cell with full p ≤ alpha had ≥ 2α·1001 − 1 of its hits among the first 1000
            relabelings (a hypergeometric tail below 1e-10 per cell at the default P). Max-stat and cluster-mass
            p-values, ``null_distribution`` and ``permutations`` are then over the 1000 screen relabelings;
            ``permutations_used`` says per cell how many its p-value is over. Given ``permutations`` (whose order
            need not be random) are never screened. ``False``: every cell on all P.
        alpha: level for ``significant`` (in (0, 1)).
        correction: which adjusted p decides ``significant``: "bh" (default), "by", "maxstat", "cluster", "none".
        seed: int, ``torch.Generator`` (permutations; the bootstrap ``numpy`` generator is seeded with the same
            int, or from the generator) or None (fresh entropy).
        permutations: explicit relabelings [P, N] (task-A memberships) instead of random ones, e.g.
            :func:`tl_circuits.stats.all_relabelings` for an exact test.
        n_bootstrap: bootstrap resamples for ``ci_low``/``ci_high`` (0: no intervals).
        ci_method: "bca" or "percentile"; confidence_level in (0, 1).
        cluster_threshold, connectivity: cluster-forming threshold on the standardised statistic and
            grid connectivity (4 or 8), see :func:`tl_circuits.stats.cluster_mass_correction`.
        dtype: computation dtype. float64 (default) is exact to ~1e-14 relative; float32 is about twice as fast
            but treats differences below ~1e-5 of a cell's scale as ties (and such cells as constant).
        memory_budget_gb: what the call may allocate, in GB (:data:`tl_circuits.defaults.MEMORY_BUDGET_GB`): the
            prepared scores, the null distribution it returns and the scratch of each chunk of relabelings (at most
            :data:`tl_circuits.defaults.STATS_WORKSPACE_GB`); ValueError when too small for one chunk.
        progress: tqdm progress bars.
        memory_budget: deprecated, the same budget in bytes.

    Warns (UserWarning) when some p-values sit at their floor ``1 / (1 + n_permutations)``, saying how many.

    >>> m = torch.rand(16, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    >>> m[:8, 8:, 0, 0] += 1.0                          # task A -> task B pairs of one head score higher
    >>> res = permutation_test({"O": m}, 8, n_permutations=499, alternative="greater", n_bootstrap=0,
    ...                        correction="maxstat", progress=False)
    >>> res.significant["O"].nonzero().tolist()
    [[0, 0]]
    """
    scores, n = check_scores(pooled_scores)
    labels = resolve_labels(n_a, n)
    k = int(labels.sum())
    alternative = defaults.conflict_alternative(variant) if alternative is None else alternative
    check_choice("alternative", alternative, ALTERNATIVES)
    alpha = check_open_unit("alpha", alpha)
    check_choice("correction", correction, CORRECTIONS)
    check_choice("ci_method", ci_method, CI_METHODS)
    check_choice("connectivity", connectivity, (4, 8))
    confidence_level = check_open_unit("confidence_level", confidence_level)
    n_bootstrap = check_int("n_bootstrap", n_bootstrap, 0)
    memory_budget_gb = resolve_memory_budget_gb(memory_budget_gb, memory_budget)
    if n_bootstrap and (k < 2 or n - k < 2):
        raise ValueError(f"bootstrap intervals need at least 2 samples per task, got n_a={k}, n_b={n - k}; "
                         "pass n_bootstrap=0")
    world = current_world()
    if world.active and seed is None:  # fresh entropy, drawn once: every rank must draw the same relabelings
        seed = agreed_int(torch.Generator().seed() % 2**62, world)
    if permutations is None:
        if n_permutations is None:
            n_permutations = defaults.default_n_permutations(count_cells(scores), alpha)
        n_permutations = check_int("n_permutations", n_permutations, 1)
        perms = random_relabelings(n, k, n_permutations, torch_generator(seed))
    else:
        perms = check_relabelings(permutations, n, k)
        n_permutations = perms.shape[0]
    # screen every cell on the first SCREEN_PERMUTATIONS relabelings, continue only the cells whose screen p is
    # <= SCREEN_MARGIN·alpha (see screen: the full test's BH/BY decisions at a fraction of the cost)
    screened = bool(screen) and permutations is None and n_permutations > defaults.SCREEN_PERMUTATIONS
    more = perms[defaults.SCREEN_PERMUTATIONS:] if screened else perms[:0]
    if screened:
        perms = perms[:defaults.SCREEN_PERMUTATIONS]
    if cluster_threshold is None:
        cluster_threshold = default_cluster_threshold(alternative)
    cluster_threshold = float(cluster_threshold)
    cells_per_block = [int(x.shape[2] * x.shape[3]) for x in scores.values()]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    scratch_gb = memory.statistics_scratch_gb(
        memory_budget_gb, memory.statistics_held_bytes(n, cells_per_block, itemsize, n_relabelings=perms.shape[0],
                                                       n_resamples=n_bootstrap), n * max(cells_per_block) * itemsize)

    names = ("observed", "null_mean", "null_std", "z", "effect_size", "p_value")
    grids: Dict[str, Dict[str, Tensor]] = {name: {} for name in names}
    z_null: Dict[str, Tensor] = {}
    null_dist: Dict[str, Tensor] = {}
    tol_z: Dict[str, Tensor] = {}
    used: Optional[Dict[str, Tensor]] = {} if screened else None
    ci_low: Optional[Dict[str, Tensor]] = {} if n_bootstrap else None
    ci_high: Optional[Dict[str, Tensor]] = {} if n_bootstrap else None
    if n_bootstrap:
        idx_a, idx_b = draw_resamples(numpy_rng(seed), k, n - k, n_bootstrap)
    n_missing = n_cells = n_degenerate = 0
    workspace = ReductionWorkspace()
    with progress_bar(len(scores) * (perms.shape[0] + 1 + n_bootstrap), "permutation test", progress) as bar:
        for block, x in scores.items():
            prep = prepare_block(x, dtype)
            missing, shape = prep.missing, prep.shape
            cells = _test_block(prep, labels, perms, alternative, scratch_gb, bar, workspace)
            if used is not None:
                refine = ~missing & (cells["p_value"] <= defaults.SCREEN_MARGIN * alpha)
                cells["p_value"] = _refine_block(prep, cells, more, refine, n_permutations, alternative, scratch_gb,
                                                 workspace)
                used[block] = torch.where(refine, float(n_permutations), float(perms.shape[0])).double() \
                    .masked_fill(missing, float("nan")).reshape(shape).cpu()

            def masked(value: Tensor) -> Tensor:
                return value.double().masked_fill(missing, float("nan")).cpu()

            for name in names:
                grids[name][block] = masked(cells[name]).reshape(shape)
            z_null[block] = masked(cells["z_null"]).reshape(-1, *shape)
            null_dist[block] = masked(cells["null"]).reshape(-1, *shape)
            tol_z[block] = cells["tolerance"].double().reshape(shape).cpu()
            if ci_low is not None and ci_high is not None:
                low, high, _ = block_bootstrap_interval(
                    prep, labels, idx_a, idx_b, method=ci_method, confidence_level=confidence_level,
                    scratch_gb=scratch_gb, bar=bar, workspace=workspace)
                miss = missing.cpu().numpy()
                n_degenerate += int(np.sum(~miss & ~(np.isfinite(low) & np.isfinite(high))))
                low[miss] = np.nan
                high[miss] = np.nan
                ci_low[block] = torch.from_numpy(low).reshape(shape)
                ci_high[block] = torch.from_numpy(high).reshape(shape)
            n_missing += int(missing.sum())
            n_cells += missing.numel()
            del prep, cells
    warn_missing(n_missing, n_cells, "statistics")
    warn_degenerate(n_degenerate, ci_method)
    warn_at_floor(flatten_cells(grids["p_value"]), n_permutations, alternative)

    p_max = maxstat_correction(grids["z"], z_null, alternative=alternative, tolerance=tol_z)
    p_max = {b: torch.maximum(p_max[b], grids["p_value"][b]) for b in p_max}    # NaN propagates
    p_clu = cluster_mass_correction(grids["z"], z_null, threshold=cluster_threshold, alternative=alternative,
                                    connectivity=connectivity, tolerance=tol_z)
    decisions = family_decisions(grids["p_value"], correction, alpha, {"maxstat": p_max, "cluster": p_clu})
    return InterferenceTestResult(
        observed=grids["observed"], null_mean=grids["null_mean"], null_std=grids["null_std"], z=grids["z"],
        effect_size=grids["effect_size"], p_value=grids["p_value"], q_value_bh=decisions.q_value_bh,
        q_value_by=decisions.q_value_by, p_value_maxstat=p_max, p_value_cluster=p_clu, ci_low=ci_low,
        ci_high=ci_high, significant=decisions.significant, alpha=alpha, n_permutations=n_permutations,
        alternative=alternative, correction=correction, n_a=k, n_b=n - k, n_bootstrap=n_bootstrap,
        ci_method=ci_method, confidence_level=confidence_level, cluster_threshold=cluster_threshold,
        connectivity=connectivity, seed=seed if not isinstance(seed, torch.Generator) else "torch.Generator",
        null_distribution=null_dist, permutations=perms,
        n_permutations_screen=perms.shape[0] if screened else None, permutations_used=used, screen=bool(screen),
    )
