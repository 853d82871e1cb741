"""The ``tl-circuits`` command (also ``python -m tl_circuits``): the whole analysis in one run, as a report folder.

With no arguments it loads the bundled default model and its two bundled tasks, runs the QK/OV freeze sweep
over every head on each task, the per-sample gradients, pooled Fisher and interference maps of task A × task B,
and their permutation statistics, and writes ``tl_circuits_report/`` (see :mod:`tl_circuits.cli.report` for what
is computed and :data:`tl_circuits.cli.report.FILES` for what is written).

``--model`` takes, in this order of lookup: a bundled model name (``--list-models``); a local checkpoint
directory (``config.json`` + ``model.safetensors`` or ``model.pt``, optional ``tokenizer/``, see
:mod:`tl_circuits.models.checkpoint`); an official TransformerLens model name, loaded with
``HookedTransformer.from_pretrained`` (needs the Hugging Face hub or its cache).
``--task-a``/``--task-b`` take task files (formats in :mod:`tl_circuits.cli.task_files`); without them the bundled
model's own tasks are used.

``--bridge`` loads the model as a TransformerLens ``TransformerBridge`` instead: bundled models and checkpoints as
a TransformerLens-native bridge with the same weights (:mod:`tl_circuits.models.native`), pretrained names with
``TransformerBridge.boot_transformers``. Under TransformerLens 4.x, which has no ``HookedTransformer``, this is
always the case, so the command with no arguments runs the whole main job on the bundled default as a bridge.
(On TransformerLens 3.x a native bridge discards ``hook_pattern`` edits, so the QK half of the sweep is left
out there, with a warning; the report's other numbers equal the HookedTransformer's.)

Errors in what the user gave (a missing file, an empty task, an unknown model, text for a model without a
tokenizer, token ids outside the vocabulary, an occupied output directory) end the run with exit status 2 and
one line on stderr; any other failure with status 1 and one line (``--traceback`` shows the traceback).
Nothing is written unless the whole run succeeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

PROG = "tl-circuits"
DEFAULT_OUT = "tl_circuits_report"
DEFAULT_SAMPLES = 64
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


@dataclass
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
    memory_gb: float
    device: Optional[str]
    seed: int
    out: Path
    quiet: bool
    list_models: bool
    traceback: bool
    bridge: bool = False


@dataclass
class LoadedModel:
    """A model ready for the analysis, and what the report says about it."""

    model: object
    name: str
    source: str  # "bundled", "checkpoint" or "pretrained"
    description: str = ""
    known_heads: Optional[dict] = None  # role -> [(layer, head), ...]
    bundled_tasks: Optional[dict] = None  # task name -> generator(n, seed) -> TaskBatch, ordered A, B

    def info(self) -> dict:
        from tl_circuits.models.spec import model_spec  # lazily, as every heavy import here

        spec = model_spec(self.model)
        known = {role: [list(h) for h in heads] for role, heads in (self.known_heads or {}).items()}
        return dict(name=self.name, source=self.source, description=self.description, known_heads=known,
                    known_heads_text=_known_heads_text(self.known_heads or {}),
                    n_layers=spec.n_layers, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, d_model=spec.d_model,
                    d_head=spec.d_head, d_vocab=spec.d_vocab, n_ctx=spec.n_ctx, attn_only=spec.attn_only,
                    has_tokenizer=getattr(self.model, "tokenizer", None) is not None,
                    model_class=type(self.model).__name__)


# ----- the command line ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
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


def build_parser() -> argparse.ArgumentParser:
    from tl_circuits.cli.report import FILES, REPLACEMENTS

    parser = _Parser(
        prog=PROG,
        description="QK/OV freeze sweep, QK-OV interference between two tasks and its statistics, "
                    "written as a report folder (PNG heatmaps, CSV/JSON numbers, report.md). "
                    "With no arguments: the bundled default model and its two bundled tasks.",
        epilog="report files: " + ", ".join(FILES) + ". Exit status: 0 success, 2 bad input, 1 other failure.",
    )
    add = parser.add_argument
    add("--model", help="bundled model name (see --list-models), local checkpoint directory (config.json + "
                        "model.safetensors or model.pt, optional tokenizer/), or an official TransformerLens model "
                        "name (downloaded; needs the hub). Default: the bundled default model")
    add("--task-a", type=Path, help="task A file: text (one sample per line, needs a tokenizer), token ids "
                                    "(.tokens/.ids: whitespace-separated ids per line) or a .pt/.npy [n, pos] "
                                    "array. Default: the bundled model's first task")
    add("--task-b", type=Path, help="task B file, as --task-a. Default: the bundled model's second task")
    add("--task-format", choices=("auto", "text", "ids"), default="auto",
        help="how to read task files: by suffix (default), or force text / whitespace-separated token ids")
    add("--n-a", type=_positive_int, help=f"task A samples (bundled tasks: default {DEFAULT_SAMPLES}; "
                                          "files: the first N, default all)")
    add("--n-b", type=_positive_int, help="task B samples, as --n-a")
    add("--n-permutations", type=_positive_int, help="task-label permutations of the test (default: "
                                                     "max(1000, 2 x tested cells / alpha))")
    add("--n-bootstrap", type=_non_negative_int, default=1000, help="bootstrap resamples for the intervals (0: none; default 1000)")
    add("--variant", choices=("signed", "unsigned", "symmetric"), default="signed",
        help="interference variant (default signed: negative = conflicting gradients)")
    add("--replacement", choices=REPLACEMENTS, default="zero", help="what a frozen circuit is replaced with (default zero)")
    add("--alpha", type=_unit_interval, default=0.05, help="significance level of the BH q-values (default 0.05)")
    add("--top-k", type=_positive_int, default=10, help="rows in the top-heads and top-pairs tables (default 10)")
    add("--memory-gb", type=_positive_float, default=2.0, help="memory budget in GB of the per-sample gradients and scores (default 2)")
    add("--device", help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    add("--seed", type=int, default=0, help="seed of the bundled task samples (task B: seed + 1), permutations and "
                                              "bootstrap (default 0)")
    add("--out", type=Path, default=Path(DEFAULT_OUT), help=f"report folder (default {DEFAULT_OUT}; an existing "
                                                            "one is replaced only if it holds an earlier report)")
    add("--quiet", action="store_true", help="no progress bars or stage messages")
    add("--bridge", action="store_true", help="load the model as a TransformerLens TransformerBridge (bundled models and "
                                              "checkpoints: a native bridge with the same weights; pretrained names: "
                                              "TransformerBridge.boot_transformers). Always on with TransformerLens 4.x, "
                                              "which has no HookedTransformer")
    add("--list-models", action="store_true", help="list the bundled models and exit")
    add("--traceback", action="store_true", help="on an unexpected failure, print the full traceback")
    return parser


def parse_options(argv: Optional[Sequence[str]]) -> CommandOptions:
    args = build_parser().parse_args(argv)
    return CommandOptions(**{name.replace("-", "_"): value for name, value in vars(args).items()})


# ----- models -------------------------------------------------------------------------------------------

def _bundled():
    """The bundled-models module, or None if this installation has none."""
    try:
        from tl_circuits.bundled import models as bundled
    except ImportError:
        return None
    return bundled


def _bundled_names(bundled) -> list[str]:
    return [info.name for info in bundled.list_bundled_models()] if bundled is not None else []


def _pretrained_name(name: str) -> Optional[str]:
    """The official TransformerLens name for ``name`` (aliases included), or None."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        return get_official_model_name(name)
    except (ValueError, ImportError):
        return None


