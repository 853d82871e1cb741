"""QK/OV circuit freezing of attention heads through TransformerLens hook points (docs/spec.md §1).

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
>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # a HookedTransformer on TransformerLens < 4, a bridge on 4.x
>>> tokens = torch.randint(0, 64, (1, 5))
>>> with freeze(model, [(0, 1)], circuit="qk", replacement="zero"):
...     _, cache = model.run_with_cache(tokens)
>>> cache["blocks.0.attn.hook_pattern"][0, 1, 4]
tensor([0.2000, 0.2000, 0.2000, 0.2000, 0.2000])
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

from tl_circuits.defaults import SEED
from tl_circuits.freezing.hooks import Hook, LayerFreeze, build_layer_freezes
from tl_circuits.freezing.options import (
    NOISE_SCALE,
    Circuit,
    FreezeSpec,
    GradientMode,
    HeadsLike,
    Replacement,
    resolve_freeze_spec,
)
from tl_circuits.freezing.references import ReferenceLike
from tl_circuits.freezing.rows import BatchRows
from tl_circuits.models.types import Model


class FreezeHandle:
    """Freeze hooks registered on a model; remove them with :meth:`remove` or by leaving a ``with`` block."""

    def __init__(self, model: Model, spec: FreezeSpec, hooks: list[Hook], layers: Sequence[LayerFreeze] = ()):
        self.model, self.spec, self.hook_fns = model, spec, hooks
        self.layers = list(layers)  # the LayerFreezes whose hooks these are (told the rows of a chunk: on_rows)
        self._registered: list[tuple[Any, Any]] = []  # (HookPoint, its LensHandle)
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

    @contextmanager
    def on_rows(self, rows: Optional[BatchRows]) -> Iterator[None]:
        """Within this block, the model's forwards run on ``rows`` of the batch a per-sample RESAMPLE reference was
        made for (the per-sample gradient engine says so for each chunk of ``freezes=``); ``None``: the whole batch."""
        for layer in self.layers:
            layer.rows = rows
        try:
            yield
        finally:
            for layer in self.layers:
                layer.rows = None

    def __enter__(self) -> "FreezeHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        s = self.spec
        state = "active" if self.active else "removed"
        return (f"FreezeHandle({s.circuit.value}, {s.replacement.value}, {s.gradient.value}, "
                f"heads={list(s.heads)}, {state})")


def freeze(
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
) -> FreezeHandle:
    """Freeze the QK and/or OV circuit of ``heads`` now; returns a handle (also a context manager).

    Args:
        heads: (layer, head) tuples, a bool [n_layers, n_heads] mask, ``{layer: [heads]}`` or
            per-layer lists (see :func:`~tl_circuits.freezing.options.normalize_heads`).
        circuit: ``"qk"``, ``"ov"`` or ``"both"``.
        replacement: ``"zero"``, ``"mean"``, ``"noise"``, ``"resample"``, ``"identity"`` (QK only).
        reference: MEAN: a :class:`~tl_circuits.freezing.references.MeanActivations` (or reference tokens,
            averaged per position);
            RESAMPLE: reference tokens [batch, pos] or an ``ActivationCache`` holding the
            ``hook_pattern`` (QK) / ``hook_z`` (OV) of the frozen layers. Reference tokens are run
            once, now, under whatever hooks are active now.
        gradient: ``"stopgrad"`` or ``"straight_through"``; ``preserve_gradients=True`` is the same
            as ``gradient="straight_through"``.
        noise_scale, seed: NOISE std relative to the head's activation std; the generator is seeded
            once per freeze, so each forward draws fresh noise and the same seed repeats the sequence.

    >>> import torch
    >>> from tl_circuits import load_bundled_model
    >>> model = load_bundled_model("induction-2l")
    >>> with freeze(model, [(0, 1)], "ov", "zero") as handle:
    ...     logits = model(torch.randint(0, 64, (1, 5)))
    >>> handle
    FreezeHandle(ov, zero, stopgrad, heads=[(0, 1)], removed)
    """
    spec, freeze_spec = resolve_freeze_spec(model, heads, circuit, replacement, gradient, preserve_gradients,
                                            noise_scale, seed)
    layers = build_layer_freezes(model, spec, freeze_spec, reference)
    return FreezeHandle(model, freeze_spec, [hook for layer in layers for hook in layer.hooks()], layers)
