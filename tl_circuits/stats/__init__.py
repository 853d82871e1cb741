"""Statistics of interference maps: permutation tests, FDR / FWER corrections, bootstrap intervals.

Everything here works on tensors, so it does not depend on how the scores were made. The input is the
*pooled pairwise score matrix* of docs/spec.md §4: for every block ("Q", "K", "V", "O" — any names work)

    pooled_scores[block][i, j, l, h] = M(i as the "A side", j as the "B side") for layer l, head h

over the pooled samples A ∪ B, computed once (with a pooled Fisher), shape ``[N, N, n_layers, n_heads_B]``.
Blocks may have different head counts (K/V per KV head, Q/O per query head). Task membership is given by
``n_a`` — an ``int`` (the first ``n_a`` pooled samples are task A, the rest task B) or a boolean vector
``[N]`` (True = task A). The diagonal ``i == j`` never enters a statistic (A and B are disjoint), so it may
hold anything, NaN included.

Per cell (block, layer, head) the statistic is the mean of M over all pairs i ∈ A, j ∈ B:

    T(a) = aᵀ M (1 − a) / (n_A n_B)          a = 0/1 membership vector of task A

**Null hypothesis**: the task labels are exchangeable. A permutation relabels which ``n_A`` pooled samples
are task A (group sizes kept) and recomputes every cell from the same matrix — a reduction, no new
gradients. All permutations of a block go through one matrix product per chunk
(``[chunk, N] @ [N, N·cells]``, chunked by ``memory_budget_gb``), never a Python loop over cells or pairs.

Definitions (each one is what the code computes; the tests check them against scipy / statsmodels):

* ``p_value``: ``"greater"``: ``(1 + #{π : T_π ≥ T_obs}) / (1 + n_permutations)``; ``"less"`` counts
  ``T_π ≤ T_obs``; ``"two-sided"`` is ``min(1, 2·min(p_less, p_greater))`` — the package's one two-sided rule
  (:mod:`~tl_circuits.stats.pvalues`), ``scipy.stats.permutation_test``'s. The default ``alternative`` is the
  direction of conflict of the scores' ``variant`` (default signed: ``"less"``, cross-task scores more negative
  than exchangeability predicts; unsigned and symmetric: ``"greater"``). Values within
  ``100·eps·max(|T_obs|, rms(M))`` of ``T_obs`` count as ties (hits), as scipy does (it uses
  ``100·eps·|T_obs|``), so mathematically equal relabelings (e.g. the mirror split of a symmetric M) are never
  lost to rounding.
* ``null_mean`` / ``null_std``: the *exact* mean and standard deviation of T over all C(N, n_A)
  relabelings, in closed form (no sampling): the mean is the mean of M over all ordered off-diagonal
  pooled pairs; the variance uses the 2-, 3- and 4-point inclusion probabilities of a random split.
* ``z`` (standardised statistic): ``(T − null_mean) / null_std``, the same label-invariant transform for the
  observed labels and every permutation; 0 where ``null_std`` is 0 (a constant cell).
* ``effect_size`` — a standardised mean difference on the pair scale, which does not grow with n:
  ``(T_obs − null_mean) / sd_pairs`` where ``sd_pairs`` is the standard deviation (ddof = 0) of M over
  all ordered off-diagonal pooled pairs. It says by how many pair-level SDs the average A×B score sits
  above what exchangeable labels predict. 0 for a constant cell.
* ``q_value_bh`` / ``q_value_by``: ``scipy.stats.false_discovery_control`` (Benjamini–Hochberg /
  Benjamini–Yekutieli) over **one family: every finite cell of every block**.
* ``p_value_maxstat``: Westfall–Young single-step max-T, family-wise over all finite cells of all blocks, from the
  same permutations: ``(1 + #{π : max_c s_π,c ≥ s_obs}) / (1 + n_permutations)`` with ``s = z``
  (``"greater"``), ``−z`` (``"less"``) or ``|z|`` (``"two-sided"``). Standardising by the exact null
  moments makes cells of different scale comparable. Never below the cell's own ``p_value``.
* ``p_value_cluster``: cluster-mass correction. On each block's layer × head grid, cells with ``s ≥ threshold``
  (``s`` as above; two-sided: positive and negative clusters separately, mass of |z|) form clusters with
  ``connectivity`` 4 (cells sharing an edge: same layer and adjacent head index, or same head index and
  adjacent layer; default) or 8 (also diagonal). Clusters never cross blocks. Mass = sum of ``s`` over the
  cluster. Null = the largest cluster mass over all blocks in each permutation (0 if none). A cell's
  ``p_value_cluster`` is its cluster's ``(1 + #{π : max mass_π ≥ mass}) / (1 + n_permutations)``; cells in no
  cluster get 1. Default threshold: the normal 0.95 quantile (1.645; two-sided 0.975: 1.960) — any fixed
  threshold gives valid FWER control, it only changes sensitivity. Caveats: a significant cluster says the
  cluster holds signal, not that each of its cells does (null cells next to a real effect can ride along);
  head indices are arbitrary, so "adjacent heads" is a convention, not anatomy. Use ``p_value_maxstat`` for
  claims about single heads.
* ``ci_low`` / ``ci_high``: two-sided bootstrap interval of T at ``confidence_level``, resampling task-A
  samples and task-B samples independently (with replacement, sizes kept), ``"bca"`` (default) or
  ``"percentile"``. Resamples are drawn exactly as ``scipy.stats.bootstrap`` draws them for
  ``data=(A, B)`` from the same ``numpy.random.Generator``, and the interval formulas are scipy's, so the
  intervals equal ``scipy.stats.bootstrap``'s (tested). Degenerate cells (constant bootstrap
  distribution) give a NaN BCa interval with a warning, as in scipy.

**NaN policy.** A cell with any non-finite off-diagonal score is *missing*: every per-cell output is
NaN (``significant`` is False), it is left out of the BH/BY, max-statistic and cluster families (the family
size is the number of finite cells), and a ``RuntimeWarning`` says how many cells were dropped. If every
cell is missing, ``ValueError``.

Modules, one per stage: :mod:`~tl_circuits.stats.validation` (argument checks, labels, seeds),
:mod:`~tl_circuits.stats.reduction` (a block prepared once; the batched bilinear reduction),
:mod:`~tl_circuits.stats.null` (relabelings, observed statistic, exact null moments, permutation null),
:mod:`~tl_circuits.stats.permutation` (:func:`permutation_test`), :mod:`~tl_circuits.stats.pvalues` (the
one two-sided rule, p-value floors, significance), :mod:`~tl_circuits.stats.corrections`,
:mod:`~tl_circuits.stats.bootstrap` (the one percentile/BCa implementation), :mod:`~tl_circuits.stats.result`;
:mod:`~tl_circuits.stats.interference_tests` runs the whole test from a model.

Defaults come from :mod:`tl_circuits.defaults`: ``n_permutations=None`` means
``default_n_permutations(cells, alpha)`` (so ``2/(1+P) ≤ α/m`` and BH can flag a lone cell; a
``UserWarning`` says how many p-values sit at that floor), screening on (``screen=True``), ``N_BOOTSTRAP``
resamples, ``ALPHA``, ``CONFIDENCE_LEVEL``, ``SEED``, and ``MEMORY_BUDGET_GB`` (``memory_budget_gb``: what the call
may allocate, of which each chunk's scratch takes at most ``STATS_WORKSPACE_GB``; the old ``memory_budget=`` in
bytes still works, with a deprecation warning).

>>> import torch
>>> from tl_circuits.stats import permutation_test
>>> m = torch.rand(10, 10, 1, 2, generator=torch.Generator().manual_seed(0))
>>> res = permutation_test({"Q": m}, 5, n_permutations=99, n_bootstrap=0, progress=False)
>>> res.n_permutations, res.settings["alternative"]      # the default variant is signed: conflict is "less"
(99, 'less')
"""

from tl_circuits.stats.bootstrap import BootstrapCI, bootstrap_ci
from tl_circuits.stats.corrections import (
    cluster_mass_correction,
    default_cluster_threshold,
    fdr_correction,
    find_clusters,
    maxstat_correction,
)
from tl_circuits.stats.null import (
    all_relabelings,
    null_moments,
    observed_statistic,
    permutation_null,
    random_relabelings,
)
from tl_circuits.stats.permutation import p_value_floor, permutation_test
from tl_circuits.stats.result import InterferenceTestResult

__all__ = [
    "InterferenceTestResult",
    "BootstrapCI",
    "permutation_test",
    "p_value_floor",
    "observed_statistic",
    "null_moments",
    "permutation_null",
    "random_relabelings",
    "all_relabelings",
    "bootstrap_ci",
    "fdr_correction",
    "maxstat_correction",
    "find_clusters",
    "cluster_mass_correction",
    "default_cluster_threshold",
]
