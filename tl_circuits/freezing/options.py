"""What a freeze is: its circuit, replacement and gradient mode, the heads, and their validation (docs/spec.md §1).

Every entry point (:func:`~tl_circuits.freezing.api.freeze`, :func:`~tl_circuits.freezing.hooks.freeze_hooks`,
:func:`~tl_circuits.freezing.sweep.freeze_sweep`) reads its options through :func:`parse_option` and
:func:`resolve_freeze_spec`, so a bad option gives the same error whichever way the freeze is asked for.

>>> parse_option(Circuit, "QK", "circuit")
<Circuit.QK: 'qk'>
>>> parse_option(Replacement, "median", "replacement")
Traceback (most recent call last):
...
ValueError: unknown replacement 'median'; expected one of 'zero', 'mean', 'noise', 'resample', 'identity'
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Optional, Sequence, TypeVar, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from tl_circuits.defaults import SEED
from tl_circuits.models.spec import ModelSpec, model_spec
from tl_circuits.models.types import Model

NOISE_SCALE = 1.0
"""Default NOISE std, relative to the frozen head's own activation std (shared by freeze and freeze_sweep)."""


class Circuit(str, Enum):
    """Which circuit of a head is frozen: ``QK`` (its pattern), ``OV`` (what it moves) or ``BOTH``."""

    QK = "qk"
    OV = "ov"
    BOTH = "both"


class Replacement(str, Enum):
    """What is written into the frozen slice (see :mod:`tl_circuits.freezing.api` for the table)."""

    ZERO = "zero"
    MEAN = "mean"
    NOISE = "noise"
    RESAMPLE = "resample"
    IDENTITY = "identity"


class GradientMode(str, Enum):
    """How gradients pass the frozen slice: not at all (``STOPGRAD``) or as if unfrozen (``STRAIGHT_THROUGH``)."""

    STOPGRAD = "stopgrad"
    STRAIGHT_THROUGH = "straight_through"


OptionT = TypeVar("OptionT", bound=Enum)


def parse_option(cls: type[OptionT], value: Union[str, Enum], what: str) -> OptionT:
    """``value`` (a member or its case-insensitive name) as a member of ``cls``; a ``ValueError`` naming ``what``."""
    try:
        return cls(value.value if isinstance(value, Enum) else str(value).lower())
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown {what} {value!r}; expected one of {choices}") from None


HeadsLike = Union[
    Sequence[tuple[int, int]],
    Bool[Tensor, "n_layers n_heads"],
    Mapping[int, Sequence[int]],
    Sequence[Sequence[int]],
]


def normalize_heads(spec: ModelSpec, heads: HeadsLike) -> tuple[tuple[int, int], ...]:
    """Sorted, de-duplicated (layer, head) pairs from any accepted form.

    Accepted: a list of ``(layer, head)`` tuples (or one tuple); a boolean ``[n_layers, n_heads]``
    mask; a dict ``{layer: [heads]}``; or per-layer lists ``[[heads of layer 0], [heads of layer 1],
    ...]`` with one entry per layer. Pairs must be tuples; inner lists always mean per-layer lists.

    >>> from tl_circuits import load_bundled_model
    >>> spec = model_spec(load_bundled_model("induction-2l"))  # 2 layers of 4 heads
    >>> normalize_heads(spec, {1: [0], 0: [1, 1]})
    ((0, 1), (1, 0))
    >>> normalize_heads(spec, [[], [0, 1]])
    ((1, 0), (1, 1))
    """
    pairs: list[tuple[int, int]] = []
    if isinstance(heads, Tensor):
        if heads.dtype != torch.bool or tuple(heads.shape) != (spec.n_layers, spec.n_heads):
            raise ValueError(
                f"a head mask must be a bool tensor of shape [{spec.n_layers}, {spec.n_heads}], "
                f"got {heads.dtype} {tuple(heads.shape)}"
            )
        pairs = [(int(l), int(h)) for l, h in heads.nonzero().tolist()]
    elif isinstance(heads, Mapping):
        pairs = [(layer, head) for layer, hs in heads.items() for head in hs]
    elif isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, int) for x in heads):
        pairs = [heads]  # type: ignore[list-item]
    elif isinstance(heads, Sequence) and not isinstance(heads, str):
        items = list(heads)
        if items and all(isinstance(x, tuple) for x in items):
            for x in items:
                if len(x) != 2:
                    raise ValueError(f"each head must be a (layer, head) pair, got {x!r}")
            pairs = [(x[0], x[1]) for x in items]
        elif items and all(not isinstance(x, tuple) and isinstance(x, (Sequence, set, range)) for x in items):
            if len(items) != spec.n_layers:
                raise ValueError(
                    f"per-layer head lists need one entry per layer ({spec.n_layers}), got {len(items)}; "
                    "give (layer, head) pairs as tuples"
                )
            pairs = [(layer, head) for layer, hs in enumerate(items) for head in hs]
        elif items:
            raise TypeError(f"cannot read heads from {heads!r}: give (layer, head) tuples, per-layer lists or a mask")
    else:
        raise TypeError(f"cannot read heads from {type(heads).__name__}")
    for layer, head in pairs:
        spec.check_layer_head(layer, head)
    if not pairs:
        raise ValueError("empty head set: name at least one (layer, head) to freeze")
    return tuple(sorted(set(pairs)))


