"""Checks and conventions of the per-sample loss: tokens, attention masks, loss masks, valid targets, sample groups.

The loss of sample ``i`` is by default the token-mean next-token cross-entropy over its *counted* predictions
(docs/spec.md §2.1). Prediction ``p`` (at position ``p``, of token ``p + 1``) is valid when both positions are
valid in the attention mask; it counts when it is valid and, if a **loss mask** is given, set there (the bundled
``scored`` convention: ``loss_mask[i, p]`` counts the prediction of token ``p + 1``). A task may instead give its own
per-sample loss ``loss_fn`` (:mod:`tl_circuits.interference.loss_fn`). :class:`TaskLoss` is one task's choice.

>>> valid_targets(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]))
tensor([[0., 1., 1.],
        [1., 1., 0.]])
>>> labels = torch.tensor([[-100, -100, 7, 8]])  # Hugging Face: the loss is on tokens 2 and 3
>>> loss_mask_from_labels(labels)                 # predicted at positions 1 and 2
tensor([[False,  True,  True, False]])
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_circuits.interference.loss_fn import LossFn, LossFunction
from tl_circuits.models.spec import ModelSpec, check_tokens, model_spec
from tl_circuits.models.types import Model

IGNORE_INDEX = -100
"""The label of a position without loss in Hugging Face's ``labels`` (``CrossEntropyLoss(ignore_index=-100)``)."""


def valid_targets(attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_minus_1"]:
    """Target positions that count: both position ``t`` and ``t - 1`` valid (0/1 float)."""
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).float()


def prediction_mask(attention_mask: Int[Tensor, "batch pos"],
                    loss_mask: Optional[Tensor] = None) -> Bool[Tensor, "batch pos"]:
    """The counted predictions ``[batch, pos]`` in the ``scored`` convention: position ``p`` counts (the
    prediction of token ``p + 1``) when both are valid and, with a loss mask, it is set there; the last column
    is never counted."""
    counted = valid_targets(attention_mask).bool()
    if loss_mask is not None:
        counted = counted & loss_mask[:, :-1].to(counted.device).bool()
    return torch.cat([counted, torch.zeros_like(counted[:, :1])], dim=1)


def next_token_losses(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"],
                      mask: Int[Tensor, "batch pos"], loss_mask: Optional[Tensor] = None) -> Float[Tensor, " batch"]:
    """Each sample's token-mean next-token cross-entropy over its counted predictions (:func:`prediction_mask`:
    valid targets, and those set in ``loss_mask`` if given), in float32 or better."""
    predictions = logits[:, :-1]  # float32 or better: bf16/fp16 up to float32, float64 kept
    log_probs = torch.log_softmax(predictions.to(torch.promote_types(predictions.dtype, torch.float32)), dim=-1)
    target = log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    counted = prediction_mask(mask, loss_mask)[:, :-1].to(log_probs.dtype)
    return -(target * counted).sum(-1) / counted.sum(-1)


def loss_mask_from_labels(labels: Int[Tensor, "batch pos"],
                          input_ids: Optional[Int[Tensor, "batch pos"]] = None) -> Bool[Tensor, "batch pos"]:
    """A loss mask from Hugging Face ``labels``: ``loss_mask[:, p] = labels[:, p + 1] != -100``.

    HF's ``labels`` are aligned with the input ids and shifted inside the model (the logits at ``p`` are scored
    against ``labels[:, p + 1]``); a loss mask is in the ``scored`` convention, aligned with the predictions, so
    this is the same shift: ``labels[:, 0]`` is never a target (HF drops it too) and the last column is False.
    The targets themselves are the input ids: with ``input_ids``, labels that are not -100 must equal them (a
    ValueError naming the samples otherwise).

    >>> ids = torch.tensor([[5, 6, 7, 8]])
    >>> loss_mask_from_labels(torch.tensor([[-100, 6, -100, 8]]), ids).int()
    tensor([[1, 0, 1, 0]], dtype=torch.int32)
    """
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer tensor [batch, pos] (-100 = no loss)")
    scored = labels != IGNORE_INDEX
    if input_ids is not None:
        if tuple(input_ids.shape) != tuple(labels.shape):
            raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
        wrong = (scored & (labels != input_ids.to(labels.device))).any(1).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(f"samples {wrong}: labels that are not -100 differ from the input ids; tl_circuits scores "
                             "the next input token, so labels must be the input ids or -100")
    return torch.cat([scored[:, 1:], torch.zeros_like(scored[:, :1])], dim=1)


