"""The ``tl-circuits`` command (also ``python -m tl_circuits``): the whole analysis in one run, as a report folder.

With no arguments it loads the bundled default model and its two bundled tasks, runs the QK/OV freeze sweep
over every head on each task, the per-sample gradients, pooled Fisher and interference maps of task A × task B,
and their permutation statistics, and writes ``tl_circuits_report/`` (see :mod:`tl_circuits.cli.pipeline` for what
is computed and :data:`tl_circuits.cli.output.FILES` for what is written).

The stages: this module (options, the run), :mod:`~tl_circuits.cli.loading` (model and tasks),
:mod:`~tl_circuits.cli.pipeline`, then :mod:`~tl_circuits.cli.tables`, :mod:`~tl_circuits.cli.markdown` and
:mod:`~tl_circuits.cli.output` (the report folder). Every default is the library's (:mod:`tl_circuits.defaults`).

``--model`` takes, in this order of lookup: a bundled model name (``--list-models``); a local model directory:
a Hugging Face ``save_pretrained`` directory (weights and tokenizer, loaded offline) or a tl_circuits checkpoint
(``config.json`` + ``model.safetensors`` or ``model.pt``, optional ``tokenizer/``), told apart by what their
``config.json`` holds (:mod:`tl_circuits.models.hf_directory`); an official TransformerLens model name, loaded with
``HookedTransformer.from_pretrained`` (needs the Hugging Face hub or its cache). ``--dtype`` loads it with
float32 (default), bfloat16 or float16 parameters; gradients, Fisher and scores accumulate in float32 or better.
``--task-a``/``--task-b`` take task files (formats in :mod:`tl_circuits.cli.task_files`: prompt -> completion
records in JSON Lines, CSV, Parquet or a ``datasets`` directory, whose completion tokens alone are scored; text,
token ids or tensors, every token scored); without them the bundled model's own tasks are used, scored on their
``scored`` positions. The freeze sweep and the interference score the same predictions.

``--bridge`` loads the model as a TransformerLens ``TransformerBridge`` instead: bundled models and checkpoints as
a TransformerLens-native bridge with the same weights (:mod:`tl_circuits.models.native`), Hugging Face directories
and pretrained names with ``TransformerBridge.boot_transformers``. Under TransformerLens 4.x, which has no
``HookedTransformer``, this is always the case, so the command with no arguments runs the whole main job on the
bundled default as a bridge.
(On TransformerLens 3.x a native bridge discards ``hook_pattern`` edits, so the QK half of the sweep is left
out there, with a warning; the report's other numbers equal the HookedTransformer's.)

``--check`` runs :func:`tl_circuits.sanity_check` on the model ``--model`` names (loaded as above, ``--bridge`` and
``--device`` included) instead, prints its table and exits 0 when every check passes, 1 when one fails or the model
is refused (docs/spec.md §0.6).

Errors in what the user gave (a missing file, an empty task, an unknown model, text for a model without a
tokenizer, token ids outside the vocabulary, an occupied output directory) end the run with exit status 2 and
one line on stderr; any other failure with status 1 and one line (``--traceback`` shows the traceback).
Nothing is written unless the whole run succeeds.

Under ``torchrun --nproc_per_node=N -m tl_circuits ...`` every rank runs the main job, its heavy calls split over
the ranks (docs/spec.md, "Distributed runs"): gloo on CPUs, NCCL and GPU ``LOCAL_RANK`` per rank with ``--device
cuda``. Rank 0 alone prints progress and writes the report, once every rank has reached the end (one collective,
bounded by ``--dist-timeout``). A rank that fails prints its error with its rank and exits 1; torchrun then stops
the others, and no report is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from tl_circuits import defaults
from tl_circuits.cli.pipeline import REPLACEMENTS, SWEEPS, TOP_K, AnalysisConfig, run_analysis
from tl_circuits.cli.loading import (  # noqa: F401  (CommandError, load_model: this module's public names too)
    DEFAULT_SAMPLES,
    CommandError,
    check_replacement_inputs,
    list_models_text,
    load_model,
    load_tasks,
)
from tl_circuits.cli.output import FILES, ReportOutputError, check_output_path, write_report
from tl_circuits.cli.prompt_completion import RecordFields
from tl_circuits.cli.task_files import FORMATS as TASK_FORMATS
from tl_circuits.interference.config import NORMALIZATIONS, VARIANTS, GradientConfig, InterferenceConfig
from tl_circuits.selection import parse_indices
from tl_circuits.models.hf_directory import DTYPES
from tl_circuits.parallel.group import (
    DEFAULT_TIMEOUT_S,
    World,
    all_succeeded,
    init_from_environment,
    launched_by_torchrun,
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

def _say(options: CommandOptions, message: str) -> None:
    if not options.quiet:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _device(requested: Optional[str]) -> str:
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {requested}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None and launched_by_torchrun():  # one GPU per rank
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return requested


def run(options: CommandOptions, world: Optional[World] = None) -> Path:
    """The main job: load, analyse, write the report folder; returns its path.

    ``world``: the torchrun group this command joined (every heavy stage is shared over it, and only rank 0
    writes); ``None``: this process alone.

    The report's ``timings_s`` holds each stage's wall time and ``total_s``, one clock from the start of
    loading to the end of the statistics; the message at the end gives the same total and the writing time.
    """
    try:
        check_output_path(options.out)  # fail before the work, not after
    except ReportOutputError as err:
        raise CommandError(str(err)) from None
    for path in (options.task_a, options.task_b):
        if path is not None and not path.exists():  # before loading a model that may take a while
            raise CommandError(f"{path}: no such file")
    config = options.analysis_config()
    torch.manual_seed(options.seed)
    device = _device(options.device)
    start = time.perf_counter()
    # silent until the inputs are known to be good, so that bad input reads as exactly one line
    loaded = load_model(options.model, device, bridge=options.bridge, dtype=DTYPES[options.dtype])
    task_a, task_b = load_tasks(loaded, options.task_a, options.task_b, task_format=options.task_format,
                                n_a=options.n_a, n_b=options.n_b, seed=options.seed, fields=options.record_fields())
    check_replacement_inputs(options.replacement, task_a, task_b)
    load_s = time.perf_counter() - start
    _say(options, f"model {loaded.name} ({loaded.source}) on {device} as a {type(loaded.model).__name__}; "
                  f"task A {task_a.name} ({task_a.n_samples} samples), task B {task_b.name} "
                  f"({task_b.n_samples} samples)")
    for note in loaded.notes + task_a.notes + task_b.notes:
        _say(options, f"note: {note}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        analysis = run_analysis(loaded.model, task_a, task_b, config, loaded.info(), lambda m: _say(options, m),
                                world=world)
    analysis.timings = {"load_s": load_s, **analysis.timings, "total_s": time.perf_counter() - start}
    analysis.warnings = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    for message in analysis.warnings:
        _say(options, f"warning: {message}")
    world = world or World()
    if not all_succeeded(True, world):  # the commit point: every rank got here (a failed one never does)
        raise RuntimeError("another rank failed; no report written")
    if not world.is_main:
        return options.out
    _say(options, f"writing {options.out}")
    writing = time.perf_counter()
    write_report(analysis, options.out)
    _say(options, f"report written to {options.out}/report.md (analysis {analysis.timings['total_s']:.1f} s, "
                  f"writing {time.perf_counter() - writing:.1f} s)")
    return options.out


def run_check(options: CommandOptions) -> int:
    """``--check``: :func:`tl_circuits.sanity_check` of the model ``--model`` names, its table on stdout; the exit
    status is 0 when every check passes, 1 otherwise (a failed check, or a model tl_circuits refuses)."""
    from tl_circuits.checks import sanity_check

    loaded = load_model(options.model, _device(options.device), bridge=options.bridge)
    result = sanity_check(loaded.model, seed=options.seed)
    print(f"model {loaded.name} ({loaded.source})")
    print(result.table())
    return EXIT_OK if result.passed else EXIT_FAILURE


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "(no message)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tl-circuits`` / ``python -m tl_circuits``; returns the exit status.

    >>> main(["--alpha", "2"])
    2
    """
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are only saved; no display needed
    try:
        options = parse_options(argv)
    except SystemExit as exit_:  # --help, or a usage error already reported in one line
        return int(exit_.code or 0)
    if options.list_models:
        print(list_models_text())
        return EXIT_OK
    where, joined = "", False
    try:
        if options.check:
            return run_check(options)
        options, joined, world = _join_ranks(options)
        where = f"{world.describe()}: " if world.active else ""
        run(options, world)
    except CommandError as err:
        print(f"{PROG}: error: {where}{_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no report written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # anything else: one line, the traceback on request
        if options.traceback:
            traceback.print_exc()
        hint = "" if options.traceback else " (rerun with --traceback for details)"
        print(f"{PROG}: error: {where}{type(err).__name__}: {_one_line(err)}; no report written{hint}",
              file=sys.stderr)
        return EXIT_FAILURE
    if joined:  # the group this run made (not one the caller had made)
        import torch.distributed as dist

        dist.destroy_process_group()
    return EXIT_OK


def _join_ranks(options: CommandOptions) -> tuple[CommandOptions, bool, World]:
    """Under torchrun: join the process group (its device's backend, ``--dist-timeout``); only rank 0 talks.

    Returns the options of this rank, whether this call made the group (an existing one is used as it is) and
    the world the command runs in (the one-rank world outside torchrun).
    """
    import torch.distributed as dist

    if not launched_by_torchrun():
        return options, False, World()
    made = not dist.is_initialized()
    try:
        world = init_from_environment(_device(options.device), options.dist_timeout)
    except (RuntimeError, ValueError) as err:
        raise CommandError(f"cannot join the torchrun process group: {_one_line(err)}") from None
    return (options if world.is_main else dataclasses.replace(options, quiet=True)), made, world


if __name__ == "__main__":
    sys.exit(main())