@dataclass(frozen=True)
class FreezeSpec:
    """A validated freeze: which heads, which circuit, what is written and how gradients flow."""

    heads: tuple[tuple[int, int], ...]
    circuit: Circuit
    replacement: Replacement
    gradient: GradientMode
    noise_scale: float = NOISE_SCALE
    seed: Optional[int] = SEED


def check_qk_freezable(spec: ModelSpec, circuit: Circuit) -> None:
    """Raise ``NotImplementedError`` for a QK freeze on a model whose ``hook_pattern`` edits are discarded."""
    if circuit in (Circuit.QK, Circuit.BOTH) and spec.qk_mask_source is None:
        raise NotImplementedError(
            "QK freezing needs hook_pattern edits to reach the attention output, and this model discards them "
            "(a native TransformerBridge before TransformerLens 4); OV freezes work"
        )


def check_replacement_fits(replacement: Replacement, circuit: Circuit) -> None:
    """Raise ``ValueError`` for IDENTITY on a circuit other than QK (it is a pattern, not a z)."""
    if replacement == Replacement.IDENTITY and circuit != Circuit.QK:
        raise ValueError("IDENTITY is defined for the QK circuit only (each position attends to itself); "
                         f"got circuit={circuit.value!r}")


def check_noise_scale(noise_scale: float) -> None:
    """Raise ``ValueError`` unless ``noise_scale >= 0`` (NaN included)."""
    if not (noise_scale >= 0):
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")


def resolve_freeze_spec(
    model: Model,
    heads: HeadsLike,
    circuit: Union[str, Circuit],
    replacement: Union[str, Replacement],
    gradient: Union[str, GradientMode],
    preserve_gradients: Optional[bool],
    noise_scale: float,
    seed: Optional[int],
) -> tuple[ModelSpec, FreezeSpec]:
    """The model's :class:`ModelSpec` and the validated :class:`FreezeSpec` of :func:`freeze`'s arguments.

    ``preserve_gradients`` (if given) overrides a default ``gradient`` and must agree with an explicit one.
    """
    spec = model_spec(model)
    circuit = parse_option(Circuit, circuit, "circuit")
    replacement = parse_option(Replacement, replacement, "replacement")
    gradient = parse_option(GradientMode, gradient, "gradient mode")
    if preserve_gradients is not None:
        wanted = GradientMode.STRAIGHT_THROUGH if preserve_gradients else GradientMode.STOPGRAD
        if gradient not in (GradientMode.STOPGRAD, wanted):
            raise ValueError(f"preserve_gradients={preserve_gradients} contradicts gradient={gradient.value!r}")
        gradient = wanted
    check_replacement_fits(replacement, circuit)
    check_qk_freezable(spec, circuit)
    check_noise_scale(noise_scale)
    freeze_spec = FreezeSpec(normalize_heads(spec, heads), circuit, replacement, gradient, float(noise_scale), seed)
    return spec, freeze_spec
