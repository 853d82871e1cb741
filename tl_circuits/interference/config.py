"""Settings of the interference stages, as frozen dataclasses that compose.

:class:`GradientConfig` says how per-sample gradients are taken (and is all that
:func:`tl_circuits.per_sample_gradients` needs); :class:`InterferenceConfig` holds one ``GradientConfig``
and adds what the Fisher and the scores are. The memory budget of a whole interference run, and whether
it shows progress, are the ``GradientConfig``'s: one budget, in GB (:mod:`tl_circuits.defaults`).

>>> cfg = InterferenceConfig(gradients=GradientConfig(memory_budget_gb=1.0), fisher_source="pooled")
>>> cfg.variant, cfg.memory_budget_gb, cfg.resolved().fisher_source
('signed', 1.0, 'pooled')
>>> cfg.replace(variant="unsigned").variant
'unsigned'
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar

from tl_circuits import defaults
from tl_circuits.deprecation import warn_deprecated

T = TypeVar("T")

Method = Literal["factored", "direct"]
Variant = Literal["unsigned", "signed", "symmetric"]
Reduction = Literal["sum", "mean"]
FisherSource = Literal["a", "b", "pooled"]
Normalization = Literal["diagonal", "head", "hybrid"]
METHODS = ("factored", "direct")
VARIANTS = ("unsigned", "signed", "symmetric")
REDUCTIONS = ("sum", "mean")
FISHER_SOURCES = ("a", "b", "pooled")
NORMALIZATIONS = ("diagonal", "head", "hybrid")

DAMPING_ABS = 1e-30
DAMPING_REL = 1e-3


@dataclass(frozen=True)
class GradientConfig:
    """How per-sample gradients are taken.

    Attributes:
        include_biases: also take gradients of ``b_Q``, ``b_K``, ``b_V`` (appended to each head's row);
            ``b_O`` is never included (it is not per head).
        memory_budget_gb: memory the call may allocate (gradients or factors held, workspace, scores),
            not counting the model and the process itself. In an :class:`InterferenceConfig` it is the
            budget of the whole run.
        chunk_size: samples per forward/backward pass; ``None`` derives it from the budget.
        progress: tqdm progress bars.
        method: ``"factored"`` (default: one batched backward per chunk, exact per-sample factors) or
            ``"direct"`` (``functional_call`` + ``vmap(grad)``, HookedTransformer only), see
            :mod:`tl_circuits.interference.gradients`.
    """

    include_biases: bool = False
    memory_budget_gb: float = defaults.MEMORY_BUDGET_GB
    chunk_size: Optional[int] = None
    progress: bool = True
    method: Method = "factored"

    def __post_init__(self) -> None:
        if not self.memory_budget_gb > 0:
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")

    def replace(self, **changes: Any) -> "GradientConfig":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def with_progress(self, progress: Optional[bool]) -> "GradientConfig":
        """This config with ``progress`` set; itself for ``None`` (a call's ``progress=`` keyword, when given,
        wins over its config's)."""
        if progress is None or progress == self.progress:
            return self
        return dataclasses.replace(self, progress=bool(progress))


# Fields that InterferenceConfig took itself before it held a GradientConfig; still accepted (deprecated).
LEGACY_GRADIENT_FIELDS = ("include_biases", "memory_budget_gb", "chunk_size", "progress")


def accept_flat_gradient_keywords(cls: type[T]) -> type[T]:
    """The one shim for the deprecated flat keywords (``InterferenceConfig(progress=False)``): they are moved into
    ``gradients`` with a :class:`~tl_circuits.deprecation.TLCircuitsDeprecationWarning`; the dataclass's own
    ``__init__`` does the rest. Dropped in the next minor version."""
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        flat = {name: kwargs.pop(name) for name in LEGACY_GRADIENT_FIELDS if name in kwargs}
        if flat:
            warn_deprecated(f"{cls.__name__}({', '.join(sorted(flat))}=...) is deprecated; pass "
                            "gradients=GradientConfig(...), or progress= to the call", stacklevel=3)
            gradients = kwargs.get("gradients") or GradientConfig()
            kwargs["gradients"] = dataclasses.replace(gradients, **flat)
        dataclass_init(self, *args, **kwargs)

    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@accept_flat_gradient_keywords
@dataclass(frozen=True)
class InterferenceConfig:
    """Settings of :func:`tl_circuits.compute_interference` and the pooled matrix of the tests.

    Attributes:
        gradients: the :class:`GradientConfig` (biases, chunking, the run's memory budget, progress).
        variant: ``"signed"`` (default; Σ g_i g_j / F̃, negative = conflict), ``"unsigned"`` (the original
            design's Σ C_i/F̃ · |g_j|) or ``"symmetric"`` (½(M_ij + M_ji) on the pooled Fisher).
        reduction: ``"sum"`` over a head's slice (default) or ``"mean"``.
        fisher_source: whose Fisher normalises: ``"a"``, ``"b"`` or ``"pooled"`` (A ∪ B). ``None``
            (default) means ``"a"`` (the original's choice), and ``"pooled"`` for the symmetric variant,
            which accepts nothing else.
        leave_one_out: remove each numerator sample from its own normaliser.
        damping_abs, damping_rel: ``λ = max(λ_abs, λ_rel · mean(F over the head's slice))``.
        max_held_samples: optional cap on the samples whose gradient factors are held in memory at once
            (the rest is spilled to disk); ``None``: as many as the budget allows.
        spill_dir: folder for the temporary spill file (a fresh sub-folder, removed on every exit path);
            ``None``: the system's temporary folder.
        checkpoint_dir: keep every finished shard of gradient factors here, and skip the shards already there
            when a run with the same model, tasks and gradient settings is started again (resume;
            :mod:`tl_circuits.interference.checkpoint`). ``None`` (default): nothing is kept.
        normalization: the Fisher normaliser of a score (docs/spec.md §3.4): ``"diagonal"`` (default; each
            parameter's own damped Fisher, the seeds' "behavioral"), ``"head"`` (one damped mean Fisher per
            (block, layer, head) slice: Fisher-scaled dot products, the seeds' "structural") or ``"hybrid"``
            (their geometric mean per parameter).

    The ``GradientConfig``'s fields are readable here as properties (``config.progress``, ...). The old flat
    keywords ``InterferenceConfig(include_biases=..., memory_budget_gb=..., chunk_size=..., progress=...)`` still
    work for this minor version, with a deprecation warning (:func:`accept_flat_gradient_keywords`).
    """

    gradients: GradientConfig = field(default_factory=GradientConfig)
    variant: str = defaults.VARIANT          # one of VARIANTS (checked; a str, so a value read from a file fits)
    reduction: str = defaults.REDUCTION      # one of REDUCTIONS
    fisher_source: Optional[str] = None
    leave_one_out: bool = False
    damping_abs: float = DAMPING_ABS
    damping_rel: float = DAMPING_REL
    max_held_samples: Optional[int] = None
    spill_dir: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    normalization: str = defaults.NORMALIZATION  # one of NORMALIZATIONS (checked)

    def __post_init__(self) -> None:
        if not isinstance(self.gradients, GradientConfig):
            raise TypeError(f"gradients must be a GradientConfig, got {type(self.gradients).__name__}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):  # e.g. a Path
            object.__setattr__(self, "checkpoint_dir", str(self.checkpoint_dir))
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; expected one of {REDUCTIONS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected one of {NORMALIZATIONS}")
        if self.fisher_source is not None and self.fisher_source not in (*FISHER_SOURCES, "external"):
            raise ValueError(f"unknown fisher_source {self.fisher_source!r}; expected one of {FISHER_SOURCES}")
        if self.damping_abs < 0 or self.damping_rel < 0:
            raise ValueError(f"damping must be non-negative, got damping_abs={self.damping_abs}, "
                             f"damping_rel={self.damping_rel}")
        if self.max_held_samples is not None and self.max_held_samples < 1:
            raise ValueError(f"max_held_samples must be >= 1 or None, got {self.max_held_samples}")

    # the GradientConfig's fields, readable here (the budget and progress are the whole run's)
    @property
    def include_biases(self) -> bool:
        return self.gradients.include_biases

    @property
    def memory_budget_gb(self) -> float:
        return self.gradients.memory_budget_gb

    @property
    def chunk_size(self) -> Optional[int]:
        return self.gradients.chunk_size

    @property
    def progress(self) -> bool:
        return self.gradients.progress

    def replace(self, **changes: Any) -> "InterferenceConfig":
        """A copy with some fields changed (``dataclasses.replace``; the flat gradient keywords, deprecated, change
        ``gradients``)."""
        return dataclasses.replace(self, **changes)

    def with_progress(self, progress: Optional[bool]) -> "InterferenceConfig":
        """This config with ``gradients.progress`` set to ``progress``; itself for ``None`` (the rule of every call
        that takes both a config and ``progress=``: the keyword, when given, wins)."""
        gradients = self.gradients.with_progress(progress)
        return self if gradients is self.gradients else dataclasses.replace(self, gradients=gradients)

    def resolved(self, external_fisher: bool = False) -> "InterferenceConfig":
        """Validate and fill ``fisher_source`` (``"external"`` for a given Fisher); ValueError naming a bad setting."""
        source = self.fisher_source
        if source == "external":
            source = None
        if self.variant == "symmetric":
            if source not in (None, "pooled"):
                raise ValueError(f"the symmetric variant uses the pooled Fisher; got fisher_source={source!r}")
            source = "pooled"
        source = source or "a"
        if self.leave_one_out and source == "b":
            raise ValueError("leave_one_out removes task-A samples from the Fisher that normalises them; "
                             "it needs fisher_source 'a' or 'pooled', not 'b'")
        if self.leave_one_out and external_fisher:
            raise ValueError("leave_one_out needs the Fisher estimated here from the tasks' samples, "
                             "not an externally given one")
        return self.replace(fisher_source="external" if external_fisher else source)

    def to_dict(self) -> dict:
        """Plain settings (JSON-ready), the gradient settings nested."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["gradients"] = dataclasses.asdict(self.gradients)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "InterferenceConfig":
        data = dict(data)
        data["gradients"] = GradientConfig(**data.get("gradients", {}))
        return cls(**data)
