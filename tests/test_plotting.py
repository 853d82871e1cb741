"""Layer x head heatmaps: labels, centred diverging scales, masks, NaN cells, shared scales, GQA labels."""

import doctest

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import TwoSlopeNorm, to_rgba  # noqa: E402

import tl_circuits.plotting as P  # noqa: E402
from tl_circuits.plotting import plot_blocks, plot_heads  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_xlabel()]


def hatched_cells(ax) -> set:
    """(layer, head) of every hatched cell patch."""
    return {(int(round(p.get_y() + 0.5)), int(round(p.get_x() + 0.5))) for p in ax.patches if p.get_hatch()}


def cell_text(ax, layer, head) -> str:
    return next(t.get_text() for t in ax.texts if t.get_position() == (head, layer))


def test_labels_ticks_and_signed_scale_centred_at_zero():
    values = torch.tensor([[-1.0, 3.0, 0.5], [0.2, -0.1, 2.0]])
    fig = plot_heads(values, title="effect", colorbar_label="Δ loss")
    ax = heatmap_axes(fig)[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("Head", "Layer", "effect")
    assert [t for t in ax.get_xticks()] == [0, 1, 2] and [t for t in ax.get_yticks()] == [0, 1]
    image = ax.images[0]
    assert isinstance(image.norm, TwoSlopeNorm) and image.norm.vcenter == 0.0
    assert image.get_clim() == (-3.0, 3.0)  # symmetric: the largest |value| on both sides
    assert image.cmap.name.startswith(P.DIVERGING_CMAP)
    assert [a.get_ylabel() for a in fig.axes if a is not ax] == ["Δ loss"]  # the colorbar


def test_unsigned_values_use_a_sequential_scale_unless_told_otherwise():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    image = heatmap_axes(plot_heads(values))[0].images[0]
    assert image.cmap.name.startswith(P.SEQUENTIAL_CMAP) and image.get_clim() == (1.0, 4.0)
    forced = heatmap_axes(plot_heads(values, signed=True))[0].images[0]
    assert forced.get_clim() == (-4.0, 4.0)


def test_masked_cells_are_hatched_and_shown_cells_are_not():
    values = torch.arange(12.0).reshape(3, 4) - 5
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    ax = heatmap_axes(plot_heads(values, mask=mask))[0]
    expected = {(layer, head) for layer in range(3) for head in range(4)} - {(0, 1), (2, 3)}
    assert hatched_cells(ax) == expected
    # hidden cells' labels are grey, shown cells' labels are black or white
    origin = next(t for t in ax.texts if t.get_position() == (0, 0))
    assert ax.texts and to_rgba(origin.get_color()) == to_rgba("#555555")
    assert next(t for t in ax.texts if t.get_position() == (1, 0)).get_color() in ("black", "white")
    with pytest.raises(ValueError, match="mask shape"):
        plot_heads(values, mask=torch.ones(2, 4, dtype=torch.bool))


def test_nan_cells_are_grey_and_labelled_not_zero():
    values = torch.tensor([[1.0, float("nan")], [-2.0, 0.5]])
    ax = heatmap_axes(plot_heads(values))[0]
    image = ax.images[0]
    assert np.ma.is_masked(image.get_array()[0, 1])
    assert to_rgba(image.cmap.get_bad()) == to_rgba(P.MISSING_COLOUR)
    assert cell_text(ax, 0, 1) == "NaN" and cell_text(ax, 1, 0) == "-2"


def test_text_colour_reads_on_its_cell():
    values = torch.tensor([[-10.0, 0.0, 10.0]])
    ax = heatmap_axes(plot_heads(values))[0]
    assert cell_text(ax, 0, 1) == "0"
    colours = {t.get_position(): t.get_color() for t in ax.texts}
    assert colours[(0, 0)] == "white" and colours[(2, 0)] == "white"  # saturated blue / red
    assert colours[(1, 0)] == "black"                                # white centre of the diverging map


def test_tiny_values_are_labelled_as_multiples_of_a_power_of_ten():
    values = torch.tensor([[2.5e-5, -1.0e-5]])
    fig = plot_heads(values, colorbar_label="score")
    ax = heatmap_axes(fig)[0]
    assert cell_text(ax, 0, 0) == "2.5" and cell_text(ax, 0, 1) == "-1"
    assert [a.get_ylabel() for a in fig.axes if a is not ax] == ["score (cells ×1e-5)"]
    plain = plot_heads(torch.tensor([[0.25, -0.5]]), colorbar_label="score")
    assert [a.get_ylabel() for a in plain.axes if a.get_ylabel() != "Layer"] == ["score"]


def test_blocks_gqa_panels_say_kv_head_and_keep_block_order():
    values = {"O": torch.randn(2, 4), "K": torch.randn(2, 2), "Q": torch.randn(2, 4), "V": torch.randn(2, 2)}
    fig = plot_blocks(values, title="interference")
    axes = heatmap_axes(fig)
    assert [ax.get_title() for ax in axes] == ["Q", "K", "V", "O"]
    assert [ax.get_xlabel() for ax in axes] == ["Head", "KV head", "KV head", "Head"]
    assert fig.get_suptitle() == "interference"
    same_width = plot_blocks({b: torch.randn(2, 4) for b in "QKVO"})
    assert {ax.get_xlabel() for ax in heatmap_axes(same_width)} == {"Head"}


def test_blocks_shared_scale_uses_one_scale_and_one_colorbar():
    values = {"qk": torch.tensor([[0.1, -0.2]]), "ov": torch.tensor([[4.0, -1.0]])}
    fig = plot_blocks(values, shared_scale=True, signed=True, colorbar_label="Δ loss", ncols=1,
                      titles={"qk": "QK frozen", "ov": "OV frozen"})
    axes = heatmap_axes(fig)
    assert [ax.get_title() for ax in axes] == ["QK frozen", "OV frozen"]
    assert {ax.images[0].get_clim() for ax in axes} == {(-4.0, 4.0)}
    assert len(fig.axes) == 3  # two heatmaps, one colorbar
    separate = plot_blocks(values, signed=True)
    assert len(separate.axes) == 4
    assert [ax.images[0].get_clim() for ax in heatmap_axes(separate)] == [pytest.approx((-0.2, 0.2)), (-4.0, 4.0)]


def test_blocks_grid_layout_masks_and_errors():
    values = {b: torch.randn(3, 2) for b in "QKVO"}
    masks = {b: torch.rand(3, 2) > 0.5 for b in "QKVO"}
    fig = plot_blocks(values, masks=masks, ncols=2)
    axes = heatmap_axes(fig)
    assert len(axes) == 4
    assert len({round(ax.get_position().y0, 3) for ax in axes}) == 2  # two rows
    for ax in axes:
        hidden = {(int(l), int(h)) for l, h in (~masks[ax.get_title()]).nonzero().tolist()}
        assert hatched_cells(ax) == hidden
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_blocks(values, blocks=["qk"])
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        plot_heads(torch.randn(2, 3, 4))


def test_existing_callers_get_figures(mha_model, tokens):
    from tl_circuits import freeze_sweep

    fig = freeze_sweep(mha_model, tokens, progress=False).plot()
    assert [ax.get_title() for ax in heatmap_axes(fig)] == ["qk", "ov"]
    assert all(ax.images[0].get_clim()[0] == -ax.images[0].get_clim()[1] for ax in heatmap_axes(fig))


def test_docstring_examples_run():
    failures, tried = doctest.testmod(P, verbose=False)
    assert tried >= 3 and failures == 0
