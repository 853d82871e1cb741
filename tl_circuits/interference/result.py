"""The result of an interference run: scores per block, ids, settings, the Fisher used; saved and loaded.

:meth:`InterferenceResult.save` writes a folder (:mod:`tl_circuits.results_io`: the scores and the Fisher, one
tensor per block; ids, the config, the run's settings), so a long run can be kept and re-plotted:
:func:`tl_circuits.load` gives back an equal result. :class:`PooledScores` is the pooled (A ∪ B)² matrix of the tests.

>>> import torch
>>> scores = {"O": torch.tensor([[[[0.5, -1.0]]], [[[2.0, 0.1]]]])}  # [N_A=2, N_B=1, n_layers=1, heads=2]
>>> result = InterferenceResult(scores, ["a0", "a1"], ["b0"], InterferenceConfig(variant="signed"))
>>> result.top_conflicts(1)  # signed: the most negative score first
[Conflict(id_a='a0', id_b='b0', block='O', layer=0, head=1, score=-1.0)]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, NamedTuple, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from tl_circuits.interference.config import InterferenceConfig
from tl_circuits.interference.fisher import DiagonalFisher
from tl_circuits.models.spec import BLOCKS
from tl_circuits.results_io import SavedResult, json_ready, legacy_files_present

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure
    from pandas import DataFrame

    from tl_circuits.stats.conflict import ConflictTestResult
    from tl_circuits.stats.result import InterferenceTestResult

LEGACY_SCORES_FILE = "scores.safetensors"
LEGACY_SETTINGS_FILE = "settings.json"
LEGACY_FORMAT = "tl_circuits.InterferenceResult/1"


class Conflict(NamedTuple):
    """One (pair, block, layer, head) score; ``head`` is a KV head for K/V under GQA."""

    id_a: Hashable
    id_b: Hashable
    block: str
    layer: int
    head: int
    score: float


@dataclass
class InterferenceResult(SavedResult):
    """Pairwise interference scores and what produced them.

    Attributes:
        scores: ``{B: [N_A, N_B, n_layers, heads_B]}`` (heads_B = KV heads for K/V under GQA); NaN where
            data is missing.
        ids_a, ids_b: the caller's sample ids (any hashables, e.g. strings or ints), in row order.
        config: the resolved :class:`InterferenceConfig`.
        settings: everything else that determines the numbers (Fisher sample count, model sizes, the
            memory plan: held samples, gradient evaluations, timings).
        fisher: the undamped diagonal Fisher that normalised the scores (float64).
    """

    scores: dict[str, Float[Tensor, "n_a n_b n_layers heads"]]
    ids_a: list
    ids_b: list
    config: InterferenceConfig
    settings: dict[str, Any] = field(default_factory=dict)
    fisher: Optional[DiagonalFisher] = None

    @property
    def blocks(self) -> list[str]:
        return [b for b in BLOCKS if b in self.scores]

    def layer_head_mean(self, block: str) -> Float[Tensor, "n_layers heads"]:
        """Mean over all pairs of one block's scores, ``[n_layers, heads_B]`` (NaN if any pair is NaN)."""
        if block not in self.scores:
            raise KeyError(f"no scores for block {block!r}; blocks are {self.blocks}")
        return self.scores[block].mean(dim=(0, 1))

    @property
    def mean(self) -> dict[str, Float[Tensor, "n_layers heads"]]:
        """``{block: layer_head_mean(block)}``."""
        return {b: self.layer_head_mean(b) for b in self.blocks}

    def block_means(self) -> dict[str, float]:
        """Mean score per block over pairs, layers and heads (NaN cells ignored; NaN if all are)."""
        return {b: float(torch.nanmean(self.scores[b])) for b in self.blocks}

    @property
    def most_conflicted_block(self) -> str:
        """The block with the largest mean score (the most negative for the signed variant)."""
        means = {b: m for b, m in self.block_means().items() if not math.isnan(m)}
        if not means:
            raise ValueError("every score is NaN: no block can be ranked")
        pick = min if self.config.variant == "signed" else max
        return pick(means, key=means.__getitem__)

    def pair(self, id_a: Hashable, id_b: Hashable) -> dict[str, Float[Tensor, "n_layers heads"]]:
        """Scores of one pair by the caller's ids; KeyError for an unknown id (never a silent 0)."""
        try:
            i, j = self.ids_a.index(id_a), self.ids_b.index(id_b)
        except ValueError:
            raise KeyError(f"unknown pair ({id_a!r}, {id_b!r})") from None
        return {b: s[i, j] for b, s in self.scores.items()}

    def top_conflicts(self, k: int = 10) -> list[Conflict]:
        """The ``k`` most conflicted (pair, block, layer, head) cells, most conflicted first.

        Largest scores for unsigned/symmetric, most negative for signed; NaN cells are skipped.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        sign = -1.0 if self.config.variant == "signed" else 1.0
        flat, owners = [], []
        for b in self.blocks:
            v = sign * self.scores[b].flatten()
            flat.append(torch.where(torch.isnan(v), torch.full_like(v, -math.inf), v))
            owners.append(b)
        values = torch.cat(flat)
        top = torch.topk(values, min(k, int((values > -math.inf).sum())))
        offsets = torch.tensor([0] + [t.numel() for t in flat]).cumsum(0)
        out = []
        for idx in top.indices.tolist():
            which = int(torch.searchsorted(offsets, idx, right=True)) - 1
            b = owners[which]
            shape = self.scores[b].shape
            i, j, layer, head = (int(x) for x in torch.unravel_index(torch.tensor(idx - int(offsets[which])), shape))
            out.append(Conflict(self.ids_a[i], self.ids_b[j], b, layer, head, float(self.scores[b][i, j, layer, head])))
        return out

    def to_dataframe(self) -> DataFrame:
        """Long table: one row per (id_a, id_b, block, layer, head) with its score (NaN kept).

        ``head_kind`` is ``"kv"`` for K/V rows (KV heads; the same as query heads without GQA) and
        ``"query"`` for Q/O rows.
        """
        import numpy as np
        import pandas as pd

        frames = []
        for b in self.blocks:
            s = self.scores[b]
            n_a, n_b, n_layers, n_heads = s.shape
            ia, ib, layer, head = np.meshgrid(np.arange(n_a), np.arange(n_b), np.arange(n_layers),
                                              np.arange(n_heads), indexing="ij")
            frames.append(pd.DataFrame({
                "id_a": np.asarray(self.ids_a, dtype=object)[ia.ravel()],
                "id_b": np.asarray(self.ids_b, dtype=object)[ib.ravel()],
                "block": b,
                "layer": layer.ravel(),
                "head": head.ravel(),
                "head_kind": "kv" if b in ("K", "V") else "query",
                "score": s.detach().float().cpu().numpy().ravel(),
            }))
        return pd.concat(frames, ignore_index=True)

    def plot(self, title: Optional[str] = None, **kwargs: Any) -> Figure:
        """Layer × head heatmap of the mean score per block (:func:`tl_circuits.plotting.plot_blocks`)."""
        from tl_circuits.plotting import plot_blocks

        if title is None:
            cfg = self.config
            title = f"{cfg.variant} interference ({cfg.reduction}, Fisher {cfg.fisher_source}, {cfg.normalization})"
        kwargs.setdefault("signed", True if self.config.variant == "signed" else None)
        return plot_blocks(self.mean, title=title, **kwargs)

    def conflict_test(self, **test_kwargs: Any) -> "ConflictTestResult":
        """The conflict test of this (signed) A × B map: :func:`tl_circuits.conflict_test` (H0: E[s_ij] ≥ 0 per
        cell; ``test_kwargs``: alternative, alpha, correction, confidence_level).

        The label-permutation test is not a method here: it needs the pooled (A ∪ B) × (A ∪ B) matrix, which an
        A × B result does not hold (:meth:`PooledScores.permutation_test`, or
        :func:`tl_circuits.interference_permutation_test` from the model).
        """
        from tl_circuits.stats.conflict import conflict_test

        return conflict_test(self, **test_kwargs)

    # ----- save / load (tl_circuits.results_io) ----------------------------------------------------------
    def saved_fields(self) -> dict[str, Any]:
        for what, ids in (("ids_a", self.ids_a), ("ids_b", self.ids_b)):
            bad = [i for i in ids if not isinstance(i, (str, int, float, bool, type(None)))]
            if bad:
                raise TypeError(f"{what} must be JSON values to be saved; got {type(bad[0]).__name__} {bad[0]!r}")
        fisher = self.fisher
        return {"scores": self.scores, "ids_a": list(self.ids_a), "ids_b": list(self.ids_b),
                "config": self.config.to_dict(), "settings": json_ready(self.settings),
                "fisher": None if fisher is None else fisher.per_block,
                "fisher_meta": None if fisher is None else {"n_samples": fisher.n_samples,
                                                            "include_biases": fisher.include_biases,
                                                            "source": fisher.source}}

    @classmethod
    def from_saved_fields(cls, fields: dict[str, Any]) -> "InterferenceResult":
        fisher, meta = fields["fisher"], fields["fisher_meta"]
        return cls(fields["scores"], fields["ids_a"], fields["ids_b"], InterferenceConfig.from_dict(fields["config"]),
                   fields["settings"], fisher=None if fisher is None else DiagonalFisher(
                       fisher, meta["n_samples"], None, meta["include_biases"], meta["source"]))

    @classmethod
    def load_legacy(cls, path: Path) -> Optional["InterferenceResult"]:
        """A folder written by tl_circuits 0.2.0.dev0 before the one result format: ``scores.safetensors`` and
        ``settings.json`` (format ``tl_circuits.InterferenceResult/1``); ``None`` when ``path`` holds neither."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not legacy_files_present((folder / LEGACY_SCORES_FILE, folder / LEGACY_SETTINGS_FILE), "InterferenceResult"):
            return None
        try:
            meta = json.loads((folder / LEGACY_SETTINGS_FILE).read_text())
        except (json.JSONDecodeError, OSError) as error:
            raise ValueError(f"{folder} holds a damaged InterferenceResult: {error}") from None
        if not isinstance(meta, dict) or meta.get("format") != LEGACY_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{folder / LEGACY_SETTINGS_FILE} is not an InterferenceResult file (format {found!r})")
        try:
            tensors = load_file(str(folder / LEGACY_SCORES_FILE))
        except Exception as error:  # safetensors raises its own error type on a corrupt header
            raise ValueError(f"{folder} holds a damaged InterferenceResult: {error}") from None
        fisher = None
        if meta["fisher"] is not None:
            fisher = {b: tensors[f"fisher.{b}"] for b in BLOCKS if f"fisher.{b}" in tensors}
        return cls.from_saved_fields({
            "scores": {b: tensors[f"scores.{b}"] for b in BLOCKS if f"scores.{b}" in tensors},
            "ids_a": meta["ids_a"], "ids_b": meta["ids_b"], "config": meta["config"], "settings": meta["settings"],
            "fisher": fisher, "fisher_meta": meta["fisher"]})


