"""tl_circuits: QK/OV circuit freezing and QK-OV interference for TransformerLens models.

The front door: freezing (:func:`freeze`, :func:`freeze_sweep` and its test), interference
(:func:`compute_interference`, :func:`per_sample_gradients`, the pooled matrix), the tests
(:func:`permutation_test`, :func:`conflict_test` and their from-a-model forms), their configs and results,
:func:`load` for every saved result, :func:`sanity_check`, and :func:`load_bundled_model`. Everything else lives in
the subpackages named for their stage: :mod:`tl_circuits.bundled` (models and tasks with known circuits),
:mod:`tl_circuits.freezing`, :mod:`tl_circuits.interference`, :mod:`tl_circuits.stats`, :mod:`tl_circuits.models`,
:mod:`tl_circuits.distributed`, :mod:`tl_circuits.plotting`, :mod:`tl_circuits.checks`, :mod:`tl_circuits.testing`.
The specification of every quantity is docs/spec.md.

>>> import tl_circuits
>>> isinstance(tl_circuits.__version__, str), len(tl_circuits.__all__) - 1  # less __version__
(True, 28)
"""

import importlib
from typing import Any

# the subpackages, so that ``tl_circuits.stats.fdr_correction`` works after ``import tl_circuits``
from tl_circuits import bundled, checks, distributed, freezing, interference, models, plotting, stats  # noqa: F401
from tl_circuits._version import __version__
from tl_circuits.bundled.models import load_bundled_model
from tl_circuits.checks import SanityCheckResult, sanity_check
from tl_circuits.deprecation import warn_deprecated
from tl_circuits.freezing import (
    AttributionResult,
    Circuit,
    GradientMode,
    MeanActivations,
    Replacement,
    SweepResult,
    SweepTestResult,
    attribution_sweep,
    compute_mean_activations,
    freeze,
    freeze_sweep,
)
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference
from tl_circuits.interference.gradients import per_sample_gradients
from tl_circuits.interference.inputs import loss_mask_from_labels
from tl_circuits.interference.result import InterferenceResult, PooledScores
from tl_circuits.results_io import load
from tl_circuits.stats import InterferenceTestResult, permutation_test
from tl_circuits.stats.conflict import ConflictTestResult, conflict_test, interference_conflict_test
from tl_circuits.stats.interference_tests import interference_permutation_test

__all__ = [
    "__version__",
    # freezing
    "Circuit", "Replacement", "GradientMode", "freeze", "freeze_sweep", "SweepResult", "SweepTestResult",
    "compute_mean_activations", "MeanActivations", "attribution_sweep", "AttributionResult",
    # interference
    "compute_interference", "per_sample_gradients", "loss_mask_from_labels", "GradientConfig", "InterferenceConfig",
    "InterferenceResult", "PooledScores",
    # tests
    "permutation_test", "interference_permutation_test", "InterferenceTestResult", "conflict_test",
    "interference_conflict_test", "ConflictTestResult",
    # everything saved, a model's check, the bundled models
    "load", "sanity_check", "SanityCheckResult", "load_bundled_model",
]

MOVED = {
    "BLOCKS": "models",
    "bootstrap_ci": "stats",
    "BootstrapCI": "stats",
    "bundled_model_info": "bundled",
    "bundled_tasks": "bundled",
    "BundledModelInfo": "bundled",
    "cell_drivers": "stats",
    "CellDrivers": "stats",
    "CheckOutcome": "checks",
    "cluster_mass_correction": "stats",
    "Conflict": "interference",
    "counting_batch": "bundled",
    "current_world": "distributed",
    "damped": "interference",
    "DEFAULT_BUNDLED_MODEL": "bundled",
    "DiagonalFisher": "interference",
    "distinct_batch": "bundled",
    "duplicate_groups": "bundled",
    "EMAFisher": "interference",
    "fdr_correction": "stats",
    "fisher_cosines": "stats",
    "fisher_from_gradients": "interference",
    "FisherCosines": "stats",
    "freeze_hooks": "freezing",
    "FreezeHandle": "freezing",
    "FreezeSpec": "freezing",
    "head_detector_scores": "bundled",
    "in_context_accuracy": "bundled",
    "in_context_loss": "bundled",
    "induction_batch": "bundled",
    "init_from_environment": "distributed",
    "leave_one_out": "interference",
    "list_bundled_models": "bundled",
    "maxstat_correction": "stats",
    "model_spec": "models",
    "ModelSpec": "models",
    "n_distinct_rows": "bundled",
    "normalize_heads": "freezing",
    "paired_bootstrap_ci": "stats",
    "PairedBootstrapCI": "stats",
    "pairwise_scores": "interference",
    "PerSampleGradients": "interference",
    "plot_blocks": "plotting",
    "plot_heads": "plotting",
    "pooled": "interference",
    "pooled_pairwise_scores": "stats",
    "random_batch": "bundled",
    "rank_stability": "stats",
    "RankStability": "stats",
    "scored_loss": "bundled",
    "scored_loss_metric": "bundled",
    "sign_flip_test": "stats",
    "SignFlipResult": "stats",
    "skip_induction_batch": "bundled",
    "task_tokenizer": "bundled",
    "TaskBatch": "bundled",
    "World": "distributed",
}
"""Names that were importable from ``tl_circuits`` before 0.x and now live in a subpackage: they still work for
one minor version, with a :class:`~tl_circuits.deprecation.TLCircuitsDeprecationWarning` naming the new home."""


def __getattr__(name: str) -> Any:
    if name in MOVED:
        home = f"tl_circuits.{MOVED[name]}"
        warn_deprecated(f"tl_circuits.{name} is deprecated; use {home}.{name} (the top level keeps the front door "
                        "only)", stacklevel=2)
        return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module 'tl_circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

