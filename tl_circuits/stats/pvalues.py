"""One convention per idea for every test of the package: tails, the floor of a p-value, and significance.

- **One two-sided rule** (docs/spec.md §4.3), :func:`tail_p_value`: a cell's two-sided p-value is
  ``min(1, 2 · min(p_less, p_greater))``, whatever the statistic (label permutations, sign flips, the conflict
  test's t). It is ``scipy.stats.permutation_test``'s rule (exact and Monte Carlo) and, for a symmetric
  distribution such as Student's t, the usual ``2 · P(|T| ≥ |t|)``. It needs no symmetric null: the
  label-permutation null of the A × B mean is not symmetric, so counting ``|T − E T|`` there would test another
  statistic. Where the null *is* symmetric (the exact sign-flip enumeration) it equals the count of
  ``|T*| ≥ |T|``. Family-wise corrections take both tails into the family instead (max of ``|z|``, clusters of
  either sign: :mod:`tl_circuits.stats.corrections`).
- **The floor** of a p-value from ``P`` relabelings, :func:`p_value_floor`: ``1/(1 + P)`` (Monte Carlo, or ``P``
  relabelings besides the observed one) or ``1/P`` (an exact enumeration that contains the identity), doubled
  two-sided.
- **Significance**, :func:`significant_cells`: a cell is significant when its adjusted p-value is ≤ ``alpha``; NaN
  (missing) cells never are. :func:`family_decisions` adds the BH/BY q-values over one family (every finite cell of
  every block) and picks the correction's adjusted p.

>>> tail_p_value(torch.tensor([0.01, 0.8]), torch.tensor([0.995, 0.3]), "two-sided")
tensor([0.0200, 0.6000])
>>> p_value_floor(999, "two-sided"), p_value_floor(16, "greater", exact=True)
(0.002, 0.0625)
"""

from __future__ import annotations

import warnings
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from tl_circuits.stats.corrections import fdr_correction
from tl_circuits.stats.validation import ALTERNATIVES, Grid, check_choice, check_int

__all__ = ["FamilyDecisions", "family_decisions", "p_value_floor", "significant_cells", "tail_p_value",
           "warn_at_floor"]


def tail_p_value(p_less: Tensor, p_greater: Tensor, alternative: str) -> Tensor:
    """The p-value of ``alternative`` from the two one-sided ones: ``"less"``, ``"greater"``, or two-sided
    ``min(1, 2 · min(p_less, p_greater))`` (module docstring)."""
    check_choice("alternative", alternative, ALTERNATIVES)
    if alternative == "less":
        return p_less
    if alternative == "greater":
        return p_greater
    return torch.clamp(2 * torch.minimum(p_less, p_greater), max=1.0)


def p_value_floor(n_permutations: int, alternative: str = "greater", *, exact: bool = False) -> float:
    """The smallest p-value ``n_permutations`` relabelings can give: ``1/(1 + P)``, or ``1/P`` for an exact
    enumeration that holds the identity (``exact=True``); doubled two-sided (:func:`tail_p_value`), at most 1.

    >>> p_value_floor(23040) <= 0.05 / 576
    True
    """
    check_choice("alternative", alternative, ALTERNATIVES)
    n_permutations = check_int("n_permutations", n_permutations, 1)
    tails = 2.0 if alternative == "two-sided" else 1.0
    return min(1.0, tails / (n_permutations if exact else 1 + n_permutations))


def warn_at_floor(p_values: Tensor, n_permutations: int, alternative: str, *, exact: bool = False,
                  alpha: Optional[float] = None, stacklevel: int = 3) -> int:
    """Warn (UserWarning) when p-values cannot resolve what is asked; returns how many cells sit at the floor.

    Monte Carlo: how many finite cells sit at :func:`p_value_floor` (no relabeling reached their statistic, so
    more relabelings would resolve them). Exact (with ``alpha``): when the floor is above ``alpha / m`` for the
    ``m`` finite cells, so that BH cannot flag a lone cell whatever the data.
    """
    floor = p_value_floor(n_permutations, alternative, exact=exact)
    flat = p_values.reshape(-1)
    finite = torch.isfinite(flat)
    m = int(finite.sum())
    count = int((flat[finite] <= floor * (1 + 1e-9)).sum())
    if exact:
        if alpha is not None and m and floor > alpha / m:
            warnings.warn(f"the exact test's smallest p-value is {floor:.3g} ({n_permutations} relabelings), above "
                          f"alpha/m = {alpha / m:.3g} for the {m} tested cells: BH cannot flag a lone cell; use "
                          "more samples", UserWarning, stacklevel=stacklevel)
        return count
    if count:
        warnings.warn(f"{count} of {m} cells have p-values at their floor {floor:.3g} (= "
                      f"{'2' if alternative == 'two-sided' else '1'}/(1 + n_permutations={n_permutations})): no "
                      "relabeling reached their statistic, so their true p-value may be smaller; more permutations "
                      "resolve it", UserWarning, stacklevel=stacklevel)
    return count


def significant_cells(adjusted: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``adjusted ≤ alpha`` per cell (bool), False for NaN cells.

    >>> significant_cells({"Q": torch.tensor([0.01, float("nan"), 0.2])}, 0.05)["Q"].tolist()
    [True, False, False]
    """
    return {block: torch.nan_to_num(values, nan=2.0) <= alpha for block, values in adjusted.items()}


class FamilyDecisions(NamedTuple):
    """BH and BY q-values over one family, and which cells the chosen correction flags."""

    q_value_bh: Grid
    q_value_by: Grid
    significant: dict[str, Tensor]


def family_decisions(p_value: Grid, correction: str, alpha: float,
                     family_wise: Optional[Mapping[str, Grid]] = None) -> FamilyDecisions:
    """BH/BY q-values of ``p_value`` over every finite cell of every block, and ``significant``: the adjusted p of
    ``correction`` (``"bh"``, ``"by"``, ``"none"``, or a key of ``family_wise``, e.g. ``"maxstat"``) ≤ ``alpha``.

    >>> d = family_decisions({"Q": torch.tensor([[0.001, 0.04, 0.5]], dtype=torch.float64)}, "bh", 0.05)
    >>> d.q_value_bh["Q"].tolist(), d.significant["Q"].tolist()
    ([[0.003, 0.06, 0.5]], [[True, False, False]])
    """
    q_bh, q_by = fdr_correction(p_value, "bh"), fdr_correction(p_value, "by")
    adjusted = {"bh": q_bh, "by": q_by, "none": p_value, **(family_wise or {})}
    check_choice("correction", correction, tuple(adjusted))
    return FamilyDecisions(q_bh, q_by, significant_cells(adjusted[correction], alpha))
