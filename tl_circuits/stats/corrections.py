"""Multiple comparisons over the cells of every block: FDR q-values, max-statistic and cluster-mass FWER.

* ``fdr_correction``: Benjamini–Hochberg / Benjamini–Yekutieli q-values (``scipy.stats.false_discovery_control``)
  over **one family: every finite cell of every block**.
* ``maxstat_correction``: Westfall–Young single-step max-T, family-wise over all finite cells of all blocks,
  from the same permutations as the cell p-values.
* ``cluster_mass_correction``: supra-threshold clusters on each block's layer × head grid (never across
  blocks); the null is the largest cluster mass over all blocks in each permutation. A significant cluster
  says the cluster holds signal, not that each of its cells does, and "adjacent heads" is a convention (head
  indices are arbitrary), not anatomy: use max-T for claims about single heads.

>>> fdr_correction({"Q": torch.tensor([[0.01, 0.5]])}, "bh")["Q"]
tensor([[0.0200, 0.5000]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import numpy as np
import torch
from jaxtyping import Float
from scipy import ndimage
from scipy.special import ndtri
from scipy.stats import false_discovery_control
from torch import Tensor

from tl_circuits.stats.validation import ALTERNATIVES, Grid, as_numpy, check_choice, flatten_cells, split_cells

__all__ = ["fdr_correction", "maxstat_correction", "find_clusters", "cluster_mass_correction",
           "default_cluster_threshold"]


def default_cluster_threshold(alternative: str) -> float:
    """The normal 0.95 quantile (one-sided) or 0.975 quantile (two-sided) of the standardised statistic.

    Any fixed threshold gives valid FWER control; it only changes which clusters are sensitive.

    >>> round(default_cluster_threshold("greater"), 3), round(default_cluster_threshold("two-sided"), 3)
    (1.645, 1.96)
    """
    check_choice("alternative", alternative, ALTERNATIVES)
    return float(ndtri(0.975 if alternative == "two-sided" else 0.95))


def fdr_correction(p_values: Mapping[str, Float[Tensor, "n_layers heads"]], method: str = "bh") -> Grid:
    """Benjamini–Hochberg (``"bh"``) or –Yekutieli (``"by"``) q-values over one family made of every finite
    cell of every block, via ``scipy.stats.false_discovery_control``; NaN cells stay NaN.

    >>> fdr_correction({"Q": torch.tensor([[0.01, 0.04], [0.03, float("nan")]])})["Q"]
    tensor([[0.0300, 0.0400],
            [0.0400,    nan]], dtype=torch.float64)
    """
    check_choice("method", method, ("bh", "by"))
    grids = {b: torch.as_tensor(as_numpy(p)) for b, p in p_values.items()}
    flat = flatten_cells(grids).numpy()
    finite = np.isfinite(flat)
    if np.any((flat[finite] < 0) | (flat[finite] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full_like(flat, np.nan)
    if finite.any():
        out[finite] = false_discovery_control(flat[finite], method=method)
    return split_cells(torch.from_numpy(out), {b: tuple(g.shape) for b, g in grids.items()})


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
    check_choice("alternative", alternative, ALTERNATIVES)
    shapes = {b: tuple(z.shape) for b, z in z_observed.items()}
    obs = _side(flatten_cells({b: torch.as_tensor(as_numpy(z)) for b, z in z_observed.items()}).numpy(),
                alternative)
    null = _side(flatten_cells({b: torch.as_tensor(as_numpy(z_null[b])) for b in shapes}, lead=1).numpy(),
                 alternative)
    if null.shape[1] != obs.shape[0]:
        raise ValueError("z_null must be [n_permutations, *z_observed.shape] for every block")
    tol = np.zeros_like(obs) if tolerance is None else flatten_cells(
        {b: torch.as_tensor(as_numpy(tolerance[b])) for b in shapes}).numpy()
    null = np.where(np.isfinite(null), null, -np.inf)
    max_null = null.max(axis=1)                                         # [P]
    hits = (max_null[:, None] >= (obs - tol)[None, :]).sum(0)
    p = (1.0 + hits) / (1.0 + null.shape[0])
    p[~np.isfinite(obs)] = np.nan
    return split_cells(torch.from_numpy(p), shapes)


def find_clusters(stat: Float[Tensor, "*batch n_layers heads"] | np.ndarray, threshold: float, *,
                  connectivity: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Clusters of cells with ``stat ≥ threshold`` on a layer × head grid (or a batch of grids, never linked
    across the batch). ``connectivity=4``: cells sharing an edge; ``8``: also diagonal neighbours.

    Returns ``(labels, masses)``: ``labels`` has ``stat``'s shape, 0 outside clusters and k = 1..K inside;
    ``masses[k - 1]`` is the sum of ``stat`` over cluster k. NaN cells never join a cluster.

    >>> labels, masses = find_clusters(torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), 1.0)
    >>> labels.tolist(), masses.tolist()
    ([[1, 1, 0], [0, 0, 2]], [4.0, 3.0])
    """
    check_choice("connectivity", connectivity, (4, 8))
    values = as_numpy(stat)
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
    check_choice("alternative", alternative, ALTERNATIVES)
    check_choice("connectivity", connectivity, (4, 8))
    if threshold is None:
        threshold = default_cluster_threshold(alternative)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    signs = {"greater": (1.0,), "less": (-1.0,), "two-sided": (1.0, -1.0)}[alternative]
    obs = {b: as_numpy(z) for b, z in z_observed.items()}
    n_perm = 0
    max_null: Optional[np.ndarray] = None
    for block, z in obs.items():
        null = as_numpy(z_null[block])
        if null.shape[1:] != z.shape:
            raise ValueError(f"z_null[{block!r}] must be [n_permutations, {z.shape[0]}, {z.shape[1]}]")
        n_perm = null.shape[0]
        for sign in signs:
            block_max = _max_cluster_mass(sign * null, threshold, connectivity)
            max_null = block_max if max_null is None else np.maximum(max_null, block_max)
    assert max_null is not None
    out = {}
    for block, z in obs.items():
        p = np.ones_like(z)
        tol = np.zeros_like(z) if tolerance is None else as_numpy(tolerance[block])
        for sign in signs:
            labels, masses = find_clusters(sign * z, threshold, connectivity=connectivity)
            slack = np.bincount(labels.ravel(), weights=tol.ravel(), minlength=masses.size + 1)[1:]
            for k, (mass, eps) in enumerate(zip(masses, slack), start=1):
                p[labels == k] = (1.0 + np.sum(max_null >= mass - eps)) / (1.0 + n_perm)
        p[~np.isfinite(z)] = np.nan
        out[block] = torch.from_numpy(p)
    return out
