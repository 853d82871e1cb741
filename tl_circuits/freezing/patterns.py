"""Pictures of what a QK freeze does: a head's attention pattern on one sample, clean beside frozen.

:meth:`~tl_circuits.freezing.sweep.SweepResult.plot_patterns` picks the heads (the top-k QK heads of a sweep by
|effect|, or given ones), freezes each alone with :func:`tl_circuits.freeze` and the sweep's replacement, seed
and noise scale, and reads both patterns from ``run_with_cache``.

>>> import torch
>>> from tl_circuits import freeze_sweep, load_bundled_model
>>> model = load_bundled_model("induction-2l")  # a HookedTransformer on TransformerLens < 4, a bridge on 4.x
>>> tokens = torch.randint(0, 64, (2, 5))
>>> fig = freeze_sweep(model, tokens, progress=False).plot_patterns(model, tokens, k=1)
>>> [ax.get_title().split(" ")[1] for ax in fig.axes if ax.images]
['clean', 'frozen']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_circuits.freezing.api import freeze
from tl_circuits.freezing.options import NOISE_SCALE, Replacement, parse_option
from tl_circuits.models.spec import check_tokens, model_spec
from tl_circuits.models.types import Model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure

    from tl_circuits.freezing.sweep import SweepResult

__all__ = ["head_patterns", "plot_patterns", "top_qk_heads"]


def top_qk_heads(result: SweepResult, k: int) -> list[tuple[int, int]]:
    """The k heads with the largest |QK effect| of a sweep (NaN cells last)."""
    if "qk" not in result.frozen:
        raise ValueError(f"plot_patterns shows QK freezes, and this sweep has no 'qk' circuit ({list(result.frozen)})")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [(layer, head) for layer, head, _ in result.top_heads(k, "qk")]


def head_patterns(model: Model, tokens: Int[Tensor, "batch pos"], heads: Sequence[tuple[int, int]], sample: int,
                  replacement: str, reference: Any = None, noise_scale: float = NOISE_SCALE,
                  seed: Optional[int] = 0) -> list[tuple[Tensor, Tensor]]:
    """``(clean, frozen)`` attention pattern [q_pos, k_pos] of each head on row ``sample``; each head frozen alone
    (QK, ``replacement``) with :func:`tl_circuits.freeze` around ``run_with_cache`` (hooks removed on every exit)."""
    spec = model_spec(model)
    names = {layer: spec.hook_name(layer, "pattern") for layer, _ in heads}
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(tokens, names_filter=lambda name: name in names.values())
        out = []
        for layer, head in heads:
            with freeze(model, [(layer, head)], "qk", replacement, reference=reference, noise_scale=noise_scale,
                        seed=seed):
                _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == names[layer])
            out.append((clean_cache[names[layer]][sample, head].detach().float().cpu(),
                        cache[names[layer]][sample, head].detach().float().cpu()))
    return out


def _position_labels(model: Model, tokens: Tensor, tokenizer: Any) -> list[str]:
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(p) for p in range(tokens.shape[0])]
    return [f"{p}: {tokenizer.decode([int(t)])}" for p, t in enumerate(tokens.tolist())]


def plot_patterns(
    result: SweepResult,
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    heads: Optional[Sequence[tuple[int, int]]] = None,
    *,
    k: int = 3,
    sample: int = 0,
    tokenizer: Any = None,
    reference: Any = None,
) -> Figure:
    """One row per head: its attention pattern on ``tokens[sample]``, clean (left) beside QK-frozen (right).

    Args:
        result: the sweep whose replacement, seed (draw 0's) and noise scale the freezes use.
        tokens: the batch the sweep ran on ([batch, pos], or one sequence [pos]); the whole batch is run, so
            batch-dependent replacements (NOISE's scale, per-row RESAMPLE references) act as in the sweep.
        heads: (layer, head) pairs; default: the top ``k`` QK heads by |effect|.
        sample: which row to show.
        tokenizer: labels positions with their tokens (default ``model.tokenizer``; positions only without one).
        reference: what the sweep's MEAN / RESAMPLE freeze read; for a RESAMPLE list of draws, the first
            (draw 0's) is used.
            A NOISE picture is a fresh draw with the sweep's seed, not one of the sweep's stacked draws.
    Returns:
        The matplotlib Figure; ``axes[2 i]`` / ``axes[2 i + 1]`` (plus colorbars) show head i clean / frozen.
    """
    import matplotlib.pyplot as plt

    spec = model_spec(model)
    if tokens.ndim == 1:
        tokens = tokens[None]
    check_tokens(spec, tokens)
    if not 0 <= sample < tokens.shape[0]:
        raise ValueError(f"sample must index a row of tokens (0..{tokens.shape[0] - 1}), got {sample}")
    replacement = parse_option(Replacement, result.replacement, "replacement")
    if isinstance(reference, (list, tuple)):
        if not reference:
            raise ValueError("the list of references is empty")
        reference = reference[0]  # draw 0, like the seed of a NOISE picture
    if replacement in (Replacement.MEAN, Replacement.RESAMPLE) and reference is None:
        raise ValueError(f"the sweep froze with {replacement.value.upper()}: pass the same reference= it used")
    if heads is None:
        heads = top_qk_heads(result, k)
    heads = [(int(layer), int(head)) for layer, head in heads]
    for layer, head in heads:
        spec.check_layer_head(layer, head)
    seeds = result.settings.get("draw_seeds") or [result.settings.get("seed", 0)]
    patterns = head_patterns(model, tokens, heads, sample, replacement.value, reference,
                             float(result.settings.get("noise_scale", NOISE_SCALE)), seeds[0])
    labels = _position_labels(model, tokens[sample], tokenizer)
    n_pos = len(labels)
    size = max(3.0, 0.35 * n_pos + 1.5)
    fig, axes = plt.subplots(len(heads), 2, figsize=(2 * size + 1.5, size * len(heads)), squeeze=False,
                             layout="constrained")
    for row, ((layer, head), (clean, frozen)) in enumerate(zip(heads, patterns)):
        for ax, pattern, what in ((axes[row, 0], clean, "clean"), (axes[row, 1], frozen, "frozen")):
            image = ax.imshow(pattern.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"L{layer}H{head} {what}" + (f" (QK {replacement.value})" if what == "frozen" else ""))
            ax.set_xticks(range(n_pos), labels, rotation=90)
            ax.set_yticks(range(n_pos), labels)
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
        fig.colorbar(image, ax=list(axes[row]), label="attention")
    fig.suptitle(f"{replacement.value.upper()} QK freeze: attention on sample {sample}")
    return fig
