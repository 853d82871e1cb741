"""tl_circuits: QK/OV circuit freezing and QK-OV interference for TransformerLens models.

The public API, all importable from here; the specification of every quantity is docs/spec.md.

>>> import tl_circuits
>>> isinstance(tl_circuits.__version__, str)
True
"""

from tl_circuits._version import __version__
from tl_circuits.bundled.models import (
    DEFAULT_BUNDLED_MODEL,
    BundledModelInfo,
    bundled_model_info,
    bundled_tasks,
    head_detector_scores,
    list_bundled_models,
    load_bundled_model,
)
from tl_circuits.bundled.samples import distinct_batch, duplicate_groups, n_distinct_rows
from tl_circuits.bundled.tasks import (
    TaskBatch,
    counting_batch,
    in_context_accuracy,
    in_context_loss,
    induction_batch,
    random_batch,
    scored_loss,
    scored_loss_metric,
    skip_induction_batch,
    task_tokenizer,
)
from tl_circuits.checks import CheckOutcome, SanityCheckResult, sanity_check
from tl_circuits.freezing import (
    AttributionResult,
    Circuit,
    FreezeHandle,
    FreezeSpec,
    GradientMode,
    MeanActivations,
    MissedEffectBound,
    Replacement,
    SweepResult,
    SweepTestResult,
    attribution_sweep,
    compute_mean_activations,
    freeze,
    freeze_hooks,
    freeze_sweep,
    normalize_heads,
)
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference
from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.interference.fisher import (
    DiagonalFisher,
    EMAFisher,
    damped,
    fisher_from_gradients,
    leave_one_out,
    pooled,
)
from tl_circuits.interference.gradients import per_sample_gradients
from tl_circuits.interference.inputs import loss_mask_from_labels
from tl_circuits.interference.result import Conflict, InterferenceResult, PooledScores
from tl_circuits.interference.scoring import pairwise_scores
from tl_circuits.models.spec import BLOCKS, ModelSpec, model_spec
from tl_circuits.parallel import World, current_world, init_from_environment
from tl_circuits.plotting import plot_blocks, plot_heads
from tl_circuits.results_io import load
from tl_circuits.stats import (
    BootstrapCI,
    InterferenceTestResult,
    bootstrap_ci,
    cluster_mass_correction,
    fdr_correction,
    maxstat_correction,
    permutation_test,
)
from tl_circuits.stats.conflict import ConflictTestResult, conflict_test, interference_conflict_test
from tl_circuits.stats.cosine import FisherCosines, fisher_cosines
from tl_circuits.stats.interference_tests import interference_permutation_test, pooled_pairwise_scores
from tl_circuits.stats.paired import PairedBootstrapCI, SignFlipResult, paired_bootstrap_ci, sign_flip_test
from tl_circuits.stats.robustness import CellDrivers, RankStability, cell_drivers, rank_stability

__all__ = [
    "__version__",
    "BLOCKS",
    "DEFAULT_BUNDLED_MODEL",
    "attribution_sweep",
    "AttributionResult",
    "bootstrap_ci",
    "BootstrapCI",
    "bundled_model_info",
    "bundled_tasks",
    "BundledModelInfo",
    "cell_drivers",
    "CellDrivers",
    "CheckOutcome",
    "Circuit",
    "cluster_mass_correction",
    "compute_interference",
    "compute_mean_activations",
    "Conflict",
    "conflict_test",
    "ConflictTestResult",
    "counting_batch",
    "current_world",
    "damped",
    "DiagonalFisher",
    "distinct_batch",
    "duplicate_groups",
    "EMAFisher",
    "fdr_correction",
    "fisher_cosines",
    "fisher_from_gradients",
    "FisherCosines",
    "freeze",
    "freeze_hooks",
    "freeze_sweep",
    "FreezeHandle",
    "FreezeSpec",
    "GradientConfig",
    "GradientMode",
    "head_detector_scores",
    "in_context_accuracy",
    "in_context_loss",
    "init_from_environment",
    "induction_batch",
    "interference_conflict_test",
    "interference_permutation_test",
    "InterferenceConfig",
    "InterferenceResult",
    "InterferenceTestResult",
    "leave_one_out",
    "list_bundled_models",
    "load",
    "load_bundled_model",
    "loss_mask_from_labels",
    "maxstat_correction",
    "MeanActivations",
    "MissedEffectBound",
    "model_spec",
    "ModelSpec",
    "n_distinct_rows",
    "normalize_heads",
    "paired_bootstrap_ci",
    "PairedBootstrapCI",
    "pairwise_scores",
    "per_sample_gradients",
    "permutation_test",
    "PerSampleGradients",
    "PooledScores",
    "plot_blocks",
    "plot_heads",
    "pooled",
    "pooled_pairwise_scores",
    "random_batch",
    "rank_stability",
    "RankStability",
    "Replacement",
    "scored_loss",
    "scored_loss_metric",
    "sanity_check",
    "SanityCheckResult",
    "sign_flip_test",
    "SignFlipResult",
    "skip_induction_batch",
    "SweepResult",
    "SweepTestResult",
    "task_tokenizer",
    "TaskBatch",
    "World",
]
