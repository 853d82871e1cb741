"""Paired (one-sample) statistics of per-sample differences ``x[N, *cells]``: the sign-flip test and the bootstrap.

Used for freeze effects (:meth:`tl_circuits.SweepResult.test`), where ``x[i]`` is sample i's frozen minus clean
metric, but generic: any ``[N, ...]`` array of paired differences, one column per cell. Every cell uses the same
sign flips (and the same bootstrap resamples), so a whole grid is one matrix product per chunk.

**Null hypothesis of the sign-flip test**: each sample's difference is symmetric about 0 and the samples are
independent (so flipping any subset of signs leaves the joint distribution unchanged); in particular the mean
difference is 0. The statistic is the mean of the finite differences of a cell; NaN differences (missing data)
are left out of that cell (its flips of them do nothing).

>>> x = torch.tensor([[0.5, -0.1], [0.7, 0.2], [0.6, -0.3], [0.9, 0.1]])
>>> res = sign_flip_test(x, alternative="greater", progress=False)
>>> res.exact, res.n_permutations, res.p_value.tolist()
(True, 16, [0.0625, 0.6875])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_circuits import defaults
from tl_circuits.stats.bootstrap import interval_from_resamples
from tl_circuits.stats.pvalues import tail_p_value
from tl_circuits.stats.validation import (
    ALTERNATIVES,
    CI_METHODS,
    TIE_EPS,
    Seed,
    check_choice,
    check_int,
    check_open_unit,
    numpy_rng,
    torch_generator,
    warn_degenerate,
)

__all__ = ["PairedBootstrapCI", "SignFlipResult", "all_sign_flips", "paired_bootstrap_ci", "random_sign_flips",
           "sign_flip_test"]

SIGN_FLIP_NULL = ("each sample's difference is symmetric about 0, independently of the others "
                  "(so the mean difference is 0)")
MAX_EXACT_SAMPLES = 20
"""Exact enumeration lists 2^N sign patterns; beyond 2^20 (about a million) it is refused."""
EXACT_PATTERNS = 2 ** 16
"""By default the test enumerates all 2^N patterns when 2^N is at most this (or at most ``n_permutations``):
an exact p costs no more than a Monte Carlo one here."""
_CHUNK_ELEMENTS = 2 ** 22  # flips x cells per matrix product: 32 MB of float64 scratch


@dataclass(frozen=True)
class SignFlipResult:
    """The sign-flip test of every cell: ``statistic`` (mean finite difference), ``p_value``, ``n_samples``
    (finite differences per cell), each ``x.shape[1:]``; ``n_permutations`` flips (``2^N`` when ``exact``)."""

    statistic: Tensor
    p_value: Tensor
    n_samples: Tensor
    n_permutations: int
    exact: bool
    alternative: str
    null_hypothesis: str = SIGN_FLIP_NULL


@dataclass(frozen=True)
class PairedBootstrapCI:
    """Bootstrap interval of every cell's mean difference (``low``, ``high``, ``standard_error``: ``x.shape[1:]``)."""

    low: Tensor
    high: Tensor
    standard_error: Tensor
    method: str
    confidence_level: float
    n_resamples: int


def all_sign_flips(n: int) -> Float[Tensor, "two_to_n n"]:
    """Every one of the ``2^n`` sign patterns (±1, float64), the identity (all +1) first.

    >>> all_sign_flips(2).tolist()
    [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]
    """
    n = check_int("n", n, 1)
    if n > MAX_EXACT_SAMPLES:
        raise ValueError(f"exact enumeration of 2^{n} sign patterns is too many; at most {MAX_EXACT_SAMPLES} "
                         "samples (use random flips)")
    # row r's bit j (most significant first) set -> sample j flipped: row 0 is the identity
    bits = (torch.arange(2 ** n)[:, None] >> torch.arange(n - 1, -1, -1)) & 1
    return (1 - 2 * bits).double()