def check_zero_one(tokens: Tensor, value: object, name: str, what: str, hint: str = "") -> Int[Tensor, "batch pos"]:
    """``value`` as int64, checked to be a tensor of the tokens' shape holding only 0 and 1 (or bool);
    TypeError/ValueError naming ``name`` of ``what``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} of {what} must be a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(tokens.shape):
        raise ValueError(f"{name} of {what} has shape {tuple(value.shape)}, but {what} has shape "
                         f"{tuple(tokens.shape)}")
    values = torch.unique(value)
    if value.dtype != torch.bool and not bool(((values == 0) | (values == 1)).all()):
        raise ValueError(f"{name} of {what} must hold only 0 and 1 (or bool), got values {values.tolist()[:10]}{hint}")
    return value.to(torch.int64)


def check_mask(tokens: Tensor, attention_mask: Optional[Tensor], what: str) -> Int[Tensor, "batch pos"]:
    """The 0/1 int64 mask (all ones for ``None``); ValueError/TypeError naming what is wrong."""
    if attention_mask is None:
        return torch.ones_like(tokens, dtype=torch.int64)
    mask = check_zero_one(tokens, attention_mask, "attention mask", what)
    empty = (valid_targets(mask).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} of {what} have no valid target position (a target needs it and "
                         "its predecessor unmasked): their loss is undefined")
    return mask


def named_samples(samples: list[int]) -> str:
    """``samples [..]`` for a message, the first 20 of a long list."""
    shown = samples[:20]
    return f"samples {shown}" + (f" (and {len(samples) - 20} more)" if len(samples) > 20 else "")


def check_loss_mask(tokens: Tensor, mask: Int[Tensor, "batch pos"], loss_mask: Optional[Tensor],
                    what: str) -> Optional[Int[Tensor, "batch pos"]]:
    """The 0/1 int64 loss mask (``None`` stays ``None``: every valid target), checked: a tensor of the tokens'
    shape holding 0/1 or bool, the last column unset (it predicts nothing), and at least one counted prediction
    (:func:`prediction_mask`) per sample; ValueError/TypeError naming what is wrong and the samples."""
    if loss_mask is None:
        return None
    loss_mask = check_zero_one(tokens, loss_mask, "loss mask", what, "; for Hugging Face labels (-100 = no "
                               "loss) use loss_mask_from_labels").to(mask.device)
    last = loss_mask[:, -1].nonzero().flatten().tolist()
    if last:
        raise ValueError(f"{named_samples(last)} of {what} set the last position of the loss mask: loss_mask[:, p] "
                         "counts the prediction of token p + 1 (the scored convention), and the last position predicts "
                         "nothing; shift a mask of target tokens left by one (loss_mask_from_labels does)")
    empty = (prediction_mask(mask, loss_mask).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{named_samples(empty)} of {what} have no counted prediction: the loss mask sets no position "
                         "whose target and predecessor are valid in the attention mask, so their loss is undefined")
    return loss_mask


@dataclass
class TaskLoss:
    """One task's per-sample loss (docs/spec.md §2.1): which predictions count and what is computed on them.

    Attributes:
        loss_mask: the checked 0/1 loss mask ``[N, pos]``, or ``None`` (every valid target counts).
        loss_fn: the caller's loss (:class:`~tl_circuits.interference.loss_fn.LossFunction`), or ``None``: the
            token-mean next-token cross-entropy over the counted predictions.
        n_counted: ``[N]`` counted predictions per sample (CPU).
    """

    loss_mask: Optional[Int[Tensor, "n pos"]]
    loss_fn: Optional[LossFunction]
    n_counted: Int[Tensor, " n"]

    def rows(self, mask: Int[Tensor, "n pos"], samples: Tensor, positions: slice) -> Bool[Tensor, "n pos"]:
        """The counted predictions of rows ``samples`` (indices into the task) at ``positions``, ``mask`` being
        their attention mask there."""
        loss_mask = None if self.loss_mask is None else self.loss_mask[samples.to(self.loss_mask.device)][:, positions]
        return prediction_mask(mask, loss_mask)

    def losses(self, logits: Float[Tensor, "n pos vocab"], tokens: Int[Tensor, "n pos"], mask: Int[Tensor, "n pos"],
               counted: Bool[Tensor, "n pos"], samples: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """The per-sample losses of these rows (``counted``: from :meth:`rows`)."""
        if self.loss_fn is None:
            return next_token_losses(logits, tokens, mask, counted)
        return self.loss_fn(logits.float(), tokens, mask, counted, samples)

    def check(self, tokens: Tensor, mask: Tensor, d_vocab: int, device: torch.device) -> None:
        """Check the loss_fn's contract once (:meth:`LossFunction.check`); nothing to check without one."""
        if self.loss_fn is not None:
            self.loss_fn.check(tokens, mask, prediction_mask(mask, self.loss_mask), d_vocab, device)

    def describe(self) -> dict:
        """What is scored, for ``settings["loss"]``: ``scored`` ("all valid targets", "loss mask" or "custom
        loss_fn"), the ``loss_fn``'s qualified name, and the counted predictions per sample."""
        counts = self.n_counted.tolist()
        scored = "custom loss_fn" if self.loss_fn is not None else "loss mask" if self.loss_mask is not None else (
            "all valid targets")
        return {"scored": scored, "loss_fn": None if self.loss_fn is None else self.loss_fn.name,
                "loss_mask": self.loss_mask is not None,
                "counted_predictions": {"min": min(counts), "median": statistics.median(counts), "max": max(counts),
                                        "total": sum(counts)}}


