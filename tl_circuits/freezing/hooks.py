"""The hooks that carry out a freeze: one :class:`LayerFreeze` per layer, and :func:`freeze_hooks` for them all.

Where each hook acts (and why there) is described in :mod:`tl_circuits.freezing.api`. A layer's hooks share
what one forward pass stashes (its scores, or its q/k under NOISE) and clear it once the pattern is written.

>>> import torch
>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8,
...                                                  n_ctx=8, d_vocab=20, act_fn="gelu"))
>>> hooks = freeze_hooks(model, [(0, 0)], circuit="ov", replacement="zero")
>>> [name for name, _ in hooks]
['blocks.0.attn.hook_z']
>>> with model.hooks(fwd_hooks=hooks):
...     _, cache = model.run_with_cache(torch.randint(0, 20, (1, 5)))
>>> float(cache["blocks.0.attn.hook_z"][..., 0, :].abs().max())
0.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from tl_circuits.defaults import SEED
from tl_circuits.freezing.rows import reference_rows
from tl_circuits.freezing.options import (
    NOISE_SCALE,
    Circuit,
    FreezeSpec,
    GradientMode,
    HeadsLike,
    Replacement,
    resolve_freeze_spec,
)
from tl_circuits.freezing.references import (
    MeanActivations,
    PreparedReference,
    ReferenceLike,
    ResampleReference,
    prepare_reference,
)
from tl_circuits.models.spec import ModelSpec, attention_scores, post_rotary
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from transformer_lens.hook_points import HookPoint

Hook = tuple[str, Callable]
"""A TransformerLens forward hook: ``(hook_name, hook_fn)``."""


class LayerFreeze:
    """Hook functions freezing some heads of one layer; they share what one forward pass stashes.

    ``row_mask`` ([batch, n_frozen], optional) freezes head ``heads[j]`` only in the batch rows where
    ``row_mask[:, j]`` is True; the sweep uses it to freeze a different head in each copy of a batch.
    """

    def __init__(
        self,
        model: Model,
        spec: ModelSpec,
        layer: int,
        heads: Sequence[int],
        circuit: Circuit,
        replacement: Replacement,
        gradient: GradientMode,
        reference: PreparedReference,
        noise_scale: float,
        generator: Optional[torch.Generator],
        row_mask: Optional[Bool[Tensor, "batch n_frozen"]] = None,
    ):
        self.model = model
        self.spec, self.layer = spec, layer
        self.heads = list(heads)
        self.circuit, self.replacement, self.gradient = circuit, replacement, gradient
        self.reference, self.noise_scale, self.generator = reference, noise_scale, generator
        self.row_mask = row_mask
        self._index: dict[torch.device, Tensor] = {}
        self._stash: dict[str, Tensor] = {}

    def hooks(self) -> list[Hook]:
        """This layer's ``(hook_name, hook_fn)`` pairs, in the order a forward pass reaches them."""
        spec, layer, out = self.spec, self.layer, []
        if self.circuit in (Circuit.QK, Circuit.BOTH):
            if (self.replacement in (Replacement.ZERO, Replacement.MEAN, Replacement.NOISE)
                    and spec.qk_mask_source == "scores"):
                out.append((spec.hook_name(layer, "attn_scores"), self._stash_hook("scores")))
            if self.replacement == Replacement.NOISE:
                out.append((spec.query_hook(layer), self._stash_hook("q")))
                out.append((spec.key_hook(layer), self._stash_hook("k")))
            out.append((spec.hook_name(layer, "pattern"), self.pattern_hook))
        if self.circuit in (Circuit.OV, Circuit.BOTH):
            out.append((spec.hook_name(layer, "z"), self.z_hook))
        return out

    def _stash_hook(self, key):
        def stash(activation, hook):
            if key in ("q", "k"):  # the q/k that enter the scores
                activation = post_rotary(self.model, self.spec, self.layer, activation)
            self._stash[key] = activation  # read only: the forward pass is not changed here
        return stash

    def _head_index(self, device) -> Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.heads, dtype=torch.long, device=device)
        return self._index[device]

    def _kv_heads(self) -> list[int]:
        return [self.spec.kv_head(h) for h in self.heads]

    def _write(self, full: Tensor, frozen: Tensor, head_dim: int) -> Tensor:
        """Write ``frozen`` (the frozen heads' slice) into ``full`` along ``head_dim``, out of place."""
        index = self._head_index(full.device)
        orig = full.index_select(head_dim, index)
        frozen = frozen.to(orig.dtype).detach()
        if self.gradient == GradientMode.STRAIGHT_THROUGH:
            frozen = frozen + (orig - orig.detach())  # value: frozen; gradient: as if orig
        if self.row_mask is not None:
            shape = [1] * orig.ndim
            shape[0], shape[head_dim] = self.row_mask.shape
            frozen = torch.where(self.row_mask.view(shape).to(orig.device), frozen, orig)
        return full.index_copy(head_dim, index, frozen)

    def _noise(self, like: Tensor) -> Tensor:
        # std of each frozen head's own activation in this batch, over (batch, pos, d_head)
        if self.generator is None:
            raise ValueError("a NOISE freeze needs a torch.Generator (see freeze_generator)")
        std = like.detach().float().std(dim=(0, 1, 3), keepdim=True)
        noise = torch.randn(like.shape, generator=self.generator, device=self.generator.device)
        return (noise.to(like.device) * std * self.noise_scale).to(like.dtype)

    def _reference(self, name: str, like: Tensor) -> Tensor:
        # a per-sample reference run in chunks (the gradient engine): the chunk's own rows
        ref = reference_rows(cast(ResampleReference, self.reference)[name], like.shape[0])
        if ref.shape[1:] != like.shape[1:] or ref.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"RESAMPLE reference for {name} has shape {tuple(ref.shape)} but this run has "
                f"{tuple(like.shape)}: the reference must have the run's batch size (or 1) and positions"
            )
        return ref.to(like.device)

    def _mean(self, kind: str, heads: list[int], n_pos: int) -> Tensor:
        reference = cast(MeanActivations, self.reference)
        mean = getattr(reference, kind)[self.layer]
        if reference.per_position:
            if mean.shape[0] < n_pos:
                raise ValueError(
                    f"the per-position MEAN reference covers {mean.shape[0]} positions but this run has "
                    f"{n_pos}; use longer reference tokens or per_position=False"
                )
            mean = mean[:n_pos]
        return mean[..., heads, :]

    # ----- QK ---------------------------------------------------------------------------------
    def _frozen_scores(self, batch: int, n_pos: int, device) -> Tensor:
        """Scores of the frozen heads from replaced queries and keys: [batch, n_frozen, q, k]."""
        if self.replacement == Replacement.MEAN:
            q = self._mean("q", self.heads, n_pos)
            k = self._mean("k", self._kv_heads(), n_pos)
            if not cast(MeanActivations, self.reference).per_position:
                q, k = q.unsqueeze(0).expand(n_pos, -1, -1), k.unsqueeze(0).expand(n_pos, -1, -1)
            q = q.unsqueeze(0).expand(batch, -1, -1, -1).to(device)
            k = k.unsqueeze(0).expand(batch, -1, -1, -1).to(device)
        else:  # NOISE
            q = self._noise(self._stash["q"][:, :, self.heads])
            k = self._noise(self._stash["k"][:, :, self._kv_heads()])
        return attention_scores(self.model, self.spec, self.layer, q, k)

    def _masked(self, pattern: Tensor) -> Bool[Tensor, "batch n_frozen q k"]:
        """Causal and padding mask of the frozen heads' scores.

        From the scores (``-inf`` in a HookedTransformer, ``finfo.min`` in a Hugging Face bridge), or, where
        no live scores are hooked (native bridge), from the pattern: an entry every head gives exactly 0.
        """
        if self.spec.qk_mask_source == "scores":
            scores = self._stash.pop("scores")[:, self.heads]
            return scores <= torch.finfo(scores.dtype).min
        masked = (pattern == 0).all(dim=1, keepdim=True)
        return masked.expand(-1, len(self.heads), -1, -1)

    def pattern_hook(self, pattern: Float[Tensor, "batch head q k"], hook: HookPoint) -> Tensor:
        batch, _, n_pos, n_key = pattern.shape
        if self.replacement == Replacement.RESAMPLE:
            name = self.spec.hook_name(self.layer, "pattern")  # not hook.name: a bridge may give its own name
            frozen = self._reference(name, pattern)[:, self.heads].expand(batch, -1, -1, -1)
        elif self.replacement == Replacement.IDENTITY:
            eye = torch.eye(n_pos, n_key, device=pattern.device, dtype=pattern.dtype)
            frozen = eye.expand(batch, len(self.heads), n_pos, n_key)
        else:
            masked = self._masked(pattern)  # causal + padding mask
            if self.replacement == Replacement.ZERO:
                scores = torch.zeros(masked.shape, device=pattern.device, dtype=pattern.dtype)
            else:
                scores = self._frozen_scores(batch, n_pos, pattern.device)
            scores = scores.masked_fill(masked, float("-inf"))
            frozen = F.softmax(scores, dim=-1)
            frozen = torch.where(torch.isnan(frozen), torch.zeros_like(frozen), frozen)  # as TL does
            self._stash.clear()
        return self._write(pattern, frozen, head_dim=1)

    # ----- OV ---------------------------------------------------------------------------------
    def z_hook(self, z: Float[Tensor, "batch pos head d_head"], hook: HookPoint) -> Tensor:
        orig = z[:, :, self.heads]
        if self.replacement == Replacement.ZERO:
            frozen = torch.zeros_like(orig)
        elif self.replacement == Replacement.MEAN:
            frozen = self._mean("z", self.heads, z.shape[1]).to(z.device).expand_as(orig)
        elif self.replacement == Replacement.NOISE:
            frozen = self._noise(orig)
        else:  # RESAMPLE
            frozen = self._reference(self.spec.hook_name(self.layer, "z"), z)[:, :, self.heads].expand_as(orig)
        return self._write(z, frozen, head_dim=2)


