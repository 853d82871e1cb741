"""The result of an attribution sweep: first-order estimates of freeze effects, the cells verified exactly, and
the missed-effect bound (docs/spec.md §1.9).

An :class:`AttributionResult` *is* a :class:`~tl_circuits.freezing.sweep.SweepResult` (same grids, ``test()``,
``plot()``; ``save(folder)``, and :func:`tl_circuits.load` gives it back as an ``AttributionResult``):
``effect[c][l, h]`` is the exact freeze effect where ``verified[c][l, h]`` and the first-order estimate elsewhere;
``estimate[c]`` keeps every estimate, so verified cells show both numbers.

>>> import torch
>>> result = AttributionResult(clean=2.0, frozen={}, replacement="mean", metric_name="loss",
...                            estimate={"ov": torch.tensor([[0.5, 0.1]])},
...                            verified={"ov": torch.tensor([[True, False]])},
...                            exact={"ov": torch.tensor([[0.4, float("nan")]])})
>>> result.effect["ov"]                                 # exact where verified, the estimate elsewhere
tensor([[0.4000, 0.1000]])
>>> result
AttributionResult(MEAN, loss: first-order estimates of freeze effects (AtP*), verified exactly: ov 1/2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from tl_circuits.freezing.sweep import SweepResult

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from pandas import DataFrame

    from tl_circuits.models.types import Model

__all__ = ["ESTIMATE_NOTE", "MISSED_ASSUMPTION", "AttributionResult", "MissedEffectBound"]

ESTIMATE_NOTE = ("first-order estimates, not freeze effects: Σ ∂metric/∂z · (z frozen − z clean) per head, the "
                 "gradient taken once at the clean run; QK: the head's frozen pattern computed exactly (AtP*), linear "
                 "from the pattern onward; cells marked verified are exact freeze effects")
MISSED_ASSUMPTION = (
    "AtP*'s: for every unverified cell c and every group containing it, the group's joint effect is c's own effect "
    "plus a remainder (the other cells' effects and all interactions) that is symmetric about 0 and independent "
    "between rounds; then each round's group is at least as large as c's effect with probability >= 1/2")


@dataclass(frozen=True)
class MissedEffectBound:
    """How large an unverified cell's effect could be (subset sampling, :func:`tl_circuits.freezing.attribution_checks.
    missed_effect_bound`).

    In each of ``rounds`` rounds the ``n_unverified`` cells of one circuit are split at random into ``groups`` groups
    and each group is frozen together; ``joint_effects`` are those ``rounds × groups`` batch-mean effects (of the
    groups ``group_cells``, each a list of ``[layer, head]``) and
    ``bound`` = max |joint effect|. Under :data:`MISSED_ASSUMPTION`, a given unverified cell has |effect| ≤ ``bound``
    with probability ≥ ``confidence_per_cell`` = 1 − 2^−rounds, and every unverified cell at once with probability
    ≥ ``confidence_all`` = max(0, 1 − n_unverified · 2^−rounds) (union bound).
    """

    circuit: str
    bound: float
    n_unverified: int
    rounds: int
    groups: int
    confidence_per_cell: float
    confidence_all: float
    joint_effects: list[float]
    group_cells: list[list[list[int]]]
    seed: Optional[int]
    assumption: str = MISSED_ASSUMPTION

    def to_dict(self) -> dict:
        """The fields as JSON values (the result's ``save`` keeps them in its metadata)."""
        return dict(circuit=self.circuit, bound=self.bound, n_unverified=self.n_unverified, rounds=self.rounds,
                    groups=self.groups, confidence_per_cell=self.confidence_per_cell,
                    confidence_all=self.confidence_all, joint_effects=list(self.joint_effects),
                    group_cells=[[list(cell) for cell in group] for group in self.group_cells], seed=self.seed,
                    assumption=self.assumption)

    def __str__(self) -> str:
        return (f"{self.circuit}: no unverified cell exceeds |effect| {self.bound:.4g} (all {self.n_unverified} at "
                f"once: confidence {self.confidence_all:.3f}; one cell: {self.confidence_per_cell:.3f}; "
                f"{self.rounds} rounds x {self.groups} groups, under AtP*'s symmetry assumption)")


@dataclass(repr=False)
class AttributionResult(SweepResult):
    """A :class:`SweepResult` of first-order estimates, some cells verified exactly (module docstring).

    ``estimate[c]`` [n_layers, n_heads]: the first-order estimate of every cell (``per_sample_estimate[c]``
    [N, n_layers, n_heads] per sample); ``verified[c]`` (bool): cells run exactly; ``exact[c]``: their exact effect
    (NaN elsewhere; ``per_sample_exact`` per sample). ``effect`` / ``per_sample_effect`` (and ``frozen``) hold the
    exact number where verified and the estimate elsewhere, so :meth:`test` tests estimates in unverified cells
    (a test of the first-order estimate, not of the freeze). ``missed[c]``: the :class:`MissedEffectBound` of the
    unverified cells, when computed.
    """

    estimate: dict[str, Tensor] = field(default_factory=dict)
    per_sample_estimate: Optional[dict[str, Tensor]] = None
    verified: dict[str, Tensor] = field(default_factory=dict)
    exact: dict[str, Tensor] = field(default_factory=dict)
    per_sample_exact: Optional[dict[str, Tensor]] = None
    missed: dict[str, MissedEffectBound] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.combine()

    def combine(self) -> None:
        """Set ``frozen`` (and ``per_sample_effect``) from the estimates and the exact cells."""
        for circuit, estimate in self.estimate.items():
            verified = self.verified.setdefault(circuit, torch.zeros(estimate.shape, dtype=torch.bool))
            exact = self.exact.setdefault(circuit, torch.full(estimate.shape, float("nan")))
            self.frozen[circuit] = (self.clean + torch.where(verified, exact.double(), estimate.double())).float()
            if self.per_sample_estimate is not None:
                per_sample = self.per_sample_estimate[circuit]
                exact_rows = (self.per_sample_exact or {}).get(circuit, torch.full(per_sample.shape, float("nan")))
                if self.per_sample_effect is None:
                    self.per_sample_effect = {}
                self.per_sample_effect[circuit] = torch.where(verified, exact_rows.double(), per_sample.double())

    @property
    def n_verified(self) -> dict[str, int]:
        return {circuit: int(mask.sum()) for circuit, mask in self.verified.items()}

    def __repr__(self) -> str:
        counts = ", ".join(f"{c} {n}/{self.verified[c].numel()}" for c, n in self.n_verified.items())
        return (f"AttributionResult({self.replacement.upper()}, {self.metric_name}: first-order estimates of freeze "
                f"effects (AtP*), verified exactly: {counts})")

    def to_dataframe(self) -> DataFrame:
        """:meth:`SweepResult.to_dataframe` plus ``estimate``, ``exact`` and ``verified`` per cell."""
        table = super().to_dataframe()
        for column, grids in (("estimate", self.estimate), ("exact", self.exact), ("verified", self.verified)):
            table[column] = [grids[c][l, h].item() for c, l, h in zip(table["circuit"], table["layer"], table["head"])]
        return table

    def saved_fields(self) -> dict[str, Any]:
        """What ``save(folder)`` writes (:mod:`tl_circuits.results_io`, kind ``AttributionResult``): the sweep's
        fields but ``frozen`` and ``per_sample_effect`` (combined again on load), the estimate, verified and exact
        grids, and the missed-effect bounds as JSON. A reader of ``SweepResult`` folders refuses it (another kind),
        so estimates are never read back as freeze effects."""
        fields = super().saved_fields()
        del fields["frozen"], fields["per_sample_effect"]
        fields["missed"] = {circuit: bound.to_dict() for circuit, bound in self.missed.items()}
        return fields

    @classmethod
    def from_saved_fields(cls, fields: dict[str, Any]) -> AttributionResult:
        """The result from what :meth:`saved_fields` wrote."""
        missed = {circuit: MissedEffectBound(**bound) for circuit, bound in (fields.pop("missed") or {}).items()}
        verified = {circuit: grid.bool() for circuit, grid in (fields.pop("verified") or {}).items()}
        return cls(**fields, frozen={}, per_sample_effect=None, verified=verified, missed=missed)

    def verify(self, model: Model, tokens: Tensor, k, metric=None, reference=None, **kwargs) -> AttributionResult:
        """This result with the top ``k`` cells of each circuit by |estimate| verified exactly; see
        :func:`tl_circuits.freezing.attribution_checks.verify_top` (same tokens, metric, reference and
        ``attention_mask=`` as the sweep)."""
        from tl_circuits.freezing.attribution_checks import verify_top

        return verify_top(self, model, tokens, k, metric=metric, reference=reference, **kwargs)

    def bound_missed(self, model: Model, tokens: Tensor, metric=None, reference=None, **kwargs) -> AttributionResult:
        """This result with :attr:`missed` computed; see
        :func:`tl_circuits.freezing.attribution_checks.missed_effect_bound`."""
        from tl_circuits.freezing.attribution_checks import missed_effect_bound

        return missed_effect_bound(self, model, tokens, metric=metric, reference=reference, **kwargs)