def prepare_loss(tokens: Tensor, mask: Int[Tensor, "batch pos"], loss_mask: Optional[Tensor],
                 loss_fn: Optional[LossFn], what: str) -> TaskLoss:
    """A task's :class:`TaskLoss`, its loss mask and loss_fn checked (``mask``: from :func:`check_mask`)."""
    loss_mask = check_loss_mask(tokens, mask, loss_mask, what)
    function = None if loss_fn is None else LossFunction(loss_fn, what, has_loss_mask=loss_mask is not None)
    return TaskLoss(loss_mask, function, prediction_mask(mask, loss_mask).sum(1).long().cpu())


def check_no_backward_hooks(model: Model) -> None:
    """ValueError if any module has a backward hook: it would change the gradients being measured (and cannot
    run inside ``torch.func`` transforms at all)."""
    from transformer_lens.hook_points import HookPoint

    for name, module in model.named_modules():
        if (isinstance(module, HookPoint) and module.bwd_hooks) or module._backward_hooks or getattr(
            module, "_backward_pre_hooks", None
        ):
            raise ValueError(f"module {name or '<root>'} has a backward hook; per-sample gradients are those of the "
                             "loss itself, which a backward hook would change: remove it first")


def valid_span(row: Tensor) -> tuple[int, int]:
    """(first, last + 1) of a sample's valid positions."""
    valid = row.nonzero().flatten()
    return int(valid[0]), int(valid[-1]) + 1


def prepare_inputs(model: Model, tokens: Tensor, attention_mask: Optional[Tensor], what: str,
                   method: str = "factored") -> tuple[ModelSpec, Int[Tensor, "batch pos"]]:
    """Validate tokens and mask for a per-sample gradient run; returns the model's spec and the 0/1 mask."""
    spec = model_spec(model)
    check_tokens(spec, tokens, what)
    if tokens.shape[1] < 2:
        raise ValueError(f"{what} needs at least 2 positions for a next-token loss, got {tokens.shape[1]}")
    mask = check_mask(tokens, attention_mask, what)
    if not spec.masks_under_vmap:  # padding is trimmed (sample_groups): it must be one run of valid positions
        host = mask.cpu()  # one transfer, not one synchronisation per sample on a GPU
        for i in range(host.shape[0]):
            first, stop = valid_span(host[i])
            if not bool(host[i, first:stop].all()):
                raise ValueError(f"sample {i} of {what} has gaps in its attention mask; on a TransformerBridge "
                                 "only left or right padding is supported")
    check_no_backward_hooks(model)
    return spec, mask


def non_finite_error(bad_ids: list, what: str) -> ValueError:
    return ValueError(f"per-sample gradients of samples {bad_ids} of {what} are not finite (NaN/inf); "
                      "check the model's weights and those inputs")


def sample_groups(spec: ModelSpec, mask: Int[Tensor, "n pos"]) -> list[tuple[Optional[Tensor], slice]]:
    """(samples, positions) of each forward over a chunk: the whole chunk with its mask (index ``None``), or,
    where the model cannot take a padding mask exactly (a TransformerBridge: ``spec.masks_under_vmap`` is
    False), one forward per valid span with the padding trimmed off: the gradient of a padded sample is that
    of its unpadded tokens."""
    n, n_pos = mask.shape
    if spec.masks_under_vmap:
        return [(None, slice(0, n_pos))]
    groups: dict[tuple[int, int], list[int]] = {}
    host = mask.cpu()  # one transfer per chunk, not one synchronisation per sample on a GPU
    for i in range(n):
        groups.setdefault(valid_span(host[i]), []).append(i)
    if list(groups) == [(0, n_pos)]:
        return [(None, slice(0, n_pos))]
    return [(torch.tensor(rows, device=mask.device), slice(*span)) for span, rows in groups.items()]


def scatter_groups(parts: Sequence[tuple[Optional[Tensor], slice, dict[str, Tensor]]], n: int,
                   n_pos: Optional[int]) -> dict[str, Tensor]:
    """Put each group's ``{key: [n_group, (pos_group,) ...]}`` back at its samples (and positions), zeros elsewhere."""
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][2]
    out: dict = {}
    for rows, positions, tensors in parts:
        for key, t in tensors.items():
            if key not in out:
                shape = (n, *t.shape[1:]) if n_pos is None else (n, n_pos, *t.shape[2:])
                out[key] = t.new_zeros(shape)
            if n_pos is None:
                out[key][rows] = t
            else:
                out[key][rows, positions] = t
    return out


def group_inputs(tokens: Tensor, mask: Tensor, rows: Optional[Tensor], positions: slice) -> tuple[Tensor, Tensor]:
    t = tokens if rows is None else tokens[rows]
    m = mask if rows is None else mask[rows]
    return t[:, positions], m[:, positions]


def group_samples(samples: slice, rows: Optional[Tensor]) -> Int[Tensor, " n"]:
    """The task's indices of a group's rows: ``rows`` (indices into the chunk ``samples``) or the whole chunk."""
    index = torch.arange(samples.start, samples.stop)
    return index if rows is None else index[rows.cpu()]
