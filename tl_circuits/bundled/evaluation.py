"""What the bundled models are measured by after training, and the rules that name their known heads.

:func:`analyse` measures on held-out batches (seeds below 10⁹; training seeds are above): loss and accuracy on
each task's scored positions; TransformerLens ``head_detector`` scores; and the effect on each task's scored loss
of freezing each head's QK and OV circuit (ZERO, and RESAMPLE from a batch of non-repeating random tokens). The
known heads are read off these numbers by the rules in :func:`select_heads`; :func:`circuit_effects` freezes a
group of heads together. (Training itself is :mod:`tl_circuits.bundled.training`.)

>>> select_heads({"head_detector": {"induction_head": [[0.0], [0.9]], "previous_token_head": [[0.8], [0.0]]},
...               "freeze_effects": {"induction": {"zero": {"qk": [[1.2], [0.1]], "ov": [[0.0], [2.0]]}}}}
...              )["known_heads"]
{'previous_token': [(0, 0)], 'induction': [(1, 0)]}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

try:  # TransformerLens 2.x/3.x; the bundled models are analysed as HookedTransformers (trained as such)
    from transformer_lens import HookedTransformer
except ImportError:
    HookedTransformer = None  # type: ignore[misc,assignment]

from tl_circuits.bundled.samples import distinct_batch
from tl_circuits.bundled.tasks import (
    TaskBatch,
    in_context_accuracy,
    in_context_loss,
    random_batch,
    scored_loss_metric,
    task_tokenizer,
)
from tl_circuits.freezing.options import HeadsLike
from tl_circuits.freezing.sweep import freeze_sweep
from tl_circuits.models.spec import model_spec

if TYPE_CHECKING:  # pragma: no cover - types only (training imports this module)
    from tl_circuits.bundled.training import TrainingConfig

__all__ = ["DETECTOR_KWARGS", "analyse", "circuit_effects", "eval_batch", "select_heads"]


def eval_batch(config: TrainingConfig, task: str, n: int = 64, seed: int = 0) -> TaskBatch:
    """A held-out batch of ``n`` distinct rows of ``task`` with the settings the model is evaluated with
    (what :func:`tl_circuits.bundled.bundled_tasks` gives for the same ``n`` and ``seed``)."""
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in config.eval_tasks[task].items()}
    return distinct_batch(task, n, seed=seed, **settings)


def _grid(t: torch.Tensor) -> list:
    return [[round(float(x), 4) for x in row] for row in t]


def _corrupted(model: HookedTransformer, batch: TaskBatch) -> torch.Tensor:
    """The RESAMPLE reference: non-repeating random tokens of the batch's shape (nothing to copy)."""
    return random_batch(len(batch), seq_len=batch.tokens.shape[1], d_vocab=model_spec(model).d_vocab, seed=1).tokens


DETECTOR_KWARGS = dict(exclude_bos=True)
"""How :func:`analyse` calls ``detect_head``: BOS excluded, as these models park attention there (a head's
attention on BOS says nothing about what it reads); otherwise TransformerLens's defaults ("mul")."""