def has_hooked_transformer() -> bool:
    """Whether this TransformerLens has ``HookedTransformer`` (2.x/3.x; 4.x removed it)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(name: Optional[str], device: str, bridge: bool = False) -> LoadedModel:
    """Resolve ``--model`` (module docstring) and load it; CommandError if it names nothing loadable.

    ``bridge``: load it as a ``TransformerBridge`` (always so where TransformerLens has no HookedTransformer)."""
    from tl_circuits.models.checkpoint import CheckpointError, is_checkpoint, load_checkpoint

    bridge = bridge or not has_hooked_transformer()
    bundled = _bundled()
    if name is None:
        if bundled is None:
            raise CommandError("no bundled models are installed; pass --model (a checkpoint directory or a "
                               "pretrained name) and --task-a/--task-b")
        name = bundled.DEFAULT_BUNDLED_MODEL
        if name not in _bundled_names(bundled):
            raise CommandError(f"the bundled default model {name!r} is not installed (its weights are missing from "
                               f"{getattr(bundled, 'DATA_DIR', 'the package')}); pass --model")
    if name in _bundled_names(bundled):
        info = next(i for i in bundled.list_bundled_models() if i.name == name)
        model = bundled.load_bundled_model(name, device, as_bridge=bridge)
        return LoadedModel(model, name, "bundled", getattr(info, "description", ""),
                           dict(getattr(info, "known_heads", None) or {}), bundled.bundled_tasks(name))
    path = Path(name)
    if path.exists():
        if not is_checkpoint(path):
            raise CommandError(f"--model {name}: not a checkpoint directory (expected a directory with config.json "
                               "and model.safetensors or model.pt)")
        try:
            model = load_checkpoint(path, device, as_bridge=bridge)
        except CheckpointError as err:
            raise CommandError(str(err)) from None
        return LoadedModel(model, path.name, "checkpoint", f"local checkpoint {path}")
    official = _pretrained_name(name)
    if bridge and official is None and not _has_official_names():  # 4.x: no name list; ask the hub
        return _load_pretrained_bridge(name, device)
    if official is None:
        choices = ", ".join(_bundled_names(bundled)) or "none installed"
        raise CommandError(f"unknown model {name!r}: not a bundled model ({choices}), not a local checkpoint "
                           "directory, and not an official TransformerLens model name")
    return _load_pretrained_bridge(official, device) if bridge else _load_pretrained(official, device)


def _has_official_names() -> bool:
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name  # noqa: F401
    except ImportError:
        return False
    return True


def _load_pretrained_bridge(name: str, device: str) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    model = _quietly_from_hub(lambda: TransformerBridge.boot_transformers(name, device=device), name,
                              " as a TransformerBridge")
    return LoadedModel(model, name, "pretrained", f"TransformerBridge.boot_transformers {name}")


def _load_pretrained(name: str, device: str) -> LoadedModel:
    from transformer_lens import HookedTransformer

    model = _quietly_from_hub(lambda: HookedTransformer.from_pretrained(name, device=device), name, "")
    return LoadedModel(model, name, "pretrained", f"TransformerLens pretrained {name}")


def _quietly_from_hub(load, name: str, as_what: str):
    """``load()`` with the hub client's per-retry logging off; any failure becomes one line (no network, no
    cache, unknown or gated model), not a traceback. Returns the model in eval mode."""
    import logging

    logging.disable(logging.WARNING)
    try:
        model = load()
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CommandError(f"cannot load pretrained model {name!r}{as_what} (is the Hugging Face hub reachable or "
                           f"the model cached?): {first}") from None
    finally:
        logging.disable(logging.NOTSET)
    return model.eval()


def _known_heads_text(known) -> str:
    """``{"induction": [(1, 3)]}`` -> ``"induction L1H3"`` (other forms as they are)."""
    if isinstance(known, dict):
        return "; ".join(f"{role} {_known_heads_text(heads)}" for role, heads in known.items() if heads)
    if isinstance(known, (list, tuple)) and all(isinstance(h, (list, tuple)) and len(h) == 2 for h in known):
        return ", ".join(f"L{layer}H{head}" for layer, head in known)
    return str(known) if known else ""


def list_models_text() -> str:
    bundled = _bundled()
    if bundled is None or not bundled.list_bundled_models():
        return "no bundled models are installed"
    lines = []
    for info in bundled.list_bundled_models():
        default = " (default)" if info.name == bundled.DEFAULT_BUNDLED_MODEL else ""
        tasks = getattr(info, "tasks", None)
        lines.append(f"{info.name}{default}: {getattr(info, 'description', '')}")
        if getattr(info, "known_heads", None):
            lines.append(f"    known heads: {_known_heads_text(info.known_heads)}")
        if tasks:
            lines.append(f"    tasks: {', '.join(tasks) if not isinstance(tasks, str) else tasks}")
    return "\n".join(lines)


# ----- tasks ------------------------------------------------------------------------------------------

def load_tasks(options: CommandOptions, loaded: LoadedModel):
    """(task A, task B) from files, or the bundled model's two tasks; CommandError on bad input."""
    from tl_circuits.cli.task_files import TaskInputError, read_task_file, task_from_batch

    if (options.task_a is None) != (options.task_b is None):
        raise CommandError("give both --task-a and --task-b, or neither (to use the bundled tasks)")
    if options.task_a is not None:
        try:
            task_a = read_task_file(options.task_a, loaded.model, fmt=options.task_format, max_samples=options.n_a)
            task_b = read_task_file(options.task_b, loaded.model, fmt=options.task_format, max_samples=options.n_b)
        except TaskInputError as err:
            raise CommandError(str(err)) from None
        if task_a.name == task_b.name:  # keep sample ids apart
            task_a.name, task_b.name = f"A:{task_a.name}", f"B:{task_b.name}"
            task_a.ids = [f"A:{i}" for i in task_a.ids]
            task_b.ids = [f"B:{i}" for i in task_b.ids]
        return _check_sample_counts(task_a, task_b)
    if not loaded.bundled_tasks:
        raise CommandError(f"model {loaded.name!r} has no bundled tasks: pass --task-a and --task-b")
    if len(loaded.bundled_tasks) < 2:
        raise CommandError(f"bundled model {loaded.name!r} has only one task; pass --task-a and --task-b")
    (name_a, make_a), (name_b, make_b) = list(loaded.bundled_tasks.items())[:2]
    n_a, n_b = options.n_a or DEFAULT_SAMPLES, options.n_b or DEFAULT_SAMPLES
    source = f"bundled:{loaded.name}"
    # different seeds so that the two tasks never share random draws
    return _check_sample_counts(task_from_batch(make_a(n_a, options.seed), name_a, source),
                                task_from_batch(make_b(n_b, options.seed + 1), name_b, source))


