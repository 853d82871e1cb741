"""QK-OV interference: per-sample gradients -> diagonal Fisher -> pairwise scores, within a memory budget.

The front door is :func:`tl_circuits.compute_interference`; here are the stages and their pieces (docs/spec.md §2-§3).
"""

from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference, pooled_scores
from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.interference.fisher import (
    DiagonalFisher,
    EMAFisher,
    damped,
    fisher_from_gradients,
    leave_one_out,
    pooled,
)
from tl_circuits.interference.gradients import iter_per_sample_gradients, per_sample_gradients
from tl_circuits.interference.inputs import loss_mask_from_labels
from tl_circuits.interference.result import Conflict, InterferenceResult, PooledScores
from tl_circuits.interference.scoring import pairwise_scores

__all__ = [
    "Conflict", "DiagonalFisher", "EMAFisher", "GradientConfig", "InterferenceConfig", "InterferenceResult",
    "PerSampleGradients", "PooledScores", "compute_interference", "damped", "fisher_from_gradients",
    "iter_per_sample_gradients", "leave_one_out", "loss_mask_from_labels", "pairwise_scores", "per_sample_gradients",
    "pooled", "pooled_scores",
]
