"""Fixtures of the interference tests."""

from __future__ import annotations

import pytest

from tests import builders
from tests.interference.tasks import task_a, task_b
from tests.reference import loop_reference


@pytest.fixture(scope="module", params=["mha", "gqa"])
def setup(request):
    """(model, raw loop gradients of A, raw loop gradients of B) — computed once per model and test module."""
    model = builders.under_test(request.param)
    tokens_b, mask_b = task_b()
    return model, loop_reference(model, task_a()), loop_reference(model, tokens_b, mask_b)
