"""Fixtures of the statistics tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny products; on a busy 2-core machine, thread hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
