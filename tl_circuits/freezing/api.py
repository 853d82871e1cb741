"""QK/OV circuit freezing of attention heads through TransformerLens hook points (SPEC §1).

A *freeze* targets a set of (layer, head) pairs, a circuit, a replacement and a gradient mode:

- circuit ``"qk"`` freezes what decides the head's attention pattern (its queries and its keys),
  ``"ov"`` what it moves (its values and its output ``z``), ``"both"`` both;
- replacement ``"zero"``, ``"mean"``, ``"noise"``, ``"resample"`` or ``"identity"`` (QK only);
- gradient ``"stopgrad"`` (default) or ``"straight_through"`` (``preserve_gradients=True``).

Where the freeze acts, and why:

- QK: the frozen head's pattern is recomputed from the replaced queries and keys and written into
  ``hook_pattern[:, h]``. Under GQA the keys ``hook_k[..., g]`` are shared by sibling heads, so
  writing them would change the siblings; writing the pattern leaves every other head bit-identical.
  The queries/keys read are the ones that enter the scores: ``hook_q``/``hook_k``, or
  ``hook_rot_q``/``hook_rot_k`` for rotary models (rotary is applied after ``hook_q``/``hook_k``).
  A run cached under a QK freeze therefore shows the head's unfrozen q/k and its frozen pattern.
- OV: the head's output ``hook_z[..., h, :]`` (per query head, so siblings are untouched).

The same hooks work on a ``TransformerBridge`` (:mod:`tl_circuits.models.spec` says where its scores, mask and
rotated q/k are found); a native bridge on TransformerLens 3.x discards ``hook_pattern`` edits, so QK
freezes raise ``NotImplementedError`` there.

Replacements (values written into the frozen slice):

========== ============================================== =========================================
replacement QK (queries and keys of the head)             OV (the head's z)
========== ============================================== =========================================
zero        q = k = 0: exactly uniform causal attention    z = 0: the head writes nothing
mean        q, k = dataset means (:func:`compute_mean_activations`), per position or over positions
noise       q, k, z = Gaussian noise, std = ``noise_scale`` x the head's own activation std in this
            batch, from a ``torch.Generator`` seeded once per freeze (same seed, same outputs)
resample    the head's pattern on a reference input        the head's z on a reference input
identity    each position attends to itself                ValueError
========== ============================================== =========================================

Gradients: ``stopgrad`` detaches the frozen values, so nothing upstream gets gradient through the
frozen slice. ``straight_through`` writes ``frozen + (orig - orig.detach())`` at the circuit's output
(the pattern for QK, z for OV): forward values are exactly the frozen ones, and W_Q/W_K of a
QK-frozen head get the gradient they would get unfrozen at the pattern.

>>> import torch
>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8,
...                                                  n_ctx=8, d_vocab=20, act_fn="gelu"))
>>> tokens = torch.randint(0, 20, (1, 5))
>>> with freeze(model, [(0, 1)], circuit="qk", replacement="zero"):
...     _, cache = model.run_with_cache(tokens)
>>> cache["blocks.0.attn.hook_pattern"][0, 1, 4]
tensor([0.2000, 0.2000, 0.2000, 0.2000, 0.2000])
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import ActivationCache

from tl_circuits.models.spec import ModelSpec, attention_scores, check_tokens, model_spec, post_rotary


class Circuit(str, Enum):
    QK = "qk"
    OV = "ov"
    BOTH = "both"


class Replacement(str, Enum):
    ZERO = "zero"
    MEAN = "mean"
    NOISE = "noise"
    RESAMPLE = "resample"
    IDENTITY = "identity"


class GradientMode(str, Enum):
    STOPGRAD = "stopgrad"
    STRAIGHT_THROUGH = "straight_through"


def _enum(cls, value, what: str):
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
        pairs = [heads]
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


# ----- references ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeanActivations:
    """Dataset means of what the freezes write, per layer (the MEAN reference).

    ``q[layer]``: [pos, n_heads, d_head] (or [n_heads, d_head] over positions), the queries that
    enter the scores (post-rotary for rotary models); ``k[layer]``: same with n_kv_heads; ``z[layer]``:
    [pos, n_heads, d_head]. Means are over the reference samples (and positions when
    ``per_position=False``), never over d_head.
    """

    q: dict[int, Tensor]
    k: dict[int, Tensor]
    z: dict[int, Tensor]
    per_position: bool
    n_samples: int


def compute_mean_activations(
    model,
    reference_tokens: Int[Tensor, "batch pos"],
    *,
    per_position: bool = True,
    batch_size: int = 32,
    progress: bool = True,
) -> MeanActivations:
    """Mean queries, keys and z of every head over a reference dataset (the MEAN reference).

    Accumulated in float32 in batches of ``batch_size``. With ``per_position=True`` (default) the
    mean is taken per position, so a freeze can only be applied to runs no longer than the
    reference; with ``False`` it is also averaged over positions and applies to any length.
    """
    spec = model_spec(model)
    check_tokens(spec, reference_tokens, "reference tokens")
    names = {}
    for layer in range(spec.n_layers):
        names[spec.query_hook(layer)] = ("q", layer)
        names[spec.key_hook(layer)] = ("k", layer)
        names[spec.hook_name(layer, "z")] = ("z", layer)
    sums: dict[tuple[str, int], Tensor] = {}
    n = reference_tokens.shape[0]
    starts = range(0, n, batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="mean activations", disable=not progress):
            _, cache = model.run_with_cache(reference_tokens[start:start + batch_size], names_filter=lambda nm: nm in names)
            for name, (kind, layer) in names.items():
                act = cache[name]  # [batch, pos, heads, d_head]
                if kind in ("q", "k"):  # the q/k that enter the scores
                    act = post_rotary(model, spec, layer, act)
                act, key = act.float(), (kind, layer)
                total = act.sum(dim=0) if per_position else act.sum(dim=(0, 1))
                sums[key] = sums[key] + total if key in sums else total
    denom = n if per_position else n * reference_tokens.shape[1]
    dtype = spec.dtype
    out = {kind: {layer: (sums[(kind, layer)] / denom).to(dtype) for layer in range(spec.n_layers)} for kind in "qkz"}
    return MeanActivations(q=out["q"], k=out["k"], z=out["z"], per_position=per_position, n_samples=n)


def _resample_reference(model, spec, layers, circuit, reference) -> dict[str, Tensor]:
    """hook name -> reference activation ([batch, ...]) for the pattern (QK) and z (OV)."""
    names = []
    for layer in layers:
        if circuit in (Circuit.QK, Circuit.BOTH):
            names.append(spec.hook_name(layer, "pattern"))
        if circuit in (Circuit.OV, Circuit.BOTH):
            names.append(spec.hook_name(layer, "z"))
    if isinstance(reference, Tensor):
        check_tokens(spec, reference, "reference tokens")
        with torch.no_grad():
            _, reference = model.run_with_cache(reference, names_filter=lambda nm: nm in names)
    if not isinstance(reference, (ActivationCache, Mapping)):
        raise TypeError(
            f"RESAMPLE needs reference tokens [batch, pos] or an ActivationCache, got {type(reference).__name__}"
        )
    out = {}
    for name in names:
        try:
            out[name] = reference[name].detach()
        except KeyError:
            raise KeyError(f"the reference cache has no {name!r}; cache it (e.g. run_with_cache without a names filter)") from None
    return out


# ----- the hooks of one layer -------------------------------------------------------------------

class _LayerFreeze:
    """Hook functions freezing some heads of one layer; they share what one forward pass stashes.

    ``row_mask`` ([batch, n_frozen], optional) freezes head ``heads[j]`` only in the batch rows where
    ``row_mask[:, j]`` is True; the sweep uses it to freeze a different head in each copy of a batch.
    """

    def __init__(self, model, spec, layer, heads, circuit, replacement, gradient, reference,
                 noise_scale, generator, row_mask=None):
        self.model = model
        self.spec, self.layer = spec, layer
        self.heads = list(heads)
        self.circuit, self.replacement, self.gradient = circuit, replacement, gradient
        self.reference, self.noise_scale, self.generator = reference, noise_scale, generator
        self.row_mask = row_mask
        self._index: dict[torch.device, Tensor] = {}
        self._stash: dict[str, Tensor] = {}

    def hooks(self) -> list[tuple[str, Callable]]:
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
        std = like.detach().float().std(dim=(0, 1, 3), keepdim=True)
        noise = torch.randn(like.shape, generator=self.generator, device=self.generator.device)
        return (noise.to(like.device) * std * self.noise_scale).to(like.dtype)

    def _reference(self, name: str, like: Tensor) -> Tensor:
        ref = self.reference[name]
        if ref.shape[1:] != like.shape[1:] or ref.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"RESAMPLE reference for {name} has shape {tuple(ref.shape)} but this run has "
                f"{tuple(like.shape)}: the reference must have the run's batch size (or 1) and positions"
            )
        return ref.to(like.device)

    def _mean(self, kind: str, heads: list[int], n_pos: int) -> Tensor:
        mean = getattr(self.reference, kind)[self.layer]
        if self.reference.per_position:
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
            if not self.reference.per_position:
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

    def pattern_hook(self, pattern: Float[Tensor, "batch head q k"], hook) -> Tensor:
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
    def z_hook(self, z: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
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


# ----- public API -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FreezeSpec:
    """A validated freeze: which heads, which circuit, what is written and how gradients flow."""

    heads: tuple[tuple[int, int], ...]
    circuit: Circuit
    replacement: Replacement
    gradient: GradientMode
    noise_scale: float
    seed: Optional[int]


def _resolve(model, heads, circuit, replacement, gradient, preserve_gradients, noise_scale, seed):
    spec = model_spec(model)
    circuit = _enum(Circuit, circuit, "circuit")
    replacement = _enum(Replacement, replacement, "replacement")
    gradient = _enum(GradientMode, gradient, "gradient mode")
    if preserve_gradients is not None:
        wanted = GradientMode.STRAIGHT_THROUGH if preserve_gradients else GradientMode.STOPGRAD
        if gradient not in (GradientMode.STOPGRAD, wanted):
            raise ValueError(f"preserve_gradients={preserve_gradients} contradicts gradient={gradient.value!r}")
        gradient = wanted
    if replacement == Replacement.IDENTITY and circuit != Circuit.QK:
        raise ValueError("IDENTITY is defined for the QK circuit only (each position attends to itself); "
                         f"got circuit={circuit.value!r}")
    check_qk_freezable(spec, circuit)
    if not (noise_scale >= 0):
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    freeze_spec = FreezeSpec(normalize_heads(spec, heads), circuit, replacement, gradient, float(noise_scale), seed)
    return spec, freeze_spec


def _prepare_reference(model, spec, freeze_spec, reference, layers):
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
        return _resample_reference(model, spec, layers, freeze_spec.circuit, reference)
    if reference is not None:
        raise ValueError(f"{replacement.value.upper()} takes no reference")
    return None


def _generator(model, seed):
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def check_qk_freezable(spec: ModelSpec, circuit: Circuit) -> None:
    """Raise ``NotImplementedError`` for a QK freeze on a model whose ``hook_pattern`` edits are discarded."""
    if circuit in (Circuit.QK, Circuit.BOTH) and spec.qk_mask_source is None:
        raise NotImplementedError(
            "QK freezing needs hook_pattern edits to reach the attention output, and this model discards them "
            "(a native TransformerBridge before TransformerLens 4); OV freezes work"
        )


def freeze_hooks(
    model,
    heads: HeadsLike,
    circuit: Union[str, Circuit] = "qk",
    replacement: Union[str, Replacement] = "zero",
    *,
    reference=None,
    gradient: Union[str, GradientMode] = "stopgrad",
    preserve_gradients: Optional[bool] = None,
    noise_scale: float = 1.0,
    seed: Optional[int] = 0,
) -> list[tuple[str, Callable]]:
    """The freeze as TransformerLens ``fwd_hooks`` — ``[(hook_name, hook_fn), ...]`` — registering nothing.

    For ``model.run_with_hooks(tokens, fwd_hooks=freeze_hooks(...))`` or
    ``with model.hooks(fwd_hooks=freeze_hooks(...)):``. Arguments as :func:`freeze`.
    """
    spec, freeze_spec = _resolve(model, heads, circuit, replacement, gradient, preserve_gradients, noise_scale, seed)
    return _build_hooks(model, spec, freeze_spec, reference)


def _build_hooks(model, spec, freeze_spec, reference, row_masks=None) -> list[tuple[str, Callable]]:
    by_layer: dict[int, list[int]] = {}
    for layer, head in freeze_spec.heads:
        by_layer.setdefault(layer, []).append(head)
    reference = _prepare_reference(model, spec, freeze_spec, reference, sorted(by_layer))
    generator = _generator(model, freeze_spec.seed) if freeze_spec.replacement == Replacement.NOISE else None
    hooks = []
    for layer, heads in sorted(by_layer.items()):
        layer_freeze = _LayerFreeze(
            model, spec, layer, heads, freeze_spec.circuit, freeze_spec.replacement, freeze_spec.gradient,
            reference, freeze_spec.noise_scale, generator, None if row_masks is None else row_masks[layer],
        )
        hooks.extend(layer_freeze.hooks())
    return hooks


class FreezeHandle:
    """Freeze hooks registered on a model; remove them with :meth:`remove` or by leaving a ``with`` block."""

    def __init__(self, model, spec: FreezeSpec, hooks: list[tuple[str, Callable]]):
        self.model, self.spec, self.hook_fns = model, spec, hooks
        self._registered: list[tuple[object, object]] = []
        try:
            for name, fn in hooks:
                hook_point = model.hook_dict[name]
                hook_point.add_hook(fn, dir="fwd")
                self._registered.append((hook_point, hook_point.fwd_hooks[-1]))
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        return bool(self._registered)

    def remove(self) -> None:
        """Remove exactly the hooks this freeze added (the user's own hooks stay). Idempotent."""
        while self._registered:
            hook_point, lens_handle = self._registered.pop()
            lens_handle.hook.remove()
            hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not lens_handle]

    def __enter__(self) -> "FreezeHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        s = self.spec
        state = "active" if self.active else "removed"
        return (f"FreezeHandle({s.circuit.value}, {s.replacement.value}, {s.gradient.value}, "
                f"heads={list(s.heads)}, {state})")


