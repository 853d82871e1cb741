"""The ``tl-circuits`` command's options: :class:`CommandOptions` (what one run asks for, and the
:class:`~tl_circuits.cli.pipeline.AnalysisConfig` it gives), the argument parser and its checks of each value.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


from tl_circuits import defaults
from tl_circuits.cli.pipeline import REPLACEMENTS, SWEEPS, TOP_K, AnalysisConfig
from tl_circuits.cli.loading import (  # noqa: F401  (CommandError, load_model: this module's public names too)
    DEFAULT_SAMPLES,
    CommandError,
    check_replacement_inputs,
    list_models_text,
    load_model,
    load_tasks,
)
from tl_circuits.cli.output import FILES
from tl_circuits.cli.prompt_completion import RecordFields
from tl_circuits.cli.task_files import FORMATS as TASK_FORMATS
from tl_circuits.interference.config import NORMALIZATIONS, VARIANTS, GradientConfig, InterferenceConfig
from tl_circuits.selection import parse_indices
from tl_circuits.models.hf_directory import DTYPES
from tl_circuits.parallel.group import (
    DEFAULT_TIMEOUT_S,
)

PROG = "tl-circuits"
DEFAULT_OUT = "tl_circuits_report"
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class CommandOptions:
    """The parsed command line."""

    model: Optional[str]
    task_a: Optional[Path]
    task_b: Optional[Path]
    task_format: str
    n_a: Optional[int]
    n_b: Optional[int]
    n_permutations: Optional[int]
    n_bootstrap: int
    variant: str
    replacement: str
    alpha: float
    top_k: int
    memory_budget_gb: float
    device: Optional[str]
    seed: int
    out: Path
    quiet: bool
    list_models: bool
    traceback: bool
    bridge: bool = False
    dist_timeout: float = DEFAULT_TIMEOUT_S
    sweep: str = "auto"
    normalization: str = defaults.NORMALIZATION
    check: bool = False
    layers: Optional[tuple[int, ...]] = None
    heads: Optional[tuple[int, ...]] = None
    dtype: str = "float32"
    prompt_field: str = "prompt"
    completion_field: str = "completion"

    def record_fields(self) -> RecordFields:
        """The field names of prompt -> completion task records."""
        return RecordFields(prompt=self.prompt_field, completion=self.completion_field)

    def analysis_config(self) -> AnalysisConfig:
        """The :class:`AnalysisConfig` these options ask for (unset ones: the library's defaults)."""
        gradients = GradientConfig(memory_budget_gb=self.memory_budget_gb, progress=not self.quiet)
        return AnalysisConfig(interference=InterferenceConfig(gradients=gradients, variant=self.variant,
                                                              fisher_source="pooled",
                                                              normalization=self.normalization),
                              replacement=self.replacement, sweep=self.sweep, n_permutations=self.n_permutations,
                              n_bootstrap=self.n_bootstrap, alpha=self.alpha, top_k=self.top_k, seed=self.seed,
                              layers=self.layers, heads=self.heads)


# ----- the command line ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        """One line, not argparse's usage block."""
        self.exit(EXIT_BAD_INPUT, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _indices(text: str) -> tuple[int, ...]:
    try:
        return parse_indices(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``tl-circuits`` argument parser; its defaults are :mod:`tl_circuits.defaults`'."""
    parser = _Parser(
        prog=PROG,
        description="QK/OV freeze sweep, QK-OV interference between two tasks and its statistics, "
                    "written as a report folder (PNG heatmaps, CSV/JSON numbers, report.md). "
                    "With no arguments: the bundled default model and its two bundled tasks.",
        epilog="report files: " + ", ".join(FILES) + ". Exit status: 0 success, 2 bad input, 1 other failure.",
    )
    add = parser.add_argument
    add("--model", help="bundled model name (see --list-models), a local Hugging Face model directory "
                        "(save_pretrained: config.json, weights, tokenizer; loaded offline), a tl_circuits "
                        "checkpoint directory (config.json + model.safetensors or model.pt, optional tokenizer/), "
                        "or an official TransformerLens model name (downloaded; needs the hub). Default: the "
                        "bundled default model")
    add("--dtype", choices=tuple(DTYPES), default="float32",
        help="dtype of the model's parameters (default float32); gradients, Fisher and scores accumulate in "
             "float32 or better")
    add("--task-a", type=Path, help="task A: prompt -> completion records (.jsonl, .csv, .parquet or a datasets "
                                    "save_to_disk directory; only the completion's tokens are scored), text (one "
                                    "sample per line, needs a tokenizer), token ids (.tokens/.ids: "
                                    "whitespace-separated ids per line) or a .pt/.npy [n, pos] array (every token "
                                    "scored). Default: the bundled model's first task")
    add("--task-b", type=Path, help="task B, as --task-a. Default: the bundled model's second task")
    add("--task-format", choices=TASK_FORMATS, default="auto",
        help="how to read task files: by suffix (default), or force a format")
    add("--prompt-field", default="prompt", help="the prompt field of task records (default prompt)")
    add("--completion-field", default="completion",
        help="the completion field of task records, the tokens that are scored (default completion)")
    add("--n-a", type=_positive_int, help=f"task A samples (bundled tasks: default {DEFAULT_SAMPLES}; "
                                          "files: the first N, default all)")
    add("--n-b", type=_positive_int, help="task B samples, as --n-a")
    add("--n-permutations", type=_positive_int,
        help=f"task-label permutations of the test (default: max({defaults.MIN_PERMUTATIONS}, "
             "2 x tested cells / alpha))")
    add("--n-bootstrap", type=_non_negative_int, default=defaults.N_BOOTSTRAP,
        help=f"bootstrap resamples for the intervals (0: none; default {defaults.N_BOOTSTRAP})")
    add("--variant", choices=VARIANTS, default=defaults.VARIANT,
        help=f"interference variant (default {defaults.VARIANT}; signed: negative = conflicting gradients)")
    add("--normalization", choices=NORMALIZATIONS, default=defaults.NORMALIZATION,
        help=f"Fisher normaliser of the scores (docs/spec.md §3.4; default {defaults.NORMALIZATION}): diagonal (each "
             "parameter's own), head (one per head: Fisher-scaled dot products) or hybrid (their geometric mean)")
    add("--layers", type=_indices, help="layers swept, scored and tested, e.g. 10-11 or 0,3-5 (default all); the "
                                        "rest of every grid is NaN and the test's family holds the selected cells")
    add("--heads", type=_indices, help="(query) heads, as --layers (default all; under GQA K/V keep the KV heads the "
                                       "selected heads read)")
    add("--replacement", choices=REPLACEMENTS, default="zero",
        help="what a frozen circuit is replaced with (default zero; mean: the task's mean; resample: each "
             "sample's corrupted twin, corrupted_prompt + completion, from the task records)")
    add("--sweep", choices=SWEEPS, default="auto",
        help="freeze sweep: exact (a forward per head), attribution (first-order estimates, the top 10%% of each "
             "circuit verified exactly; see docs/attribution.md) or auto (default: exact unless it would take more "
             "than a few minutes)")
    add("--alpha", type=_unit_interval, default=defaults.ALPHA,
        help=f"significance level of the BH q-values (default {defaults.ALPHA})")
    add("--top-k", type=_positive_int, default=TOP_K, help=f"rows in the top-heads and top-pairs tables "
                                                           f"(default {TOP_K})")
    # --memory-gb: the option's earlier name, still accepted
    add("--memory-budget-gb", "--memory-gb", dest="memory_budget_gb", type=_positive_float,
        default=defaults.MEMORY_BUDGET_GB,
        help="memory budget in GB of the per-sample gradients and scores, beyond the model "
             f"(default {defaults.MEMORY_BUDGET_GB:g})")
    add("--device", help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    add("--seed", type=int, default=defaults.SEED,
        help=f"seed of the bundled task samples (task B: seed + 1), permutations and bootstrap "
             f"(default {defaults.SEED})")
    add("--out", type=Path, default=Path(DEFAULT_OUT), help=f"report folder (default {DEFAULT_OUT}; an existing "
                                                            "one is replaced only if it holds an earlier report)")
    add("--quiet", action="store_true", help="no progress bars or stage messages")
    add("--bridge", action="store_true",
        help="load the model as a TransformerLens TransformerBridge (bundled models and checkpoints: a native "
             "bridge with the same weights; Hugging Face directories and pretrained names: "
             "TransformerBridge.boot_transformers). Always on "
             "with TransformerLens 4.x, which has no HookedTransformer")
    add("--dist-timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
        help="under torchrun: seconds a rank waits for the others in a collective before the run fails "
             f"(default {DEFAULT_TIMEOUT_S:g})")
    add("--check", action="store_true",
        help="check that tl_circuits reads --model the way the model computes (tl_circuits.sanity_check: per-head "
             "slicing, head additivity, GQA mapping, freeze isolation, model unchanged; a few random tokens from "
             "--seed), print the table and exit: 0 all checks pass, 1 a check fails or the model is refused, "
             "2 bad input")
    add("--list-models", action="store_true", help="list the bundled models and exit")
    add("--traceback", action="store_true", help="on an unexpected failure, print the full traceback")
    return parser


def parse_options(argv: Optional[Sequence[str]]) -> CommandOptions:
    """The command line as :class:`CommandOptions` (SystemExit on ``--help`` or a usage error)."""
    args = build_parser().parse_args(argv)
    return CommandOptions(**vars(args))


# ----- the run ----------------------------------------------------------------------------------------
