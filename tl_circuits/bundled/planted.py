"""A model whose conflicting heads are known by construction: per-task head masks on the gradients.

The ``planted-conflict-2l`` model (:data:`tl_circuits.bundled.training.BUNDLED_CONFIGS`) is trained on two tasks
with the loss of each task reaching only some heads: every training step computes task A's and task B's loss
separately, zeroes each task's gradient in the per-head slices of W_Q/W_K/W_V/W_O (and b_Q/b_K/b_V) of the heads
it may not train (:func:`mask_head_gradients`, through :mod:`tl_circuits.models.layout`), and sums the two; every
other parameter (embeddings, LayerNorms, unembedding, ``b_O``) gets both. Heads listed in no task's set are
*untrained*: they start at zero and, with zero weights, get zero gradients, so they stay zero (a head that
writes nothing).

At the joint optimum of this masked training, a head trained by both tasks (*shared*) has
Σ_A g + Σ_B g ≈ 0: where the tasks compete for it, their task-mean gradients are opposed. A head trained by task
A only has ḡ_A ≈ 0 (A's own optimum), so whatever B's gradient there is, it is not opposed by A's: the conflict
test (:func:`tl_circuits.interference_conflict_test`) should find the shared heads and not the others.

The two tasks compete for the one trainable layer-0 head: **induction** (copy the token that followed the current
token's previous occurrence) needs it to attend one token back, **skip induction**
(:func:`skip_induction_batch`: the continuation skips every other pattern token) needs it to attend two back
(the layer-1 head then finds the earlier position whose two-back token is the current token). One head cannot do
both for rows it cannot tell apart in layer 0.

>>> roles = {"induction": [(0, 0), (1, 0)], "skip_induction": [(0, 0), (1, 1)]}
>>> known_heads_by_construction(roles, n_layers=2, n_heads=2)
{'shared': [(0, 0)], 'task A only': [(1, 0)], 'task B only': [(1, 1)], 'untrained': [(0, 1)]}
>>> batch = skip_induction_batch(1, seq_len=12, d_vocab=30, seed=0, period=7)
>>> row = batch.tokens[0].tolist()
>>> row[8:] == [row[1], row[3], row[5], row[7]]               # BOS, 7 pattern tokens, then every other one
True
>>> batch.scored[0].nonzero().flatten().tolist()               # predictions of x3, x5, x7 in the second part
[8, 9, 10]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

import torch
from torch import Tensor

from tl_circuits.bundled.tasks import skip_induction_batch  # noqa: F401 (the docstring's example)
from tl_circuits.models.layout import BLOCKS, bias_to_heads, weight_to_heads
from tl_circuits.models.spec import model_spec
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.bundled.training import TrainingConfig

__all__ = ["construction", "head_roles", "known_heads_by_construction", "mask_head_gradients", "masked_backward",
           "untrained_heads", "zero_heads"]

Head = tuple[int, int]


def known_heads_by_construction(roles: Mapping[str, Iterable[Head]], *, n_layers: int,
                                n_heads: int) -> dict[str, list[Head]]:
    """The heads each role has by construction, from ``roles`` = {task A: heads A trains, task B: heads B trains}:
    ``shared`` (both), ``task A only``, ``task B only``, ``untrained`` (neither)."""
    if len(roles) != 2:
        raise ValueError(f"expected the head sets of two tasks, got {list(roles)}")
    heads_a, heads_b = (set(map(tuple, heads)) for heads in roles.values())
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    outside = sorted(h for h in heads_a | heads_b if h not in every)
    if outside:
        raise ValueError(f"heads {outside} are not in a model of {n_layers} layers x {n_heads} heads")
    return {"shared": [h for h in every if h in heads_a and h in heads_b],
            "task A only": [h for h in every if h in heads_a and h not in heads_b],
            "task B only": [h for h in every if h in heads_b and h not in heads_a],
            "untrained": [h for h in every if h not in heads_a | heads_b]}


def _per_head_slices(model: Model, layer: int, grads: dict[str, Tensor]) -> list[Tensor]:
    """Per-head views ``[heads, ...]`` of the gradients of a layer's per-head attention parameters."""
    spec = model_spec(model)
    views = []
    for block in BLOCKS:
        views.append(weight_to_heads(grads[spec.param_name(layer, block)], block, "hooked", spec.n_block_heads(block)))
        if block != "O":
            bias = grads.get(spec.param_name(layer, block, bias=True))
            if bias is not None:
                views.append(bias_to_heads(bias, spec.n_block_heads(block), "hooked"))
    return views


def mask_head_gradients(model: Model, grads: dict[str, Tensor], allowed: set[Head]) -> None:
    """Zero, in place, the per-head slices of ``grads`` (parameter name -> gradient) of every head not in
    ``allowed``; other parameters are left alone. A HookedTransformer without GQA (every block per query head)."""
    spec = model_spec(model)
    if spec.kind != "hooked" or spec.n_kv_heads != spec.n_heads:
        raise ValueError("head-masked training needs a HookedTransformer without grouped K/V heads")
    for layer in range(spec.n_layers):
        blocked = [h for h in range(spec.n_heads) if (layer, h) not in allowed]
        for view in _per_head_slices(model, layer, grads):
            view[blocked] = 0


def zero_heads(model: Model, heads: list[Head]) -> None:
    """Set every per-head attention parameter slice of ``heads`` to 0 (the head writes nothing and, so, gets no
    gradient: an untrained head stays zero)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer, head in heads:
            for view in _per_head_slices(model, layer, {k: p.data for k, p in params.items()}):
                view[head] = 0


def masked_backward(model: Model, parts: dict[str, Tensor], roles: dict[str, set[Head]]) -> Tensor:
    """One training step's gradients under per-task head masks, written to ``.grad``: each task's mean
    next-token loss on its rows (``parts``: task -> tokens), its gradient masked to the heads it trains
    (``roles``: task -> heads), summed over tasks with weight 1/n_tasks. Returns that weighted loss (detached)."""
    params = dict(model.named_parameters())
    names = list(params)
    total: dict[str, Tensor] = {}
    losses = []
    for task, tokens in parts.items():
        loss = model(tokens, return_type="loss") / len(parts)
        grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)))
        grads = {n: g if g is not None else torch.zeros_like(params[n]) for n, g in grads.items()}
        mask_head_gradients(model, grads, roles[task])
        for name, grad in grads.items():
            total[name] = total[name] + grad if name in total else grad
        losses.append(loss.detach())
    for name, param in params.items():
        param.grad = total[name]
    return torch.stack(losses).sum()


def head_roles(config: TrainingConfig) -> dict[str, set[Head]]:
    """``config.head_roles`` as task -> set of ``(layer, head)`` (JSON gives lists)."""
    return {task: {(int(h[0]), int(h[1])) for h in heads} for task, heads in (config.head_roles or {}).items()}


def _known(config: TrainingConfig) -> dict[str, list[Head]]:
    return known_heads_by_construction(head_roles(config), n_layers=config.model["n_layers"],
                                       n_heads=config.model["n_heads"])


def untrained_heads(config: TrainingConfig) -> list[Head]:
    """The heads no task of ``config.head_roles`` trains (zero from the start)."""
    return _known(config)["untrained"]


def construction(config: TrainingConfig) -> dict:
    """:func:`tl_circuits.bundled.evaluation.select_heads`'s record for a head-masked model: the known heads are
    those of the construction; no control heads."""
    return dict(known_heads=_known(config), control_heads=[],
                rules=dict(by_construction={task: [list(h) for h in heads]
                                            for task, heads in (config.head_roles or {}).items()}))
