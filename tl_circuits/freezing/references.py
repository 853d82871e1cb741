"""The reference activations a freeze writes: dataset means (MEAN) and another input's activations (RESAMPLE).

Both are computed once, before any hook runs, so that a freeze's forward passes only read them.

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # 4 heads of d_head 16 per layer
>>> means = compute_mean_activations(model, torch.randint(0, 64, (4, 6)), progress=False)
>>> means.q[0].shape, means.n_samples  # layer 0's mean queries: [pos, head, d_head]
(torch.Size([6, 4, 16]), 4)

Padded reference tokens: the mean leaves out the padding, per position (sample 0 is left-padded by two):

>>> mask = torch.tensor([[0, 0, 1, 1, 1, 1]] + [[1] * 6] * 3)
>>> means = compute_mean_activations(model, torch.randint(0, 64, (4, 6)), attention_mask=mask, progress=False)
>>> means.valid_per_position.tolist()
[3, 3, 4, 4, 4, 4]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import ActivationCache

from tl_circuits import defaults
from tl_circuits.deprecation import renamed_argument
from tl_circuits.freezing.options import Circuit, FreezeSpec, Replacement
from tl_circuits.interference import memory
from tl_circuits.interference.inputs import check_zero_one
from tl_circuits.models.spec import ModelSpec, check_tokens, model_spec, post_rotary
from tl_circuits.models.types import Model

MEAN_BATCH_SIZE = 32
"""The most reference samples per forward pass when accumulating MEAN activations (fewer when
``memory_budget_gb`` does not hold 32): larger batches gain nothing here."""


@dataclass(frozen=True)
class MeanActivations:
    """Dataset means of what the freezes write, per layer (the MEAN reference).

    ``q[layer]``: [pos, n_heads, d_head] (or [n_heads, d_head] over positions), the queries that
    enter the scores (post-rotary for rotary models); ``k[layer]``: same with n_kv_heads; ``z[layer]``:
    [pos, n_heads, d_head]. Means are over the reference samples (and positions when
    ``per_position=False``), never over d_head. ``valid_per_position`` ([pos], computed with an attention mask): the
    samples each position's mean is over (0: the position fell back to the mean over every valid position).
    """

    q: dict[int, Tensor]
    k: dict[int, Tensor]
    z: dict[int, Tensor]
    per_position: bool
    n_samples: int
    valid_per_position: Optional[Tensor] = None


def compute_mean_activations(
    model: Model,
    reference_tokens: Int[Tensor, "batch pos"],
    *,
    per_position: bool = True,
    memory_budget_gb: float = defaults.MEMORY_BUDGET_GB,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    batch_size: Optional[int] = None,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> MeanActivations:
    """Mean queries, keys and z of every head over a reference dataset (the MEAN reference).

    Accumulated in float32, in chunks of ``chunk_size`` samples per forward pass; ``None`` (default): as many as
    ``memory_budget_gb`` (what the call may allocate, in GB) holds, at most :data:`MEAN_BATCH_SIZE`
    (``batch_size``, the old name of ``chunk_size``, is deprecated). With ``per_position=True`` (default) the
    mean is taken per position, so a freeze can only be applied to runs no longer than the
    reference; with ``False`` it is also averaged over positions and applies to any length.

    ``attention_mask`` ([batch, pos] 0/1 or bool; ``None``: every position real): padded reference tokens are run with
    their mask, and padded positions are left out of every mean: position t's mean is over the samples valid at t
    (``per_position=False``: over every valid (sample, position)). A position no sample is valid at (the first
    positions of a left-padded batch, the last of a right-padded one) takes the mean over every valid position
    instead, not NaN: a freeze writes it only where the run is padded too, and a NaN there would reach the valid
    positions through the attention (0 · NaN); ``valid_per_position`` says which positions did (0).
    """
    spec = model_spec(model)
    check_tokens(spec, reference_tokens, "reference tokens")
    weights = None
    if attention_mask is not None:
        weights = check_zero_one(reference_tokens, attention_mask, "attention mask", "reference tokens")
        if not bool(weights.any()):
            raise ValueError("the attention mask of the reference tokens masks every position: no mean to take")
    chunk_size = renamed_argument("batch_size", "chunk_size", batch_size, chunk_size, default=None,
                                  note="reference samples per forward pass")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 (samples per forward pass), got {chunk_size!r}")
    if chunk_size is None:  # the cache keeps q, k and z of every layer for the chunk
        row_bytes = memory.forward_row_bytes(spec, reference_tokens.shape[1], cached_heads=3)
        chunk_size = min(MEAN_BATCH_SIZE, memory.rows_for_budget(row_bytes, memory_budget_gb))
    names = {}
    for layer in range(spec.n_layers):
        names[spec.query_hook(layer)] = ("q", layer)
        names[spec.key_hook(layer)] = ("k", layer)
        names[spec.hook_name(layer, "z")] = ("z", layer)
    sums: dict[tuple[str, int], Tensor] = {}
    n = reference_tokens.shape[0]
    starts = range(0, n, chunk_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="mean activations", disable=not progress):
            chunk = reference_tokens[start:start + chunk_size]
            masked: dict[str, Any] = {}
            if weights is not None:
                masked["attention_mask"] = weights[start:start + chunk_size].to(chunk.device)
            _, cache = model.run_with_cache(chunk, names_filter=lambda nm: nm in names, **masked)
            for name, (kind, layer) in names.items():
                act = cache[name]  # [batch, pos, heads, d_head]
                if kind in ("q", "k"):  # the q/k that enter the scores
                    act = post_rotary(model, spec, layer, act)
                act, key = act.float(), (kind, layer)
                if weights is not None:  # padded positions add nothing (whatever they hold: where, not a product)
                    act = torch.where(masked["attention_mask"].to(act.device).bool()[:, :, None, None], act, 0.0)
                total = act.sum(dim=0) if per_position or weights is not None else act.sum(dim=(0, 1))
                sums[key] = sums[key] + total if key in sums else total
    if weights is None:
        denom = n if per_position else n * reference_tokens.shape[1]
        means = {key: total / denom for key, total in sums.items()}
        valid = None
    else:
        valid = weights.sum(0)
        means = {key: _masked_mean(total, valid, per_position) for key, total in sums.items()}
    dtype = spec.dtype
    out = {kind: {layer: means[(kind, layer)].to(dtype) for layer in range(spec.n_layers)} for kind in "qkz"}
    return MeanActivations(q=out["q"], k=out["k"], z=out["z"], per_position=per_position, n_samples=n,
                           valid_per_position=valid)


def _masked_mean(per_position_sum: Tensor, valid: Tensor, per_position: bool) -> Tensor:
    """The mean of valid activations from their per-position sums ``[pos, head, d_head]`` and valid counts ``[pos]``:
    per position (a position with none: the mean over every valid position), or over all positions."""
    counts = valid.to(per_position_sum.device, torch.float32)[:, None, None]
    overall = per_position_sum.sum(0) / counts.sum()
    if not per_position:
        return overall
    return torch.where(counts > 0, per_position_sum / counts.clamp_min(1), overall)


ResampleReference = dict[str, Tensor]
"""hook name -> the reference activation ([batch, ...]) of the pattern (QK) and z (OV) of the frozen layers."""

ReferenceLike = Union[MeanActivations, ActivationCache, ResampleReference, Int[Tensor, "batch pos"]]
"""What ``reference=`` accepts: MEAN: a :class:`MeanActivations` or reference tokens; RESAMPLE: reference
tokens, an ``ActivationCache`` or a :data:`ResampleReference`; prepared by :func:`prepare_reference`."""

PreparedReference = Optional[Union[MeanActivations, ResampleReference]]
"""What the freeze hooks read: :func:`prepare_reference`'s result (None for ZERO, NOISE and IDENTITY)."""