def random_sign_flips(n: int, n_permutations: int, generator: torch.Generator) -> Float[Tensor, "n_permutations n"]:
    """``n_permutations`` independent uniform sign patterns (±1, float64), drawn with replacement.

    >>> random_sign_flips(3, 2, torch.Generator().manual_seed(0)).abs().tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    bits = torch.randint(0, 2, (n_permutations, n), generator=generator)
    return (1 - 2 * bits).double()


def _as_float64(x) -> Tensor:
    x = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x)).double()
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be [N, ...] with N >= 1 samples, got shape {tuple(x.shape)}")
    return x


def sign_flip_test(
    x: Float[Tensor, "n ..."],
    *,
    alternative: str = "two-sided",
    n_permutations: Optional[int] = None,
    exact: Optional[bool] = None,
    seed: Seed = defaults.SEED,
    progress: bool = True,
) -> SignFlipResult:
    """Paired sign-flip permutation test of H0: "each difference is symmetric about 0" (mean 0), per cell.

    Statistic ``T = mean of the finite x[:, cell]``; under a sign pattern s, ``T* = Σ s_i x_i / n_cell``. p-values:
    ``"greater"``: #{T* ≥ T}, ``"less"``: #{T* ≤ T} (ties within ``TIE_EPS`` machine epsilons of the cell's scale
    count), divided by ``2^N`` for the exact enumeration (which contains the identity) or ``(1 + #) / (1 + B)``
    for B random patterns — so p is never 0; ``"two-sided"``: the package's one rule
    ``min(1, 2·min(p_less, p_greater))`` (:func:`tl_circuits.stats.pvalues.tail_p_value`; for the exact
    enumeration, whose null is symmetric, the share of ``|T*| ≥ |T|``). The p-values equal
    ``scipy.stats.permutation_test((x,), mean, permutation_type="samples")``'s (tested).

    Args:
        x: ``[N, *cells]`` paired differences; NaN entries are missing and left out of their cell.
        n_permutations: random patterns B (default :func:`tl_circuits.defaults.default_n_permutations` of the
            number of cells).
        exact: force (True) or forbid (False) exact enumeration; default: exact when
            ``2^N ≤ max(n_permutations, EXACT_PATTERNS)``.
        seed: int, ``torch.Generator`` or None (fresh entropy), for the random patterns.
        progress: a tqdm progress bar over the sign patterns.
    """
    check_choice("alternative", alternative, ALTERNATIVES)
    x = _as_float64(x)
    n, cell_shape = x.shape[0], x.shape[1:]
    flat = x.reshape(n, -1)
    if n_permutations is None:
        n_permutations = defaults.default_n_permutations(max(1, flat.shape[1]))
    n_permutations = check_int("n_permutations", n_permutations, 1)
    if exact is None:
        exact = n <= MAX_EXACT_SAMPLES and 2 ** n <= max(n_permutations, EXACT_PATTERNS)
    flips = all_sign_flips(n) if exact else random_sign_flips(n, n_permutations, torch_generator(seed))
    valid = torch.isfinite(flat)
    filled = torch.where(valid, flat, 0.0)
    count = valid.sum(0)
    safe_count = count.clamp(min=1).double()
    observed = filled.sum(0) / safe_count
    scale = filled.abs().sum(0) / safe_count
    gamma = TIE_EPS * torch.finfo(torch.float64).eps * torch.maximum(observed.abs(), scale)
    hits_greater = torch.zeros(flat.shape[1], dtype=torch.float64)
    hits_less = torch.zeros(flat.shape[1], dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, flat.shape[1]))
    with tqdm(total=flips.shape[0], desc="sign-flip test", disable=not progress, leave=False) as bar:
        for start in range(0, flips.shape[0], step):
            null = flips[start:start + step] @ filled / safe_count              # [chunk, C]
            hits_greater += (null >= observed - gamma).sum(0)
            hits_less += (null <= observed + gamma).sum(0)
            bar.update(null.shape[0])
    # the exact enumeration holds the identity; B random patterns add it: (1 + hits) / (1 + B)
    p_greater, p_less = (hits_greater / flips.shape[0], hits_less / flips.shape[0]) if exact else \
        ((1 + hits_greater) / (1 + flips.shape[0]), (1 + hits_less) / (1 + flips.shape[0]))
    missing = count == 0
    p = tail_p_value(p_less, p_greater, alternative).masked_fill(missing, float("nan"))
    observed = observed.masked_fill(missing, float("nan"))
    return SignFlipResult(statistic=observed.reshape(cell_shape), p_value=p.reshape(cell_shape),
                          n_samples=count.reshape(cell_shape), n_permutations=int(flips.shape[0]),
                          exact=bool(exact), alternative=alternative)


def paired_bootstrap_ci(
    x: Float[Tensor, "n ..."],
    *,
    n_resamples: int = defaults.N_BOOTSTRAP,
    confidence_level: float = defaults.CONFIDENCE_LEVEL,
    method: str = "bca",
    seed: Union[int, np.random.Generator, torch.Generator, None] = defaults.SEED,
) -> PairedBootstrapCI:
    """Two-sided bootstrap interval of each cell's mean over samples, every cell on the same resamples.

    Resamples are the index draws ``rng.integers(0, N, (R, N))`` of ``numpy.random.default_rng(seed)``, what
    ``scipy.stats.bootstrap((x,), np.mean, axis=0, rng=rng)`` draws, and the percentile and BCa formulas are
    scipy's (jackknife acceleration), so on data without NaN the intervals equal scipy's (tested). A cell's
    NaN samples are left out of each resample's mean (and of its jackknife); a degenerate cell (constant
    bootstrap distribution) has a NaN BCa interval, with a warning, as in scipy.

    >>> x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([0.0, 5.0])
    >>> ci = paired_bootstrap_ci(x, n_resamples=999)
    >>> bool(ci.low[1] < 5 < ci.high[1]), bool(ci.high[1] - ci.low[1] < 1.5)
    (True, True)
    """
    x = _as_float64(x)
    n, cell_shape = x.shape[0], x.shape[1:]
    if n < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 samples, got {n}")
    n_resamples = check_int("n_resamples", n_resamples, 1)
    confidence_level = check_open_unit("confidence_level", confidence_level)
    check_choice("method", method, CI_METHODS)
    flat = x.reshape(n, -1)
    valid = torch.isfinite(flat)
    filled = torch.where(valid, flat, 0.0)
    weights = valid.double()
    idx = torch.from_numpy(numpy_rng(seed).integers(0, n, (n_resamples, n)))
    counts = torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(idx.shape).double())
    with np.errstate(invalid="ignore", divide="ignore"):
        theta_b = ((counts @ filled) / (counts @ weights)).numpy().T          # [C, R]; 0/0 = NaN
        n_valid = weights.sum(0)
        total = filled.sum(0)
        theta_hat = (total / n_valid).numpy()
    scale = (filled.abs().sum(0) / n_valid).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        jack = ((total - filled) / (n_valid - 1)).numpy()  # leave out x_i: (S - x_i) / (n_c - 1), per cell   [N, C]
    low, high, se = interval_from_resamples(theta_b, theta_hat, scale, [(jack, weights.numpy())], method=method,
                                            confidence_level=confidence_level)   # sorts theta_b: NaN last
    ci = np.stack([low, high], -1)
    unresolved = ~np.all(np.isfinite(theta_b), axis=-1)  # some resample had no finite sample: no interval
    ci[unresolved] = np.nan
    se[unresolved] = np.nan
    degenerate = int(np.sum(~unresolved & ~np.all(np.isfinite(ci), axis=-1)))
    warn_degenerate(degenerate, method)

    def grid(values: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(cell_shape)

    return PairedBootstrapCI(low=grid(ci[:, 0]), high=grid(ci[:, 1]), standard_error=grid(se), method=method,
                             confidence_level=confidence_level, n_resamples=n_resamples)
