"""Deterministic training of the bundled models, and the analysis that names their known heads.

``scripts/train_bundled.py`` runs :func:`train_and_save` for every entry of :data:`BUNDLED_CONFIGS`
and writes ``tl_circuits/bundled/data/<name>.safetensors`` and ``<name>.json``. Everything is seeded: the
model's initialisation (from ``TrainingConfig.seed``), every training batch (its own generator
seed, derived from the config seed and the step), and the run uses
``torch.use_deterministic_algorithms(True)`` with one CPU thread — so the same torch version on the
same kind of CPU reproduces the shipped weights bit for bit (tested on a few steps; the full
retraining is a slow test).

Training: AdamW, linear warm-up then cosine decay, gradient clipping, next-token loss over every
position of a batch that mixes the training tasks in equal parts (rows of all tasks have the same
length). Induction is trained on *varied* periods so that no head can solve it by attending a fixed
distance back: copying needs the previous-token → induction composition.

After training, :func:`tl_circuits.bundled.analysis.analyse` measures the model on held-out batches and
:func:`~tl_circuits.bundled.analysis.select_heads` names its known heads (re-exported here).

>>> from transformer_lens import HookedTransformer  # training builds one (TransformerLens < 4)
>>> config = BUNDLED_CONFIGS["induction-2l"]
>>> a, b = train_model(config, steps=2), train_model(config, steps=2)
>>> isinstance(a, HookedTransformer), all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
(True, True)
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

try:  # TransformerLens 2.x/3.x; the bundled models are trained as HookedTransformers, which 4.x removed
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[misc,assignment]

from tl_circuits.bundled.analysis import analyse, circuit_effects, select_heads
from tl_circuits.bundled.planted import construction, head_roles, masked_backward, untrained_heads, zero_heads
from tl_circuits.bundled.tasks import TASK_GENERATORS

__all__ = [
    "BUNDLED_CONFIGS", "TrainingConfig", "analyse", "circuit_effects", "reanalyse_saved", "select_heads",
    "train_and_save", "train_model",
]

TRAIN_SEED_OFFSET = 10**9
"""Training batches use generator seeds from here up; evaluation batches use small seeds."""


@dataclass(frozen=True)
class TrainingConfig:
    """How one bundled model is built and trained.

    Attributes:
        name, description: as listed by :func:`tl_circuits.list_bundled_models`.
        model: ``HookedTransformerConfig`` arguments.
        train_tasks: task name -> generator arguments (besides ``n`` and ``seed``) of the training mix.
        eval_tasks: task name -> generator arguments of the held-out evaluation batches, in order
            (task A, task B); these become :func:`tl_circuits.bundled_tasks`.
        steps, batch_size, lr, weight_decay, warmup_steps, grad_clip: optimisation (``batch_size`` rows
            per step, split equally over the training tasks).
        seed: initialisation seed; training batch seeds derive from it.
        threads: CPU threads during training (1: reproducible and polite on a shared machine).
        head_roles: ``None`` (every task trains every head), or task -> the heads ``(layer, head)`` whose
            attention parameters that task's loss may train (:mod:`tl_circuits.bundled.planted`): heads of no
            task start at zero and stay so; the known heads are then those of the construction.
    """

    name: str
    description: str
    model: dict
    train_tasks: dict
    eval_tasks: dict
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    head_roles: Optional[dict] = None


_ATTN_ONLY_2L = dict(
    n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=48, d_vocab=64, attn_only=True,
    normalization_type="LN", positional_embedding_type="standard",
)
_INDUCTION_TRAIN = dict(seq_len=48, d_vocab=64, period=(3, 23))
_INDUCTION_EVAL = dict(seq_len=33, d_vocab=64, period=16)  # classic: 16 random tokens, repeated once
_COUNTING_TRAIN = dict(seq_len=48, d_vocab=64)
# rows of 29..33 tokens: 315 distinct rows (full-length rows are fixed by their start: only 63 exist)
_COUNTING_EVAL = dict(seq_len=33, d_vocab=64, min_len=29)

# the planted model: 2 heads a layer; the one trainable layer-0 head is shared and contested (see planted.py)
_PLANTED_2L = dict(_ATTN_ONLY_2L, n_heads=2, n_ctx=33)
_PLANTED_INDUCTION = dict(seq_len=33, d_vocab=64, period=(8, 16))
_PLANTED_SKIP = dict(seq_len=33, d_vocab=64, period=(22, 28))
_PLANTED_ROLES = {"induction": [(0, 0), (1, 0)], "skip_induction": [(0, 0), (1, 1)]}

BUNDLED_CONFIGS: dict[str, TrainingConfig] = {
    "induction-2l": TrainingConfig(
        name="induction-2l",
        description="2-layer attention-only; copies repeated random sequences with a previous-token -> induction "
                    "circuit",
        model=_ATTN_ONLY_2L,
        train_tasks={"induction": _INDUCTION_TRAIN},
        eval_tasks={"induction": _INDUCTION_EVAL},
    ),
    "induction-counting-2l": TrainingConfig(
        name="induction-counting-2l",
        description="2-layer attention-only trained on a mix of induction (repeated random sequences) and counting "
                    "(consecutive ids)",
        model=_ATTN_ONLY_2L,
        train_tasks={"induction": _INDUCTION_TRAIN, "counting": _COUNTING_TRAIN},
        eval_tasks={"induction": _INDUCTION_EVAL, "counting": _COUNTING_EVAL},
    ),
    "planted-conflict-2l": TrainingConfig(
        name="planted-conflict-2l",
        description="2-layer attention-only, 2 heads a layer, trained with per-task head masks: induction and skip "
                    "induction compete for the one shared layer-0 head (conflict known by construction)",
        model=_PLANTED_2L,
        train_tasks={"induction": _PLANTED_INDUCTION, "skip_induction": _PLANTED_SKIP},
        eval_tasks={"induction": _PLANTED_INDUCTION, "skip_induction": _PLANTED_SKIP},
        steps=5000,
        lr=2e-3,
        head_roles=_PLANTED_ROLES,
    ),
}


@contextmanager
def _deterministic(threads: int):
    """Deterministic kernels and a fixed thread count for the duration; previous settings restored."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


