"""A task's own per-sample loss ``loss_fn(logits, tokens) -> [n]``, and its contract (docs/spec.md §2.1).

The gradient engines take every sample's gradient from ONE batched backward of the *summed* losses of a chunk.
That is sample ``i``'s own gradient only if ``loss_i`` depends on row ``i`` of the logits alone (rows do not
interact in the forward pass, so the sum then separates), and the engine calls the function on chunks and, on a
TransformerBridge with padding, on groups of rows trimmed to their tokens. So a ``loss_fn`` must return **one
float value per row it is given, each a function of that row only**, computed in float32 or better (the logits
it gets are float32), differentiably. Before the first chunk, :meth:`LossFunction.check` refuses what breaks that
and is cheap to see: anything but a float tensor of shape ``[n]`` (a batch mean), a value that does not depend on
the logits through autograd, and a value that changes when another row's logits change or when it is called on
a subset of the rows (a batch normalisation), each with a ``ValueError`` or ``TypeError`` saying what is wrong.

Besides ``logits`` ``[n, pos, vocab]`` (float32) and ``tokens`` ``[n, pos]``, the engine passes, when the function
names them as parameters (or takes ``**kwargs``):

- ``attention_mask``: ``[n, pos]`` 0/1, the rows as the model ran them;
- ``loss_mask``: ``[n, pos]`` bool, the counted predictions of these rows in the ``scored`` convention (position
  ``p`` predicts token ``p + 1``): the caller's loss mask, or every valid target without one;
- ``samples``: ``[n]`` int64, the indices of these rows in the caller's batch, to look up per-sample data (the
  answer ids of a logit difference, say).

Positions are those of the rows the model ran: on a TransformerBridge a padded sample is trimmed to its tokens
(``ModelSpec.masks_under_vmap`` is False), so column ``p`` of the logits there is column ``p + first`` of the
caller's tokens. Find positions through ``loss_mask``/``attention_mask``, never by fixed column numbers.

>>> import torch
>>> def answer_logprob(logits, tokens, *, loss_mask):  # log-probability of each counted next token, summed
...     logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
...     return (logp * loss_mask[:, :-1]).sum(-1)
>>> fn = LossFunction(answer_logprob, "tokens", has_loss_mask=True)
>>> fn.keywords, fn.name
(('loss_mask',), 'tl_circuits.interference.loss_fn.answer_logprob')
>>> ones = torch.ones(3, 4, dtype=torch.long)
>>> LossFunction(lambda logits, tokens: logits.mean(), "tokens", False).check(
...     0 * ones, ones, ones.bool(), 10, torch.device("cpu"))
Traceback (most recent call last):
...
ValueError: loss_fn of tokens must return one value per sample, shape (2,); it returned shape () (a batch mean?). ...
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

LossFn = Callable[..., Float[Tensor, " batch"]]
"""``loss_fn(logits [n, pos, vocab] float32, tokens [n, pos], *, attention_mask, loss_mask, samples) -> [n]``."""

KEYWORDS = ("attention_mask", "loss_mask", "samples")
"""The optional keyword arguments the engine passes to a loss_fn that names them."""

CHECK_ROWS = 2
"""Rows the contract check calls the function on (random logits, the caller's first rows): two are enough to see
one row's value move with another's, and keep the check's logits (``rows × pos × vocab``) small."""


def callable_name(fn: Any) -> str:
    """``module.qualname`` of a function (of the wrapped one for ``functools.partial``, of the class for an object)."""
    inner = getattr(fn, "func", fn)
    target = inner if inspect.isfunction(inner) or inspect.ismethod(inner) else type(inner)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def accepted_keywords(fn: Callable) -> tuple[str, ...]:
    """Which of :data:`KEYWORDS` ``fn`` takes (all of them with ``**kwargs``; none if it has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return KEYWORDS
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return tuple(k for k in KEYWORDS if k in names)


class LossFunction:
    """A caller's ``loss_fn``, called the engine's way and checked against the contract (module docstring).

    Args:
        fn: the caller's function.
        what: the task's name in messages (``"tokens_a"``...).
        has_loss_mask: a loss mask was given with it: ``fn`` must take ``loss_mask=`` (else it would be ignored).
    """

    def __init__(self, fn: LossFn, what: str, has_loss_mask: bool):
        if not callable(fn):
            raise TypeError(f"loss_fn of {what} must be callable, got {type(fn).__name__}")
        self.fn, self.what, self.name = fn, what, callable_name(fn)
        self.keywords = accepted_keywords(fn)
        self.checked = False
        if has_loss_mask and "loss_mask" not in self.keywords:
            raise ValueError(f"a loss mask was given for {what} with a loss_fn ({self.name}) that takes no loss_mask= "
                             "argument: the mask would be ignored; add a loss_mask keyword to the function (it gets "
                             "the counted predictions) or drop the mask")

    def __call__(self, logits: Float[Tensor, "n pos vocab"], tokens: Int[Tensor, "n pos"],
                 attention_mask: Int[Tensor, "n pos"], loss_mask: Bool[Tensor, "n pos"],
                 samples: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """The function's value on these rows (float32 logits), checked to be one float per row."""
        given = {"attention_mask": attention_mask, "loss_mask": loss_mask, "samples": samples}
        value = self.fn(logits, tokens, **{k: given[k] for k in self.keywords})
        return self._one_per_row(value, logits.shape[0])

    def _one_per_row(self, value: Any, n: int) -> Tensor:
        if not isinstance(value, Tensor):
            raise TypeError(f"loss_fn of {self.what} ({self.name}) must return a torch.Tensor of shape ({n},), got "
                            f"{type(value).__name__}")
        if tuple(value.shape) != (n,):
            hint = " (a batch mean?)" if value.dim() == 0 else ""
            raise ValueError(f"loss_fn of {self.what} must return one value per sample, shape ({n},); it returned "
                             f"shape {tuple(value.shape)}{hint}. The engine takes each sample's gradient from one "
                             "backward of the summed losses (docs/spec.md §2.1)")
        if not value.is_floating_point():
            raise TypeError(f"loss_fn of {self.what} ({self.name}) must return floating-point values, got "
                            f"{value.dtype}")
        return value.float()

    def check(self, tokens: Int[Tensor, "n pos"], mask: Int[Tensor, "n pos"], counted: Bool[Tensor, "n pos"],
              d_vocab: int, device: torch.device) -> None:
        """Refuse a function that breaks the contract (once per call; module docstring), on random logits for the
        first :data:`CHECK_ROWS` rows: shape and dtype, a differentiable value, and row 1's value unchanged
        when row 0's logits change or when row 0 is left out (``counted``: the rows' counted predictions)."""
        if self.checked:
            return
        k = min(CHECK_ROWS, tokens.shape[0])
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(k, tokens.shape[1], d_vocab, generator=gen).to(device).requires_grad_(True)
        rows = (tokens[:k].to(device), mask[:k].to(device), counted[:k].to(device), torch.arange(k, device=device))
        with torch.enable_grad():
            value = self(logits, *rows)
        if not value.requires_grad:
            raise ValueError(f"loss_fn of {self.what} ({self.name}) returned values that do not depend on the logits "
                             "through autograd (detached, or computed by argmax/integer ops): its gradient would be "
                             "zero")
        if k >= 2:
            with torch.no_grad():
                base = value.detach()
                shuffled = logits.detach().clone()
                shuffled[0] = shuffled[0].flip(-1) * 3.0  # another row 0
                changed = self(shuffled, *rows)
                alone = self(logits.detach()[1:], *(r[1:] for r in rows))
            for values, how in ((changed[1:], "when another sample's logits change"),
                                (alone, "when it is called on a subset of the samples")):
                if not torch.allclose(values, base[1:], rtol=1e-5, atol=1e-6, equal_nan=True):
                    raise ValueError(f"loss_fn of {self.what} ({self.name}) is not per sample: a sample's value "
                                     f"changes {how} (a batch mean or normalisation?). Each value must depend on "
                                     "that sample's logits only: the engine takes per-sample gradients from one "
                                     "backward of the summed losses, over chunks of samples (docs/spec.md §2.1)")
        self.checked = True


__all__ = ["CHECK_ROWS", "KEYWORDS", "LossFn", "LossFunction", "accepted_keywords", "callable_name"]