@dataclass(frozen=True)
class PooledScores:
    """A ∪ B scored against itself under the pooled Fisher (:func:`tl_circuits.interference.engine.pooled_scores`).

    Attributes:
        scores: ``{block: [N, N, n_layers, heads_B]}``, rows and columns task A's samples then task B's
            (``N = n_a + n_b``); the diagonal is a sample against itself and enters no statistic.
        n_a: the number of task-A samples (the first ``n_a`` rows).
        config: the resolved :class:`InterferenceConfig` (``fisher_source="pooled"``).
        fisher: the undamped pooled Fisher used.
        settings: the run's settings (model sizes, the memory plan, timings), as :attr:`InterferenceResult.settings`.

    The A × B block is the interference map (:meth:`interference`); both tests have their home here:
    :meth:`permutation_test` (the whole matrix) and :meth:`conflict_test` (the A × B block).
    """

    scores: dict[str, Float[Tensor, "n n n_layers heads"]]
    n_a: int
    config: InterferenceConfig
    fisher: Optional[DiagonalFisher] = None
    settings: dict[str, Any] = field(default_factory=dict)

    def interference(self, ids_a: Optional[list] = None, ids_b: Optional[list] = None) -> InterferenceResult:
        """The A × B block as an :class:`InterferenceResult` (equal to ``compute_interference(...,
        fisher_source="pooled")``); ids default to ``0..N-1`` per task."""
        n = next(iter(self.scores.values())).shape[0]
        cross = {block: s[:self.n_a, self.n_a:].clone() for block, s in self.scores.items()}
        return InterferenceResult(cross, list(range(self.n_a)) if ids_a is None else list(ids_a),
                                  list(range(n - self.n_a)) if ids_b is None else list(ids_b), self.config,
                                  dict(self.settings), fisher=self.fisher)

    def permutation_test(self, **test_kwargs: Any) -> "InterferenceTestResult":
        """The label-permutation test of this matrix: :func:`tl_circuits.permutation_test` with this variant's
        default alternative (``test_kwargs``: n_permutations, alternative, alpha, correction, seed, ...); the
        result's ``loss`` is what each task scored (``settings["loss"]``)."""
        import dataclasses

        from tl_circuits.stats.permutation import permutation_test

        test_kwargs.setdefault("variant", self.config.variant)
        test_kwargs.setdefault("memory_budget_gb", self.config.memory_budget_gb)
        test_kwargs.setdefault("progress", self.config.progress)
        result = permutation_test(self.scores, self.n_a, **test_kwargs)
        return dataclasses.replace(result, loss=self.settings.get("loss"))

    def conflict_test(self, **test_kwargs: Any) -> "ConflictTestResult":
        """The conflict test of the A × B block: :meth:`InterferenceResult.conflict_test`."""
        return self.interference().conflict_test(**test_kwargs)
