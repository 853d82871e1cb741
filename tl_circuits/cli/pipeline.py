"""The whole analysis of two tasks on one model: what the ``tl-circuits`` report shows.

:func:`run_analysis` runs, on task A and task B:

1. **Freeze sweeps** — :mod:`tl_circuits.cli.freeze_stage`: :func:`tl_circuits.freeze_sweep` with
   ``per_sample=True`` over every head, QK, OV and BOTH circuits, on each task's batch. Metric: each sample's mean
   next-token cross-entropy over its counted predictions (``loss_mask``: the bundled tasks' *scored* positions, a
   prompt -> completion file's completion tokens, other files' every real token after the first), so the effect
   is the change of the loss on what the task is about, averaged over samples.
   ``effect = frozen loss − clean loss`` (positive: the head helps). Its paired test
   (:meth:`tl_circuits.SweepResult.test`, two-sided, with intervals and the QK × OV interaction) and the top QK
   heads' attention patterns, clean beside frozen.
2. **Interference** — per-sample gradients of the attention weights of A ∪ B, the *pooled* diagonal Fisher,
   and the pooled pairwise score matrix (:func:`tl_circuits.interference.engine.pooled_scores`), computed once. Its
   A × B block is the interference map: identical to :func:`tl_circuits.compute_interference` with
   ``fisher_source="pooled"`` and the tasks' ``loss_mask_a`` / ``loss_mask_b`` (tested), so the map and its
   statistics share one normaliser and one loss.
3. **Statistics** — two tests of different nulls, on the same scores:

   - *where the tasks conflict*: :func:`tl_circuits.conflict_test` of the A × B block (H0: E[A × B signed score]
     ≥ 0 per cell; signed variant only), with the Fisher-metric cosines (:func:`tl_circuits.stats.fisher_cosines`: the
     pair cosines and the joint-optimum diagnostic cos(ḡ_A, ḡ_B)), the bootstrap stability of the cell ranking and
     the leave-one-out sample drivers of each cell (:mod:`tl_circuits.stats.robustness`);
   - *where the tasks use a head differently*: :func:`tl_circuits.permutation_test` on the pooled matrix (task
     labels exchangeable; one-sided ``"less"`` for the signed variant, ``"greater"`` otherwise; screened, as the
     library's default), BH/BY q-values, max-stat and cluster-mass family-wise p-values, bootstrap (BCa) intervals
     of each cell's mean.

One loss throughout: each task's :attr:`TaskInput.loss_mask` (the bundled tasks' ``scored`` positions, a task
file's completion tokens) is the ``loss_mask`` of the sweep, of the per-sample gradients, and so of the map, the pooled
matrix and both tests; each sample's loss is its token mean over these counted predictions (docs/spec.md §2.1).
:attr:`Analysis.loss` (``settings["loss"]`` of the report) records what each task scored.

Every default is the library's (:mod:`tl_circuits.defaults`):

>>> config = AnalysisConfig()
>>> config.variant, config.interference.fisher_source, config.n_bootstrap, config.alternative, config.screen
('signed', 'pooled', 2000, 'less', True)
>>> config.permutations_for(576), AnalysisConfig(n_permutations=99).permutations_for(576)
(23040, 99)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.bundled.samples import duplicate_groups
from tl_circuits.cli.task_files import TaskInput
from tl_circuits.cli.freeze_stage import (  # noqa: F401 - CIRCUITS: the report's circuits
    CIRCUITS,
    SWEEPS,
    run_freeze_stage,
)
from tl_circuits.freezing.sweep import SweepResult
from tl_circuits.freezing.sweep_stats import SweepTestResult
from tl_circuits.interference.config import InterferenceConfig
from tl_circuits.interference.engine import pooled_scores
from tl_circuits.interference.result import InterferenceResult, PooledScores
from tl_circuits.models.spec import model_spec
from tl_circuits.stats.conflict import ConflictTestResult
from tl_circuits.stats.cosine import FisherCosines, fisher_cosines
from tl_circuits.stats.permutation import CORRECTIONS, InterferenceTestResult
from tl_circuits.stats.validation import count_cells
from tl_circuits.stats.robustness import CellDrivers, RankStability, cell_drivers, rank_stability
from tl_circuits.models.types import Model
from tl_circuits.parallel.group import World

REPLACEMENTS = ("zero", "mean", "resample")
TOP_K = 10
N_DRIVERS = 3  # samples per task named as a cell's drivers, and removed to test its dominance


def pooled_interference_config() -> InterferenceConfig:
    """The library's default :class:`InterferenceConfig` on the pooled Fisher (what the test needs)."""
    return InterferenceConfig(fisher_source="pooled")


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of :func:`run_analysis` (recorded in the report); defaults from :mod:`tl_circuits.defaults`.

    Attributes:
        interference: the map's and the test's :class:`tl_circuits.InterferenceConfig` (variant, memory budget,
            progress, ...). Its ``fisher_source`` must be ``"pooled"`` (``None`` is read as ``"pooled"``): the
            permutation null needs a label-free normaliser, and the map shares it.
        replacement: freeze replacement of the sweep, ``"zero"``, ``"mean"`` (mean over the task's own batch) or
            ``"resample"`` (each sample's corrupted twin, :attr:`TaskInput.corrupted`).
        sweep: ``"exact"`` (a forward per head), ``"attribution"`` (first-order estimates, the top 10% of each
            circuit verified exactly; docs/attribution.md) or ``"auto"`` (exact unless it would take more than a few
            minutes: :func:`tl_circuits.cli.freeze_stage.chosen_sweep`).
        n_permutations: label permutations; ``None`` (default): :func:`tl_circuits.defaults.default_n_permutations`
            of all (block, layer, head) cells at ``alpha``, so a single real effect can reach significance.
        screen: screen the permutation test's cells (as :func:`tl_circuits.permutation_test`'s ``screen``, its
            default): the command and the library run the same test for the same settings.
        n_bootstrap, alpha, correction: as :func:`tl_circuits.permutation_test`.
        top_k: rows in the report's top-heads and top-pairs tables.
        seed: permutations, bootstrap, the sweep and (through the caller) the bundled task samples.
        layers, heads: the cells swept, scored and tested (``None``: all; :mod:`tl_circuits.selection`): every
            grid keeps its shape, NaN elsewhere, and the test's family holds the selected cells only.
    """

    interference: InterferenceConfig = field(default_factory=pooled_interference_config)
    replacement: str = "zero"
    sweep: str = "auto"
    n_permutations: Optional[int] = None
    screen: bool = True
    n_bootstrap: int = defaults.N_BOOTSTRAP
    alpha: float = defaults.ALPHA
    correction: str = "bh"
    top_k: int = TOP_K
    seed: int = defaults.SEED
    layers: Optional[tuple[int, ...]] = None
    heads: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.interference, InterferenceConfig):
            raise TypeError(f"interference must be an InterferenceConfig, got {type(self.interference).__name__}")
        if self.interference.fisher_source not in (None, "pooled"):
            raise ValueError("the report's map and test share the pooled Fisher; got "
                             f"fisher_source={self.interference.fisher_source!r}")
        if self.interference.fisher_source is None:  # frozen: set once, here
            object.__setattr__(self, "interference", self.interference.replace(fisher_source="pooled"))
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")
        if self.sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {SWEEPS}, got {self.sweep!r}")
        if self.n_permutations is not None and self.n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1 or None, got {self.n_permutations}")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def variant(self) -> str:
        return self.interference.variant

    @property
    def progress(self) -> bool:
        """Progress bars of every stage (the interference config's setting)."""
        return self.interference.progress

    @property
    def alternative(self) -> str:
        """The direction of conflict: more negative (signed) or larger (unsigned, symmetric) than the null."""
        return defaults.conflict_alternative(self.variant)

    def permutations_for(self, n_cells: int) -> int:
        """The number of permutations used for ``n_cells`` tested cells (see ``n_permutations``)."""
        if self.n_permutations is not None:
            return self.n_permutations
        return defaults.default_n_permutations(n_cells, self.alpha)

    def to_dict(self, n_permutations_used: Optional[int] = None) -> dict[str, Any]:
        """Plain settings (JSON-ready); ``n_permutations`` is the number used where it is given."""
        n_permutations = n_permutations_used if n_permutations_used is not None else self.n_permutations
        return dict(variant=self.variant, replacement=self.replacement, sweep=self.sweep, n_permutations=n_permutations,
                    n_permutations_requested=self.n_permutations, screen=self.screen, n_bootstrap=self.n_bootstrap,
                    alpha=self.alpha,
                    correction=self.correction, alternative=self.alternative, top_k=self.top_k, seed=self.seed,
                    memory_budget_gb=self.interference.memory_budget_gb, interference=self.interference.to_dict(),
                    **({} if self.layers is None and self.heads is None else
                       {"selection": {"layers": None if self.layers is None else list(self.layers),
                                      "heads": None if self.heads is None else list(self.heads)}}))


@dataclass(frozen=True)
class CellEvidence:
    """What backs each (block, layer, head) cell of the map besides the permutation test.

    ``conflict`` and ``cosines`` are ``None`` for an unsigned variant (they are about the sign of the score).
    """

    conflict: Optional[ConflictTestResult]
    cosines: Optional[FisherCosines]
    ranking: RankStability
    drivers: CellDrivers


def cell_evidence(interference: InterferenceResult, pooled: dict[str, Tensor], n_a: int,
                  config: AnalysisConfig) -> CellEvidence:
    """The conflict test, cosines, rank stability (top ``config.top_k``) and drivers of the A × B map."""
    signed = config.variant == "signed"
    scores = interference.scores
    conflict = interference.conflict_test(alpha=config.alpha, correction=config.correction) if signed else None
    cosines = fisher_cosines(pooled, n_a) if signed else None
    ranking = rank_stability(scores, k=config.top_k, n_resamples=max(1, config.n_bootstrap), seed=config.seed,
                             order="lowest" if signed else "highest")
    return CellEvidence(conflict, cosines, ranking, cell_drivers(scores, top=N_DRIVERS))


@dataclass
class Analysis:
    """Everything the report is written from.

    ``timings``: wall seconds per stage (``load_s`` where the command loaded the model, ``sweep_a_s``,
    ``sweep_b_s``, ``interference_s``, ``statistics_s``) and ``total_s``, one clock over all of them.
    """

    model_info: dict[str, Any]
    task_a: TaskInput
    task_b: TaskInput
    sweeps: dict[str, SweepResult]
    interference: InterferenceResult
    statistics: InterferenceTestResult
    evidence: CellEvidence
    config: AnalysisConfig
    sweep_tests: dict[str, SweepTestResult] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib Figure (the pattern pictures)
    duplicates: dict[str, list[list[str]]] = field(default_factory=dict)  # "A", "B", "A+B" -> groups of sample ids
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> dict[str, TaskInput]:
        return {"a": self.task_a, "b": self.task_b}

    @property
    def loss(self) -> dict[str, Any]:
        """What each task's loss scored, ``{"a": ..., "b": ...}`` (the engine's ``settings["loss"]``: ``scored``,
        the counted predictions per sample); the sweeps scored the same (their ``settings["loss"]``)."""
        return dict(self.interference.settings.get("loss") or {})


def pooled_interference(model: Model, task_a: TaskInput, task_b: TaskInput, config: AnalysisConfig,
                        world: Optional[World] = None) -> tuple[InterferenceResult, PooledScores]:
    """(the A × B map, the pooled matrix): one gradient pass over A ∪ B, each task's loss on its ``loss_mask``."""
    device = next(model.parameters()).device
    icfg = config.interference
    # the one streaming engine: every gradient once, the pooled matrix tiled within the memory budget
    pooled = pooled_scores(model, task_a.tokens.to(device), task_b.tokens.to(device),
                           attention_mask_a=task_a.attention_mask.to(device),
                           attention_mask_b=task_b.attention_mask.to(device),
                           loss_mask_a=task_a.loss_mask.to(device), loss_mask_b=task_b.loss_mask.to(device),
                           layers=config.layers, heads=config.heads, config=icfg, world=world)
    return pooled.interference(list(task_a.ids), list(task_b.ids)), pooled


def pooled_statistics(pooled: PooledScores, config: AnalysisConfig,
                      world: Optional[World] = None) -> InterferenceTestResult:
    """The permutation test of the pooled matrix (n_permutations: :meth:`AnalysisConfig.permutations_for`); its
    ``loss`` records what each task scored."""
    n_cells = count_cells(pooled.scores)  # the family: the selected cells only
    return pooled.permutation_test(n_permutations=config.permutations_for(n_cells), screen=config.screen,
                                   alternative=config.alternative, alpha=config.alpha, correction=config.correction,
                                   seed=config.seed, n_bootstrap=config.n_bootstrap,
                                   memory_budget_gb=config.interference.memory_budget_gb, progress=config.progress,
                                   world=world)


def run_interference(model: Model, task_a: TaskInput, task_b: TaskInput, config: AnalysisConfig,
                     world: Optional[World] = None) -> tuple[InterferenceResult, InterferenceTestResult]:
    """The pooled pairwise matrix once; its A × B block as the map, all of it for the permutation test."""
    interference, pooled = pooled_interference(model, task_a, task_b, config, world)
    return interference, pooled_statistics(pooled, config, world)


def find_duplicates(task_a: TaskInput, task_b: TaskInput) -> dict[str, list[list[str]]]:
    """Groups of identical samples (padding ignored) within task A, within task B and shared by both ("A+B"),
    as sample ids; a warning names them, since every test treats samples as independent draws."""
    n_pos = max(task_a.tokens.shape[1], task_b.tokens.shape[1])

    def padded(x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, n_pos - x.shape[1]))

    tokens = torch.cat([padded(task_a.tokens), padded(task_b.tokens)])
    mask = torch.cat([padded(task_a.attention_mask), padded(task_b.attention_mask)])
    ids = [f"A:{i}" for i in task_a.ids] + [f"B:{j}" for j in task_b.ids]
    found: dict[str, list[list[str]]] = {"A": [], "B": [], "A+B": []}
    for group in duplicate_groups(tokens, mask):
        sides = {ids[i][0] for i in group}
        found["A+B" if len(sides) == 2 else sides.pop()].append([ids[i] for i in group])
    for where, groups in found.items():
        if groups:
            shown = "; ".join(", ".join(g) for g in groups[:3]) + (" ..." if len(groups) > 3 else "")
            what = "shared by task A and task B" if where == "A+B" else f"within task {where}"
            warnings.warn(f"{sum(len(g) for g in groups)} samples {what} are duplicates ({len(groups)} groups: "
                          f"{shown}); the tests treat every sample as an independent draw, so deduplicate the "
                          "task", UserWarning, stacklevel=2)
    return found


def run_analysis(model: Model, task_a: TaskInput, task_b: TaskInput, config: Optional[AnalysisConfig] = None,
                 model_info: Optional[dict] = None,
                 announce: Callable[[str], None] = lambda message: None, world: Optional[World] = None) -> Analysis:
    """Sweeps on both tasks, interference of A × B, and its statistics (module docstring), timed per stage.

    ``world``: the ranks every heavy stage is shared over (the command under torchrun passes its group's);
    ``None``: this process alone."""
    config = config if config is not None else AnalysisConfig()
    start = time.perf_counter()
    duplicates = find_duplicates(task_a, task_b)
    timings: dict[str, float] = {}
    sweeps, sweep_tests, figures = {}, {}, {}
    for key, task in (("a", task_a), ("b", task_b)):
        announce(f"freeze sweep on task {key.upper()} ({task.name}, {task.n_samples} samples)")
        stage = time.perf_counter()
        freeze = run_freeze_stage(model, task, config, world)
        sweeps[key], sweep_tests[key], figures[f"patterns_{key}.png"] = freeze.sweep, freeze.test, freeze.patterns
        timings[f"sweep_{key}_s"] = time.perf_counter() - stage
    announce(f"per-sample gradients, pooled Fisher, pairwise scores and permutation test "
             f"({task_a.n_samples} × {task_b.n_samples} samples)")
    stage = time.perf_counter()
    interference, pooled = pooled_interference(model, task_a, task_b, config, world)
    timings["interference_s"] = time.perf_counter() - stage
    stage = time.perf_counter()
    statistics = pooled_statistics(pooled, config, world)
    evidence = cell_evidence(interference, pooled.scores, pooled.n_a, config)
    timings["statistics_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - start
    info = {"d_vocab": model_spec(model).d_vocab, **(model_info or {})}  # the headlines' chance loss needs it
    return Analysis(info, task_a, task_b, sweeps, interference, statistics, evidence, config, sweep_tests, figures,
                    duplicates, timings)
