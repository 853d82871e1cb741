"""QK/OV circuit freezing (docs/spec.md §1), by stage.

- :mod:`~tl_circuits.freezing.options`: circuits, replacements, gradient modes, heads, and their validation;
- :mod:`~tl_circuits.freezing.references`: the MEAN and RESAMPLE reference activations;
- :mod:`~tl_circuits.freezing.hooks`: the per-layer freeze hooks and :func:`freeze_hooks`;
- :mod:`~tl_circuits.freezing.api`: :func:`freeze` and its :class:`FreezeHandle`;
- :mod:`~tl_circuits.freezing.stacked`: the stacked, layer-restarting forward passes of one sweep draw;
- :mod:`~tl_circuits.freezing.sweep`: :func:`freeze_sweep`, every head in turn, and its :class:`SweepResult`
  (on disk: :mod:`~tl_circuits.freezing.sweep_io`);
- :mod:`~tl_circuits.freezing.sweep_stats`: :meth:`SweepResult.test`, intervals and paired tests of per-sample effects;
- :mod:`~tl_circuits.freezing.attribution`: :func:`attribution_sweep`, first-order estimates of every head's freeze
  effect (:mod:`~tl_circuits.freezing.first_order`), the top cells verified exactly and a bound on the rest
  (:mod:`~tl_circuits.freezing.attribution_checks`), in an :class:`AttributionResult`.
"""

from tl_circuits.freezing.api import FreezeHandle, freeze
from tl_circuits.freezing.attribution import attribution_sweep
from tl_circuits.freezing.attribution_result import AttributionResult, MissedEffectBound
from tl_circuits.freezing.hooks import Hook, LayerFreeze, build_freeze_hooks, freeze_generator, freeze_hooks
from tl_circuits.freezing.options import (
    NOISE_SCALE,
    Circuit,
    FreezeSpec,
    GradientMode,
    HeadsLike,
    Replacement,
    check_noise_scale,
    check_qk_freezable,
    check_replacement_fits,
    normalize_heads,
    parse_option,
    resolve_freeze_spec,
)
from tl_circuits.freezing.references import (
    MeanActivations,
    PreparedReference,
    ReferenceLike,
    ResampleReference,
    compute_mean_activations,
    prepare_reference,
    resample_reference,
)
from tl_circuits.freezing.sweep import (
    SWEEP_FORMAT,
    SWEEP_FORMAT_VERSION,
    Metric,
    PerSampleMetric,
    SweepResult,
    freeze_sweep,
    sweep_result_files,
)
from tl_circuits.freezing.sweep_stats import INTERACTION, SWEEP_NULL_HYPOTHESIS, SweepTestResult, sweep_test

__all__ = [
    "INTERACTION",
    "AttributionResult",
    "NOISE_SCALE",
    "SWEEP_FORMAT",
    "SWEEP_FORMAT_VERSION",
    "SWEEP_NULL_HYPOTHESIS",
    "Circuit",
    "FreezeHandle",
    "FreezeSpec",
    "GradientMode",
    "HeadsLike",
    "Hook",
    "LayerFreeze",
    "MeanActivations",
    "Metric",
    "MissedEffectBound",
    "PerSampleMetric",
    "PreparedReference",
    "ReferenceLike",
    "Replacement",
    "ResampleReference",
    "SweepResult",
    "SweepTestResult",
    "attribution_sweep",
    "build_freeze_hooks",
    "check_noise_scale",
    "check_qk_freezable",
    "check_replacement_fits",
    "compute_mean_activations",
    "freeze",
    "freeze_generator",
    "freeze_hooks",
    "freeze_sweep",
    "normalize_heads",
    "parse_option",
    "prepare_reference",
    "resample_reference",
    "resolve_freeze_spec",
    "sweep_result_files",
    "sweep_test",
]


def __getattr__(name: str) -> object:
    if name == "test_sweep":  # renamed sweep_test (pytest collected it); deprecated, warns when called
        from tl_circuits.freezing import sweep_stats

        return getattr(sweep_stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
