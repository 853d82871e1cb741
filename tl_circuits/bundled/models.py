"""Small HookedTransformers shipped with the package, trained on synthetic tasks with known circuits.

There is no model hub here (and many users work offline), so tl_circuits trains and ships its own
models (``scripts/train_bundled.py``, deterministic, CPU, minutes). Each lives in
``tl_circuits/bundled/data/<name>.safetensors`` (weights, float32, exactly as trained — no weight
processing) and ``<name>.json`` (its ``HookedTransformerConfig`` arguments, the tasks it was trained
and is evaluated on, its known heads, TransformerLens ``head_detector`` scores, freeze-ablation
effects and final metrics, all measured after training by :mod:`tl_circuits.bundled.training`).
``planted-conflict-2l``'s known heads are instead those of its construction: it is trained with per-task head
masks, so which heads the two tasks fight over is known in advance (:mod:`tl_circuits.bundled.planted`).

>>> import tl_circuits as tlc
>>> [info.name for info in tlc.bundled.list_bundled_models()]
['induction-2l', 'induction-counting-2l', 'planted-conflict-2l']
>>> model = tlc.load_bundled_model("induction-2l")
>>> tasks = tlc.bundled.bundled_tasks("induction-2l")
>>> batch = tasks["induction"](8, seed=0)
>>> info = tlc.bundled.bundled_model_info("induction-2l")
>>> float(tlc.bundled.in_context_loss(model, batch)) < 0.5
True
>>> with tlc.freeze(model, info.known_heads["induction"], "qk", "zero"):  # the induction heads, together
...     float(tlc.bundled.in_context_loss(model, batch)) > 2.0
True
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

try:  # TransformerLens 2.x/3.x; 4.x removed HookedTransformer, which the bundled models are
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[misc,assignment]

from tl_circuits.bundled.samples import distinct_batch
from tl_circuits.bundled.tasks import BOS, TaskBatch, task_tokenizer
from tl_circuits.models.types import Model

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Where the bundled weights (``<name>.safetensors``) and metadata (``<name>.json``) live."""

DEFAULT_BUNDLED_MODEL = "induction-counting-2l"
"""The model trained on two tasks (induction and counting): the default for the ``tl-circuits`` command."""

__all__ = [
    "DATA_DIR",
    "DEFAULT_BUNDLED_MODEL",
    "BundledModelInfo",
    "bundled_model_info",
    "bundled_tasks",
    "head_detector_scores",
    "list_bundled_models",
    "load_bundled_model",
    "load_weights",
]

Head = tuple[int, int]


