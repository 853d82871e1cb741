"""The ``tl-circuits`` command (also ``python -m tl_circuits``): the whole analysis in one run, as a report folder.

With no arguments it loads the bundled default model and its two bundled tasks, runs the QK/OV freeze sweep
over every head on each task, the per-sample gradients, pooled Fisher and interference maps of task A × task B,
and their permutation statistics, and writes ``tl_circuits_report/`` (see :mod:`tl_circuits.cli.pipeline` for what
is computed and :data:`tl_circuits.cli.output.FILES` for what is written).

The stages: :mod:`~tl_circuits.cli.arguments` (the options), this module (the run),
:mod:`~tl_circuits.cli.loading` (model and tasks),
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

import dataclasses
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from tl_circuits.cli.pipeline import run_analysis
from tl_circuits.cli.loading import (  # noqa: F401  (CommandError, load_model: this module's public names too)
    DEFAULT_SAMPLES,
    CommandError,
    check_replacement_inputs,
    list_models_text,
    load_model,
    load_tasks,
)
from tl_circuits.cli.arguments import (  # noqa: F401  (CommandOptions, build_parser, parse_options: public here too)
    DEFAULT_OUT,
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    CommandOptions,
    build_parser,
    parse_options,
)
from tl_circuits.cli.output import ReportOutputError, check_output_path, write_report
from tl_circuits.models.hf_directory import DTYPES
from tl_circuits.parallel.group import (
    World,
    all_succeeded,
    init_from_environment,
    launched_by_torchrun,
)



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
