"""Checks and conventions of the per-sample loss: tokens, attention masks, valid targets, sample groups.

The loss of sample ``i`` is the token-mean next-token cross-entropy over its valid targets: target position
``t`` (predicting ``tokens[i, t]`` from position ``t - 1``) counts when both ``t`` and ``t - 1`` are valid in
the attention mask (docs/spec.md §2).

>>> valid_targets(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]))
tensor([[0., 1., 1.],
        [1., 1., 0.]])
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits.models.spec import ModelSpec, check_tokens, model_spec
from tl_circuits.models.types import Model


def valid_targets(attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_minus_1"]:
    """Target positions that count: both position ``t`` and ``t - 1`` valid (0/1 float)."""
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).float()


def next_token_losses(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"],
                      mask: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Each sample's token-mean next-token cross-entropy over its valid targets, in float32 or better."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    valid = valid_targets(mask).to(log_probs.dtype)
    return -(target * valid).sum(-1) / valid.sum(-1)


def check_mask(tokens: Tensor, attention_mask: Optional[Tensor], what: str) -> Int[Tensor, "batch pos"]:
    """The 0/1 int64 mask (all ones for ``None``); ValueError/TypeError naming what is wrong."""
    if attention_mask is None:
        return torch.ones_like(tokens, dtype=torch.int64)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention mask of {what} must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"attention mask of {what} has shape {tuple(attention_mask.shape)}, "
                         f"but {what} has shape {tuple(tokens.shape)}")
    values = torch.unique(attention_mask)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError(f"attention mask of {what} must hold only 0 and 1, got values {values.tolist()}")
    mask = attention_mask.to(torch.int64)
    empty = (valid_targets(mask).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} of {what} have no valid target position (a target needs it and "
                         "its predecessor unmasked): their loss is undefined")
    return mask


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
