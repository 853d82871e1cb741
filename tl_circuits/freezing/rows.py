"""Which rows of the caller's batch a forward pass is running on, for references that have one row per sample.

A RESAMPLE freeze may hold a reference with the batch size of the run (sample ``i`` is patched from
reference row ``i``). Code that runs a batch in chunks (the per-sample gradient engine) says which rows each
chunk is, so the freeze takes the matching reference rows; outside such a context a reference must have the
forward's batch size or 1.

>>> import torch
>>> ref = torch.arange(6.0)[:, None]
>>> with batch_rows(torch.arange(2, 4), n_total=6):
...     reference_rows(ref, batch=2).flatten().tolist()
[2.0, 3.0]
>>> reference_rows(ref, batch=6).shape
torch.Size([6, 1])
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

from torch import Tensor

_ROWS: ContextVar[Optional[tuple[Tensor, int]]] = ContextVar("tl_circuits_batch_rows", default=None)


@contextmanager
def batch_rows(rows: Tensor, n_total: int) -> Iterator[None]:
    """Within this context, forwards run on rows ``rows`` (int64 indices) of a batch of ``n_total`` samples."""
    token = _ROWS.set((rows, n_total))
    try:
        yield
    finally:
        _ROWS.reset(token)


def reference_rows(reference: Tensor, batch: int) -> Tensor:
    """The rows of a per-sample ``reference`` that belong to the current forward of ``batch`` samples.

    Unchanged when the reference has 1 row or the forward's own batch size (or no rows are declared).
    """
    current = _ROWS.get()
    if current is None or reference.shape[0] in (1, batch):
        return reference
    rows, n_total = current
    if reference.shape[0] == n_total and rows.numel() == batch:
        return reference[rows.to(reference.device)]
    return reference
