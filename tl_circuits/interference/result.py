"""The result of an interference run: scores per block, ids, settings, the Fisher used; saved and loaded.

:meth:`InterferenceResult.save` writes a folder with ``scores.safetensors`` (the scores and the Fisher, one
tensor per block) and ``settings.json`` (ids, the config, the run's settings), so a long run can be kept and
re-plotted: :meth:`InterferenceResult.load` gives back an equal result.

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
from typing import TYPE_CHECKING, Any, Hashable, NamedTuple, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_circuits.interference.config import InterferenceConfig
from tl_circuits.interference.fisher import DiagonalFisher
from tl_circuits.models.spec import BLOCKS

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure
    from pandas import DataFrame

SCORES_FILE = "scores.safetensors"
SETTINGS_FILE = "settings.json"
FORMAT = "tl_circuits.InterferenceResult/1"


class Conflict(NamedTuple):
    """One (pair, block, layer, head) score; ``head`` is a KV head for K/V under GQA."""

    id_a: Hashable
    id_b: Hashable
    block: str
    layer: int
    head: int
    score: float


@dataclass
class InterferenceResult:
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

    # ----- save / load ---------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the result to the folder ``path`` (created; files in it are replaced). Returns the folder.

        Ids must be JSON values (str, int, float, bool or None); anything else raises TypeError.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"scores.{b}": s.contiguous() for b, s in self.scores.items()}
        if self.fisher is not None:
            tensors.update({f"fisher.{b}": f.contiguous() for b, f in self.fisher.per_block.items()})
        for what, ids in (("ids_a", self.ids_a), ("ids_b", self.ids_b)):
            bad = [i for i in ids if not isinstance(i, (str, int, float, bool, type(None)))]
            if bad:
                raise TypeError(f"{what} must be JSON values to be saved; got {type(bad[0]).__name__} {bad[0]!r}")
        meta = {"format": FORMAT, "ids_a": list(self.ids_a), "ids_b": list(self.ids_b),
                "config": self.config.to_dict(), "settings": _jsonable(self.settings),
                "fisher": None if self.fisher is None else {"n_samples": self.fisher.n_samples,
                                                            "include_biases": self.fisher.include_biases,
                                                            "source": self.fisher.source}}
        save_file(tensors, str(folder / SCORES_FILE))
        (folder / SETTINGS_FILE).write_text(json.dumps(meta, indent=1, allow_nan=True))
        return folder

    @classmethod
    def load(cls, path: Union[str, Path]) -> "InterferenceResult":
        """Read a result written by :meth:`save`; FileNotFoundError / ValueError name what is missing or wrong."""
        from safetensors.torch import load_file

        folder = Path(path)
        for name in (SCORES_FILE, SETTINGS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a saved InterferenceResult: {name} is missing")
        try:
            meta = json.loads((folder / SETTINGS_FILE).read_text())
        except (json.JSONDecodeError, OSError) as error:
            raise ValueError(f"{folder} holds a damaged InterferenceResult: {error}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{folder / SETTINGS_FILE} is not an InterferenceResult file (format {found!r})")
        try:
            tensors = load_file(str(folder / SCORES_FILE))
        except Exception as error:  # safetensors raises its own error type on a corrupt header
            raise ValueError(f"{folder} holds a damaged InterferenceResult: {error}") from None
        scores: dict[str, Tensor] = {b: tensors[f"scores.{b}"] for b in BLOCKS if f"scores.{b}" in tensors}
        fisher = None
        if meta["fisher"] is not None:
            fisher = DiagonalFisher({b: tensors[f"fisher.{b}"] for b in BLOCKS if f"fisher.{b}" in tensors},
                                    meta["fisher"]["n_samples"], None, meta["fisher"]["include_biases"],
                                    meta["fisher"]["source"])
        return cls(scores, meta["ids_a"], meta["ids_b"], InterferenceConfig.from_dict(meta["config"]),
                   meta["settings"], fisher=fisher)


def _jsonable(x: Any) -> Any:
    """Settings as JSON values (tuples become lists; tensors, lists)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, float) and math.isnan(x):
        return x
    return x