def freeze_generator(model: Model, seed: Optional[int]) -> torch.Generator:
    """The NOISE generator on the model's device, seeded with ``seed`` (``None``: a fresh random seed)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def build_freeze_hooks(
    model: Model,
    spec: ModelSpec,
    freeze_spec: FreezeSpec,
    reference: Optional[ReferenceLike],
    row_masks: Optional[dict[int, Bool[Tensor, "batch n_frozen"]]] = None,
) -> list[Hook]:
    """The hooks of a validated freeze; ``row_masks[layer]`` restricts that layer's heads to some batch rows."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in freeze_spec.heads:
        by_layer.setdefault(layer, []).append(head)
    prepared = prepare_reference(model, spec, freeze_spec, reference, sorted(by_layer))
    generator = freeze_generator(model, freeze_spec.seed) if freeze_spec.replacement == Replacement.NOISE else None
    hooks = []
    for layer, heads in sorted(by_layer.items()):
        layer_freeze = LayerFreeze(
            model, spec, layer, heads, freeze_spec.circuit, freeze_spec.replacement, freeze_spec.gradient,
            prepared, freeze_spec.noise_scale, generator, None if row_masks is None else row_masks[layer],
        )
        hooks.extend(layer_freeze.hooks())
    return hooks


def freeze_hooks(
    model: Model,
    heads: HeadsLike,
    circuit: Union[str, Circuit] = "qk",
    replacement: Union[str, Replacement] = "zero",
    *,
    reference: Optional[ReferenceLike] = None,
    gradient: Union[str, GradientMode] = "stopgrad",
    preserve_gradients: Optional[bool] = None,
    noise_scale: float = NOISE_SCALE,
    seed: Optional[int] = SEED,
) -> list[Hook]:
    """The freeze as TransformerLens ``fwd_hooks`` — ``[(hook_name, hook_fn), ...]`` — registering nothing.

    For ``model.run_with_hooks(tokens, fwd_hooks=freeze_hooks(...))`` or
    ``with model.hooks(fwd_hooks=freeze_hooks(...)):``. Arguments as :func:`tl_circuits.freeze`.
    """
    spec, freeze_spec = resolve_freeze_spec(model, heads, circuit, replacement, gradient, preserve_gradients,
                                            noise_scale, seed)
    return build_freeze_hooks(model, spec, freeze_spec, reference)
