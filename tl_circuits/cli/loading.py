"""What ``--model``, ``--task-a`` and ``--task-b`` name, loaded for the analysis.

``--model`` is looked up in this order: a bundled model name (``--list-models``); a local model directory, told
apart by what its ``config.json`` holds (:mod:`tl_circuits.models.hf_directory`): a Hugging Face
``save_pretrained`` directory (``architectures``/``model_type``, weights, tokenizer; loaded offline) or a
tl_circuits checkpoint (``HookedTransformerConfig`` arguments, ``model.safetensors`` or ``model.pt``, optional
``tokenizer/``, see :mod:`tl_circuits.models.model_dir`); an official TransformerLens model name, loaded from
the Hugging Face hub or its cache (``HookedTransformer.from_pretrained``, or ``TransformerBridge.boot_transformers``
as a bridge). ``dtype`` (``--dtype``) is the dtype of the model's parameters.
Tasks come from files (:mod:`tl_circuits.cli.task_files`) or, without them, are the bundled model's own two.

Every problem with what the user named is a :class:`CommandError` with a one-line message (an unknown name too;
under TransformerLens 4.x, which has no list of official names, after asking the hub for it):

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as empty:  # doctest: +ELLIPSIS
...     load_model(empty, "cpu")
Traceback (most recent call last):
...
tl_circuits.cli.loading.CommandError: --model ...: not a model directory: expected a Hugging Face model directory...
>>> known_heads_text({"induction": [(1, 3)], "previous token": [(0, 2), (0, 5)]})
'induction L1H3; previous token L0H2, L0H5'
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tl_circuits.cli.prompt_completion import RecordFields
from tl_circuits.cli.task_files import TaskInput, TaskInputError, read_task_file, task_from_batch
from tl_circuits.models.types import Model

DEFAULT_SAMPLES = 64
"""Samples drawn from each bundled task when ``--n-a``/``--n-b`` are not given, unless the bundled model's metadata
names its own ``report_samples`` (the planted model's conflict needs more samples to be seen)."""


class CommandError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


@dataclass
class LoadedModel:
    """A model ready for the analysis, and what the report says about it."""

    model: Model  # a HookedTransformer or TransformerBridge
    name: str
    source: str  # "bundled", "checkpoint", "hugging_face" or "pretrained"
    description: str = ""
    known_heads: Optional[dict] = None  # role -> [(layer, head), ...]
    bundled_tasks: Optional[dict] = None  # task name -> generator(n, seed) -> TaskBatch, ordered A, B
    default_samples: int = DEFAULT_SAMPLES  # per bundled task, when --n-a/--n-b are not given
    notes: list[str] = field(default_factory=list)  # how it was loaded, where the user should know

    def info(self) -> dict:
        """The model section of the report (architecture, source, known heads)."""
        from tl_circuits.models.spec import model_spec  # lazily, as every heavy import here

        spec = model_spec(self.model)
        known = {role: [list(h) for h in heads] for role, heads in (self.known_heads or {}).items()}
        return dict(name=self.name, source=self.source, description=self.description, known_heads=known,
                    known_heads_text=known_heads_text(self.known_heads or {}),
                    n_layers=spec.n_layers, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, d_model=spec.d_model,
                    d_head=spec.d_head, d_vocab=spec.d_vocab, n_ctx=spec.n_ctx, attn_only=spec.attn_only,
                    has_tokenizer=getattr(self.model, "tokenizer", None) is not None,
                    model_class=type(self.model).__name__,
                    dtype=str(parameter_dtype(self.model)).removeprefix("torch."), notes=list(self.notes))


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


def _has_official_names() -> bool:
    """Whether this TransformerLens has its list of official names (4.x asks the hub instead)."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name  # noqa: F401
    except ImportError:
        return False
    return True


def has_hooked_transformer() -> bool:
    """Whether this TransformerLens has ``HookedTransformer`` (2.x/3.x; 4.x removed it)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def parameter_dtype(model: Model) -> torch.dtype:
    """The dtype of the model's (first floating-point) parameters."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def load_model(name: Optional[str], device: str, bridge: bool = False,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve ``--model`` (module docstring) and load it with ``dtype`` parameters; CommandError if it names
    nothing loadable.

    ``bridge``: load it as a ``TransformerBridge`` (always so where TransformerLens has no HookedTransformer)."""
    loaded = _load_model(name, device, bridge or not has_hooked_transformer(), dtype)
    if parameter_dtype(loaded.model) != dtype:
        loaded.model.to(dtype)  # HookedTransformer.to also records it in cfg.dtype
    return loaded


def _load_model(name: Optional[str], device: str, bridge: bool, dtype: torch.dtype) -> LoadedModel:
    bundled = _bundled()
    if name is None:
        if bundled is None:
            raise CommandError("no bundled models are installed; pass --model (a model directory or a "
                               "pretrained name) and --task-a/--task-b")
        name = bundled.DEFAULT_BUNDLED_MODEL
        if name not in _bundled_names(bundled):
            raise CommandError(f"the bundled default model {name!r} is not installed (its weights are missing from "
                               f"{getattr(bundled, 'DATA_DIR', 'the package')}); pass --model")
    if name in _bundled_names(bundled):
        info = next(i for i in bundled.list_bundled_models() if i.name == name)
        model = bundled.load_bundled_model(name, device, as_bridge=bridge)
        samples = int((getattr(info, "metadata", None) or {}).get("report_samples", DEFAULT_SAMPLES))
        return LoadedModel(model, name, "bundled", getattr(info, "description", ""),
                           dict(getattr(info, "known_heads", None) or {}), bundled.bundled_tasks(name), samples)
    path = Path(name)
    if path.exists():
        return load_directory(path, device, bridge, dtype)
    official = _pretrained_name(name)
    if bridge and official is None and not _has_official_names():  # 4.x: no name list; ask the hub
        return load_pretrained_bridge(name, device)
    if official is None:
        choices = ", ".join(_bundled_names(bundled)) or "none installed"
        raise CommandError(f"unknown model {name!r}: not a bundled model ({choices}), not a local model "
                           "directory, and not an official TransformerLens model name")
    return load_pretrained_bridge(official, device) if bridge else load_pretrained(official, device)


def load_directory(path: Path, device: str, bridge: bool, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A local model directory, by what its config.json holds: a Hugging Face model or a tl_circuits checkpoint;
    CommandError (one line saying what was expected) for anything else."""
    from tl_circuits.models.model_dir import CheckpointError, load_checkpoint
    from tl_circuits.models.hf_directory import HF, TL_CIRCUITS, HFDirectoryError, directory_kind, load_hf_directory

    kind = directory_kind(path)
    if kind == HF:
        try:
            found = load_hf_directory(path, device, dtype, as_bridge=bridge)
        except HFDirectoryError as err:
            raise CommandError(str(err)) from None
        how = type(found.model).__name__
        return LoadedModel(found.model, path.name, "hugging_face",
                           f"local Hugging Face model {path} ({found.architecture}, as a {how})", notes=found.notes)
    if kind == TL_CIRCUITS:
        try:
            model = load_checkpoint(path, device, as_bridge=bridge)
        except CheckpointError as err:
            raise CommandError(str(err)) from None
        return LoadedModel(model, path.name, "checkpoint", f"local checkpoint {path}")
    config = path / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CommandError(f"{config}: not a readable JSON file ({err})") from None
    raise CommandError(f"--model {path}: not a model directory: expected a Hugging Face model directory (config.json "
                       "naming 'architectures' or 'model_type', its weights and tokenizer, as save_pretrained writes "
                       "it) or a tl_circuits checkpoint (config.json of HookedTransformerConfig arguments such as "
                       "d_model and n_layers, and model.safetensors or model.pt)")


def load_pretrained_bridge(name: str, device: str) -> LoadedModel:
    """``TransformerBridge.boot_transformers(name)``; CommandError (one line) if the hub cannot give it."""
    from transformer_lens.model_bridge import TransformerBridge

    model = _quietly_from_hub(lambda: TransformerBridge.boot_transformers(name, device=device), name,
                              " as a TransformerBridge")
    return LoadedModel(model, name, "pretrained", f"TransformerBridge.boot_transformers {name}")


def load_pretrained(name: str, device: str) -> LoadedModel:
    """``HookedTransformer.from_pretrained(name)``; CommandError (one line) if the hub cannot give it."""
    from transformer_lens import HookedTransformer

    model = _quietly_from_hub(lambda: HookedTransformer.from_pretrained(name, device=device), name, "")
    return LoadedModel(model, name, "pretrained", f"TransformerLens pretrained {name}")


def _quietly_from_hub(load: Callable[[], Any], name: str, as_what: str):
    """``load()`` with the hub client's per-retry logging off; any failure becomes one line (no network, no
    cache, unknown or gated model), not a traceback. Returns the model in eval mode."""
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


def known_heads_text(known: Any) -> str:
    """``{"induction": [(1, 3)]}`` -> ``"induction L1H3"`` (other forms as they are)."""
    if isinstance(known, dict):
        return "; ".join(f"{role} {known_heads_text(heads)}" for role, heads in known.items() if heads)
    if isinstance(known, (list, tuple)) and all(isinstance(h, (list, tuple)) and len(h) == 2 for h in known):
        return ", ".join(f"L{layer}H{head}" for layer, head in known)
    return str(known) if known else ""


def list_models_text() -> str:
    """What ``--list-models`` prints: each bundled model, its known heads and tasks."""
    bundled = _bundled()
    if bundled is None or not bundled.list_bundled_models():
        return "no bundled models are installed"
    lines = []
    for info in bundled.list_bundled_models():
        default = " (default)" if info.name == bundled.DEFAULT_BUNDLED_MODEL else ""
        tasks = getattr(info, "tasks", None)
        lines.append(f"{info.name}{default}: {getattr(info, 'description', '')}")
        if getattr(info, "known_heads", None):
            lines.append(f"    known heads: {known_heads_text(info.known_heads)}")
        if tasks:
            lines.append(f"    tasks: {', '.join(tasks) if not isinstance(tasks, str) else tasks}")
    return "\n".join(lines)


# ----- tasks ------------------------------------------------------------------------------------------

def load_tasks(loaded: LoadedModel, task_a: Optional[Path] = None, task_b: Optional[Path] = None, *,
               task_format: str = "auto", n_a: Optional[int] = None, n_b: Optional[int] = None,
               seed: int = 0, fields: Optional[RecordFields] = None) -> tuple[TaskInput, TaskInput]:
    """(task A, task B) from files, or the bundled model's two tasks; CommandError on bad input.

    Files: the first ``n_a``/``n_b`` samples (default all). Bundled tasks: ``n_a``/``n_b`` *distinct* samples
    (default: the model's ``default_samples``: :data:`DEFAULT_SAMPLES` unless its metadata says) drawn with
    ``seed`` (task A) and ``seed + 1`` (task B) by :func:`tl_circuits.bundled.bundled_tasks`'s makers; more than a task
    has is a CommandError naming how many exist. ``fields``: the field names of prompt -> completion records.
    """
    if (task_a is None) != (task_b is None):
        raise CommandError("give both --task-a and --task-b, or neither (to use the bundled tasks)")
    if task_a is not None and task_b is not None:
        try:
            input_a = read_task_file(task_a, loaded.model, fmt=task_format, max_samples=n_a, fields=fields)
            input_b = read_task_file(task_b, loaded.model, fmt=task_format, max_samples=n_b, fields=fields)
        except TaskInputError as err:
            raise CommandError(str(err)) from None
        if input_a.name == input_b.name:  # keep sample ids apart
            input_a.name, input_b.name = f"A:{input_a.name}", f"B:{input_b.name}"
            input_a.ids = [f"A:{i}" for i in input_a.ids]
            input_b.ids = [f"B:{i}" for i in input_b.ids]
        return check_sample_counts(input_a, input_b)
    if not loaded.bundled_tasks:
        raise CommandError(f"model {loaded.name!r} has no bundled tasks: pass --task-a and --task-b")
    if len(loaded.bundled_tasks) < 2:
        raise CommandError(f"bundled model {loaded.name!r} has only one task; pass --task-a and --task-b")
    (name_a, make_a), (name_b, make_b) = list(loaded.bundled_tasks.items())[:2]
    source = f"bundled:{loaded.name}"
    # different seeds so that the two tasks never share random draws
    n = loaded.default_samples
    return check_sample_counts(_bundled_task(make_a, n_a or n, seed, name_a, "A", source),
                               _bundled_task(make_b, n_b or n, seed + 1, name_b, "B", source))


def _bundled_task(make: Callable, n: Optional[int], seed: int, name: str, label: str, source: str) -> TaskInput:
    """``n`` (default :data:`DEFAULT_SAMPLES`) distinct samples of a bundled task; CommandError when the task
    has fewer distinct samples than asked for."""
    try:
        batch = make(n or DEFAULT_SAMPLES, seed)
    except ValueError as err:
        raise CommandError(f"task {label} ({name}): {err}; ask for fewer with --n-{label.lower()}") from None
    return task_from_batch(batch, name, source)


def check_replacement_inputs(replacement: str, task_a: TaskInput, task_b: TaskInput) -> None:
    """RESAMPLE needs each sample's corrupted twin (a ``corrupted_prompt`` in every record of both task files)."""
    if replacement != "resample":
        return
    for label, task in (("A", task_a), ("B", task_b)):
        if task.corrupted is None:
            raise CommandError(f"--replacement resample patches each sample with its corrupted twin, but task {label} "
                               f"({task.source}) has none: give a corrupted_prompt in every record of a prompt -> "
                               "completion task file")


def check_sample_counts(task_a: TaskInput, task_b: TaskInput) -> tuple[TaskInput, TaskInput]:
    """The permutation test and the bootstrap need at least two samples per task."""
    for label, task in (("A", task_a), ("B", task_b)):
        if task.n_samples < 2:
            raise CommandError(f"task {label} has {task.n_samples} sample; the statistics need at least 2 per task "
                               f"({task.source})")
    return task_a, task_b
