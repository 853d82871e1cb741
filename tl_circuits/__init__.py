"""tl_circuits: QK/OV circuit freezing and QK-OV interference for TransformerLens models."""

from tl_circuits.freezing import (
    Circuit,
    FreezeHandle,
    FreezeSpec,
    GradientMode,
    MeanActivations,
    Replacement,
    compute_mean_activations,
    freeze,
    freeze_hooks,
    normalize_heads,
)
from tl_circuits.interference.fisher import DiagonalFisher, EMAFisher, damped, fisher_from_gradients, leave_one_out, pooled
from tl_circuits.interference.config import GradientConfig
from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.interference.gradients import per_sample_gradients
from tl_circuits.interference.config import InterferenceConfig
from tl_circuits.interference.engine import compute_interference
from tl_circuits.interference.result import Conflict, InterferenceResult
from tl_circuits.interference.scoring import pairwise_scores
from tl_circuits.models.spec import BLOCKS, ModelSpec, model_spec
from tl_circuits.plotting import plot_blocks, plot_heads
from tl_circuits.stats.model_test import interference_permutation_test, pooled_pairwise_scores
from tl_circuits.stats import (
    BootstrapCI,
    InterferenceTestResult,
    bootstrap_ci,
    cluster_mass_correction,
    fdr_correction,
    maxstat_correction,
    permutation_test,
)
from tl_circuits.freezing.sweep import SweepResult, freeze_sweep
from tl_circuits.bundled.tasks import (
    TaskBatch,
    counting_batch,
    in_context_accuracy,
    in_context_loss,
    induction_batch,
    random_batch,
    scored_loss,
    scored_loss_metric,
    task_tokenizer,
)
from tl_circuits.bundled.models import (
    DEFAULT_BUNDLED_MODEL,
    BundledModelInfo,
    bundled_model_info,
    bundled_tasks,
    head_detector_scores,
    list_bundled_models,
    load_bundled_model,
)

__version__ = "0.1.0"

__all__ = [
    "interference_permutation_test",
    "pooled_pairwise_scores",
    "Conflict",
    "DiagonalFisher",
    "EMAFisher",
    "GradientConfig",
    "InterferenceConfig",
    "InterferenceResult",
    "PerSampleGradients",
    "compute_interference",
    "damped",
    "fisher_from_gradients",
    "leave_one_out",
    "pairwise_scores",
    "per_sample_gradients",
    "pooled",
    "BootstrapCI",
    "InterferenceTestResult",
    "bootstrap_ci",
    "cluster_mass_correction",
    "fdr_correction",
    "maxstat_correction",
    "permutation_test",
    "BLOCKS",
    "Circuit",
    "FreezeHandle",
    "FreezeSpec",
    "GradientMode",
    "MeanActivations",
    "ModelSpec",
    "Replacement",
    "SweepResult",
    "compute_mean_activations",
    "freeze",
    "freeze_hooks",
    "freeze_sweep",
    "model_spec",
    "normalize_heads",
    "plot_blocks",
    "plot_heads",
    "TaskBatch",
    "counting_batch",
    "in_context_accuracy",
    "in_context_loss",
    "induction_batch",
    "random_batch",
    "scored_loss",
    "scored_loss_metric",
    "task_tokenizer",
    "DEFAULT_BUNDLED_MODEL",
    "BundledModelInfo",
    "bundled_model_info",
    "bundled_tasks",
    "head_detector_scores",
    "list_bundled_models",
    "load_bundled_model",
]