def freeze(
    model,
    heads: HeadsLike,
    circuit: Union[str, Circuit] = "qk",
    replacement: Union[str, Replacement] = "zero",
    *,
    reference=None,
    gradient: Union[str, GradientMode] = "stopgrad",
    preserve_gradients: Optional[bool] = None,
    noise_scale: float = 1.0,
    seed: Optional[int] = 0,
) -> FreezeHandle:
    """Freeze the QK and/or OV circuit of ``heads`` now; returns a handle (also a context manager).

    Args:
        heads: (layer, head) tuples, a bool [n_layers, n_heads] mask, ``{layer: [heads]}`` or
            per-layer lists (see :func:`normalize_heads`).
        circuit: ``"qk"``, ``"ov"`` or ``"both"``.
        replacement: ``"zero"``, ``"mean"``, ``"noise"``, ``"resample"``, ``"identity"`` (QK only).
        reference: MEAN: a :class:`MeanActivations` (or reference tokens, averaged per position);
            RESAMPLE: reference tokens [batch, pos] or an ``ActivationCache`` holding the
            ``hook_pattern`` (QK) / ``hook_z`` (OV) of the frozen layers. Reference tokens are run
            once, now, under whatever hooks are active now.
        gradient: ``"stopgrad"`` or ``"straight_through"``; ``preserve_gradients=True`` is the same
            as ``gradient="straight_through"``.
        noise_scale, seed: NOISE std relative to the head's activation std; the generator is seeded
            once per freeze, so each forward draws fresh noise and the same seed repeats the sequence.

    >>> with freeze(model, [(0, 1)], "ov", "zero"):  # doctest: +SKIP
    ...     logits = model(tokens)
    """
    spec, freeze_spec = _resolve(model, heads, circuit, replacement, gradient, preserve_gradients, noise_scale, seed)
    return FreezeHandle(model, freeze_spec, _build_hooks(model, spec, freeze_spec, reference))
