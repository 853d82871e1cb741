"""Statistics for interference maps: permutation tests, FDR / FWER corrections, bootstrap intervals.

Everything here works on tensors, so it does not depend on how the scores were made. The input is the
*pooled pairwise score matrix* of SPEC §4: for every block ("Q", "K", "V", "O" — any names work)

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
(``[chunk, N] @ [N, N·cells]``, chunked by ``memory_budget``), never a Python loop over cells or pairs.

Definitions (each one is what the code computes; the tests check them against scipy / statsmodels):

* ``p_value`` (``alternative="greater"``, the default: cross-task scores larger than exchangeability
  predicts — more interference for the unsigned metric; for the *signed* metric, where negative means
  conflict, use ``"less"``): ``(1 + #{π : T_π ≥ T_obs}) / (1 + n_permutations)``. ``"less"`` counts
  ``T_π ≤ T_obs``. ``"two-sided"`` is ``min(1, 2·min(p_less, p_greater))`` — the convention of
  ``scipy.stats.permutation_test``. Values within ``100·eps·max(|T_obs|, rms(M))`` of ``T_obs`` count as
  ties (hits), as scipy does (it uses ``100·eps·|T_obs|``), so mathematically equal relabelings (e.g. the
  mirror split of a symmetric M) are never lost to rounding.
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
* ``p_maxstat``: Westfall–Young single-step max-T, family-wise over all finite cells of all blocks, from the
  same permutations: ``(1 + #{π : max_c s_π,c ≥ s_obs}) / (1 + n_permutations)`` with ``s = z``
  (``"greater"``), ``−z`` (``"less"``) or ``|z|`` (``"two-sided"``). Standardising by the exact null
  moments makes cells of different scale comparable. Never below the cell's own ``p_value``.
* ``p_cluster``: cluster-mass correction. On each block's layer × head grid, cells with ``s ≥ threshold``
  (``s`` as above; two-sided: positive and negative clusters separately, mass of |z|) form clusters with
  ``connectivity`` 4 (cells sharing an edge: same layer and adjacent head index, or same head index and
  adjacent layer; default) or 8 (also diagonal). Clusters never cross blocks. Mass = sum of ``s`` over the
  cluster. Null = the largest cluster mass over all blocks in each permutation (0 if none). A cell's
  ``p_cluster`` is its cluster's ``(1 + #{π : max mass_π ≥ mass}) / (1 + n_permutations)``; cells in no
  cluster get 1. Default threshold: the normal 0.95 quantile (1.645; two-sided 0.975: 1.960) — any fixed
  threshold gives valid FWER control, it only changes sensitivity. Caveats: a significant cluster says the
  cluster holds signal, not that each of its cells does (null cells next to a real effect can ride along);
  head indices are arbitrary, so "adjacent heads" is a convention, not anatomy. Use ``p_maxstat`` for
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

import itertools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Dict, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy import ndimage
from scipy.special import ndtr, ndtri
from scipy.stats import false_discovery_control
from torch import Tensor

__all__ = [
    "InterferenceTestResult",
    "BootstrapCI",
    "permutation_test",
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
]

ALTERNATIVES = ("greater", "less", "two-sided")
CORRECTIONS = ("bh", "by", "maxstat", "cluster", "none")
CI_METHODS = ("bca", "percentile")
_CORRECTION_FIELD = {"bh": "q_value_bh", "by": "q_value_by", "maxstat": "p_maxstat", "cluster": "p_cluster",
                     "none": "p_value"}
_TIE_EPS = 100  # ties within 100 * machine epsilon, scipy's convention

Scores = Mapping[str, Float[Tensor, "n n n_layers heads"]]
Grid = Dict[str, Float[Tensor, "n_layers heads"]]
Labels = Union[int, Bool[Tensor, "n"]]
Seed = Union[int, torch.Generator, None]


# --------------------------------------------------------------------------------------------- validation


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_open_unit(name: str, value) -> float:
    try:
        value_f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < value_f < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return value_f


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_scores(pooled_scores: Scores) -> Tuple[Dict[str, Tensor], int]:
    if not isinstance(pooled_scores, Mapping) or len(pooled_scores) == 0:
        raise ValueError("pooled_scores must be a non-empty mapping block -> Tensor[N, N, n_layers, n_heads]")
    checked, n = {}, None
    for block, scores in pooled_scores.items():
        if not isinstance(scores, Tensor):
            scores = torch.as_tensor(np.asarray(scores))
        if scores.ndim != 4:
            raise ValueError(f"pooled_scores[{block!r}] must be [N, N, n_layers, n_heads], got shape "
                             f"{tuple(scores.shape)}")
        if scores.shape[0] != scores.shape[1]:
            raise ValueError(f"pooled_scores[{block!r}] must be square in its first two (sample) dimensions, "
                             f"got {tuple(scores.shape[:2])}")
        if n is not None and scores.shape[0] != n:
            raise ValueError(f"pooled_scores[{block!r}] has {scores.shape[0]} pooled samples, other blocks {n}")
        if scores.shape[2] == 0 or scores.shape[3] == 0:
            raise ValueError(f"pooled_scores[{block!r}] has an empty layer x head grid {tuple(scores.shape[2:])}")
        if scores.is_complex() or scores.dtype == torch.bool:
            raise ValueError(f"pooled_scores[{block!r}] must be real-valued, got {scores.dtype}")
        n = scores.shape[0]
        checked[block] = scores
    if n < 2:
        raise ValueError(f"need at least 2 pooled samples, got {n}")
    return checked, n


def _resolve_labels(n_a: Labels, n: int) -> Tensor:
    """Task-A membership as a bool vector [n] (CPU)."""
    if isinstance(n_a, (Tensor, np.ndarray, list, tuple)):
        labels = torch.as_tensor(np.asarray(n_a.cpu() if isinstance(n_a, Tensor) else n_a))
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"task labels must be a vector of length N={n}, got shape {tuple(labels.shape)}")
        if labels.dtype != torch.bool:
            if not bool(((labels == 0) | (labels == 1)).all()):
                raise ValueError("task labels must be boolean (True = task A)")
            labels = labels.bool()
        count = int(labels.sum())
        if not 1 <= count <= n - 1:
            raise ValueError(f"task labels must put between 1 and N-1={n - 1} samples in task A, got {count}")
        return labels.cpu()
    if isinstance(n_a, bool) or not isinstance(n_a, numbers.Integral):
        raise ValueError(f"n_a must be an int or a boolean label vector, got {n_a!r}")
    if not 1 <= n_a <= n - 1:
        raise ValueError(f"n_a must be in [1, N-1] = [1, {n - 1}] so both tasks are non-empty, got {n_a}")
    labels = torch.zeros(n, dtype=torch.bool)
    labels[: int(n_a)] = True
    return labels


def _check_relabelings(permutations, n: int, n_a: int) -> Tensor:
    perms = torch.as_tensor(permutations).cpu()
    if perms.ndim != 2 or perms.shape[1] != n or perms.shape[0] < 1:
        raise ValueError(f"permutations must be a bool tensor [n_permutations >= 1, N={n}] of task-A "
                         f"memberships, got shape {tuple(perms.shape)}")
    if perms.dtype != torch.bool:
        if not bool(((perms == 0) | (perms == 1)).all()):
            raise ValueError("permutations must be boolean task-A memberships")
        perms = perms.bool()
    sizes = perms.sum(1)
    if not bool((sizes == n_a).all()):
        bad = int((sizes != n_a).nonzero()[0, 0])
        raise ValueError(f"every relabeling must keep the group sizes (n_a={n_a} in task A); row {bad} has "
                         f"{int(sizes[bad])}")
    return perms


# ------------------------------------------------------------------------------------------- relabelings


def random_relabelings(n: int, n_a: int, n_permutations: int,
                       generator: Optional[torch.Generator] = None) -> Bool[Tensor, "n_permutations n"]:
    """Uniformly random task-A memberships keeping group sizes: each row has ``n_a`` True of ``n``.

    >>> g = torch.Generator().manual_seed(0)
    >>> random_relabelings(6, 2, 3, g).sum(1).tolist()
    [2, 2, 2]
    """
    n = _check_int("n", n, 2)
    n_a = _check_int("n_a", n_a, 1)
    n_permutations = _check_int("n_permutations", n_permutations, 1)
    if n_a >= n:
        raise ValueError(f"n_a must be in [1, n-1], got n_a={n_a}, n={n}")
    out = torch.zeros(n_permutations, n, dtype=torch.bool)
    step = max(1, 2 ** 22 // n)
    for start in range(0, n_permutations, step):
        stop = min(n_permutations, start + step)
        chosen = torch.rand(stop - start, n, generator=generator).argsort(dim=1)[:, :n_a]
        out[start:stop].scatter_(1, chosen, True)
    return out


def all_relabelings(n_a: Labels, n: Optional[int] = None, *,
                    max_count: int = 1_000_000) -> Bool[Tensor, "n_relabelings n"]:
    """Every relabeling with the observed group sizes *except the observed one*: C(N, n_A) − 1 rows.

    Passed as ``permutations=`` this makes the test exact: ``(1 + hits) / (1 + C − 1)`` is then the exact
    permutation p-value (scipy's ``permutation_test`` with all partitions).

    >>> all_relabelings(2, 4).shape
    torch.Size([5, 4])
    """
    if isinstance(n_a, numbers.Integral) and not isinstance(n_a, bool):
        if n is None:
            raise ValueError("give n (the number of pooled samples) with an integer n_a")
        labels = _resolve_labels(n_a, n)
    else:
        labels = _resolve_labels(n_a, len(n_a) if n is None else n)
    n, k = labels.shape[0], int(labels.sum())
    count = math.comb(n, k)
    if count > max_count:
        raise ValueError(f"C({n}, {k}) = {count} relabelings exceed max_count={max_count}; use random ones")
    rows = []
    for subset in itertools.combinations(range(n), k):
        row = torch.zeros(n, dtype=torch.bool)
        row[list(subset)] = True
        if not torch.equal(row, labels):
            rows.append(row)
    if not rows:
        raise ValueError("there is no relabeling other than the observed one")
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------- internals


class _Block(NamedTuple):
    centered: Tensor   # [N, N, C] M − mu, diagonal 0; missing cells all 0
    mu: Tensor         # [C] mean of M over ordered off-diagonal pairs (= exact null mean)
    missing: Tensor    # [C] bool: some off-diagonal entry is non-finite
    scale: Tensor      # [C] RMS of M over off-diagonal pairs (scale of the tie tolerance)
    sd_pairs: Tensor   # [C] SD (ddof 0) of M over off-diagonal pairs
    sq: Tensor         # [C] Σ over off-diagonal pairs of (M − mu)²
    shape: Tuple[int, int]


def _prepare_block(scores: Tensor, dtype: torch.dtype) -> _Block:
    n, _, n_layers, n_heads = scores.shape
    m = scores.detach().reshape(n, n, n_layers * n_heads).to(dtype, copy=True)
    diag = torch.arange(n, device=m.device)
    m[diag, diag] = 0
    total = m.sum((0, 1))
    missing = ~torch.isfinite(total)     # a NaN/inf off-diagonal entry makes the cell's sum non-finite
    if bool(missing.any()):
        m[:, :, missing] = 0
        total = total.masked_fill(missing, 0.0)
    n_pairs = n * (n - 1)
    mu = total / n_pairs
    m -= mu
    m[diag, diag] = 0
    sq = torch.linalg.vector_norm(m, dim=(0, 1)).square()
    sd_pairs = (sq / n_pairs).sqrt()
    scale = (sd_pairs.square() + mu.square()).sqrt()
    return _Block(m, mu, missing, scale, sd_pairs, sq, (n_layers, n_heads))


class _Workspace:
    """One reusable buffer for the per-chunk products: large fresh allocations cost page faults every time."""

    def __init__(self):
        self.buffer: Optional[Tensor] = None

    def get(self, numel: int, dtype: torch.dtype, device) -> Tensor:
        buf = self.buffer
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self.buffer = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def _bilinear(left: Tensor, m: Tensor, right: Tensor, memory_budget: int, bar=None,
              workspace: Optional[_Workspace] = None) -> Tensor:
    """out[p, c] = Σ_ij left[p, i] m[i, j, c] right[p, j] — one GEMM + one batched product per chunk."""
    n1, n2, c = m.shape
    flat = m.reshape(n1, n2 * c)
    chunk = min(left.shape[0], max(1, int(memory_budget) // max(1, n2 * c * m.element_size())))
    workspace = workspace or _Workspace()
    out = torch.empty(left.shape[0], c, dtype=m.dtype, device=m.device)
    for start in range(0, left.shape[0], chunk):
        stop = min(left.shape[0], start + chunk)
        lhs = left[start:stop].to(device=m.device, dtype=m.dtype)
        rhs = right[start:stop].to(device=m.device, dtype=m.dtype)
        partial = workspace.get((stop - start) * n2 * c, m.dtype, m.device).view(stop - start, n2 * c)
        torch.mm(lhs, flat, out=partial)
        out[start:stop] = torch.bmm(rhs.unsqueeze(1), partial.view(stop - start, n2, c)).squeeze(1)
        if bar is not None:
            bar.update(stop - start)
    return out


def _null_sd(prep: _Block, n_a: int, n_b: int) -> Tensor:
    """Exact SD of T = aᵀ M b / (n_a n_b) over all splits with these group sizes.

    With S = Σ_{i≠j} a_i b_j M_ij and the (centred) M having zero diagonal:
    E[S²] = Σ over pairs of ordered pairs (i, j), (k, l) of M_ij M_kl P(i, k ∈ A; j, l ∈ B), which only
    depends on which indices coincide: the same pair (p2), a shared A-side index (p3_first), a shared
    B-side index (p3_second), four distinct indices (p4); a reversed pair or an index that would have to be
    on both sides has probability 0.
    """
    m = prep.centered
    n = n_a + n_b
    p2 = n_a * n_b / (n * (n - 1))
    p3_first = n_a * n_b * (n_b - 1) / (n * (n - 1) * (n - 2)) if n > 2 else 0.0   # i∈A; j, l∈B
    p3_second = n_a * (n_a - 1) * n_b / (n * (n - 1) * (n - 2)) if n > 2 else 0.0  # i, k∈A; j∈B
    p4 = (n_a * (n_a - 1) * n_b * (n_b - 1) / (n * (n - 1) * (n - 2) * (n - 3))) if n > 3 else 0.0
    rows, cols = m.sum(1), m.sum(0)                  # [N, C]
    total = rows.sum(0)
    sq = prep.sq
    reverse = (m * m.transpose(0, 1)).sum((0, 1))    # Σ m_ij m_ji
    rr, cc, rc = rows.square().sum(0), cols.square().sum(0), (rows * cols).sum(0)
    distinct = total.square() + sq + reverse - rr - cc - 2 * rc   # pairs of pairs with 4 distinct indices
    second = p2 * sq + p3_first * (rr - sq) + p3_second * (cc - sq) + p4 * distinct
    var = (second - (p2 * total).square()).clamp_min(0)
    return var.sqrt() / (n_a * n_b)


def _split(flat: Tensor, shapes: Mapping[str, Tuple[int, int]], lead: Tuple[int, ...] = ()) -> Grid:
    out, start = {}, 0
    for block, (n_layers, n_heads) in shapes.items():
        size = n_layers * n_heads
        out[block] = flat[..., start:start + size].reshape(*lead, n_layers, n_heads)
        start += size
    return out


def _flat(grids: Mapping[str, Tensor], lead: int = 0) -> Tensor:
    return torch.cat([g.reshape(*g.shape[:lead], -1) for g in grids.values()], dim=-1)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _numpy_rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=seed)))
    return np.random.default_rng(seed)


def _torch_generator(seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(_check_int("seed", seed, 0))
    return gen


def _warn_missing(n_missing: int, n_cells: int, what: str) -> None:
    if n_missing == n_cells:
        raise ValueError(f"every one of the {n_cells} cells has non-finite (NaN/inf) off-diagonal scores; "
                         "nothing to test")
    if n_missing:
        warnings.warn(f"{n_missing} of {n_cells} cells have non-finite (NaN/inf) off-diagonal scores: their "
                      f"{what} are NaN and they are left out of the multiple-comparison families",
                      RuntimeWarning, stacklevel=3)


def _warn_degenerate(count: int, method: str) -> None:
    if count:
        warnings.warn(f"the {method} interval could not be computed for {count} cells (degenerate bootstrap "
                      "distribution, e.g. a constant cell); they are NaN, as in scipy.stats.bootstrap",
                      RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ tensor-level pieces


def observed_statistic(pooled_scores: Scores, n_a: Labels) -> Grid:
    """Mean of M over all pairs i ∈ A, j ∈ B per cell; NaN where an off-diagonal score is non-finite.

    >>> m = torch.arange(16.).reshape(4, 4, 1, 1)
    >>> observed_statistic({"Q": m}, 2)["Q"]   # mean of m[:2, 2:]
    tensor([[4.5000]], dtype=torch.float64)
    """
    scores, n = _check_scores(pooled_scores)
    labels = _resolve_labels(n_a, n)
    out = {}
    for block, x in scores.items():
        x = x.detach().double()
        sub = x[labels.to(x.device)][:, ~labels.to(x.device)]
        missing = _prepare_block(x, torch.float64).missing.reshape(x.shape[2:])
        out[block] = sub.mean((0, 1)).cpu().masked_fill(missing.cpu(), float("nan"))
    return out


def null_moments(pooled_scores: Scores, n_a: Labels) -> Tuple[Grid, Grid]:
    """Exact mean and SD of the per-cell statistic over *all* relabelings with the observed group sizes.

    Closed form, O(N² · cells): the mean is the mean of M over ordered off-diagonal pooled pairs; the
    variance follows from the probabilities that 2, 3 or 4 given samples fall on given sides of a
    uniformly random split.

    >>> mean, sd = null_moments({"Q": torch.ones(5, 5, 1, 2)}, 2)
    >>> mean["Q"].tolist(), sd["Q"].tolist()
    ([[1.0, 1.0]], [[0.0, 0.0]])
    """
    scores, n = _check_scores(pooled_scores)
    labels = _resolve_labels(n_a, n)
    k = int(labels.sum())
    means, sds = {}, {}
    for block, x in scores.items():
        prep = _prepare_block(x, torch.float64)
        nan = prep.missing
        means[block] = prep.mu.masked_fill(nan, float("nan")).reshape(prep.shape).cpu()
        sds[block] = _null_sd(prep, k, n - k).masked_fill(nan, float("nan")).reshape(prep.shape).cpu()
    return means, sds


def permutation_null(pooled_scores: Scores, permutations: Bool[Tensor, "n_permutations n"], *,
                     dtype: torch.dtype = torch.float64, memory_budget: int = 256 * 2 ** 20,
                     progress: bool = False) -> Dict[str, Float[Tensor, "n_permutations n_layers heads"]]:
    """The per-cell statistic under each given relabeling (row = task-A membership), all cells batched.

    >>> m = torch.rand(6, 6, 2, 2)
    >>> perms = all_relabelings(3, 6)
    >>> permutation_null({"Q": m}, perms)["Q"].shape
    torch.Size([19, 2, 2])
    """
    scores, n = _check_scores(pooled_scores)
    perms = torch.as_tensor(permutations)
    k = int(perms[0].sum()) if perms.ndim == 2 and perms.shape[0] else 0
    perms = _check_relabelings(perms, n, k)
    out, workspace = {}, _Workspace()
    with _progress(len(scores) * perms.shape[0], "permutations", progress) as bar:
        for block, x in scores.items():
            prep = _prepare_block(x, dtype)
            t = _bilinear(perms, prep.centered, ~perms, memory_budget, bar, workspace) / (k * (n - k)) + prep.mu
            t = t.masked_fill(prep.missing, float("nan"))
            out[block] = t.reshape(-1, *prep.shape).cpu()
    return out


def fdr_correction(p_values: Mapping[str, Float[Tensor, "n_layers heads"]], method: str = "bh") -> Grid:
    """Benjamini–Hochberg (``"bh"``) or –Yekutieli (``"by"``) q-values over one family made of every finite
    cell of every block, via ``scipy.stats.false_discovery_control``; NaN cells stay NaN.

    >>> fdr_correction({"Q": torch.tensor([[0.01, 0.04], [0.03, float("nan")]])})["Q"]
    tensor([[0.0300, 0.0400],
            [0.0400,    nan]], dtype=torch.float64)
    """
    _check_choice("method", method, ("bh", "by"))
    grids = {b: torch.as_tensor(_as_numpy(p)) for b, p in p_values.items()}
    flat = _flat(grids).numpy()
    finite = np.isfinite(flat)
    if np.any((flat[finite] < 0) | (flat[finite] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full_like(flat, np.nan)
    if finite.any():
        out[finite] = false_discovery_control(flat[finite], method=method)
    return _split(torch.from_numpy(out), {b: tuple(g.shape) for b, g in grids.items()})


def _side(z: np.ndarray, alternative: str) -> np.ndarray:
    return {"greater": z, "less": -z, "two-sided": np.abs(z)}[alternative]


def maxstat_correction(z_observed: Mapping[str, Float[Tensor, "n_layers heads"]],
                       z_null: Mapping[str, Float[Tensor, "n_permutations n_layers heads"]], *,
                       alternative: str = "greater",
                       tolerance: Optional[Mapping[str, Float[Tensor, "n_layers heads"]]] = None) -> Grid:
    """Westfall–Young single-step max-T adjusted p-values, family-wise over every finite cell of every block.

    ``z_observed[block]``: [L, H] standardised statistics; ``z_null[block]``: [P, L, H] the same statistic
    under each permutation. With ``s = z, −z, |z|`` for ``"greater"``, ``"less"``, ``"two-sided"``:
    ``p_c = (1 + #{π : max_c' s_π,c' ≥ s_c − tolerance_c}) / (1 + P)``. NaN cells are left out and get NaN.

    >>> zo = {"Q": torch.tensor([[3.0, 0.0]])}
    >>> zn = {"Q": torch.tensor([[[1.0, 0.5]], [[0.2, 2.0]], [[0.1, 0.3]]])}
    >>> maxstat_correction(zo, zn)["Q"]
    tensor([[0.2500, 1.0000]], dtype=torch.float64)
    """
    _check_choice("alternative", alternative, ALTERNATIVES)
    shapes = {b: tuple(z.shape) for b, z in z_observed.items()}
    obs = _side(_flat({b: torch.as_tensor(_as_numpy(z)) for b, z in z_observed.items()}).numpy(), alternative)
    null = _side(_flat({b: torch.as_tensor(_as_numpy(z_null[b])) for b in shapes}, lead=1).numpy(), alternative)
    if null.shape[1] != obs.shape[0]:
        raise ValueError("z_null must be [n_permutations, *z_observed.shape] for every block")
    tol = np.zeros_like(obs) if tolerance is None else _flat(
        {b: torch.as_tensor(_as_numpy(tolerance[b])) for b in shapes}).numpy()
    null = np.where(np.isfinite(null), null, -np.inf)
    max_null = null.max(axis=1)                                         # [P]
    hits = (max_null[:, None] >= (obs - tol)[None, :]).sum(0)
    p = (1.0 + hits) / (1.0 + null.shape[0])
    p[~np.isfinite(obs)] = np.nan
    return _split(torch.from_numpy(p), shapes)


def find_clusters(stat: Float[Tensor, "*batch n_layers heads"], threshold: float, *,
                  connectivity: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Clusters of cells with ``stat ≥ threshold`` on a layer × head grid (or a batch of grids, never linked
    across the batch). ``connectivity=4``: cells sharing an edge; ``8``: also diagonal neighbours.

    Returns ``(labels, masses)``: ``labels`` has ``stat``'s shape, 0 outside clusters and k = 1..K inside;
    ``masses[k - 1]`` is the sum of ``stat`` over cluster k. NaN cells never join a cluster.

    >>> labels, masses = find_clusters(torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), 1.0)
    >>> labels.tolist(), masses.tolist()
    ([[1, 1, 0], [0, 0, 2]], [4.0, 3.0])
    """
    _check_choice("connectivity", connectivity, (4, 8))
    values = _as_numpy(stat)
    if values.ndim < 2:
        raise ValueError(f"stat must be [..., n_layers, n_heads], got shape {values.shape}")
    batch_shape = values.shape[:-2]
    grid = values.reshape(-1, *values.shape[-2:])
    with np.errstate(invalid="ignore"):
        supra = grid >= threshold
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, count = ndimage.label(supra, structure=structure)
    masses = np.bincount(labels.ravel(), weights=np.where(supra, grid, 0.0).ravel(), minlength=count + 1)[1:]
    return labels.reshape(*batch_shape, *values.shape[-2:]), masses


def _max_cluster_mass(stat: np.ndarray, threshold: float, connectivity: int) -> np.ndarray:
    """[P, L, H] -> [P]: the largest cluster mass of each grid (0 if it has no cluster)."""
    labels, masses = find_clusters(stat, threshold, connectivity=connectivity)
    out = np.zeros(stat.shape[0])
    if masses.size:
        owner = np.zeros(masses.size + 1, dtype=np.int64)
        owner[labels.ravel()] = np.repeat(np.arange(stat.shape[0]), stat.shape[1] * stat.shape[2])
        np.maximum.at(out, owner[1:], masses)
    return out


def cluster_mass_correction(z_observed: Mapping[str, Float[Tensor, "n_layers heads"]],
                            z_null: Mapping[str, Float[Tensor, "n_permutations n_layers heads"]], *,
                            threshold: Optional[float] = None, alternative: str = "greater",
                            connectivity: int = 4,
                            tolerance: Optional[Mapping[str, Float[Tensor, "n_layers heads"]]] = None) -> Grid:
    """Cluster-mass FWER-adjusted p-values on each block's layer × head grid.

    Cells with ``s ≥ threshold`` (``s = z`` for ``"greater"``, ``−z`` for ``"less"``; ``"two-sided"``: positive
    clusters of ``z`` and negative clusters of ``−z`` separately) form clusters within a block
    (``connectivity`` 4 or 8). Mass = Σ s over the cluster. Null: for each permutation the largest cluster mass
    over all blocks and signs (0 if none). A cell's p is its cluster's ``(1 + #{π : max_π ≥ mass}) / (1 + P)``;
    cells outside every cluster get 1, NaN cells NaN. Default threshold: ``ndtri(0.95)`` one-sided,
    ``ndtri(0.975)`` two-sided.

    >>> zo = {"Q": torch.tensor([[3.0, 3.0], [0.0, 0.0]])}
    >>> zn = {"Q": torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])}
    >>> cluster_mass_correction(zo, zn, threshold=1.0)["Q"]
    tensor([[0.3333, 0.3333],
            [1.0000, 1.0000]], dtype=torch.float64)
    """
    _check_choice("alternative", alternative, ALTERNATIVES)
    _check_choice("connectivity", connectivity, (4, 8))
    if threshold is None:
        threshold = float(ndtri(0.975 if alternative == "two-sided" else 0.95))
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    signs = {"greater": (1.0,), "less": (-1.0,), "two-sided": (1.0, -1.0)}[alternative]
    obs = {b: _as_numpy(z) for b, z in z_observed.items()}
    n_perm = None
    max_null = None
    for block, z in obs.items():
        null = _as_numpy(z_null[block])
        if null.shape[1:] != z.shape:
            raise ValueError(f"z_null[{block!r}] must be [n_permutations, {z.shape[0]}, {z.shape[1]}]")
        n_perm = null.shape[0]
        for sign in signs:
            block_max = _max_cluster_mass(sign * null, threshold, connectivity)
            max_null = block_max if max_null is None else np.maximum(max_null, block_max)
    out = {}
    for block, z in obs.items():
        p = np.ones_like(z)
        tol = np.zeros_like(z) if tolerance is None else _as_numpy(tolerance[block])
        for sign in signs:
            labels, masses = find_clusters(sign * z, threshold, connectivity=connectivity)
            slack = np.bincount(labels.ravel(), weights=tol.ravel(), minlength=masses.size + 1)[1:]
            for k, (mass, eps) in enumerate(zip(masses, slack), start=1):
                p[labels == k] = (1.0 + np.sum(max_null >= mass - eps)) / (1.0 + n_perm)
        p[~np.isfinite(z)] = np.nan
        out[block] = torch.from_numpy(p)
    return out


# ---------------------------------------------------------------------------------------------- bootstrap


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


def _bootstrap_block(prep: _Block, labels: Tensor, idx_a: Tensor, idx_b: Tensor, *, method: str,
                     confidence_level: float, memory_budget: int, bar=None,
                     workspace: Optional[_Workspace] = None):
    """Percentile/BCa interval for one block's cells, as scipy.stats.bootstrap computes it."""
    device = prep.centered.device
    lab = labels.to(device)
    sub = prep.centered[lab][:, ~lab]                      # [n_a, n_b, C], centred (shift-invariant)
    n_a, n_b, _ = sub.shape
    ones = torch.ones(1, dtype=sub.dtype)
    count_a = torch.zeros(idx_a.shape[0], n_a, dtype=sub.dtype).scatter_add_(1, idx_a, ones.expand_as(idx_a))
    count_b = torch.zeros(idx_b.shape[0], n_b, dtype=sub.dtype).scatter_add_(1, idx_b, ones.expand_as(idx_b))
    theta_b = _bilinear(count_a, sub, count_b, memory_budget, bar, workspace) / (n_a * n_b)  # [R, C] centred
    total = sub.sum((0, 1))
    theta_hat = total / (n_a * n_b)
    mu = prep.mu
    theta_b_np = (theta_b + mu).cpu().numpy().T                                     # [C, R]
    theta_hat_np = (theta_hat + mu).cpu().numpy()
    theta_b_np.sort(axis=-1)
    alpha = (1 - confidence_level) / 2
    if method == "percentile":
        q = np.broadcast_to(np.array([alpha, 1 - alpha]), (theta_b_np.shape[0], 2))
    else:
        # z0: share of bootstrap values below theta_hat (ties count half); values equal to theta_hat up to
        # rounding are ties.
        tol = _TIE_EPS * np.finfo(theta_b_np.dtype).eps * np.maximum(np.abs(theta_hat_np),
                                                                        prep.scale.cpu().numpy())
        below = (theta_b_np < (theta_hat_np - tol)[:, None]).sum(-1)
        at_or_below = (theta_b_np <= (theta_hat_np + tol)[:, None]).sum(-1)
        z0 = ndtri((below + at_or_below) / (2 * theta_b_np.shape[1]))
        # acceleration from the jackknife of each sample separately (scipy's multi-sample BCa)
        jack_a = ((total - sub.sum(1)) / ((n_a - 1) * n_b)).cpu().numpy()          # leave out A_i: [n_a, C]
        jack_b = ((total - sub.sum(0)) / (n_a * (n_b - 1))).cpu().numpy()          # leave out B_j: [n_b, C]
        num, den = 0.0, 0.0
        for jack in (jack_a, jack_b):
            k = jack.shape[0]
            u = (k - 1) * (jack.mean(0) - jack)
            num = num + (u ** 3).sum(0) / k ** 3
            den = den + (u ** 2).sum(0) / k ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            a_hat = num / (6 * den ** 1.5)
            z_alpha = ndtri(alpha)
            n1 = z0 + z_alpha
            n2 = z0 - z_alpha
            q = np.stack([ndtr(z0 + n1 / (1 - a_hat * n1)), ndtr(z0 + n2 / (1 - a_hat * n2))], -1)
    ci = _quantile_linear(theta_b_np[:, None, :], q)                               # [C, 2]
    se = theta_b_np.std(axis=-1, ddof=1)
    return ci[:, 0], ci[:, 1], se


def _draw_bootstrap(rng: np.random.Generator, n_a: int, n_b: int, n_resamples: int) -> Tuple[Tensor, Tensor]:
    # Same draws, in the same order, as scipy.stats.bootstrap(data=(A, B), batch=None, rng=rng).
    idx_a = torch.from_numpy(rng.integers(0, n_a, (n_resamples, n_a)))
    idx_b = torch.from_numpy(rng.integers(0, n_b, (n_resamples, n_b)))
    return idx_a, idx_b


def bootstrap_ci(pooled_scores: Scores, n_a: Labels, *, n_resamples: int = 9999, confidence_level: float = 0.95,
                 method: str = "bca", seed: Union[int, np.random.Generator, None] = 0,
                 dtype: torch.dtype = torch.float64, memory_budget: int = 256 * 2 ** 20,
                 progress: bool = False) -> BootstrapCI:
    """Two-sided bootstrap interval of each cell's A×B mean, resampling A and B independently.

    Resamples are index draws ``rng.integers(0, n_A, (R, n_A))`` then ``rng.integers(0, n_B, (R, n_B))`` from
    ``numpy.random.default_rng(seed)`` — what ``scipy.stats.bootstrap(data=(A, B), ...)`` draws — and all cells
    use the same resamples; the bootstrap distribution of every cell comes from one batched product. Percentile
    and BCa (with scipy's multi-sample jackknife acceleration) follow ``scipy.stats.bootstrap`` exactly.
    Needs at least 2 samples per task.

    >>> m = torch.rand(10, 10, 1, 2, generator=torch.Generator().manual_seed(0))
    >>> ci = bootstrap_ci({"Q": m}, 5, n_resamples=999)
    >>> bool((ci.low["Q"] <= ci.high["Q"]).all())
    True
    """
    scores, n = _check_scores(pooled_scores)
    labels = _resolve_labels(n_a, n)
    k = int(labels.sum())
    if k < 2 or n - k < 2:
        raise ValueError(f"bootstrap intervals need at least 2 samples per task, got n_a={k}, n_b={n - k}")
    n_resamples = _check_int("n_resamples", n_resamples, 1)
    confidence_level = _check_open_unit("confidence_level", confidence_level)
    _check_choice("method", method, CI_METHODS)
    idx_a, idx_b = _draw_bootstrap(_numpy_rng(seed), k, n - k, n_resamples)
    lows, highs, ses, n_missing, n_cells, degenerate = {}, {}, {}, 0, 0, 0
    workspace = _Workspace()
    with _progress(len(scores) * n_resamples, "bootstrap", progress) as bar:
        for block, x in scores.items():
            prep = _prepare_block(x, dtype)
            low, high, se = _bootstrap_block(prep, labels, idx_a, idx_b, method=method,
                                             confidence_level=confidence_level, memory_budget=memory_budget,
                                             bar=bar, workspace=workspace)
            missing = prep.missing.cpu().numpy()
            degenerate += int(np.sum(~missing & ~(np.isfinite(low) & np.isfinite(high))))
            for arr in (low, high, se):
                arr[missing] = np.nan
            lows[block] = torch.from_numpy(low).reshape(prep.shape)
            highs[block] = torch.from_numpy(high).reshape(prep.shape)
            ses[block] = torch.from_numpy(se).reshape(prep.shape)
            n_missing += int(missing.sum())
            n_cells += missing.size
    _warn_missing(n_missing, n_cells, "intervals")
    _warn_degenerate(degenerate, method)
    return BootstrapCI(lows, highs, ses, method, confidence_level, n_resamples)


# ------------------------------------------------------------------------------------------ result object


_GRID_FIELDS = ("observed", "null_mean", "null_std", "z", "effect_size", "p_value", "q_value_bh", "q_value_by",
                "p_maxstat", "p_cluster", "ci_low", "ci_high", "significant")


@dataclass(frozen=True, repr=False)
class InterferenceTestResult:
    """Result of :func:`permutation_test`. Every grid field is a dict block -> Tensor[n_layers, n_heads_B].

    Attributes:
        observed: mean of M over all A×B pairs.
        null_mean, null_std: exact mean / SD of that statistic over all relabelings.
        z: ``(observed − null_mean) / null_std`` (standardised statistic; used by max-stat and clusters).
        effect_size: ``(observed − null_mean) / sd_pairs``, a standardised mean difference on the pair scale
            (``sd_pairs``: SD of M over ordered off-diagonal pooled pairs).
        p_value: permutation p-value, ``(1 + hits) / (1 + n_permutations)``.
        q_value_bh, q_value_by: BH / BY q-values over all finite cells of all blocks.
        p_maxstat: Westfall–Young max-T family-wise adjusted p.
        p_cluster: cluster-mass family-wise adjusted p (1 outside clusters).
        ci_low, ci_high: bootstrap interval of ``observed`` (``None`` when ``n_bootstrap=0``).
        significant: ``correction``'s adjusted p (``q_value_bh`` for "bh", ...) ≤ ``alpha``; False for NaN cells.
        null_distribution: block -> [n_permutations, L, H], the statistic under each relabeling.
        permutations: [n_permutations, N] bool, the task-A membership of each relabeling.
    """

    observed: Grid
    null_mean: Grid
    null_std: Grid
    z: Grid
    effect_size: Grid
    p_value: Grid
    q_value_bh: Grid
    q_value_by: Grid
    p_maxstat: Grid
    p_cluster: Grid
    ci_low: Optional[Grid]
    ci_high: Optional[Grid]
    significant: Dict[str, Bool[Tensor, "n_layers heads"]]
    alpha: float
    n_permutations: int
    alternative: str
    correction: str
    n_a: int
    n_b: int
    n_bootstrap: int
    ci_method: str
    confidence_level: float
    cluster_threshold: float
    connectivity: int
    seed: object
    null_distribution: Dict[str, Tensor] = field(default_factory=dict)
    permutations: Optional[Tensor] = None

    @property
    def blocks(self) -> Tuple[str, ...]:
        return tuple(self.observed)

    @property
    def settings(self) -> dict:
        return dict(alpha=self.alpha, n_permutations=self.n_permutations, alternative=self.alternative,
                    correction=self.correction, n_a=self.n_a, n_b=self.n_b, n_bootstrap=self.n_bootstrap,
                    ci_method=self.ci_method, confidence_level=self.confidence_level,
                    cluster_threshold=self.cluster_threshold, connectivity=self.connectivity, seed=self.seed)

    def __repr__(self) -> str:
        counts = {b: int(s.sum()) for b, s in self.significant.items()}
        return (f"InterferenceTestResult(blocks={list(self.blocks)}, n_permutations={self.n_permutations}, "
                f"alternative={self.alternative!r}, correction={self.correction!r}, alpha={self.alpha}, "
                f"significant_cells={counts})")

    def to_dataframe(self):
        """Tidy table: one row per (block, layer, head), one column per grid field."""
        import pandas as pd

        frames = []
        for block in self.blocks:
            n_layers, n_heads = self.observed[block].shape
            layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
            columns = {"block": block, "layer": layer.ravel(), "head": head.ravel()}
            for name in _GRID_FIELDS:
                grid = getattr(self, name)
                if grid is None:
                    continue
                values = grid[block].detach().cpu().numpy().ravel()
                columns[name] = values.astype(bool) if name == "significant" else values.astype(float)
            frames.append(pd.DataFrame(columns))
        return pd.concat(frames, ignore_index=True)

    def plot(self, field: str = "observed", mask_with: Optional[str] = None, *, title: Optional[str] = None,
             **kwargs):
        """Heatmaps of ``field`` per block; cells that are not significant are hatched and greyed.

        ``mask_with=None`` uses ``significant`` (this result's correction); a p/q field name
        (e.g. ``"p_maxstat"``) shows the cells where that field ≤ ``alpha``; ``mask_with=False`` shows all.
        ``z`` and ``effect_size`` use a diverging colormap centred at 0. Other keyword arguments go to
        :func:`tl_circuits.plotting.plot_blocks`. Returns the matplotlib Figure.
        """
        from tl_circuits.plotting import plot_blocks

        if field not in _GRID_FIELDS or field == "significant" or getattr(self, field) is None:
            raise ValueError(f"field must be one of the computed value fields, got {field!r}")
        if mask_with is None:
            masks, shown = self.significant, f"{self.correction} ≤ {self.alpha}"
        elif mask_with is False:
            masks, shown = None, None
        elif mask_with in ("p_value", "q_value_bh", "q_value_by", "p_maxstat", "p_cluster"):
            masks = {b: torch.nan_to_num(v, nan=2.0) <= self.alpha for b, v in getattr(self, mask_with).items()}
            shown = f"{mask_with} ≤ {self.alpha}"
        else:
            raise ValueError(f"mask_with must be None, False or a p/q field name, got {mask_with!r}")
        if title is None:
            title = field + (f" (hatched: not significant, {shown})" if shown else "")
        if field in ("z", "effect_size"):
            kwargs.setdefault("signed", True)        # centred at 0 in every block
        return plot_blocks(getattr(self, field), masks=masks, title=title, blocks=self.blocks,
                           colorbar_label=field, **kwargs)


# -------------------------------------------------------------------------------------------- entry point


def permutation_test(
    pooled_scores: Scores,
    n_a: Labels,
    *,
    n_permutations: int = 1000,
    alternative: str = "greater",
    alpha: float = 0.05,
    correction: str = "bh",
    seed: Seed = 0,
    permutations: Optional[Bool[Tensor, "n_permutations n"]] = None,
    n_bootstrap: int = 2000,
    ci_method: str = "bca",
    confidence_level: float = 0.95,
    cluster_threshold: Optional[float] = None,
    connectivity: int = 4,
    dtype: torch.dtype = torch.float64,
    memory_budget: int = 256 * 2 ** 20,
    progress: bool = True,
) -> InterferenceTestResult:
    """Permutation test of task-label exchangeability for every (block, layer, head) cell, with corrections.

    Args:
        pooled_scores: block -> [N, N, n_layers, n_heads_B] pooled pairwise scores (see the module docstring).
        n_a: int (first ``n_a`` pooled samples are task A) or a bool vector [N] (True = task A).
        n_permutations: random relabelings (>= 1), drawn uniformly with group sizes kept (with replacement,
            so the identity may appear — the p-value stays valid).
        alternative: "greater" (default), "less" or "two-sided" (``min(1, 2·min(p_less, p_greater))``).
        alpha: level for ``significant`` (in (0, 1)).
        correction: which adjusted p decides ``significant``: "bh" (default), "by", "maxstat", "cluster", "none".
        seed: int, ``torch.Generator`` (permutations; the bootstrap ``numpy`` generator is seeded with the same
            int, or from the generator) or None (fresh entropy).
        permutations: explicit relabelings [P, N] (task-A memberships) instead of random ones, e.g.
            :func:`all_relabelings` for an exact test.
        n_bootstrap: bootstrap resamples for ``ci_low``/``ci_high`` (0: no intervals).
        ci_method: "bca" or "percentile"; confidence_level in (0, 1).
        cluster_threshold, connectivity: cluster-forming threshold on the standardised statistic and
            grid connectivity (4 or 8), see :func:`cluster_mass_correction`.
        dtype: computation dtype. float64 (default) is exact to ~1e-14 relative; float32 is about twice as fast
            but treats differences below ~1e-5 of a cell's scale as ties (and such cells as constant).
        memory_budget: bytes for the per-chunk intermediate ``[chunk, N, cells]``.
        progress: tqdm progress bars.

    >>> m = torch.rand(16, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    >>> m[:8, 8:, 0, 0] += 1.0                          # task A -> task B pairs of one head score higher
    >>> res = permutation_test({"O": m}, 8, n_permutations=499, n_bootstrap=0, correction="maxstat",
    ...                        progress=False)
    >>> res.significant["O"].nonzero().tolist()
    [[0, 0]]
    """
    scores, n = _check_scores(pooled_scores)
    labels = _resolve_labels(n_a, n)
    k = int(labels.sum())
    _check_choice("alternative", alternative, ALTERNATIVES)
    alpha = _check_open_unit("alpha", alpha)
    _check_choice("correction", correction, CORRECTIONS)
    _check_choice("ci_method", ci_method, CI_METHODS)
    _check_choice("connectivity", connectivity, (4, 8))
    confidence_level = _check_open_unit("confidence_level", confidence_level)
    n_bootstrap = _check_int("n_bootstrap", n_bootstrap, 0)
    if n_bootstrap and (k < 2 or n - k < 2):
        raise ValueError(f"bootstrap intervals need at least 2 samples per task, got n_a={k}, n_b={n - k}; "
                         "pass n_bootstrap=0")
    if permutations is None:
        n_permutations = _check_int("n_permutations", n_permutations, 1)
        perms = random_relabelings(n, k, n_permutations, _torch_generator(seed))
    else:
        perms = _check_relabelings(permutations, n, k)
        n_permutations = perms.shape[0]
    if cluster_threshold is None:
        cluster_threshold = float(ndtri(0.975 if alternative == "two-sided" else 0.95))
    cluster_threshold = float(cluster_threshold)

    obs_row = labels[None]
    n_pairs = k * (n - k)
    eps = torch.finfo(dtype).eps
    grids = {name: {} for name in ("observed", "null_mean", "null_std", "z", "effect_size", "p_value")}
    z_null, null_dist, tol_z, shapes = {}, {}, {}, {}
    ci_low, ci_high = ({}, {}) if n_bootstrap else (None, None)
    if n_bootstrap:
        idx_a, idx_b = _draw_bootstrap(_numpy_rng(seed), k, n - k, n_bootstrap)
    n_missing = n_cells = n_degenerate = 0
    workspace = _Workspace()
    total_work = len(scores) * (n_permutations + 1 + n_bootstrap)
    with _progress(total_work, "permutation test", progress) as bar:
        for block, x in scores.items():
            prep = _prepare_block(x, dtype)
            shapes[block] = prep.shape
            missing = prep.missing
            t_obs = _bilinear(obs_row, prep.centered, ~obs_row, memory_budget, bar)[0] / n_pairs      # centred
            t_null = _bilinear(perms, prep.centered, ~perms, memory_budget, bar, workspace) / n_pairs  # [P, C]
            sd = _null_sd(prep, k, n - k)
            observed = t_obs + prep.mu
            gamma = _TIE_EPS * eps * torch.maximum(observed.abs(), prep.scale)
            p_greater = (1 + (t_null >= t_obs - gamma).sum(0).double()) / (1 + n_permutations)
            p_less = (1 + (t_null <= t_obs + gamma).sum(0).double()) / (1 + n_permutations)
            p = {"greater": p_greater, "less": p_less,
                 "two-sided": torch.clamp(2 * torch.minimum(p_less, p_greater), max=1.0)}[alternative]
            degenerate = sd <= _TIE_EPS * eps * prep.scale
            safe_sd = torch.where(degenerate, torch.ones_like(sd), sd)
            z_obs = torch.where(degenerate, 0.0, t_obs / safe_sd)
            z_n = torch.where(degenerate, 0.0, t_null / safe_sd)
            tol = torch.where(degenerate, 0.0, gamma / safe_sd)
            safe_pairs = torch.where(prep.sd_pairs > 0, prep.sd_pairs, torch.ones_like(prep.sd_pairs))
            effect = torch.where(prep.sd_pairs > 0, t_obs / safe_pairs, 0.0)

            def put(name, value):
                grids[name][block] = value.double().masked_fill(missing, float("nan")).reshape(prep.shape).cpu()

            put("observed", observed)
            put("null_mean", prep.mu)
            put("null_std", sd)
            put("z", z_obs)
            put("effect_size", effect)
            put("p_value", p.double())
            z_null[block] = z_n.double().masked_fill(missing, float("nan")).reshape(-1, *prep.shape).cpu()
            tol_z[block] = tol.double().reshape(prep.shape).cpu()
            null_dist[block] = (t_null + prep.mu).double().masked_fill(missing, float("nan")) \
                .reshape(-1, *prep.shape).cpu()
            if n_bootstrap:
                low, high, _ = _bootstrap_block(prep, labels, idx_a, idx_b, method=ci_method,
                                                confidence_level=confidence_level, memory_budget=memory_budget,
                                                bar=bar, workspace=workspace)
                miss = missing.cpu().numpy()
                n_degenerate += int(np.sum(~miss & ~(np.isfinite(low) & np.isfinite(high))))
                low[miss] = np.nan
                high[miss] = np.nan
                ci_low[block] = torch.from_numpy(low).reshape(prep.shape)
                ci_high[block] = torch.from_numpy(high).reshape(prep.shape)
            n_missing += int(missing.sum())
            n_cells += missing.numel()
            del prep
    _warn_missing(n_missing, n_cells, "statistics")
    _warn_degenerate(n_degenerate, ci_method)

    q_bh = fdr_correction(grids["p_value"], "bh")
    q_by = fdr_correction(grids["p_value"], "by")
    p_max = maxstat_correction(grids["z"], z_null, alternative=alternative, tolerance=tol_z)
    p_max = {b: torch.maximum(p_max[b], grids["p_value"][b]) for b in p_max}    # NaN propagates
    p_clu = cluster_mass_correction(grids["z"], z_null, threshold=cluster_threshold, alternative=alternative,
                                    connectivity=connectivity, tolerance=tol_z)
    adjusted = {"bh": q_bh, "by": q_by, "maxstat": p_max, "cluster": p_clu, "none": grids["p_value"]}[correction]
    significant = {b: torch.nan_to_num(v, nan=2.0) <= alpha for b, v in adjusted.items()}
    return InterferenceTestResult(
        observed=grids["observed"], null_mean=grids["null_mean"], null_std=grids["null_std"], z=grids["z"],
        effect_size=grids["effect_size"], p_value=grids["p_value"], q_value_bh=q_bh, q_value_by=q_by,
        p_maxstat=p_max, p_cluster=p_clu, ci_low=ci_low, ci_high=ci_high, significant=significant, alpha=alpha,
        n_permutations=n_permutations, alternative=alternative, correction=correction, n_a=k, n_b=n - k,
        n_bootstrap=n_bootstrap, ci_method=ci_method, confidence_level=confidence_level,
        cluster_threshold=cluster_threshold, connectivity=connectivity,
        seed=seed if not isinstance(seed, torch.Generator) else "torch.Generator",
        null_distribution=null_dist, permutations=perms,
    )
