"""What :func:`tl_circuits.sanity_check` returns: one :class:`CheckOutcome` per check, in a :class:`SanityCheckResult`.

Errors are measured against the model's own activations (or gradients): ``max_abs_error`` is the largest
absolute difference, ``max_rel_error`` that difference divided by the largest magnitude of the reference it was
measured against (so it does not depend on the model's scale), and a check passes when ``max_rel_error <=
tolerance`` (the bit-identity checks have tolerance 0: any difference fails). NaN means "not measured"
(``model_unchanged`` lists differences rather than measuring them; a check that raised measured nothing).

>>> result = SanityCheckResult("ToyModel", "TransformerBridge", (
...     CheckOutcome("qkv_slicing", True, 2e-7, 1e-7, 1e-4, "q/k/v reproduced"),
...     CheckOutcome("model_unchanged", False, math.nan, math.nan, 0.0, "torch hooks: 1 more than before")))
>>> result.passed, result.failed, result["qkv_slicing"].passed
(False, ['model_unchanged'], True)
>>> print(result)  # doctest: +NORMALIZE_WHITESPACE
sanity_check(ToyModel, TransformerBridge): FAILED (1 of 2 checks failed)
check            result  max abs  max rel  tolerance  message
qkv_slicing      pass    2.0e-07  1.0e-07  1.0e-04    q/k/v reproduced
model_unchanged  FAIL    -        -        0          torch hooks: 1 more than before
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["CheckOutcome", "SanityCheckResult"]


@dataclass(frozen=True)
class CheckOutcome:
    """One check: did it pass, the measured error, the tolerance it was held to, and what it found."""

    name: str
    passed: bool
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    message: str

    @classmethod
    def raised(cls, name: str, error: BaseException) -> "CheckOutcome":
        """A check that could not be completed: failed, with the exception named in the message."""
        return cls(name, False, math.nan, math.nan, math.nan,
                   f"the check raised {type(error).__name__}: {' '.join(str(error).split())}")


def _number(x: float) -> str:
    if math.isnan(x):
        return "-"
    return "0" if x == 0 else f"{x:.1e}"


@dataclass(frozen=True)
class SanityCheckResult:
    """The checks of one model (docs/spec.md §0.6).

    Attributes:
        architecture: the model's architecture (the wrapped class of a bridge, ``"HookedTransformer"``...).
        model_kind: ``"HookedTransformer"`` or ``"TransformerBridge"`` (the Python class of the model).
        checks: one :class:`CheckOutcome` per check, in the order they ran; empty when the model is refused.
        refusal: why tl_circuits refuses this model (``NotImplementedError`` of :func:`tl_circuits.model_spec`,
            docs/spec.md §0.5), or None. A refused model has no failed check, and does not pass.
        settings: what the checks ran on (samples, positions, seed, dtype, sizes).
    """

    architecture: str
    model_kind: str
    checks: tuple[CheckOutcome, ...] = ()
    refusal: Optional[str] = None
    settings: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when the model is supported and every check passed."""
        return self.refusal is None and all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the checks that failed."""
        return [check.name for check in self.checks if not check.passed]

    def __getitem__(self, name: str) -> CheckOutcome:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r}; the checks are {[c.name for c in self.checks]}")

    def summary(self) -> str:
        """The first line of :meth:`table`: the model and the verdict."""
        head = f"sanity_check({self.architecture}, {self.model_kind}): "
        if self.refusal is not None:
            return head + f"REFUSED: {self.refusal}"
        if self.passed:
            return head + f"passed (all {len(self.checks)} checks)"
        return head + f"FAILED ({len(self.failed)} of {len(self.checks)} checks failed)"

    def table(self) -> str:
        """The verdict, then one row per check (name, pass/FAIL, errors, tolerance, message)."""
        if self.refusal is not None:
            return self.summary()
        rows = [("check", "result", "max abs", "max rel", "tolerance", "message")]
        rows += [(c.name, "pass" if c.passed else "FAIL", _number(c.max_abs_error), _number(c.max_rel_error),
                  _number(c.tolerance), c.message) for c in self.checks]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths)) + "  " + row[5]
                 for row in rows]
        return "\n".join([self.summary(), *lines])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()
