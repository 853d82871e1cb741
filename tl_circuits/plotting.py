"""Layer x head heatmaps that return figures, so notebooks show them inline.

>>> import torch
>>> fig = plot_heads(torch.randn(2, 4), title="effect", signed=True)
>>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
('Head', 'Layer')
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def plot_heads(
    values: Float[Tensor, "n_layers n_heads"],
    *,
    mask: Optional[Bool[Tensor, "n_layers n_heads"]] = None,
    title: Optional[str] = None,
    signed: Optional[bool] = None,
    cmap: Optional[str] = None,
    colorbar_label: Optional[str] = None,
    annotate: Optional[bool] = None,
    ax=None,
):
    """Heatmap of one value per (layer, head): rows are layers, columns heads.

    Args:
        values: [n_layers, n_heads]; NaN cells (missing data) are drawn grey.
        mask: cells to show (e.g. significant ones); cells outside it are hatched and greyed.
        signed: diverging colormap centred at 0; by default, when values have both signs.
        annotate: write each value in its cell; by default for grids of at most 16x16.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    data = _to_numpy(values)
    if data.ndim != 2:
        raise ValueError(f"values must be [n_layers, n_heads], got shape {data.shape}")
    finite = data[np.isfinite(data)]
    if signed is None:
        signed = finite.size > 0 and finite.min() < 0 < finite.max()
    if ax is None:
        n_layers, n_heads = data.shape
        fig, ax = plt.subplots(figsize=(max(3.5, 0.55 * n_heads + 2), max(2.5, 0.45 * n_layers + 1.2)))
    else:
        fig = ax.figure
    cmap_obj = plt.get_cmap(cmap or ("RdBu_r" if signed else "viridis")).with_extremes(bad="#bbbbbb")
    norm = None
    if signed and finite.size:
        bound = float(np.abs(finite).max()) or 1.0
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap_obj, norm=norm, aspect="auto")
    if mask is not None:
        keep = _to_numpy(mask).astype(bool)
        if keep.shape != data.shape:
            raise ValueError(f"mask shape {keep.shape} does not match values {data.shape}")
        hidden = np.ma.masked_where(keep, np.ones_like(data))
        ax.imshow(hidden, cmap="Greys", vmin=0, vmax=1.6, alpha=0.75, aspect="auto")
        for layer, head in zip(*np.nonzero(~keep)):
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="///",
                                       edgecolor="#666666", linewidth=0))
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    if title:
        ax.set_title(title)
    bar = fig.colorbar(image, ax=ax)
    if colorbar_label:
        bar.set_label(colorbar_label)
    if annotate is None:
        annotate = data.shape[0] <= 16 and data.shape[1] <= 16
    if annotate:
        scale = float(np.abs(finite).max()) if finite.size else 1.0
        for (layer, head), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(head, layer, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if (not signed and scale and v < 0.5 * scale) else "black")
    fig.tight_layout()
    return fig


def plot_blocks(
    values: Mapping[str, Float[Tensor, "n_layers heads"]],
    *,
    masks: Optional[Mapping[str, Bool[Tensor, "n_layers heads"]]] = None,
    title: Optional[str] = None,
    signed: Optional[bool] = None,
    blocks: Sequence[str] = ("Q", "K", "V", "O"),
    colorbar_label: Optional[str] = None,
):
    """One layer x head heatmap per block (e.g. Q/K/V/O interference), side by side."""
    import matplotlib.pyplot as plt

    blocks = [b for b in blocks if b in values]
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.6), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        plot_heads(values[block], mask=None if masks is None else masks[block], title=block,
                   signed=signed, colorbar_label=colorbar_label, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
