"""The hooks that carry out a freeze: one :class:`LayerFreeze` per layer, and :func:`freeze_hooks` for them all.

Where each hook acts (and why there) is described in :mod:`tl_circuits.freezing.api`. A layer's hooks share
what one forward pass stashes (its scores, or its q/k under NOISE) and clear it once the pattern is written.

>>> import torch
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # a HookedTransformer on TransformerLens < 4, a bridge on 4.x
>>> hooks = freeze_hooks(model, [(0, 0)], circuit="ov", replacement="zero")
>>> [name for name, _ in hooks]
['blocks.0.attn.hook_z']
>>> with model.hooks(fwd_hooks=hooks):
...     _, cache = model.run_with_cache(torch.randint(0, 64, (1, 5)))
>>> float(cache["blocks.0.attn.hook_z"][..., 0, :].abs().max())
0.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union, cast

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from tl_circuits.defaults import SEED
from tl_circuits.freezing.rows import BatchRows, reference_rows
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
    ``row_mask[:, j]`` is True; the sweep uses it to freeze a different head in each copy of a batch. ``rows``
    (:class:`~tl_circuits.freezing.rows.BatchRows`, set by the code that runs a batch in chunks through
    :meth:`tl_circuits.freezing.api.FreezeHandle.on_rows`): which rows of a per-sample reference a forward takes.
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
        self.rows: Optional[BatchRows] = None
        self._index: dict[torch.device, Tensor] = {}
        self._stash: dict[str, Tensor] = {}

    def hooks(self) -> list[Hook]:
        """This layer's ``(hook_name, hook_fn)`` pairs, in the order a forward pass reaches them."""
        spec, layer, out = self.spec, self.layer, []
        if self.circuit in (Circuit.QK, Circuit.BOTH):
            out.extend(self._qk_input_hooks())
            if spec.qk_route == "z":
                out.append((spec.hook_name(layer, "v"), self._stash_hook("v")))
                out.append((spec.hook_name(layer, "z"), self.qk_z_hook))
            out.append((spec.hook_name(layer, "pattern"), self.pattern_hook))
        if self.circuit in (Circuit.OV, Circuit.BOTH):
            out.append((spec.hook_name(layer, "z"), self.z_hook))
        return out

    def reading_hooks(self, record: Callable[[str, Tensor], None]) -> list[Hook]:
        """Hooks that leave the forward unchanged and hand ``record`` what :meth:`hooks` would write, detached:
        ``("pattern", [batch, n_frozen, q, k])`` for QK and ``("z", [batch, pos, n_frozen, d_head])`` for OV.

        The first-order estimates (:mod:`tl_circuits.freezing.attribution`) read the frozen values here, so an
        estimate and a freeze compute them with the same code."""
        spec, layer, out = self.spec, self.layer, []
        if self.circuit in (Circuit.QK, Circuit.BOTH):
            out.extend(self._qk_input_hooks())

            def read_pattern(activation: Tensor, hook: HookPoint) -> None:
                if spec.qk_route == "z":  # at hook_z, before the (post-hoc) pattern hook: a pattern-shaped stand-in
                    batch, n_pos = activation.shape[:2]
                    activation = torch.empty(batch, spec.n_heads, n_pos, n_pos, device=activation.device)
                record("pattern", self.frozen_pattern(activation).detach())
                self._stash.clear()
            out.append((spec.hook_name(layer, "z" if spec.qk_route == "z" else "pattern"), read_pattern))
        if self.circuit in (Circuit.OV, Circuit.BOTH):
            out.append((spec.hook_name(layer, "z"), lambda z, hook: record("z", self.frozen_z(z).detach())))
        return out

    def _qk_input_hooks(self) -> list[Hook]:
        """The read-only hooks stashing what a QK freeze's pattern is computed from (live q/k, live scores)."""
        spec, layer, out = self.spec, self.layer, []
        recomputed = self.replacement in (Replacement.ZERO, Replacement.MEAN, Replacement.NOISE)
        # live q/k: NOISE draws at their scale, a position bias is the live scores minus their q·k, and
        # the z route rebuilds the original pattern for straight-through gradients
        needs_live_qk = self.replacement == Replacement.NOISE or (recomputed and spec.position_bias) or (
            spec.qk_route == "z" and self.gradient == GradientMode.STRAIGHT_THROUGH)
        if needs_live_qk:
            out.append((spec.query_hook(layer), self._stash_hook("q")))
            out.append((spec.key_hook(layer), self._stash_hook("k")))
        if spec.qk_route != "z" and recomputed and spec.qk_mask_source == "scores":
            out.append((spec.hook_name(layer, "attn_scores"), self._stash_hook("scores")))
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

    def _write(self, full: Tensor, frozen: Tensor, head_dim: int, detach: bool = True) -> Tensor:
        """Write ``frozen`` (the frozen heads' slice) into ``full`` along ``head_dim``, out of place.

        ``detach=False``: ``frozen`` already carries the gradient it should (the z route of a QK freeze)."""
        index = self._head_index(full.device)
        orig = full.index_select(head_dim, index)
        frozen = frozen.to(orig.dtype)
        if detach:
            frozen = frozen.detach()
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
        # a per-sample reference run in chunks (the gradient engine, told the rows): the chunk's own rows
        ref = reference_rows(cast(ResampleReference, self.reference)[name], like.shape[0], self.rows)
        if ref.shape[1:] != like.shape[1:] or ref.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"RESAMPLE reference for {name} has shape {tuple(ref.shape)} but this run has "
                f"{tuple(like.shape)}: the reference must have the run's batch size (or 1) and positions (a "
                "per-sample reference under per_sample_gradients run in chunks: pass the freeze as freezes=[handle])"
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

    def _masked(self, like: Tensor) -> Bool[Tensor, "batch n_frozen q k"]:
        """Causal, padding and window mask of the frozen heads' scores (``like``: the pattern, [batch, head, q, k]).

        From the live scores (``-inf`` in a HookedTransformer, ``finfo.min`` in a Hugging Face bridge); where no
        live scores are hooked, from the pattern (native bridge: an entry every head gives exactly 0), or the
        causal mask itself (a delegating bridge, whose mask is not hooked before z)."""
        batch, _, n_pos, n_key = like.shape
        if self.spec.qk_mask_source == "scores":
            scores = self._stash["scores"][:, self.heads]
            return scores <= torch.finfo(scores.dtype).min
        if self.spec.qk_mask_source == "causal":
            future = torch.ones(n_pos, n_key, dtype=torch.bool, device=like.device).triu(1 + n_key - n_pos)
            return future.expand(batch, len(self.heads), n_pos, n_key)
        masked = (like == 0).all(dim=1, keepdim=True)
        return masked.expand(-1, len(self.heads), -1, -1)

    def _position_bias(self) -> Tensor:
        """The additive position bias (ALiBi) of the frozen heads: live scores minus the live q·k term."""
        live_q = self._stash["q"][:, :, self.heads]
        live_k = self._stash["k"][:, :, self._kv_heads()]
        qk = attention_scores(self.model, self.spec, self.layer, live_q, live_k)
        return self._stash["scores"][:, self.heads] - qk.to(self._stash["scores"].dtype)

    def _softmax(self, scores: Tensor, masked: Tensor) -> Tensor:
        frozen = F.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
        return torch.where(torch.isnan(frozen), torch.zeros_like(frozen), frozen)  # fully masked rows: 0, as TL

    def frozen_pattern(self, like: Float[Tensor, "batch head q k"]) -> Tensor:
        """The frozen heads' pattern [batch, n_frozen, q, k] in a run whose pattern is shaped like ``like``."""
        batch, _, n_pos, n_key = like.shape
        if self.replacement == Replacement.RESAMPLE:
            name = self.spec.hook_name(self.layer, "pattern")  # not hook.name: a bridge may give its own name
            return self._reference(name, like)[:, self.heads].expand(batch, -1, -1, -1)
        if self.replacement == Replacement.IDENTITY:
            eye = torch.eye(n_pos, n_key, device=like.device, dtype=like.dtype)
            return eye.expand(batch, len(self.heads), n_pos, n_key)
        masked = self._masked(like)
        if self.replacement == Replacement.ZERO:  # q = k = 0: every q·k term is 0 (soft-capped: still 0)
            scores = torch.zeros(masked.shape, device=like.device, dtype=like.dtype)
        else:
            scores = self._frozen_scores(batch, n_pos, like.device)
        if self.spec.position_bias:  # ALiBi stays: QK-ZERO is the softmax of the position bias (§1.4)
            scores = scores + self._position_bias().to(scores.dtype)
        return self._softmax(scores, masked)

    def pattern_hook(self, pattern: Float[Tensor, "batch head q k"], hook: HookPoint) -> Tensor:
        if self.spec.qk_route == "z":  # after the output: what the cache shows, the pattern z was built from
            frozen = self._stash.pop("pattern", None)
            return pattern if frozen is None else self._write(pattern, frozen.to(pattern.dtype), head_dim=1)
        frozen = self.frozen_pattern(pattern)
        self._stash.clear()
        return self._write(pattern, frozen, head_dim=1)

    def qk_z_hook(self, z: Float[Tensor, "batch pos head d_head"], hook: HookPoint) -> Tensor:
        """The z route (delegating bridges, §1.4): the frozen heads' z = frozen pattern · v, written at hook_z.

        stopgrad: the pattern is detached and v keeps its gradient (as a pattern write does); straight-through:
        the pattern is ``frozen + (orig − orig.detach())`` with ``orig`` rebuilt from the live q and k."""
        batch, n_pos = z.shape[:2]
        v = self._stash.pop("v")[:, :, self._kv_heads()]
        like = torch.empty(batch, self.spec.n_heads, n_pos, v.shape[1], device=z.device)  # the pattern's shape
        frozen = self.frozen_pattern(like).float().detach()
        self._stash["pattern"] = frozen
        if self.gradient == GradientMode.STRAIGHT_THROUGH:
            live = attention_scores(self.model, self.spec, self.layer, self._stash["q"][:, :, self.heads],
                                    self._stash["k"][:, :, self._kv_heads()]).float()
            orig = self._softmax(live, self._masked(like))
            frozen = frozen + (orig - orig.detach())
        for key in ("q", "k", "scores"):
            self._stash.pop(key, None)
        head_z = einops.einsum(frozen, v.float(), "batch head q k, batch k head d -> batch q head d")
        return self._write(z, head_z, head_dim=2, detach=False)

    # ----- OV ---------------------------------------------------------------------------------
    def frozen_z(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos n_frozen d_head"]:
        """The frozen heads' z (an OV freeze's replacement) in a run whose z is ``z``."""
        orig = z[:, :, self.heads]
        if self.replacement == Replacement.ZERO:
            return torch.zeros_like(orig)
        if self.replacement == Replacement.MEAN:
            return self._mean("z", self.heads, z.shape[1]).to(z.device).expand_as(orig)
        if self.replacement == Replacement.NOISE:
            return self._noise(orig)
        return self._reference(self.spec.hook_name(self.layer, "z"), z)[:, :, self.heads].expand_as(orig)  # RESAMPLE

    def z_hook(self, z: Float[Tensor, "batch pos head d_head"], hook: HookPoint) -> Tensor:
        return self._write(z, self.frozen_z(z), head_dim=2)


def freeze_generator(model: Model, seed: Optional[int]) -> torch.Generator:
    """The NOISE generator on the model's device, seeded with ``seed`` (``None``: a fresh random seed)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def build_layer_freezes(
    model: Model,
    spec: ModelSpec,
    freeze_spec: FreezeSpec,
    reference: Optional[ReferenceLike],
    row_masks: Optional[dict[int, Bool[Tensor, "batch n_frozen"]]] = None,
) -> list[LayerFreeze]:
    """One :class:`LayerFreeze` per frozen layer of a validated freeze; ``row_masks[layer]`` restricts that layer's
    heads to some batch rows."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in freeze_spec.heads:
        by_layer.setdefault(layer, []).append(head)
    prepared = prepare_reference(model, spec, freeze_spec, reference, sorted(by_layer))
    generator = freeze_generator(model, freeze_spec.seed) if freeze_spec.replacement == Replacement.NOISE else None
    return [LayerFreeze(model, spec, layer, heads, freeze_spec.circuit, freeze_spec.replacement, freeze_spec.gradient,
                        prepared, freeze_spec.noise_scale, generator, None if row_masks is None else row_masks[layer])
            for layer, heads in sorted(by_layer.items())]


def build_freeze_hooks(
    model: Model,
    spec: ModelSpec,
    freeze_spec: FreezeSpec,
    reference: Optional[ReferenceLike],
    row_masks: Optional[dict[int, Bool[Tensor, "batch n_frozen"]]] = None,
) -> list[Hook]:
    """The hooks of a validated freeze (:func:`build_layer_freezes`)."""
    return [hook for layer_freeze in build_layer_freezes(model, spec, freeze_spec, reference, row_masks)
            for hook in layer_freeze.hooks()]


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
