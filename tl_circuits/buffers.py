"""Reusable buffers: one named tensor per use, allocated once and viewed per shape.

On a CPU every fresh large tensor is fresh pages from the OS, and faulting them in costs more than the
arithmetic done on them in the interference engine and the permutation test; both therefore keep their
large temporaries in a :class:`Workspace`, whose buffers only grow.

>>> ws = Workspace()
>>> a = ws.get("rows", (2, 3))
>>> b = ws.get("rows", (3,))          # the same storage, viewed again
>>> a.data_ptr() == b.data_ptr()
True
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

Device = Union[str, torch.device, None]


class Workspace:
    """Named reusable buffers (a buffer is replaced when a larger one, or another dtype or device, is asked for)."""

    def __init__(self, device: Device = None):
        self.device = device
        self.storage: dict[str, Optional[Tensor]] = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype = torch.float32, device: Device = None) -> Tensor:
        """A ``shape`` view of buffer ``name`` (contents undefined)."""
        numel = math.prod(shape)
        where = torch.device(device if device is not None else (self.device or "cpu"))
        buf = self.storage.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != where:
            self.storage[name] = buf = None  # free before growing
            self.storage[name] = buf = torch.empty(numel, dtype=dtype, device=where)
        return buf[:numel].view(shape)
