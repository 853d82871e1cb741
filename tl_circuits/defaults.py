"""Every default that more than one entry point shares, in one place and one unit.

The library's functions, its config dataclasses and the ``tl-circuits`` command all read these, so that
the same call gives the same numbers whichever way it is made (README, "Defaults").

- ``MEMORY_BUDGET_GB``: memory a heavy call may allocate beyond the model and the process itself, in GB
  (2**30 bytes) everywhere. 4 GB leaves room for a GPT-2-small-sized model and the interpreter on a
  16 GB laptop; what does not fit is streamed or spilled to disk, never recomputed.
  ``memory_budget_gb`` always means this, in every call that takes it (interference, the freeze sweep, the
  MEAN reference, the statistics).
- ``STATS_WORKSPACE_GB``: the largest scratch buffer of the statistics for one chunk of permutations or bootstrap
  resamples (``[chunk, N · cells]``), in GB, taken out of the call's ``memory_budget_gb``. Once a chunk is a large
  GEMM, bigger chunks buy nothing, while every fresh GB of buffer costs page faults. 0.25 GB is the 256 MiB the
  statistics always used (the benchmarked setting).
- ``VARIANT``: ``"signed"``, the diagonal-Fisher influence Σ g_i g_j / F̃ (negative = conflict). It is the
  quantity the statistics test and the one kronfluence computes; ``"unsigned"`` (the original design's
  formula) is kept as an explicit choice. :func:`conflict_alternative` is the tail of the label-permutation test
  that points towards conflict for a variant (its default ``alternative``).
- ``NORMALIZATION``: ``"diagonal"``, the Fisher normaliser of every parameter on its own (docs/spec.md §3.4);
  ``"head"`` and ``"hybrid"`` are explicit choices.
- ``N_BOOTSTRAP``: bootstrap resamples for intervals. 2000 keeps the BCa end points' Monte-Carlo error
  small at a 95% level while costing about a second on a 576-cell grid.
- ``ALPHA``, ``CONFIDENCE_LEVEL``, ``SEED``: the test level, interval level and the seed of every random
  draw (permutations, bootstrap, NOISE freezes).
- ``MIN_PERMUTATIONS``: the fewest random permutations; the default is raised to ``2·m/α`` for an
  ``m``-cell family so that Benjamini–Hochberg can flag a single cell (``1/(1+P) ≤ α/m``), see
  :func:`default_n_permutations`.
"""

from __future__ import annotations

import math

GB = 2**30
MEMORY_BUDGET_GB = 4.0
STATS_WORKSPACE_GB = 0.25
VARIANT = "signed"
REDUCTION = "sum"
NORMALIZATION = "diagonal"
N_BOOTSTRAP = 2000
ALPHA = 0.05
CONFIDENCE_LEVEL = 0.95
SEED = 0
MIN_PERMUTATIONS = 1000
SCREEN_PERMUTATIONS = 1000
"""With the default number of permutations, every cell is tested on this many first; only cells whose screen
p-value is <= SCREEN_MARGIN * alpha get the rest (:func:`tl_circuits.permutation_test`)."""
SCREEN_MARGIN = 2.0
"""A cell the full test flags at alpha is stopped by the screen only if >= 2·alpha·1001 − 1 of its hits fall in the
first 1000 relabelings: a hypergeometric tail below 1e-10 for the default counts (docs/spec.md §4.3)."""


def default_n_permutations(n_cells: int, alpha: float = ALPHA) -> int:
    """Permutations that let BH flag one cell of ``n_cells`` at level ``alpha``: ``max(1000, ⌈2m/α⌉)``.

    >>> default_n_permutations(576)
    23040
    >>> default_n_permutations(4)
    1000
    """
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return max(MIN_PERMUTATIONS, math.ceil(2 * n_cells / alpha))


def conflict_alternative(variant: str = VARIANT) -> str:
    """The label-permutation test's default alternative: the direction of conflict for ``variant``.

    ``"less"`` for signed scores (negative = conflict: cross-task scores lower than a random split gives), and
    ``"greater"`` for unsigned and symmetric ones (more interference than exchangeable labels predict).

    >>> conflict_alternative("signed"), conflict_alternative("unsigned")
    ('less', 'greater')
    """
    if variant not in ("signed", "unsigned", "symmetric"):
        raise ValueError(f"unknown variant {variant!r}; expected 'signed', 'unsigned' or 'symmetric'")
    return "less" if variant == "signed" else "greater"