def _check_sample_counts(task_a, task_b):
    """The permutation test and the bootstrap need at least two samples per task."""
    for label, task in (("A", task_a), ("B", task_b)):
        if task.n_samples < 2:
            raise CommandError(f"task {label} has {task.n_samples} sample; the statistics need at least 2 per task "
                               f"({task.source})")
    return task_a, task_b


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
    return requested


def run(options: CommandOptions) -> Path:
    """The main job: load, analyse, write the report folder; returns its path."""
    from tl_circuits.cli.report import AnalysisConfig, ReportOutputError, check_output_path, run_analysis, write_report

    try:
        check_output_path(options.out)  # fail before the work, not after
    except ReportOutputError as err:
        raise CommandError(str(err)) from None
    for path in (options.task_a, options.task_b):
        if path is not None and not path.exists():  # before loading a model that may take a while
            raise CommandError(f"{path}: no such file")
    torch.manual_seed(options.seed)
    device = _device(options.device)
    start = time.perf_counter()
    # silent until the inputs are known to be good, so that bad input reads as exactly one line
    loaded = load_model(options.model, device, bridge=options.bridge)
    task_a, task_b = load_tasks(options, loaded)
    load_s = time.perf_counter() - start
    _say(options, f"model {loaded.name} ({loaded.source}) on {device} as a {type(loaded.model).__name__}; task A {task_a.name} "
                  f"({task_a.n_samples} samples), task B {task_b.name} ({task_b.n_samples} samples)")
    for note in task_a.notes + task_b.notes:
        _say(options, f"note: {note}")
    config = AnalysisConfig(variant=options.variant, replacement=options.replacement,
                            n_permutations=options.n_permutations, n_bootstrap=options.n_bootstrap,
                            alpha=options.alpha, top_k=options.top_k, seed=options.seed,
                            memory_budget_gb=options.memory_gb, progress=not options.quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        analysis = run_analysis(loaded.model, task_a, task_b, config, loaded.info(), lambda m: _say(options, m))
    analysis.timings = {"load_s": load_s, **analysis.timings}
    analysis.warnings = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    for message in analysis.warnings:
        _say(options, f"warning: {message}")
    _say(options, f"writing {options.out}")
    start = time.perf_counter()
    write_report(analysis, options.out)
    _say(options, f"report written to {options.out}/report.md "
                  f"({sum(analysis.timings.values()) + time.perf_counter() - start:.1f} s)")
    return options.out


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "(no message)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tl-circuits`` / ``python -m tl_circuits``; returns the exit status."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are only saved; no display needed
    try:
        options = parse_options(argv)
    except SystemExit as exit_:  # --help, or a usage error already reported in one line
        return int(exit_.code or 0)
    if options.list_models:
        print(list_models_text())
        return EXIT_OK
    try:
        run(options)
    except CommandError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no report written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # anything else: one line, the traceback on request
        if options.traceback:
            traceback.print_exc()
        hint = "" if options.traceback else " (rerun with --traceback for details)"
        print(f"{PROG}: error: {type(err).__name__}: {_one_line(err)}; no report written{hint}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
