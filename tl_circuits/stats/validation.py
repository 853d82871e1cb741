"""Argument checks and shared plumbing of the statistics: scores, task labels, relabelings, seeds, warnings.

Every public function of :mod:`tl_circuits.stats` validates its input here, so one kind of bad input gets
one error message wherever it is passed.

>>> resolve_labels(2, 4).tolist()
[True, True, False, False]
>>> check_choice("alternative", "less", ALTERNATIVES)
'less'
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.deprecation import warn_deprecated

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tqdm import tqdm

ALTERNATIVES = ("greater", "less", "two-sided")
CORRECTIONS = ("bh", "by", "maxstat", "cluster", "none")
CI_METHODS = ("bca", "percentile")
TIE_EPS = 100  # values within 100 * machine epsilon count as ties, scipy's convention

Scores = Mapping[str, Float[Tensor, "n n n_layers heads"]]
Grid = Dict[str, Float[Tensor, "n_layers heads"]]
Labels = Union[int, Bool[Tensor, " n"]]
Seed = Union[int, torch.Generator, None]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` (bools and floats are rejected).

    >>> check_int("n_permutations", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: n_permutations must be >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_open_unit(name: str, value: object) -> float:
    """``value`` as a float in the open interval (0, 1); NaN is rejected."""
    try:
        value_f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < value_f < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return value_f


def check_choice(name: str, value: Any, choices: Sequence) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def resolve_memory_budget_gb(memory_budget_gb: float, memory_budget: Optional[float]) -> float:
    """What a statistics call may allocate, in GB; the deprecated ``memory_budget`` (bytes) still works, with a warning.

    >>> resolve_memory_budget_gb(0.5, None)
    0.5
    """
    if memory_budget is not None:
        warn_deprecated("memory_budget (bytes) is deprecated; pass memory_budget_gb (GB, 2**30 bytes: what the call "
                        "may allocate) instead", stacklevel=4)
        if memory_budget_gb != defaults.MEMORY_BUDGET_GB:
            raise ValueError("pass memory_budget_gb or the deprecated memory_budget, not both")
        memory_budget_gb = float(memory_budget) / defaults.GB
    try:
        budget = float(memory_budget_gb)
    except (TypeError, ValueError):
        raise ValueError(f"memory_budget_gb must be a positive number of GB, got {memory_budget_gb!r}") from None
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"memory_budget_gb must be a positive, finite number of GB, got {memory_budget_gb!r}")
    return budget


def check_scores(pooled_scores: Scores) -> Tuple[Dict[str, Tensor], int]:
    """The pooled score blocks as tensors, and the number of pooled samples N they share."""
    if not isinstance(pooled_scores, Mapping) or len(pooled_scores) == 0:
        raise ValueError("pooled_scores must be a non-empty mapping block -> Tensor[N, N, n_layers, n_heads]")
    checked: Dict[str, Tensor] = {}
    n: Optional[int] = None
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
    assert n is not None
    if n < 2:
        raise ValueError(f"need at least 2 pooled samples, got {n}")
    return checked, n


def count_cells(scores: Mapping[str, Tensor]) -> int:
    """Number of (block, layer, head) cells of pooled score blocks ``[N, N, L, H]``."""
    return sum(int(x.shape[2]) * int(x.shape[3]) for x in scores.values())


def resolve_labels(n_a: Labels, n: int) -> Bool[Tensor, " n"]:
    """Task-A membership as a bool vector [n] (CPU): from an int (the first ``n_a``) or a 0/1 vector."""
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


def check_relabelings(permutations: Any, n: int, n_a: int) -> Bool[Tensor, "n_permutations n"]:
    """Explicit relabelings as a bool tensor [P, N] (CPU), each keeping ``n_a`` samples in task A."""
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


def numpy_rng(seed: Union[int, None, np.random.Generator, torch.Generator]) -> np.random.Generator:
    """The numpy generator of the bootstrap: the same int seed, or one drawn from a torch generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=seed)))
    return np.random.default_rng(seed)


def torch_generator(seed: Seed) -> torch.Generator:
    """The torch generator of the permutations; ``None`` seeds from fresh entropy."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(check_int("seed", seed, 0))
    return gen


def as_numpy(x: Any) -> np.ndarray:
    """float64 numpy copy of a tensor or array-like."""
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def flatten_cells(grids: Mapping[str, Tensor], lead: int = 0) -> Tensor:
    """Concatenate every block's cells along the last axis, keeping ``lead`` leading axes."""
    return torch.cat([g.reshape(*g.shape[:lead], -1) for g in grids.values()], dim=-1)


def split_cells(flat: Tensor, shapes: Mapping[str, Tuple[int, ...]], lead: Tuple[int, ...] = ()) -> Grid:
    """Inverse of :func:`flatten_cells`: block -> [*lead, n_layers, n_heads].

    >>> grids = {"Q": torch.zeros(2, 3), "K": torch.ones(2, 1)}
    >>> {b: tuple(g.shape) for b, g in split_cells(flatten_cells(grids), {"Q": (2, 3), "K": (2, 1)}).items()}
    {'Q': (2, 3), 'K': (2, 1)}
    """
    out, start = {}, 0
    for block, (n_layers, n_heads) in shapes.items():
        size = n_layers * n_heads
        out[block] = flat[..., start:start + size].reshape(*lead, n_layers, n_heads)
        start += size
    return out


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def warn_missing(n_missing: int, n_cells: int, what: str) -> None:
    """Error if every cell is missing; otherwise say how many were dropped from the families."""
    if n_missing == n_cells:
        raise ValueError(f"every one of the {n_cells} cells has non-finite (NaN/inf) off-diagonal scores; "
                         "nothing to test")
    if n_missing:
        warnings.warn(f"{n_missing} of {n_cells} cells have non-finite (NaN/inf) off-diagonal scores: their "
                      f"{what} are NaN and they are left out of the multiple-comparison families",
                      RuntimeWarning, stacklevel=3)


def warn_degenerate(count: int, method: str) -> None:
    if count:
        warnings.warn(f"the {method} interval could not be computed for {count} cells (degenerate bootstrap "
                      "distribution, e.g. a constant cell); they are NaN, as in scipy.stats.bootstrap",
                      RuntimeWarning, stacklevel=3)
