"""What a call must leave as it found it: :func:`model_state`, :func:`state_differences` and the context manager
:func:`assert_model_unchanged`, from :mod:`tl_circuits.checks.state` (the one implementation, which
:func:`tl_circuits.sanity_check` uses too)."""

from tl_circuits.checks.state import ModelState, assert_model_unchanged, model_state, state_differences

__all__ = ["ModelState", "assert_model_unchanged", "model_state", "state_differences"]
