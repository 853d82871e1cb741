"""Per-sample gradients as data: per-head rows (:class:`PerSampleGradients`) and factors (:class:`GradientFactors`).

A per-sample weight gradient of an attention projection is a sum over positions of outer products
(``dL/dW_Q[h] = Σ_t x_t ⊗ dL/dq_t[h]``, ``dL/dW_O[h] = Σ_t z_t[h] ⊗ dL/dout_t``), so the *factors* (the
projection inputs and the output gradients, ``O(pos·(D + H·d))`` per layer) give the exact rows on demand,
``O(H·D·d)`` per layer: ~8× less to hold for GPT-2 small at 64 positions. The layout of a row is
:class:`tl_circuits.models.spec.ModelSpec`'s.

>>> from tl_circuits.models.spec import ModelSpec
>>> spec = ModelSpec(n_layers=1, n_heads=2, n_kv_heads=1, d_model=3, d_head=2, d_vocab=5, n_ctx=4,
...                  grouped=True, rotary=False)
>>> f = GradientFactors.zeros(spec, n=2, n_pos=4)
>>> {b: tuple(f.rows(b).shape) for b in "QKVO"}  # [n, layers, heads of the block, D·d]
{'Q': (2, 1, 2, 6), 'K': (2, 1, 1, 6), 'V': (2, 1, 1, 6), 'O': (2, 1, 2, 6)}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits.models.spec import BLOCKS, Block, ModelSpec


Index = Union[int, slice, Sequence[int], Tensor]
"""Which samples to take: an int, a slice, a list of ints or an index tensor."""


def pick_rows(t: Optional[Tensor], index: Index) -> Optional[Tensor]:
    return None if t is None else t[index]


def cat_optional(parts: Sequence[Any], name: str) -> Optional[Tensor]:
    values = [getattr(p, name) for p in parts]
    return None if any(v is None for v in values) else torch.cat(values)


@dataclass
class PerSampleGradients:
    """Per-sample gradients as per-head rows, one float32 tensor per block.

    Attributes:
        per_block: ``{"Q"|"K"|"V"|"O": [n_samples, n_layers, heads, n_params_per_head]}``; rows as
            :meth:`ModelSpec.per_head` lays them out (a head's weight slice flattened, then its bias).
        spec: the model's :class:`ModelSpec`.
        include_biases: whether bias gradients are part of the rows.
        losses: each sample's loss (docs/spec.md §2.1: by default the token-mean next-token cross-entropy over
            its counted predictions).
        n_targets: each sample's number of counted predictions (its valid targets, or those of its loss mask).
    """

    per_block: dict[str, Float[Tensor, "n n_layers heads per_head"]]
    spec: ModelSpec
    include_biases: bool = False
    losses: Optional[Float[Tensor, " n"]] = None
    n_targets: Optional[Int[Tensor, " n"]] = None

    @property
    def n_samples(self) -> int:
        return next(iter(self.per_block.values())).shape[0]

    def __len__(self) -> int:
        return self.n_samples

    def select(self, index: Index) -> "PerSampleGradients":
        """The gradients of a subset of samples (an int, slice, list or index tensor)."""
        if isinstance(index, int):
            index = [index]
        return PerSampleGradients({b: g[index] for b, g in self.per_block.items()}, self.spec,
                                  self.include_biases, pick_rows(self.losses, index), pick_rows(self.n_targets, index))

    def scaled(self, factor: float) -> "PerSampleGradients":
        """Every gradient multiplied by ``factor`` (used to check the scaling law of docs/spec.md §3)."""
        return PerSampleGradients({b: g * factor for b, g in self.per_block.items()}, self.spec,
                                  self.include_biases, self.losses, self.n_targets)

    def contributions(self) -> dict[str, Float[Tensor, "n n_layers heads per_head"]]:
        """C_i = g_i ⊙ g_i per block."""
        return {b: g.square() for b, g in self.per_block.items()}

    @property
    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.per_block.values())

    @staticmethod
    def cat(parts: Sequence["PerSampleGradients"]) -> "PerSampleGradients":
        """Concatenate along the sample dimension."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.spec != first.spec or p.include_biases != first.include_biases:
                raise ValueError("cannot concatenate gradients of different models or bias settings")
        return PerSampleGradients({b: torch.cat([p.per_block[b] for p in parts]) for b in first.per_block},
                                  first.spec, first.include_biases, cat_optional(parts, "losses"),
                                  cat_optional(parts, "n_targets"))


@dataclass
class GradientFactors:
    """Per-sample factors of the attention gradients (the ``"factored"`` engine), float32.

    Attributes:
        inputs: ``{"Q"|"K"|"V": [n, L, pos, D]}`` — the attention module's query/key/value inputs (often
            one shared tensor).
        out_grads: ``{"Q": [n, L, pos, H, d], "K"|"V": [n, L, pos, G, d]}`` — gradients at
            ``hook_q``/``hook_k``/``hook_v``; ``"O": [n, L, pos, D]`` — at the attention output.
        z: ``[n, L, pos, H, d]`` — ``hook_z``, the input of ``W_O``.
    """

    inputs: dict[str, Tensor]
    out_grads: dict[str, Tensor]
    z: Tensor
    spec: ModelSpec
    include_biases: bool = False
    losses: Optional[Float[Tensor, " n"]] = None
    n_targets: Optional[Int[Tensor, " n"]] = None

    @property
    def n_samples(self) -> int:
        return self.z.shape[0]

    def __len__(self) -> int:
        return self.n_samples

    @property
    def nbytes(self) -> int:
        tensors = {id(t): t for t in [*self.inputs.values(), *self.out_grads.values(), self.z]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def rows(self, block: Block, layers: slice = slice(None)) -> Float[Tensor, "n n_layers heads per_head"]:
        """Per-head gradient rows of one block (optionally some layers), float32."""
        inputs = self.z if block == "O" else self.inputs[block]
        return self.spec.rows_from_factors(block, inputs[:, layers], self.out_grads[block][:, layers],
                                           self.include_biases)

    def to_gradients(self) -> PerSampleGradients:
        return PerSampleGradients({b: self.rows(b) for b in BLOCKS}, self.spec, self.include_biases,
                                  self.losses, self.n_targets)

    def select(self, index: Index) -> "GradientFactors":
        if isinstance(index, int):
            index = [index]
        shared: dict[int, Tensor] = {}  # keep shared input tensors shared
        inputs: dict[str, Tensor] = {}
        for b, t in self.inputs.items():
            inputs[b] = shared.setdefault(id(t), t[index])
        return GradientFactors(inputs, {b: t[index] for b, t in self.out_grads.items()}, self.z[index], self.spec,
                               self.include_biases, pick_rows(self.losses, index), pick_rows(self.n_targets, index))

    @staticmethod
    def zeros(spec: ModelSpec, n: int, n_pos: int, include_biases: bool = False) -> "GradientFactors":
        """All-zero factors of ``n`` samples (a buffer, or a doctest's input)."""
        L, H, G, d, D = spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head, spec.d_model
        x = torch.zeros(n, L, n_pos, D)
        grads = {"Q": torch.zeros(n, L, n_pos, H, d), "K": torch.zeros(n, L, n_pos, G, d),
                 "V": torch.zeros(n, L, n_pos, G, d), "O": torch.zeros(n, L, n_pos, D)}
        return GradientFactors({"Q": x, "K": x, "V": x}, grads, torch.zeros(n, L, n_pos, H, d), spec, include_biases)
