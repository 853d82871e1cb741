"""Which rows of the caller's batch a forward pass is running on, for references that have one row per sample.

A RESAMPLE freeze may hold a reference with the batch size of the run (sample ``i`` is patched from
reference row ``i``). Code that runs a batch in chunks (the per-sample gradient engine) is given the freeze
(``per_sample_gradients(..., freezes=[handle])``) and tells it, chunk by chunk, which rows each chunk is
(:meth:`tl_circuits.freezing.api.FreezeHandle.on_rows`), so the freeze takes the matching reference rows; a freeze
told nothing needs a reference with the forward's batch size or 1.

>>> import torch
>>> ref = torch.arange(6.0)[:, None]
>>> reference_rows(ref, batch=2, rows=BatchRows(torch.arange(2, 4), n_total=6)).flatten().tolist()
[2.0, 3.0]
>>> reference_rows(ref, batch=6, rows=None).shape
torch.Size([6, 1])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass(frozen=True)
class BatchRows:
    """A forward runs on rows ``rows`` (int64 indices) of a batch of ``n_total`` samples."""

    rows: Tensor
    n_total: int


def reference_rows(reference: Tensor, batch: int, rows: Optional[BatchRows]) -> Tensor:
    """The rows of a per-sample ``reference`` that belong to a forward of ``batch`` samples, rows ``rows``.

    Unchanged when the reference has 1 row or the forward's own batch size (or ``rows`` is None).
    """
    if rows is None or reference.shape[0] in (1, batch):
        return reference
    if reference.shape[0] == rows.n_total and rows.rows.numel() == batch:
        return reference[rows.rows.to(reference.device)]
    return reference


__all__ = ["BatchRows", "reference_rows"]
