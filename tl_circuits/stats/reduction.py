"""One block of pooled scores prepared once, and the batched bilinear reduction every statistic is made of.

The permutation null, the observed statistic and the bootstrap are all ``aᵀ M b`` for many 0/1 (or count)
vectors ``a``, ``b`` and every cell at once: one ``[chunk, N] @ [N, N·cells]`` GEMM and one batched product
per chunk, never a Python loop over cells or pairs.

>>> m = torch.arange(16.).reshape(4, 4, 1, 1)
>>> prep = prepare_block(m, torch.float64)
>>> a = torch.tensor([[True, True, False, False]])
>>> float(bilinear(a, prep.centered, ~a, 0.25)[0, 0] / 4 + prep.mu[0])   # mean of m[:2, 2:]
4.5
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_circuits.buffers import Workspace
from tl_circuits import defaults

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tqdm import tqdm


class PreparedBlock(NamedTuple):
    """A block ``[N, N, L, H]`` flattened to ``C = L·H`` cells, centred, with its missing cells zeroed."""

    centered: Tensor   # [N, N, C] M − mu, diagonal 0; missing cells all 0
    mu: Tensor         # [C] mean of M over ordered off-diagonal pairs (= exact null mean)
    missing: Tensor    # [C] bool: some off-diagonal entry is non-finite
    scale: Tensor      # [C] RMS of M over off-diagonal pairs (scale of the tie tolerance)
    sd_pairs: Tensor   # [C] SD (ddof 0) of M over off-diagonal pairs
    sq: Tensor         # [C] Σ over off-diagonal pairs of (M − mu)²
    shape: Tuple[int, int]


def prepare_block(scores: Float[Tensor, "n n n_layers heads"], dtype: torch.dtype) -> PreparedBlock:
    """Centre one block on its off-diagonal mean; the diagonal never enters (it may hold NaN)."""
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
    return PreparedBlock(m, mu, missing, scale, sd_pairs, sq, (n_layers, n_heads))


# the permutation and bootstrap reductions keep their per-chunk products in one shared-type buffer
ReductionWorkspace = Workspace


def chunk_rows(n_rows: int, row_numel: int, element_size: int, memory_budget_gb: float) -> int:
    """Rows of ``[rows, row_numel]`` that fit ``memory_budget_gb``; at least one.

    >>> chunk_rows(1000, 2**20, 8, 0.25)   # 8 MiB per row, 256 MiB
    32
    """
    budget_bytes = int(memory_budget_gb * defaults.GB)
    return min(n_rows, max(1, budget_bytes // max(1, row_numel * element_size)))


def bilinear(left: Float[Tensor, "p n1"] | Bool[Tensor, "p n1"], m: Float[Tensor, "n1 n2 c"],
             right: Float[Tensor, "p n2"] | Bool[Tensor, "p n2"],
             scratch_gb: float = defaults.STATS_WORKSPACE_GB, bar: Optional[tqdm] = None,
             workspace: Optional[ReductionWorkspace] = None) -> Float[Tensor, "p c"]:
    """``out[p, c] = Σ_ij left[p, i] m[i, j, c] right[p, j]``, chunked so one chunk's product ``[chunk, n2·c]``
    fits ``scratch_gb`` (a scratch size, set from the calls' ``memory_budget_gb`` by
    :mod:`tl_circuits.interference.memory`)."""
    n1, n2, c = m.shape
    if not math.isfinite(scratch_gb) or scratch_gb <= 0:
        raise ValueError(f"scratch_gb must be a positive, finite number of GB, got {scratch_gb!r}")
    flat = m.reshape(n1, n2 * c)
    chunk = chunk_rows(left.shape[0], n2 * c, m.element_size(), scratch_gb)
    workspace = workspace or ReductionWorkspace()
    out = torch.empty(left.shape[0], c, dtype=m.dtype, device=m.device)
    for start in range(0, left.shape[0], chunk):
        stop = min(left.shape[0], start + chunk)
        lhs = left[start:stop].to(device=m.device, dtype=m.dtype)
        rhs = right[start:stop].to(device=m.device, dtype=m.dtype)
        partial = workspace.get("products", (stop - start, n2 * c), m.dtype, m.device)
        torch.mm(lhs, flat, out=partial)
        out[start:stop] = torch.bmm(rhs.unsqueeze(1), partial.view(stop - start, n2, c)).squeeze(1)
        if bar is not None:
            bar.update(stop - start)
    return out