def analyse(model: HookedTransformer, config: TrainingConfig, *, n: int = 64, detector_rows: int = 16) -> dict:
    """Metrics, head-detector scores and freeze-ablation effects of a trained model (held-out batches).

    Returns a JSON-ready dict: ``metrics[task]`` = {loss, accuracy} on scored positions;
    ``head_detector[kind]`` = [n_layers][n_heads] TransformerLens ``detect_head`` scores on induction
    rows (:data:`DETECTOR_KWARGS`); ``freeze_effects[task][replacement][circuit]`` = [n_layers][n_heads]
    change in the task's scored loss when that one head's circuit is frozen (ZERO; RESAMPLE from
    non-repeating random tokens, the corrupted run), via :func:`tl_circuits.freeze_sweep`.
    """
    from tl_circuits.bundled.models import head_detector_scores

    if model.tokenizer is None:
        model.set_tokenizer(task_tokenizer(model_spec(model).d_vocab))
    out: dict = {"metrics": {}, "freeze_effects": {}, "head_detector": {"settings": dict(DETECTOR_KWARGS)}}
    for task in config.eval_tasks:
        batch = eval_batch(config, task, n)
        out["metrics"][task] = dict(loss=round(float(in_context_loss(model, batch)), 4),
                                    accuracy=round(in_context_accuracy(model, batch), 4))
        metric = scored_loss_metric(batch)
        effects = {}
        for replacement, ref in (("zero", None), ("resample", _corrupted(model, batch))):
            sweep = freeze_sweep(model, batch.tokens, metric, replacement=replacement, reference=ref, progress=False)
            effects[replacement] = {c: _grid(e) for c, e in sweep.effect.items()}
        out["freeze_effects"][task] = effects
    rows = eval_batch(config, "induction", detector_rows)
    n_ctx = model_spec(model).n_ctx
    if rows.tokens.shape[1] >= n_ctx:  # detect_head wants rows shorter than n_ctx: drop the last tokens
        tokens = rows.tokens[:, :n_ctx - 1]
        rows = TaskBatch(tokens, torch.zeros_like(tokens, dtype=torch.bool), rows.name, rows.params)
    for kind in ("previous_token_head", "induction_head"):
        out["head_detector"][kind] = _grid(head_detector_scores(model, rows, kind, **DETECTOR_KWARGS))
    return out


def select_heads(analysis: dict, *, detector_min: float = 0.3, damage_min: float = 0.5,
                 control_max: float = 0.25) -> dict:
    """Known and control heads from :func:`analyse`'s numbers, by fixed rules.

    - induction: every layer ≥ 1 head whose ``induction_head`` detector score is ≥ ``detector_min``.
      These small models saturate their task, so their induction heads back each other up: freezing
      one alone can cost little, freezing the group destroys copying (:func:`circuit_effects`).
    - previous_token: a layer-0 head whose ``previous_token_head`` score is ≥ ``detector_min`` and whose
      QK-ZERO freeze alone raises the induction loss by ≥ ``damage_min`` nats (the circuit needs it).
    - control: heads outside the circuit whose every single-head freeze (ZERO and RESAMPLE, QK and OV)
      changes the induction loss by < ``control_max`` nats — the "unrelated head" of the tests.
    """
    detector = analysis["head_detector"]
    effects = analysis["freeze_effects"]["induction"]
    n_layers, n_heads = len(detector["induction_head"]), len(detector["induction_head"][0])
    induction = [(l, h) for l in range(1, n_layers) for h in range(n_heads)
                 if detector["induction_head"][l][h] >= detector_min]
    previous = [(0, h) for h in range(n_heads)
                if detector["previous_token_head"][0][h] >= detector_min and effects["zero"]["qk"][0][h] >= damage_min]

    def largest_effect(l, h):
        return max(abs(grid[l][h]) for by_circuit in effects.values() for grid in by_circuit.values())

    control = [(l, h) for l in range(n_layers) for h in range(n_heads)
               if (l, h) not in induction + previous and largest_effect(l, h) < control_max]
    return dict(known_heads={"previous_token": previous, "induction": induction}, control_heads=control,
                rules=dict(detector_min=detector_min, damage_min=damage_min, control_max=control_max,
                           detector=dict(DETECTOR_KWARGS)))


def circuit_effects(model: HookedTransformer, config: TrainingConfig, heads: HeadsLike, *, n: int = 64) -> dict:
    """Each task's scored loss and accuracy with ``heads`` frozen together, per replacement and circuit."""
    from tl_circuits.freezing.api import freeze

    out: dict[str, dict] = {}
    for task in config.eval_tasks:
        batch = eval_batch(config, task, n)
        out[task] = {}
        for replacement, ref in (("zero", None), ("resample", _corrupted(model, batch))):
            for circuit in ("qk", "ov"):
                with freeze(model, heads, circuit, replacement, reference=ref):
                    out[task][f"{circuit}-{replacement}"] = dict(
                        loss=round(float(in_context_loss(model, batch)), 4),
                        accuracy=round(in_context_accuracy(model, batch), 4))
    return out