def resample_reference(
    model: Model,
    spec: ModelSpec,
    layers: Iterable[int],
    circuit: Circuit,
    reference: Union[Int[Tensor, "batch pos"], ActivationCache, Mapping[str, Tensor]],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> ResampleReference:
    """The RESAMPLE reference: ``reference`` tokens run once now (no grad; with ``attention_mask``, their
    padding), or read from a cache."""
    names = []
    for layer in layers:
        if circuit in (Circuit.QK, Circuit.BOTH):
            names.append(spec.hook_name(layer, "pattern"))
        if circuit in (Circuit.OV, Circuit.BOTH):
            names.append(spec.hook_name(layer, "z"))
    if isinstance(reference, Tensor):
        check_tokens(spec, reference, "reference tokens")
        with torch.no_grad():
            masked: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
            _, reference = model.run_with_cache(reference, names_filter=lambda nm: nm in names, **masked)
    if not isinstance(reference, (ActivationCache, Mapping)):
        raise TypeError(
            f"RESAMPLE needs reference tokens [batch, pos] or an ActivationCache, got {type(reference).__name__}"
        )
    out = {}
    for name in names:
        try:
            out[name] = reference[name].detach()
        except KeyError:
            raise KeyError(
                f"the reference cache has no {name!r}; cache it (e.g. run_with_cache without a names filter)"
            ) from None
    return out


def prepare_reference(
    model: Model, spec: ModelSpec, freeze_spec: FreezeSpec, reference: Optional[ReferenceLike], layers: Iterable[int],
    reference_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> PreparedReference:
    """The reference the hooks read for ``freeze_spec.replacement``: checked, and computed from tokens if needed.

    MEAN: a :class:`MeanActivations` (reference tokens are averaged per position); RESAMPLE: a
    :data:`ResampleReference` (``reference_mask``: the attention mask of RESAMPLE reference tokens); every other
    replacement: ``None`` (and a given reference is an error).
    """
    replacement = freeze_spec.replacement
    if replacement == Replacement.MEAN:
        if isinstance(reference, Tensor):
            reference = compute_mean_activations(model, reference, progress=False)
        if not isinstance(reference, MeanActivations):
            raise TypeError("MEAN needs a MeanActivations (see compute_mean_activations) or reference tokens, "
                            f"got {type(reference).__name__}")
        return reference
    if replacement == Replacement.RESAMPLE:
        if reference is None:
            raise ValueError("RESAMPLE needs reference=tokens or an ActivationCache")
        # a MeanActivations here is resample_reference's TypeError, at run time
        return resample_reference(model, spec, layers, freeze_spec.circuit, reference,  # type: ignore[arg-type]
                                  reference_mask)
    if reference is not None:
        raise ValueError(f"{replacement.value.upper()} takes no reference")
    return None
