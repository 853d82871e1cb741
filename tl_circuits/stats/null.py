"""The statistic and its permutation null: relabelings, the observed A×B mean, exact null moments.

A relabeling is a task-A membership vector with the observed group sizes; the statistic of a cell under
relabeling ``a`` is ``T(a) = aᵀ M (1 − a) / (n_A n_B)`` over the pooled matrix ``M`` (the diagonal never
enters). The exact mean and SD of ``T`` over all C(N, n_A) relabelings have a closed form (no sampling).

>>> g = torch.Generator().manual_seed(0)
>>> perms = random_relabelings(6, 2, 4, g)
>>> permutation_null({"Q": torch.rand(6, 6, 1, 2, generator=g)}, perms)["Q"].shape
torch.Size([4, 1, 2])
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.interference import memory
from tl_circuits.parallel.group import current_world, split_rows
from tl_circuits.stats.reduction import PreparedBlock, ReductionWorkspace, bilinear, prepare_block
from tl_circuits.stats.validation import (
    Grid,
    Labels,
    Scores,
    check_int,
    check_relabelings,
    check_scores,
    progress_bar,
    resolve_labels,
    resolve_memory_budget_gb,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tqdm import tqdm

__all__ = ["random_relabelings", "all_relabelings", "observed_statistic", "null_moments", "exact_null_sd",
           "permutation_null", "relabeled_statistic"]


def random_relabelings(n: int, n_a: int, n_permutations: int,
                       generator: Optional[torch.Generator] = None) -> Bool[Tensor, "n_permutations n"]:
    """Uniformly random task-A memberships keeping group sizes: each row has ``n_a`` True of ``n``.

    >>> g = torch.Generator().manual_seed(0)
    >>> random_relabelings(6, 2, 3, g).sum(1).tolist()
    [2, 2, 2]
    """
    n = check_int("n", n, 2)
    n_a = check_int("n_a", n_a, 1)
    n_permutations = check_int("n_permutations", n_permutations, 1)
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
        labels = resolve_labels(n_a, n)
    else:
        labels = resolve_labels(n_a, len(n_a) if n is None else n)  # type: ignore[arg-type]
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


def exact_null_sd(prep: PreparedBlock, n_a: int, n_b: int) -> Float[Tensor, " c"]:
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




def observed_statistic(pooled_scores: Scores, n_a: Labels) -> Grid:
    """Mean of M over all pairs i ∈ A, j ∈ B per cell; NaN where an off-diagonal score is non-finite.

    >>> m = torch.arange(16.).reshape(4, 4, 1, 1)
    >>> observed_statistic({"Q": m}, 2)["Q"]   # mean of m[:2, 2:]
    tensor([[4.5000]], dtype=torch.float64)
    """
    scores, n = check_scores(pooled_scores)
    labels = resolve_labels(n_a, n)
    out = {}
    for block, x in scores.items():
        x = x.detach().double()
        sub = x[labels.to(x.device)][:, ~labels.to(x.device)]
        missing = prepare_block(x, torch.float64).missing.reshape(x.shape[2:])
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
    scores, n = check_scores(pooled_scores)
    labels = resolve_labels(n_a, n)
    k = int(labels.sum())
    means, sds = {}, {}
    for block, x in scores.items():
        prep = prepare_block(x, torch.float64)
        nan = prep.missing
        means[block] = prep.mu.masked_fill(nan, float("nan")).reshape(prep.shape).cpu()
        sds[block] = exact_null_sd(prep, k, n - k).masked_fill(nan, float("nan")).reshape(prep.shape).cpu()
    return means, sds


def relabeled_statistic(centered: Float[Tensor, "n n c"], relabelings: Bool[Tensor, "p n"], *, scratch_gb: float,
                        bar: Optional[tqdm] = None, workspace: Optional[ReductionWorkspace] = None,
                        split: bool = True) -> Float[Tensor, "p c"]:
    """The centred statistic ``aᵀ (M − μ) (1 − a) / (n_A n_B)`` of every cell under each relabeling ``a``: the one
    batched reduction of the permutation null (the observed labels, the screen, the rest of the relabelings).

    ``centered``: a prepared block's :attr:`~tl_circuits.stats.reduction.PreparedBlock.centered` (or some of its
    cells); ``scratch_gb``: one chunk's scratch product. With ``split`` the rows are shared out over the ranks of a
    process group (every rank gets all of them back, bit for bit what one process computes).
    """
    k, n = int(relabelings[0].sum()), relabelings.shape[1]

    def reduce(rows: slice) -> Tensor:
        return bilinear(relabelings[rows], centered, ~relabelings[rows], scratch_gb, bar, workspace)

    n_rows = relabelings.shape[0]
    total = split_rows(n_rows, (centered.shape[-1],), centered.dtype, reduce, current_world()) if split \
        else reduce(slice(0, n_rows))
    return total / (k * (n - k))


def permutation_null(pooled_scores: Scores, permutations: Bool[Tensor, "n_permutations n"], *,
                     dtype: torch.dtype = torch.float64, memory_budget_gb: float = defaults.MEMORY_BUDGET_GB,
                     progress: bool = True, memory_budget: Optional[float] = None,
                     ) -> Dict[str, Float[Tensor, "n_permutations n_layers heads"]]:
    """The per-cell statistic under each given relabeling (row = task-A membership), all cells batched.

    ``memory_budget_gb``: what the call may allocate (GB; ``memory_budget``, in bytes, is deprecated).

    >>> m = torch.rand(6, 6, 2, 2)
    >>> perms = all_relabelings(3, 6)
    >>> permutation_null({"Q": m}, perms, progress=False)["Q"].shape
    torch.Size([19, 2, 2])
    """
    scores, n = check_scores(pooled_scores)
    memory_budget_gb = resolve_memory_budget_gb(memory_budget_gb, memory_budget)
    perms = torch.as_tensor(permutations)
    k = int(perms[0].sum()) if perms.ndim == 2 and perms.shape[0] else 0
    perms = check_relabelings(perms, n, k)
    cells = [int(x.shape[2] * x.shape[3]) for x in scores.values()]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    scratch_gb = memory.statistics_scratch_gb(
        memory_budget_gb, memory.statistics_held_bytes(n, cells, itemsize, n_relabelings=perms.shape[0]),
        n * max(cells) * itemsize)
    out, workspace = {}, ReductionWorkspace()
    with progress_bar(len(scores) * perms.shape[0], "permutations", progress) as bar:
        for block, x in scores.items():
            prep = prepare_block(x, dtype)
            t = relabeled_statistic(prep.centered, perms, scratch_gb=scratch_gb, bar=bar, workspace=workspace)
            t = (t + prep.mu).masked_fill(prep.missing, float("nan"))
            out[block] = t.reshape(-1, *prep.shape).cpu()
    return out
