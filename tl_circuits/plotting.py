"""Layer x head heatmaps that return figures, so notebooks show them inline.

Conventions (every heatmap): rows are layers (``Layer`` on the y axis, layer 0 at the top), columns heads
(``Head``, or ``KV head`` for K/V blocks under grouped-query attention); signed quantities use a diverging
colormap centred at 0 with symmetric limits; NaN cells (missing data) are plain grey and read ``NaN``;
cells outside a ``mask`` (e.g. not significant) are greyed and hatched, so they stay distinct from both.

>>> import torch
>>> fig = plot_heads(torch.randn(2, 4), title="effect", signed=True)
>>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
('Head', 'Layer')
>>> lo, hi = fig.axes[0].images[0].get_clim(); lo == -hi
True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
from jaxtyping import Bool, Float
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING_COLOUR = "#bbbbbb"
HIDDEN_OVERLAY = "#f2f2f2"
HATCH = "///"
DIVERGING_CMAP = "RdBu_r"
SEQUENTIAL_CMAP = "viridis"
_QKVO = ("Q", "K", "V", "O")


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def _is_signed(finite: np.ndarray) -> bool:
    return bool(finite.size) and finite.min() < 0 < finite.max()


def _colour_limits(finite: np.ndarray, signed: bool) -> tuple[float, float]:
    """(vmin, vmax): symmetric around 0 when signed; never an empty range."""
    if not finite.size:
        return (-1.0, 1.0) if signed else (0.0, 1.0)
    if signed:
        bound = float(np.abs(finite).max()) or 1.0
        return -bound, bound
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _cell_exponent(scale: float) -> int:
    """Power of ten factored out of the cell labels when values are very small or large (0: none)."""
    if not scale or not math.isfinite(scale):
        return 0
    exponent = math.floor(math.log10(scale))
    return exponent if exponent < -2 or exponent > 2 else 0


def _text_colour(rgba) -> str:
    """Black or white, whichever reads better on the cell colour (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


__all__ = ["plot_blocks", "plot_heads"]


def plot_heads(
    values: Union[Float[Tensor, "n_layers n_heads"], np.ndarray],
    *,
    mask: Optional[Bool[Tensor, "n_layers n_heads"]] = None,
    title: Optional[str] = None,
    signed: Optional[bool] = None,
    cmap: Optional[str] = None,
    colorbar_label: Optional[str] = None,
    annotate: Optional[bool] = None,
    limits: Optional[tuple[float, float]] = None,
    head_label: str = "Head",
    colorbar: bool = True,
    ax: Optional[Axes] = None,
) -> Figure:
    """Heatmap of one value per (layer, head): rows are layers, columns heads.

    Args:
        values: [n_layers, n_heads]; NaN cells (missing data) are drawn plain grey (``NaN`` when annotated).
        mask: cells to show (e.g. significant ones); cells outside it are greyed and hatched.
        signed: diverging colormap centred at 0 with symmetric limits; by default, when values have both signs.
        annotate: write each value in its cell; by default for grids of at most 16x16. Very small or large
            values are written as multiples of a power of ten, named in the colorbar label.
        limits: (vmin, vmax) of the colour scale, e.g. shared across panels; default: from the finite values.
        head_label: the x-axis label (``"KV head"`` for K/V blocks under GQA).
        colorbar: draw this panel's colorbar (off when a caller draws one shared colorbar).
        ax: draw into this Axes (and add its colorbar to its figure) instead of a new figure.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, TwoSlopeNorm

    data = _to_numpy(values)
    if data.ndim != 2:
        raise ValueError(f"values must be [n_layers, n_heads], got shape {data.shape}")
    n_layers, n_heads = data.shape
    finite = data[np.isfinite(data)]
    if signed is None:
        signed = _is_signed(finite)
    if ax is None:
        fig, ax = plt.subplots(figsize=_panel_size(n_layers, n_heads), layout="constrained")
    else:
        fig = ax.figure  # type: ignore[assignment]  # an Axes of a SubFigure: its figure draws the same
    vmin, vmax = limits if limits is not None else _colour_limits(finite, signed)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=vmin, vmax=vmax) if signed and vmin < 0 < vmax else Normalize(vmin, vmax)
    cmap_obj = plt.get_cmap(cmap or (DIVERGING_CMAP if signed else SEQUENTIAL_CMAP)).with_extremes(bad=MISSING_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap_obj, norm=norm, aspect="auto", interpolation="nearest")

    keep = np.ones_like(data, dtype=bool)
    if mask is not None:
        keep = _to_numpy(mask).astype(bool)
        if keep.shape != data.shape:
            raise ValueError(f"mask shape {keep.shape} does not match values {data.shape}")
        for layer, head in zip(*np.nonzero(~keep)):
            # a pale veil plus hatching: hidden cells stay readable but cannot be mistaken for shown ones
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, facecolor=HIDDEN_OVERLAY, alpha=0.75,
                                       hatch=HATCH, edgecolor="#777777", linewidth=0))

    ax.set_xlabel(head_label)
    ax.set_ylabel("Layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    if title:
        ax.set_title(title)

    # with given limits (a shared scale) every panel factors its cell labels by the same power of ten
    exponent = _cell_exponent(max(abs(vmin), abs(vmax)) if limits is not None else
                              (float(np.abs(finite).max()) if finite.size else 0.0))
    if annotate is None:
        annotate = n_layers <= 16 and n_heads <= 16
    if colorbar:
        _colorbar(fig, image, ax, colorbar_label, exponent if annotate else 0)
    if annotate:
        _annotate(ax, data, keep, image, exponent, n_heads)
    if fig.get_layout_engine() is None:  # a caller's own figure without a layout engine
        fig.tight_layout()
    return fig


def _colorbar(fig, image, ax, label: Optional[str], exponent: int):
    """A colorbar for ``ax`` (one Axes or a list); names the power of ten factored out of the cell labels."""
    label = label or ""
    if exponent:
        label = f"{label} (cells ×1e{exponent})".strip()
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    if label:
        bar.set_label(label)
    return bar


def _annotate(ax, data: np.ndarray, keep: np.ndarray, image, exponent: int, n_heads: int) -> None:
    """Write each cell's value, in a colour that reads on its background (grey on hidden cells)."""
    fontsize = 8 if n_heads <= 8 else 6.5
    for (layer, head), v in np.ndenumerate(data):
        if not np.isfinite(v):
            ax.text(head, layer, "NaN", ha="center", va="center", fontsize=fontsize, color="#444444")
            continue
        colour = _text_colour(image.cmap(image.norm(v))) if keep[layer, head] else "#555555"
        ax.text(head, layer, f"{v / 10.0 ** exponent:.2g}", ha="center", va="center", fontsize=fontsize, color=colour)


def _panel_size(n_layers: int, n_heads: int) -> tuple[float, float]:
    """Inches for one heatmap with its colorbar: cells about 0.5 in wide, never too small to read."""
    return max(3.4, 0.5 * n_heads + 1.9), max(2.6, 0.42 * n_layers + 1.5)


def _head_label(block: str, width: int, widths: Mapping[str, int]) -> str:
    """``KV head`` for a K/V panel narrower than the query-head panels (grouped-query attention)."""
    query_widths = [w for b, w in widths.items() if b not in ("K", "V")]
    if block in ("K", "V") and query_widths and width < max(query_widths):
        return "KV head"
    return "Head"


def plot_blocks(
    values: Mapping[str, Float[Tensor, "n_layers heads"]],
    *,
    masks: Optional[Mapping[str, Bool[Tensor, "n_layers heads"]]] = None,
    title: Optional[str] = None,
    signed: Optional[bool] = None,
    blocks: Optional[Sequence[str]] = None,
    colorbar_label: Optional[str] = None,
    shared_scale: bool = False,
    ncols: Optional[int] = None,
    titles: Optional[Mapping[str, str]] = None,
    annotate: Optional[bool] = None,
) -> Figure:
    """One layer x head heatmap per entry of ``values`` (Q/K/V/O blocks, QK/OV circuits, ...), in a grid.

    Args:
        values: panel name -> [n_layers, heads] grid.
        masks: panel name -> cells to show; the others are greyed and hatched (see :func:`plot_heads`).
        title: the figure's title.
        signed: diverging colormap centred at 0 (per panel by default, when its values have both signs).
        blocks: which panels, in order; default: Q, K, V, O first (those present), then the other keys.
        colorbar_label: label of every colorbar.
        shared_scale: one colour scale and one colorbar for all panels (use it when panels are in the same
            units and should be compared, e.g. the QK and OV freeze effects); default: each panel its own.
        ncols: panels per row (default: all in one row).
        titles: panel name -> panel title (default: the name itself).
        annotate: as :func:`plot_heads`.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if blocks is None:
        blocks = [b for b in _QKVO if b in values] + [b for b in values if b not in _QKVO]
    blocks = [b for b in blocks if b in values]
    if not blocks:
        raise ValueError(f"nothing to plot: none of the requested panels is in values (keys {list(values)})")
    grids = {b: _to_numpy(values[b]) for b in blocks}
    widths = {b: g.shape[1] for b, g in grids.items()}
    limits: Optional[tuple[float, float]] = None
    finite = np.concatenate([g[np.isfinite(g)].ravel() for g in grids.values()])
    if shared_scale:
        if signed is None:
            signed = _is_signed(finite)
        limits = _colour_limits(finite, signed)
    ncols = len(blocks) if ncols is None else max(1, min(ncols, len(blocks)))
    nrows = math.ceil(len(blocks) / ncols)
    n_layers = max(g.shape[0] for g in grids.values())
    width, height = _panel_size(n_layers, max(widths.values()))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + (0.4 if title else 0)),
                             squeeze=False, layout="constrained")
    for ax, block in zip(axes.flat, blocks):
        plot_heads(grids[block], mask=None if masks is None else masks[block],
                   title=(titles or {}).get(block, block), signed=signed, colorbar_label=colorbar_label,
                   annotate=annotate, limits=limits, head_label=_head_label(block, widths[block], widths),
                   colorbar=not shared_scale, ax=ax)
    for ax in list(axes.flat)[len(blocks):]:
        ax.remove()
    if shared_scale and limits is not None:  # one colorbar for the grid, cell labels factored like every panel's
        shown = list(axes.flat)[:len(blocks)]
        annotated = all(len(ax.texts) for ax in shown)
        _colorbar(fig, shown[0].images[0], shown, colorbar_label,
                  _cell_exponent(max(abs(limits[0]), abs(limits[1]))) if annotated else 0)
    if title:
        fig.suptitle(title)
    return fig