@dataclass(frozen=True)
class BundledModelInfo:
    """What a bundled model is, what it was trained on and what is known about it.

    Attributes:
        name: the name :func:`load_bundled_model` takes.
        description: one line: the task(s) and the circuit.
        known_heads: role -> heads found after training, e.g. ``{"previous_token": [(0, 1)],
            "induction": [(1, 3)]}`` (how each was found: ``metadata["head_selection"]``).
        control_heads: heads in the induction head's layer whose freeze barely changes any task: the
            "unrelated head" of the known-circuit tests.
        tasks: names of the tasks the model is evaluated on, in order (task A, task B, ...); see
            :func:`bundled_tasks`.
        trained_on: names of the tasks in its training mix.
        metrics: task -> {"loss", "accuracy"} on its scored positions, measured after training.
        config: the ``HookedTransformerConfig`` arguments.
        metadata: the whole JSON record (training settings, detector scores, freeze effects, ...).
    """

    name: str
    description: str
    known_heads: dict[str, list[Head]]
    control_heads: list[Head]
    tasks: tuple[str, ...]
    trained_on: tuple[str, ...]
    metrics: dict[str, dict[str, float]]
    config: dict
    metadata: dict = field(repr=False, default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return DATA_DIR / f"{self.name}.safetensors"

    def summary(self) -> str:
        """One line: name, description, known heads."""
        heads = "; ".join(f"{role} {', '.join(f'L{l}H{h}' for l, h in hs)}" for role, hs in self.known_heads.items())
        return f"{self.name}: {self.description} [{heads}]"


def _available() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def _read_info(name: str) -> BundledModelInfo:
    meta = json.loads((DATA_DIR / f"{name}.json").read_text())
    as_heads = lambda heads: [tuple(h) for h in heads]  # noqa: E731 (JSON has no tuples)
    return BundledModelInfo(
        name=meta["name"],
        description=meta["description"],
        known_heads={role: as_heads(heads) for role, heads in meta["known_heads"].items()},
        control_heads=as_heads(meta["control_heads"]),
        tasks=tuple(meta["tasks"]),
        trained_on=tuple(meta["trained_on"]),
        metrics=meta["metrics"],
        config=meta["config"],
        metadata=meta,
    )


def _check_name(name: str) -> None:
    available = _available()
    if name not in available:
        raise ValueError(f"unknown bundled model {name!r}; available: {', '.join(available) or 'none'}")


def list_bundled_models() -> list[BundledModelInfo]:
    """Every bundled model, sorted by name.

    >>> "induction-2l" in [info.name for info in list_bundled_models()]
    True
    """
    return [_read_info(name) for name in _available()]


def bundled_model_info(name: str = DEFAULT_BUNDLED_MODEL) -> BundledModelInfo:
    """The :class:`BundledModelInfo` of one model; ``ValueError`` naming the available ones if unknown."""
    _check_name(name)
    return _read_info(name)


def load_bundled_model(
    name: str = DEFAULT_BUNDLED_MODEL,
    device: Union[str, torch.device] = "cpu",
    *,
    tokenizer: bool = True,
    as_bridge: Optional[bool] = None,
) -> Model:
    """A bundled model as a ready ``HookedTransformer`` in eval mode, weights exactly as trained — or, with
    ``as_bridge``, the same weights as a TransformerLens-native ``TransformerBridge``.

    Args:
        name: see :func:`list_bundled_models`; default :data:`DEFAULT_BUNDLED_MODEL`.
        device: where to put it.
        tokenizer: attach :func:`tl_circuits.bundled.tasks.task_tokenizer` (``"<bos>"`` = 0, token ``i`` =
            ``"i"``), so ``to_tokens``/``to_str_tokens`` and TransformerLens's ``head_detector`` work.
        as_bridge: ``True``: a ``TransformerBridge.boot_native`` model with these weights
            (:func:`tl_circuits.models.native.native_bridge_from_tl`; same logits as the HookedTransformer, tested);
            ``False``: a HookedTransformer; ``None`` (default): a HookedTransformer where TransformerLens has
            one (2.x/3.x), a bridge otherwise (4.x). On TransformerLens 3.x a native bridge discards
            ``hook_pattern`` edits, so QK freezes are refused on it there (OV freezes, gradients and
            interference work); on 4.x everything works.

    Raises:
        ValueError: ``name`` is not a bundled model (the message lists those that are).
        ImportError: ``as_bridge=False`` under TransformerLens 4.x (no HookedTransformer).
    """
    info = bundled_model_info(name)
    if as_bridge is None:
        as_bridge = HookedTransformer is None
    if as_bridge:
        from safetensors.torch import load_file

        from tl_circuits.models.native import native_bridge_from_tl

        state = load_file(str(info.weights_path), device=str(device))
        try:
            return native_bridge_from_tl(info.config, state, device=device, model_name=name,
                                         tokenizer=task_tokenizer(info.config["d_vocab"]) if tokenizer else None)
        except RuntimeError as err:
            raise RuntimeError(f"{info.weights_path}: {err}") from None
    model = load_weights(info.config, info.weights_path, device=device)
    if tokenizer:
        model.set_tokenizer(task_tokenizer(info.config["d_vocab"]))
    return model


def load_weights(config: dict, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> HookedTransformer:
    """A ``HookedTransformer`` built from ``HookedTransformerConfig(**config)`` with the parameters in the
    safetensors file ``path`` loaded as they are (no weight processing); eval mode, no tokenizer.

    Raises ``RuntimeError`` when the file's parameters do not fit the config (missing or extra names,
    or wrong shapes).
    """
    from safetensors.torch import load_file

    if HookedTransformer is None:
        raise ImportError("HookedTransformer is not in this TransformerLens (4.x removed it): load the bundled model "
                          "as a TransformerBridge with load_bundled_model(name, as_bridge=True)")
    cfg = HookedTransformerConfig(**{**config, "device": str(device)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # TL 3.x: "HookedTransformer is deprecated"
        model = HookedTransformer(cfg)
    state = load_file(str(path), device=str(device))
    # buffers (causal masks) are rebuilt from the config; only parameters are stored
    missing, unexpected = model.load_state_dict(state, strict=False)
    parameters = {n for n, _ in model.named_parameters()}
    if unexpected or parameters & set(missing):
        raise RuntimeError(f"the weights in {path} do not fit the config: missing {sorted(parameters & set(missing))}, "
                           f"unexpected {sorted(unexpected)}")
    return model.eval()


def bundled_tasks(name: str = DEFAULT_BUNDLED_MODEL) -> dict[str, Callable[..., TaskBatch]]:
    """Task name -> ``make(n, seed=0) -> TaskBatch`` for a bundled model, in order (task A, task B, ...).

    Each maker draws ``n`` *distinct* rows (:func:`tl_circuits.bundled.samples.distinct_batch`) of the task's
    generator (:data:`tl_circuits.bundled.tasks.TASK_GENERATORS`) with the settings the model was evaluated
    with (sequence length, vocabulary, induction period, counting's ``min_len``), recorded in its JSON; at least
    64 distinct rows exist for every bundled task, and asking for more than exist is a ``ValueError`` naming how
    many do. Training used different seeds (see :mod:`tl_circuits.bundled.training`), so small seeds give
    held-out batches. A batch with an ``attention_mask`` (counting: rows of varied length) needs it passed on
    to gradient and interference calls.

    >>> list(bundled_tasks("induction-counting-2l"))
    ['induction', 'counting']
    >>> make_a, make_b = bundled_tasks("induction-counting-2l").values()
    >>> make_a(4).tokens.shape[0], len(make_b(64, seed=3))
    (4, 64)
    """
    info = bundled_model_info(name)
    makers = {}
    for task in info.tasks:
        spec = info.metadata["task_settings"][task]
        makers[task] = _task_maker(task, spec)
    return makers


def _task_maker(task: str, kwargs: dict) -> Callable[..., TaskBatch]:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}

    def make(n: int, seed: int = 0) -> TaskBatch:
        return distinct_batch(task, n, seed=seed, **kwargs)

    make.__name__ = f"make_{task}"
    make.__doc__ = f"distinct_batch({task!r}, n, seed=seed, **{kwargs!r})"
    return make


def head_detector_scores(
    model: HookedTransformer,
    batch: TaskBatch,
    head_type: str = "induction_head",
    **kwargs: Any,
) -> Float[Tensor, "n_layers n_heads"]:
    """TransformerLens's own ``head_detector.detect_head`` on the rows of a task batch, averaged.

    ``detect_head`` takes strings, so each row is spelt by the model's tokenizer (without its
    leading BOS, which ``to_tokens`` prepends again); the round trip is checked. ``head_type`` is
    ``"previous_token_head"``, ``"induction_head"``, ``"duplicate_token_head"`` or a detection
    pattern; ``kwargs`` go to ``detect_head`` (``exclude_bos``, ``error_measure``, ...).
    The default ``"mul"`` score is the fraction of a head's attention that falls on the pattern's
    cells, over *all* query positions — rows with no target (an induction batch's first pass)
    count in the denominator, so a perfect induction head scores the fraction of rows that have one.
    """
    from transformer_lens.head_detector import detect_head

    if model.tokenizer is None:
        raise ValueError("head_detector_scores needs the model's tokenizer: "
                         "model.set_tokenizer(task_tokenizer(d_vocab))")
    if not (batch.tokens[:, 0] == BOS).all():
        raise ValueError("every row must start with BOS (detect_head prepends it)")
    strings = [str(model.to_string(row[1:])) for row in batch.tokens]  # one row: one string
    round_trip = model.to_tokens(strings, prepend_bos=True).cpu()
    if round_trip.shape != batch.tokens.shape or not torch.equal(round_trip, batch.tokens.cpu()):
        raise ValueError("the model's tokenizer does not reproduce the batch's tokens")
    # head_type is a plain str here; detect_head's Literal names only its built-in patterns
    return detect_head(model, strings, head_type, **kwargs)  # type: ignore[arg-type]
