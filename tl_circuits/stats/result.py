"""The result of :func:`tl_circuits.stats.permutation_test`: per-cell grids, settings, a table, plots, files.

``save(path)`` writes two files side by side, as the bundled models do: ``<path>.safetensors`` (every tensor:
the grids, the null distribution, the relabelings) and ``<path>.json`` (settings, block names, which
optional fields are absent). ``InterferenceTestResult.load(path)`` reads them back exactly: same dtypes, NaN
kept, ``None`` fields kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from tl_circuits.stats.validation import Grid

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure
    from pandas import DataFrame

__all__ = ["InterferenceTestResult", "GRID_FIELDS"]

GRID_FIELDS = ("observed", "null_mean", "null_std", "z", "effect_size", "p_value", "q_value_bh", "q_value_by",
               "p_maxstat", "p_cluster", "ci_low", "ci_high", "significant", "permutations_used")
SETTING_FIELDS = ("alpha", "n_permutations", "alternative", "correction", "n_a", "n_b", "n_bootstrap", "ci_method",
                  "confidence_level", "cluster_threshold", "connectivity", "seed", "n_permutations_screen", "loss")
OPTIONAL_GRIDS = ("permutations_used",)  # absent from files written before they existed
FILE_FORMAT = "tl_circuits.InterferenceTestResult"
FILE_VERSION = 1


@dataclass(frozen=True, repr=False)
class InterferenceTestResult:
    """Result of :func:`permutation_test`. Every grid field is a dict block -> Tensor[n_layers, n_heads_B].

    Attributes:
        observed: mean of M over all A×B pairs.
        null_mean, null_std: exact mean / SD of that statistic over all relabelings.
        z: ``(observed − null_mean) / null_std`` (standardised statistic; used by max-stat and clusters).
        effect_size: ``(observed − null_mean) / sd_pairs``, a standardised mean difference on the pair scale
            (``sd_pairs``: SD of M over ordered off-diagonal pooled pairs).
        p_value: permutation p-value, ``(1 + hits) / (1 + n_permutations)``.
        q_value_bh, q_value_by: BH / BY q-values over all finite cells of all blocks.
        p_maxstat: Westfall–Young max-T family-wise adjusted p.
        p_cluster: cluster-mass family-wise adjusted p (1 outside clusters).
        ci_low, ci_high: bootstrap interval of ``observed`` (``None`` when ``n_bootstrap=0``).
        significant: ``correction``'s adjusted p (``q_value_bh`` for "bh", ...) ≤ ``alpha``; False for NaN cells.
        null_distribution: block -> [P, L, H], the statistic under each relabeling of ``permutations``.
        permutations: [P, N] bool, the task-A membership of each relabeling (all of them; with the default
            screening, the ``n_permutations_screen`` that every cell saw, which max-stat and clusters use).
        n_permutations_screen: ``None``, or with the default number of permutations the screen size (every cell
            is tested on these; cells with screen p ≤ alpha on all ``n_permutations``).
        permutations_used: ``None``, or per cell the number of relabelings its ``p_value`` is over.
        loss: what each task's per-sample loss scored (``settings["loss"]`` of the engine, docs/spec.md §2.1) when
            the pooled matrix came from a model (:func:`~tl_circuits.stats.model_test.interference_permutation_test`);
            ``None`` for a matrix given as tensors.
    """

    observed: Grid
    null_mean: Grid
    null_std: Grid
    z: Grid
    effect_size: Grid
    p_value: Grid
    q_value_bh: Grid
    q_value_by: Grid
    p_maxstat: Grid
    p_cluster: Grid
    ci_low: Optional[Grid]
    ci_high: Optional[Grid]
    significant: Dict[str, Bool[Tensor, "n_layers heads"]]
    alpha: float
    n_permutations: int
    alternative: str
    correction: str
    n_a: int
    n_b: int
    n_bootstrap: int
    ci_method: str
    confidence_level: float
    cluster_threshold: float
    connectivity: int
    seed: object
    null_distribution: Dict[str, Tensor] = field(default_factory=dict)
    permutations: Optional[Tensor] = None
    n_permutations_screen: Optional[int] = None
    permutations_used: Optional[Grid] = None
    loss: Optional[dict] = None

    @property
    def blocks(self) -> Tuple[str, ...]:
        return tuple(self.observed)

    @property
    def settings(self) -> dict:
        """The scalar settings of the test, ``n_permutations`` being the number actually used."""
        return {name: getattr(self, name) for name in SETTING_FIELDS}

    def __repr__(self) -> str:
        counts = {b: int(s.sum()) for b, s in self.significant.items()}
        return (f"InterferenceTestResult(blocks={list(self.blocks)}, n_permutations={self.n_permutations}, "
                f"alternative={self.alternative!r}, correction={self.correction!r}, alpha={self.alpha}, "
                f"significant_cells={counts})")

    def to_dataframe(self) -> DataFrame:
        """Tidy table: one row per (block, layer, head), one column per grid field."""
        import pandas as pd

        frames = []
        for block in self.blocks:
            n_layers, n_heads = self.observed[block].shape
            layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
            columns = {"block": block, "layer": layer.ravel(), "head": head.ravel()}
            for name in GRID_FIELDS:
                grid = getattr(self, name)
                if grid is None:
                    continue
                values = grid[block].detach().cpu().numpy().ravel()
                columns[name] = values.astype(bool) if name == "significant" else values.astype(float)
            frames.append(pd.DataFrame(columns))
        return pd.concat(frames, ignore_index=True)

    def plot(self, field: str = "observed", mask_with: Optional[str] = None, *, title: Optional[str] = None,
             **kwargs: Any) -> Figure:
        """Heatmaps of ``field`` per block; cells that are not significant are hatched and greyed.

        ``mask_with=None`` uses ``significant`` (this result's correction); a p/q field name
        (e.g. ``"p_maxstat"``) shows the cells where that field ≤ ``alpha``; ``mask_with=False`` shows all.
        ``z``, ``effect_size`` and any field with negative values (signed scores) use a diverging colormap
        centred at 0; ``shared_scale=True`` gives all blocks one colour scale. Other keyword arguments go to
        :func:`tl_circuits.plotting.plot_blocks`. Returns the matplotlib Figure.
        """
        from tl_circuits.plotting import plot_blocks

        if field not in GRID_FIELDS or field == "significant" or getattr(self, field) is None:
            raise ValueError(f"field must be one of the computed value fields, got {field!r}")
        if mask_with is None:
            masks, shown = self.significant, f"{self.correction} ≤ {self.alpha}"
        elif mask_with is False:
            masks, shown = None, None
        elif mask_with in ("p_value", "q_value_bh", "q_value_by", "p_maxstat", "p_cluster"):
            masks = {b: torch.nan_to_num(v, nan=2.0) <= self.alpha for b, v in getattr(self, mask_with).items()}
            shown = f"{mask_with} ≤ {self.alpha}"
        else:
            raise ValueError(f"mask_with must be None, False or a p/q field name, got {mask_with!r}")
        if title is None:
            title = field + (f" (hatched = not significant; significant: {shown})" if shown else "")
        values = getattr(self, field)
        negative = any(bool((torch.nan_to_num(v, nan=0.0) < 0).any()) for v in values.values())
        if field in ("z", "effect_size") or negative:
            # standardised fields, and signed scores (any value below 0): diverging, centred at 0 in every block
            kwargs.setdefault("signed", True)
        return plot_blocks(getattr(self, field), masks=masks, title=title, blocks=self.blocks,
                           colorbar_label=field, **kwargs)

    def save(self, path: Union[str, Path]) -> Tuple[Path, Path]:
        """Write ``<path>.safetensors`` (tensors) and ``<path>.json`` (settings); returns both paths.

        ``path`` may end in ``.safetensors`` or ``.json``; the stem is used for both files.

        >>> import tempfile, torch
        >>> from tl_circuits.stats import permutation_test
        >>> res = permutation_test({"Q": torch.rand(6, 6, 1, 2)}, 3, n_permutations=19, n_bootstrap=0,
        ...                        progress=False)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = res.save(f"{tmp}/run")
        ...     back = InterferenceTestResult.load(f"{tmp}/run")
        >>> back.settings == res.settings and torch.equal(back.observed["Q"], res.observed["Q"])
        True
        """
        from safetensors.torch import save_file

        tensor_path, json_path = result_paths(path)
        blocks = list(self.blocks)
        tensors: Dict[str, Tensor] = {}
        absent = []
        for name in GRID_FIELDS:
            grid = getattr(self, name)
            if grid is None:
                absent.append(name)
                continue
            if list(grid) != blocks:
                raise ValueError(f"{name} has blocks {list(grid)}, observed has {blocks}")
            for index, block in enumerate(blocks):
                tensors[f"{name}/{index}"] = _own_storage(grid[block])
        null_blocks = list(self.null_distribution)
        for index, block in enumerate(null_blocks):
            tensors[f"null_distribution/{index}"] = _own_storage(self.null_distribution[block])
        if self.permutations is None:
            absent.append("permutations")
        else:
            tensors["permutations"] = _own_storage(self.permutations)
        settings = self.settings
        try:
            json.dumps(settings["seed"])
        except TypeError:
            settings["seed"] = repr(settings["seed"])     # e.g. a generator: kept as a description
        record = {"format": FILE_FORMAT, "version": FILE_VERSION, "blocks": blocks,
                  "null_distribution_blocks": null_blocks, "absent": absent, "settings": settings}
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tensor_path), metadata={"format": FILE_FORMAT})
        json_path.write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
        return tensor_path, json_path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "InterferenceTestResult":
        """Read a result written by :meth:`save` (the same ``path``)."""
        from safetensors.torch import load_file

        tensor_path, json_path = result_paths(path)
        missing = [str(p) for p in (tensor_path, json_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no saved InterferenceTestResult at {str(path)!r}: missing "
                                    f"{' and '.join(missing)} (save() writes both)")
        record = json.loads(json_path.read_text())
        if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
            raise ValueError(f"{json_path} is not a saved InterferenceTestResult (no format {FILE_FORMAT!r})")
        if record.get("version") != FILE_VERSION:
            raise ValueError(f"{json_path} has file version {record.get('version')!r}; this tl_circuits reads "
                             f"version {FILE_VERSION}")
        tensors = load_file(str(tensor_path))
        blocks, absent = record["blocks"], set(record["absent"])

        def grid(name: str) -> Optional[Dict[str, Tensor]]:
            if name in absent or (name in OPTIONAL_GRIDS and f"{name}/0" not in tensors):
                return None
            try:
                return {block: tensors[f"{name}/{index}"] for index, block in enumerate(blocks)}
            except KeyError:
                raise ValueError(f"{tensor_path} lacks the {name!r} grid that {json_path} lists") from None

        grids = {name: grid(name) for name in GRID_FIELDS}
        null = {block: tensors[f"null_distribution/{index}"]
                for index, block in enumerate(record["null_distribution_blocks"])}
        permutations = None if "permutations" in absent else tensors["permutations"]
        return cls(**grids, **record["settings"], null_distribution=null,  # type: ignore[arg-type]
                   permutations=permutations)


def result_paths(path: Union[str, Path]) -> Tuple[Path, Path]:
    """``(<stem>.safetensors, <stem>.json)`` for a path with or without one of those suffixes.

    >>> [p.name for p in result_paths("out/run.json")]
    ['run.safetensors', 'run.json']
    """
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _own_storage(tensor: Tensor) -> Tensor:
    # safetensors refuses views that share storage (the blocks of one q-value vector do)
    return tensor.detach().cpu().contiguous().clone()
