"""Scoring a model on a task batch's scored positions: losses, accuracy, the sweep metric.

Re-exported by :mod:`tl_circuits.bundled.tasks` (and the package); a :class:`~tl_circuits.bundled.tasks.TaskBatch`
is read through its ``tokens`` and ``scored`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.bundled.tasks import TaskBatch

__all__ = ["in_context_accuracy", "in_context_loss", "scored_accuracy", "scored_loss", "scored_loss_metric"]


def _token_nll(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """Next-token negative log-likelihood at each position but the last: [batch, pos - 1]."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _scored_mask(batch: TaskBatch, logits: Tensor) -> Tensor:
    if logits.shape[:2] != batch.tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape[:2])} do not match the batch's tokens "
                         f"{tuple(batch.tokens.shape)}")
    if not batch.scored.any():
        raise ValueError(f"the {batch.name!r} batch has no scored positions")
    return batch.scored[:, :-1].to(logits.device)


def scored_loss(
    logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch, *, per_sample: bool = False
) -> Union[Float[Tensor, ""], Float[Tensor, " batch"]]:
    """Mean next-token cross-entropy over the scored positions (float32).

    ``per_sample=True`` gives one mean per row ([batch]; NaN for a row with no scored position).
    Differentiable, so it also serves as a training or gradient objective.
    """
    mask = _scored_mask(batch, logits)
    nll = _token_nll(logits, batch.tokens.to(logits.device))
    if per_sample:
        return (nll * mask).sum(1) / mask.sum(1)  # 0/0 = NaN: missing data, not zero loss
    return nll[mask].mean()


def scored_accuracy(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, ""]:
    """Fraction of scored positions where the argmax prediction is the next token."""
    mask = _scored_mask(batch, logits)
    correct = logits[:, :-1].argmax(-1) == batch.tokens[:, 1:].to(logits.device)
    return correct[mask].float().mean()


def scored_loss_metric(batch: TaskBatch) -> Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]:
    """``logits -> scored_loss(logits, batch)`` as a metric for :func:`tl_circuits.freeze_sweep`.

    >>> import tl_circuits as tlc
    >>> model = tlc.load_bundled_model("induction-2l")
    >>> batch = tlc.bundled.induction_batch(4, seed=0)
    >>> result = tlc.freeze_sweep(model, batch.tokens, scored_loss_metric(batch), progress=False)
    >>> sorted(result.frozen)
    ['ov', 'qk']
    """
    def in_context_loss(logits: Tensor) -> Tensor:
        return scored_loss(logits, batch)

    return in_context_loss


def _logits(model: Model, batch: TaskBatch) -> Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(batch.tokens.to(device), return_type="logits")


def in_context_loss(model: Model, batch: TaskBatch, *,
                    per_sample: bool = False) -> Union[Float[Tensor, ""], Float[Tensor, " batch"]]:
    """The model's mean cross-entropy on the batch's scored positions (no gradient; hooks apply).

    Runs ``model(batch.tokens)``, so freezes and other hooks active around the call take effect:

    >>> import tl_circuits as tlc
    >>> model = tlc.load_bundled_model("induction-2l")
    >>> batch = tlc.bundled.induction_batch(4, seed=0)
    >>> with tlc.freeze(model, [(1, 2)], "qk", "zero"):
    ...     damaged = in_context_loss(model, batch)
    >>> bool(damaged > in_context_loss(model, batch))
    True
    """
    return scored_loss(_logits(model, batch), batch, per_sample=per_sample)


def in_context_accuracy(model: Model, batch: TaskBatch) -> float:
    """Fraction of the batch's scored positions where the model's top prediction is right."""
    return float(scored_accuracy(_logits(model, batch), batch))
