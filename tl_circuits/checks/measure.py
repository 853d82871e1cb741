"""How the sanity checks measure an error, and what they tolerate.

An error is measured per comparison as ``max |got − expected|`` (absolute) and that divided by
``max |expected|`` (relative to the reference's scale; for a sum whose terms may cancel, by the largest sum of
the terms' magnitudes). The tolerance on the relative error depends on the dtype
the model computes in (:data:`TOLERANCES`): rounding of a float32 model's own matmuls against the checks'
float64 recomputation stays below 1e-6 at the sizes tested, while a wrong slice gives errors of order 1.

>>> worst = Worst()
>>> worst.add(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), "layer 0")
>>> worst.add(torch.tensor([3.0]), torch.tensor([3.0]), "layer 1")
>>> worst.abs_error, worst.rel_error, worst.where
(0.5, 0.2, 'layer 0')
>>> tolerance(torch.float32), tolerance(torch.bfloat16)
(0.0001, 0.05)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from tl_circuits.checks.result import CheckOutcome

TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative error a check accepts for a model computing in ``dtype``."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype the checks recompute in: float64 where the device has it (not on Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Worst:
    """The worst relative error over a series of comparisons, with its absolute error and where it was."""

    def __init__(self) -> None:
        self.rel_error, self.abs_error, self.where = 0.0, 0.0, ""
        self.n = 0

    def add(self, got: Tensor, expected: Tensor, where: str, scale: Optional[Tensor] = None) -> None:
        """One comparison; the relative error divides by ``max |scale|`` (default ``expected``; e.g. a sum's
        Σ|terms|, the scale its rounding error has)."""
        got = got.to(expected.dtype)
        abs_error = float((got - expected).abs().max()) if got.numel() else 0.0
        reference = expected if scale is None else scale
        scale_value = float(reference.abs().max()) if reference.numel() else 0.0
        rel_error = abs_error / scale_value if scale_value > 0 else (0.0 if abs_error == 0 else math.inf)
        if math.isnan(abs_error):
            rel_error = abs_error = math.inf
        self.n += 1
        if rel_error > self.rel_error or self.n == 1:
            self.rel_error, self.abs_error, self.where = rel_error, abs_error, where


def measured_outcome(name: str, worst: Worst, tol: float, passed_message: str, failed_message: str,
                     problems: Sequence[str] = ()) -> CheckOutcome:
    """The outcome of a measured check: failed with ``problems`` (e.g. wrong shapes) if any, else passed when the
    worst relative error is within ``tol``; a failure's message ends with where the worst error was."""
    if problems:
        return CheckOutcome(name, False, worst.abs_error, worst.rel_error, tol, "; ".join(problems))
    passed = worst.rel_error <= tol
    message = passed_message if passed else (f"{failed_message}: worst {worst.where} (relative error "
                                             f"{worst.rel_error:.2g} > {tol:g})")
    return CheckOutcome(name, passed, worst.abs_error, worst.rel_error, tol, message)
