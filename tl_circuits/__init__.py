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
from tl_circuits.model import BLOCKS, ModelSpec, model_spec
from tl_circuits.plotting import plot_blocks, plot_heads
from tl_circuits.statistics import (
    BootstrapCI,
    InterferenceTestResult,
    bootstrap_ci,
    cluster_mass_correction,
    fdr_correction,
    maxstat_correction,
    permutation_test,
)
from tl_circuits.sweep import SweepResult, freeze_sweep

__version__ = "0.1.0"

__all__ = [
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
]
