"""Checks that tl_circuits reads a model the way the model computes (docs/spec.md §0.6), by stage.

- :mod:`~tl_circuits.checks.sanity`: :func:`sanity_check` and the list of its checks;
- :mod:`~tl_circuits.checks.capture`: the forward passes the checks read (the model's own hooks);
- :mod:`~tl_circuits.checks.slicing`: Q/K/V and O slices against the model's activations;
- :mod:`~tl_circuits.checks.additivity`: per-head interference scores against the whole layer tensor;
- :mod:`~tl_circuits.checks.heads`: the GQA mapping and the isolation of a frozen head;
- :mod:`~tl_circuits.checks.state`: what a call must leave unchanged on a model (:func:`model_state`,
  :func:`state_differences`);
- :mod:`~tl_circuits.checks.result`: :class:`SanityCheckResult` and its :class:`CheckOutcome`\\ s;
- :mod:`~tl_circuits.checks.measure`: how errors are measured, and the tolerances.

This package depends on :mod:`tl_circuits.models`, :mod:`tl_circuits.freezing` and :mod:`tl_circuits.interference`;
nothing in those depends on it.
"""

from tl_circuits.checks.result import CheckOutcome, SanityCheckResult
from tl_circuits.checks.sanity import CHECKS, sanity_check
from tl_circuits.checks.state import ModelState, model_state, state_differences

__all__ = ["CHECKS", "CheckOutcome", "ModelState", "SanityCheckResult", "model_state", "sanity_check",
           "state_differences"]
