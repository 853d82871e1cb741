"""The result of a freeze sweep (:func:`tl_circuits.freezing.sweep.freeze_sweep`): :class:`SweepResult`, its effects,
its test, its table, its picture, and saving it (:mod:`tl_circuits.results_io`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.freezing.sweep_io import load_sweep
from tl_circuits.models.types import Model
from tl_circuits.results_io import SavedResult

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure
    from pandas import DataFrame

    from tl_circuits.freezing.sweep_stats import SweepTestResult

__all__ = ["SweepResult"]


@dataclass
class SweepResult(SavedResult):
    """Metric of the model with each head's circuit frozen in turn.

    ``frozen[circuit][layer, head]``: the batch-mean metric with that head's circuit frozen (NaN where not
    run), averaged over draws; ``clean``: the metric of the unfrozen model; ``effect[circuit] = frozen - clean``.
    With ``per_sample=True``: ``clean_per_sample`` [N] and ``per_sample_effect[circuit]`` [N, n_layers, n_heads]
    (sample i's frozen minus clean metric, averaged over draws; NaN for a sample with a NaN metric), and then
    ``clean`` and ``effect`` are means over the finite samples (``effect`` = the nan-mean of
    ``per_sample_effect``). ``per_draw_effect[circuit]`` [n_draws, n_layers, n_heads]: each draw's batch-mean effect.
    ``save(folder)`` / :func:`tl_circuits.load` keep it on disk, every number bit for bit, NaN included
    (:mod:`tl_circuits.results_io`; settings must be JSON values, and tuples come back as lists).

    >>> import tempfile
    >>> result = SweepResult(clean=2.5, frozen={"qk": torch.tensor([[2.0, float("nan")]])},
    ...                      replacement="zero", metric_name="loss", settings={"seed": 0})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     loaded = SweepResult.load(result.save(f"{folder}/sweep"))
    >>> loaded.clean, loaded.frozen["qk"], loaded.settings
    (2.5, tensor([[2., nan]]), {'seed': 0})
    """

    clean: float
    frozen: dict[str, Float[Tensor, "n_layers n_heads"]]
    replacement: str
    metric_name: str
    settings: dict = field(default_factory=dict)
    clean_per_sample: Optional[Float[Tensor, " n"]] = None
    per_sample_effect: Optional[dict[str, Float[Tensor, "n n_layers n_heads"]]] = None
    per_draw_effect: Optional[dict[str, Float[Tensor, "n_draws n_layers n_heads"]]] = None

    @property
    def effect(self) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
        return {circuit: values - self.clean for circuit, values in self.frozen.items()}

    def top_heads(self, k: int = 5, circuit: str = "qk") -> list[tuple[int, int, float]]:
        """The k heads whose freeze moves the metric most (largest |effect|): (layer, head, effect)."""
        effect = self.effect[circuit]
        order = torch.nan_to_num(effect.abs(), nan=-1.0).flatten().argsort(descending=True)[:k]
        n_heads = effect.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(effect.flatten()[i])) for i in order]

    def to_dataframe(self) -> DataFrame:
        import pandas as pd

        rows = []
        for circuit, values in self.frozen.items():
            cells = torch.cartesian_prod(torch.arange(values.shape[0]), torch.arange(values.shape[1])).tolist()
            for (layer, head), v in zip(cells, values.flatten().tolist()):
                rows.append(dict(circuit=circuit, layer=layer, head=head, metric=v, effect=v - self.clean))
        return pd.DataFrame(rows)

    def test(self, alpha: float = defaults.ALPHA, alternative: str = "two-sided",
             n_permutations: Optional[int] = None, n_bootstrap: int = defaults.N_BOOTSTRAP,
             confidence_level: float = defaults.CONFIDENCE_LEVEL, ci_method: str = "bca", correction: str = "bh",
             seed: Optional[int] = defaults.SEED, progress: bool = True) -> SweepTestResult:
        """Intervals and paired sign-flip tests of every head's per-sample effect; see
        :func:`tl_circuits.freezing.sweep_stats.sweep_test` (needs ``freeze_sweep(..., per_sample=True)``)."""
        from tl_circuits.freezing.sweep_stats import sweep_test

        return sweep_test(self, alpha=alpha, alternative=alternative, n_permutations=n_permutations,
                          n_bootstrap=n_bootstrap, confidence_level=confidence_level, ci_method=ci_method,
                          correction=correction, seed=seed, progress=progress)

    @classmethod
    def load_legacy(cls, path: Path) -> Optional["SweepResult"]:
        """The file pair ``<stem>.safetensors`` + ``<stem>.json`` of earlier versions (format 1 or 2;
        :mod:`tl_circuits.freezing.sweep_io`), or ``None`` when there is none."""
        return load_sweep(cls, path)

    def plot_patterns(self, model: Model, tokens: Int[Tensor, "batch pos"],
                      heads: Optional[Sequence[tuple[int, int]]] = None, k: int = 3, sample: int = 0,
                      tokenizer=None, reference=None) -> Figure:
        """The top-k QK heads' (or ``heads``') attention on ``tokens[sample]``, clean beside frozen; see
        :func:`tl_circuits.freezing.patterns.plot_patterns` (``reference``: what a MEAN/RESAMPLE sweep read)."""
        from tl_circuits.freezing.patterns import plot_patterns

        return plot_patterns(self, model, tokens, heads, k=k, sample=sample, tokenizer=tokenizer, reference=reference)

    def plot(self, title: Optional[str] = None) -> Figure:
        """Effect heatmap per circuit (diverging, centred at 0)."""
        from tl_circuits.plotting import plot_blocks

        effect = self.effect
        return plot_blocks(effect, blocks=list(effect), signed=True,
                           colorbar_label=f"Δ {self.metric_name}",
                           title=title or f"{self.replacement.upper()} freeze effect on {self.metric_name}")
