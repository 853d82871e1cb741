"""The result of :func:`tl_circuits.stats.permutation_test`: per-cell grids, settings, a table, plots, files.

``save(folder)`` writes it as every result is written (:mod:`tl_circuits.results_io`: the grids, the null
distribution and the relabelings bit for bit, NaN and ``None`` fields kept); :func:`tl_circuits.load` reads it
back. The file pair ``<stem>.safetensors`` + ``<stem>.json`` of earlier versions is still read
(:meth:`InterferenceTestResult.load_legacy`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from tl_circuits.deprecation import deprecated_alias
from tl_circuits.results_io import SavedResult, check_record, legacy_files_present, pair_paths, read_json
from tl_circuits.stats.pvalues import significant_cells
from tl_circuits.stats.validation import Grid

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure
    from pandas import DataFrame

__all__ = ["InterferenceTestResult", "GRID_FIELDS", "NULL_HYPOTHESIS", "P_FIELDS"]

GRID_FIELDS = ("observed", "null_mean", "null_std", "z", "effect_size", "p_value", "q_value_bh", "q_value_by",
               "p_value_maxstat", "p_value_cluster", "ci_low", "ci_high", "significant", "permutations_used")
SETTING_FIELDS = ("alpha", "n_permutations", "alternative", "correction", "n_a", "n_b", "n_bootstrap", "ci_method",
                  "confidence_level", "cluster_threshold", "connectivity", "seed", "n_permutations_screen", "screen",
                  "loss")
P_FIELDS = ("p_value", "q_value_bh", "q_value_by", "p_value_maxstat", "p_value_cluster")
"""The p- and q-value fields, each of which can decide ``significant`` (:meth:`InterferenceTestResult.plot`)."""
NULL_HYPOTHESIS = ("the task labels are exchangeable: the joint distribution of the pooled pairwise scores does not "
                   "change when the labels A and B are reassigned among the pooled samples (group sizes kept)")
ALTERNATIVE_TEXT = {
    "less": "the A x B mean score is lower than under exchangeable labels (towards conflict for signed scores)",
    "greater": "the A x B mean score is higher than under exchangeable labels (more interference for unsigned "
               "and symmetric scores)",
    "two-sided": "the A x B mean score differs from what exchangeable labels give, in either direction",
}
LEGACY_FORMAT = "tl_circuits.InterferenceTestResult"
LEGACY_VERSION = 1
LEGACY_NAMES = {"p_maxstat": "p_value_maxstat", "p_cluster": "p_value_cluster"}  # fields of the file pair


@dataclass(frozen=True, repr=False)
class InterferenceTestResult(SavedResult):
    """Result of :func:`permutation_test`. Every grid field is a dict block -> Tensor[n_layers, n_heads_B].

    Attributes:
        observed: mean of M over all A×B pairs.
        null_mean, null_std: exact mean / SD of that statistic over all relabelings.
        z: ``(observed − null_mean) / null_std`` (standardised statistic; used by max-stat and clusters).
        effect_size: ``(observed − null_mean) / sd_pairs``, a standardised mean difference on the pair scale
            (``sd_pairs``: SD of M over ordered off-diagonal pooled pairs).
        p_value: permutation p-value, ``(1 + hits) / (1 + n_permutations)``.
        q_value_bh, q_value_by: BH / BY q-values over all finite cells of all blocks.
        p_value_maxstat: Westfall–Young max-T family-wise adjusted p (``p_maxstat`` before: deprecated alias).
        p_value_cluster: cluster-mass family-wise adjusted p (1 outside clusters; ``p_cluster`` before).
        ci_low, ci_high: bootstrap interval of ``observed`` (``None`` when ``n_bootstrap=0``).
        significant: ``correction``'s adjusted p (``q_value_bh`` for "bh", ...) ≤ ``alpha``; False for NaN cells.
        null_distribution: block -> [P, L, H], the statistic under each relabeling of ``permutations``.
        permutations: [P, N] bool, the task-A membership of each relabeling (all of them; with the default
            screening, the ``n_permutations_screen`` that every cell saw, which max-stat and clusters use).
        n_permutations_screen: ``None``, or with the default number of permutations the screen size (every cell
            is tested on these; cells with screen p ≤ alpha on all ``n_permutations``).
        permutations_used: ``None``, or per cell the number of relabelings its ``p_value`` is over.
        screen: whether screening was asked for (``n_permutations_screen`` says whether it happened).
        null_hypothesis: what each cell's p-value tests, with the alternative, in words.
        loss: what each task's per-sample loss scored (``settings["loss"]`` of the engine, docs/spec.md §2.1) when
            the pooled matrix came from a model
            (:func:`~tl_circuits.stats.interference_tests.interference_permutation_test`); ``None`` for a matrix
            given as tensors.
    """

    observed: Grid
    null_mean: Grid
    null_std: Grid
    z: Grid
    effect_size: Grid
    p_value: Grid
    q_value_bh: Grid
    q_value_by: Grid
    p_value_maxstat: Grid
    p_value_cluster: Grid
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
    screen: bool = True
    loss: Optional[dict] = None

    p_maxstat = deprecated_alias("p_maxstat", "p_value_maxstat")
    p_cluster = deprecated_alias("p_cluster", "p_value_cluster")

    @property
    def null_hypothesis(self) -> str:
        """H0 and the alternative of every cell's ``p_value``, in words."""
        return f"H0: {NULL_HYPOTHESIS}. H1 ({self.alternative}): {ALTERNATIVE_TEXT[self.alternative]}"

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
        (e.g. ``"p_value_maxstat"``) shows the cells where that field ≤ ``alpha``; ``mask_with=False`` shows all.
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
        elif mask_with in P_FIELDS or mask_with in LEGACY_NAMES:
            mask_with = LEGACY_NAMES.get(mask_with, mask_with)
            masks = significant_cells(getattr(self, mask_with), self.alpha)
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

    def saved_fields(self) -> dict[str, Any]:
        fields = super().saved_fields()
        try:
            json.dumps(fields["seed"])
        except TypeError:
            fields["seed"] = repr(fields["seed"])     # e.g. a generator: kept as a description
        return fields

    @classmethod
    def load_legacy(cls, path: Path) -> Optional["InterferenceTestResult"]:
        """The file pair of earlier versions, ``<stem>.safetensors`` + ``<stem>.json`` (format
        ``tl_circuits.InterferenceTestResult``, version 1; ``path`` the stem or either file), or ``None``."""
        from safetensors.torch import load_file

        tensor_path, json_path = pair_paths(path)
        if not legacy_files_present((tensor_path, json_path), "InterferenceTestResult"):
            return None
        record = check_record(read_json(json_path), json_path, LEGACY_FORMAT, (LEGACY_VERSION,),
                              "InterferenceTestResult")
        tensors = load_file(str(tensor_path))
        blocks, absent = record["blocks"], set(record["absent"])

        def grid(name: str) -> Optional[Dict[str, Tensor]]:
            stored = {new: old for old, new in LEGACY_NAMES.items()}.get(name, name)
            if stored in absent or (name == "permutations_used" and f"{stored}/0" not in tensors):
                return None  # absent, or written before the field existed
            try:
                return {block: tensors[f"{stored}/{index}"] for index, block in enumerate(blocks)}
            except KeyError:
                raise ValueError(f"{tensor_path} lacks the {stored!r} grid that {json_path} lists") from None

        grids = {name: grid(name) for name in GRID_FIELDS}
        null = {block: tensors[f"null_distribution/{index}"]
                for index, block in enumerate(record["null_distribution_blocks"])}
        permutations = None if "permutations" in absent else tensors["permutations"]
        settings = {"screen": record["settings"].get("n_permutations_screen") is not None, **record["settings"]}
        return cls(**grids, **settings, null_distribution=null,  # type: ignore[arg-type]
                   permutations=permutations)


result_paths = pair_paths  # the file pair of earlier versions (tl_circuits.results_io.pair_paths)