def _new_model(config: TrainingConfig) -> HookedTransformer:
    """A freshly initialised model; the initialisation is seeded without touching the global RNG."""
    if HookedTransformer is None:
        raise ImportError("training the bundled models needs HookedTransformer, which this TransformerLens (4.x) "
                          "removed: install transformer-lens<4 to train (the shipped weights load on 4.x as bridges)")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # TL 3.x: "HookedTransformer is deprecated"
        torch.manual_seed(config.seed)
        return HookedTransformer(HookedTransformerConfig(**config.model, device="cpu"))


def training_parts(config: TrainingConfig, step: int) -> dict[str, torch.Tensor]:
    """Task -> its tokens of training step ``step`` (``batch_size // n_tasks`` rows each)."""
    n_tasks = len(config.train_tasks)
    per_task = config.batch_size // n_tasks
    parts = {}
    for index, (task, kwargs) in enumerate(config.train_tasks.items()):
        seed = TRAIN_SEED_OFFSET + (config.seed * 10**7 + step) * n_tasks + index
        parts[task] = TASK_GENERATORS[task](per_task, seed=seed, **kwargs).tokens
    return parts


def training_batch(config: TrainingConfig, step: int) -> torch.Tensor:
    """The tokens of training step ``step``: ``batch_size`` rows, equal parts of each training task."""
    return torch.cat(list(training_parts(config, step).values()))


def _learning_rate(config: TrainingConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_model(
    config: TrainingConfig,
    *,
    steps: Optional[int] = None,
    progress: bool = False,
    log: Optional[list] = None,
) -> HookedTransformer:
    """Train a fresh model by ``config`` (``steps`` overrides ``config.steps``, e.g. for tests); eval mode.

    ``log``, if given, receives ``(step, loss)`` every 100 steps and at the end.
    """
    from tqdm.auto import tqdm

    steps = config.steps if steps is None else steps
    with _deterministic(config.threads):
        model = _new_model(config)
        if config.head_roles is not None:
            zero_heads(model, untrained_heads(config))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                      weight_decay=config.weight_decay)
        for step in tqdm(range(steps), desc=f"train {config.name}", disable=not progress):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            if config.head_roles is None:
                loss = model(training_batch(config, step), return_type="loss")
                loss.backward()
            else:
                loss = masked_backward(model, training_parts(config, step), head_roles(config))
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if log is not None and (step % 100 == 0 or step == steps - 1):
                log.append((step, round(loss.item(), 4)))
    return model.eval()


def bundled_record(model: HookedTransformer, config: TrainingConfig, training: dict) -> dict:
    """The JSON record of a trained model: config, tasks, training settings, analysis, known heads."""
    from importlib.metadata import version

    with _deterministic(config.threads):
        analysis = analyse(model, config)
        selection = select_heads(analysis) if config.head_roles is None else construction(config)
        known = selection["known_heads"]
        group_effects = {role: circuit_effects(model, config, heads) for role, heads in known.items() if heads}
    settings = {k: v for k, v in asdict(config).items() if k not in ("name", "description", "model")}
    return {
        "name": config.name,
        "description": config.description,
        "format_version": 1,
        "config": dict(config.model),
        "tasks": list(config.eval_tasks),
        "task_settings": config.eval_tasks,
        "trained_on": list(config.train_tasks),
        # what trained the weights (bit-for-bit retraining needs the same torch and CPU vector unit); ``training``
        # wins, so a reanalysis keeps the provenance of the weights it read
        "training": {**settings, "torch": torch.__version__,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "transformer_lens": version("transformer-lens"), **training},
        "known_heads": known,
        "control_heads": selection["control_heads"],
        "head_selection": selection["rules"],
        **analysis,
        "circuit_freeze": group_effects,
    }


def write_bundled(model: HookedTransformer, record: dict, out_dir: Path) -> None:
    """``<name>.safetensors`` (the parameters, float32) and ``<name>.json`` (``record``) in ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = record["name"]
    weights = {key: p.detach().contiguous() for key, p in model.named_parameters()}
    save_file(weights, str(out_dir / f"{name}.safetensors"), metadata={"name": name})
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")


def train_and_save(config: TrainingConfig, out_dir: Path, *, progress: bool = True) -> dict:
    """Train, analyse and write ``<name>.safetensors`` + ``<name>.json`` to ``out_dir``; returns the JSON record."""
    log: list = []
    start = time.perf_counter()
    model = train_model(config, progress=progress, log=log)
    training = {"seconds": round(time.perf_counter() - start, 1), "loss_log": log[-5:]}
    record = bundled_record(model, config, training)
    write_bundled(model, record, out_dir)
    return record


def reanalyse_saved(config: TrainingConfig, out_dir: Path) -> dict:
    """Rewrite ``<name>.json`` from the saved weights in ``out_dir`` (no training; the recorded
    training time and loss log are kept). For changes to the analysis, not to training."""
    from tl_circuits.bundled.models import load_weights

    out_dir = Path(out_dir)
    old = json.loads((out_dir / f"{config.name}.json").read_text())
    model = load_weights(config.model, out_dir / f"{config.name}.safetensors")
    training = {k: old["training"].get(k) for k in ("seconds", "loss_log", "torch", "cpu_capability",
                                                     "transformer_lens")}
    record = bundled_record(model, config, training)
    (out_dir / f"{config.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
