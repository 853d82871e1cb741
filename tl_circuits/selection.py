"""Layer and head subsets: which (layer, head) cells a sweep or an interference run computes (docs/spec.md §0.7).

``layers=`` and ``heads=`` (any iterable of ints, ``None``: all) select the cells ``layers × heads``. Results keep
their ``[n_layers, n_heads]`` grids, NaN outside the selection (missing, never 0), and a multiple-testing family
holds the selected cells only. Under GQA a head selection names *query* heads: Q and O keep those heads, K and V
the KV heads they read (``spec.kv_head``). The notation the report prints and the command reads is
:func:`format_indices` / :func:`parse_indices` (``"0,3-5"``).

>>> parse_indices("0,3-5"), format_indices([10, 11]), format_indices(range(12))
((0, 3, 4, 5), '10-11', '0-11')
>>> from tl_circuits.models.spec import ModelSpec
>>> spec = ModelSpec(4, 4, 2, 8, 2, 10, 8, True, False)   # 4 layers, 4 query heads reading 2 KV heads
>>> selection = resolve_selection(spec, layers=[2, 3], heads=[0, 1])
>>> selection.describe(), selection.cells(spec)["K"].int().tolist()
('layers 2-3, heads 0-1', [[0, 0], [0, 0], [1, 0], [1, 0]])
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from tl_circuits.models.spec import BLOCKS, ModelSpec


def parse_indices(text: str, what: str = "indices") -> tuple[int, ...]:
    """``"0,3-5"`` -> ``(0, 3, 4, 5)``: comma-separated integers and inclusive ranges ``a-b`` (sorted, unique)."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"{what}: {part!r} in {text!r} is not an integer or a range a-b (e.g. '0,3-5')") from None
        if sep and int(hi) < int(lo):
            raise ValueError(f"{what}: the range {part!r} in {text!r} runs backwards")
        out.update(values)
    return tuple(sorted(out))


def format_indices(values: Iterable[int]) -> str:
    """Sorted integers in the compact notation of :func:`parse_indices` (``[0, 3, 4, 5]`` -> ``"0,3-5"``)."""
    items = sorted(set(int(v) for v in values))
    runs: list[list[int]] = []
    for v in items:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _checked(values: Optional[Iterable[int]], n: int, what: str) -> tuple[int, ...]:
    if values is None:
        return tuple(range(n))
    if isinstance(values, str):
        values = parse_indices(values, what)
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{what} must be an iterable of ints (or None: all), got {values!r}") from None
    if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in items):
        raise TypeError(f"{what} must hold ints, got {items!r}")
    chosen = sorted(set(operator.index(v) for v in items))
    if not chosen:
        raise ValueError(f"{what} is empty: select at least one (None: all {n})")
    bad = [v for v in chosen if not 0 <= v < n]
    if bad:
        raise IndexError(f"{what} {bad} out of range: the model has {n} (0..{n - 1})")
    return tuple(chosen)


@dataclass(frozen=True)
class Selection:
    """The selected layers and (query) heads, sorted and unique."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    n_layers: int
    n_heads: int

    @property
    def is_full(self) -> bool:
        return len(self.layers) == self.n_layers and len(self.heads) == self.n_heads

    def describe(self) -> str:
        """``"layers 10-11, heads 0-11"`` (the notation of :func:`format_indices`)."""
        return f"layers {format_indices(self.layers)}, heads {format_indices(self.heads)}"

    def block_heads(self, spec: ModelSpec, block: str) -> tuple[int, ...]:
        """The heads of ``block`` the selection keeps: the query heads for Q/O, the KV heads they read for K/V."""
        if spec.head_kind(block) == "kv":  # type: ignore[arg-type]
            return tuple(sorted({spec.kv_head(h) for h in self.heads}))
        return self.heads

    def cells(self, spec: ModelSpec) -> dict[str, Tensor]:
        """``{block: bool [n_layers, heads_B]}``: True on the selected cells."""
        out: dict[str, Tensor] = {}
        for block in BLOCKS:
            grid = torch.zeros(spec.n_layers, spec.n_block_heads(block), dtype=torch.bool)
            grid[torch.tensor(self.layers)[:, None], torch.tensor(self.block_heads(spec, block))[None, :]] = True
            out[block] = grid
        return out

    def to_dict(self) -> dict[str, Any]:
        """What a result's settings record (``settings["selection"]``), JSON values."""
        return {"layers": list(self.layers), "heads": list(self.heads)}


def resolve_selection(spec: ModelSpec, layers: Optional[Iterable[int]] = None,
                      heads: Optional[Iterable[int]] = None) -> Selection:
    """The checked :class:`Selection` of ``layers`` and ``heads`` (``None``: all; a string in the notation of
    :func:`parse_indices` is read as such); a ValueError / IndexError / TypeError names a bad one."""
    return Selection(_checked(layers, spec.n_layers, "layers"), _checked(heads, spec.n_heads, "heads"),
                     spec.n_layers, spec.n_heads)


def selected_cells(settings: dict, spec_like: Any = None) -> Optional[dict[str, Tensor]]:
    """The selected cells recorded in a result's ``settings`` (``None``: no selection, every cell)."""
    recorded = settings.get("selection") if isinstance(settings, dict) else None
    if not recorded or spec_like is None:
        return None
    selection = Selection(tuple(recorded["layers"]), tuple(recorded["heads"]), spec_like.n_layers, spec_like.n_heads)
    return selection.cells(spec_like)


__all__ = ["Selection", "format_indices", "parse_indices", "resolve_selection", "selected_cells"]
