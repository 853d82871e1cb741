"""Where the gradient factors of a run live: in memory, or spilled to a memory-mapped file.

A run computes each sample's gradient factors once (:mod:`tl_circuits.interference.gradients`) and reads
them back for every score tile. When they do not fit the budget they go to ``.npy``-style memory maps in a
fresh temporary folder (removed on every exit path: :meth:`FactorStore.close`, the context manager, and a
finaliser), and the pages touched by a read or write are released from the process straight after
(``madvise(MADV_DONTNEED)``), so the resident memory stays that of the tile being scored. The pages are not
synced to disk (``msync``): the file lives only as long as the run, and the kernel keeps a dropped page's
contents in its page cache (or writes them back when it needs the memory), so a later read sees them.

A store may hold a contiguous range of the model's layers only (``layers``): in a process group each rank holds,
and scores, its own share of the layers (:func:`tl_circuits.parallel.shards.held_layers`).

>>> import torch
>>> from tl_circuits.models.spec import ModelSpec
>>> spec = ModelSpec(1, 2, 2, 4, 2, 10, 8, False, False)
>>> with FactorStore(spec, n=3, n_pos=5, spill=True) as store:
...     f = GradientFactors.zeros(spec, 2, 5)
...     f.z += 1.0
...     store.put(1, f)
...     round(float(store.get(slice(0, 3)).z.sum()), 1), store.spilled
(40.0, True)
>>> with FactorStore(spec, n=3, n_pos=5, layers=slice(0, 0)) as none_held:  # a rank that holds no layer
...     tuple(none_held.shapes(2)["z"])
(2, 0, 5, 2, 2)
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import weakref
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from tl_circuits.interference.factors import GradientFactors
from tl_circuits.models.spec import ModelSpec

_QKV = ("Q", "K", "V")


def array_shapes(spec: ModelSpec, n: int, n_pos: int, shared_inputs: bool = True,
                 n_layers: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the arrays of ``n`` samples' factors (over ``n_layers``, default every layer)."""
    L = spec.n_layers if n_layers is None else n_layers
    H, G, d, D = spec.n_heads, spec.n_kv_heads, spec.d_head, spec.d_model
    shapes: dict[str, tuple[int, ...]] = {"in_Q": (n, L, n_pos, D)}
    if not shared_inputs:
        shapes.update({"in_K": (n, L, n_pos, D), "in_V": (n, L, n_pos, D)})
    shapes.update({"grad_Q": (n, L, n_pos, H, d), "grad_K": (n, L, n_pos, G, d), "grad_V": (n, L, n_pos, G, d),
                   "grad_O": (n, L, n_pos, D), "z": (n, L, n_pos, H, d)})
    return shapes


def factor_arrays(factors: GradientFactors, shared_inputs: bool = True) -> dict[str, Tensor]:
    """A chunk's factors as the arrays of a store, ``{name: [n, L, ...]}`` over every layer: the form in which
    factors are stored, sent between ranks and checkpointed (Q, K and V's input once when ``shared_inputs``)."""
    values = {"grad_" + b: t for b, t in factors.out_grads.items()}
    values["z"] = factors.z
    values["in_Q"] = factors.inputs["Q"]
    if not shared_inputs:
        values["in_K"], values["in_V"] = factors.inputs["K"], factors.inputs["V"]
    return values


def _release(array: np.ndarray) -> None:
    """Drop a memory map's resident pages from this process (the data stays in the file / page cache)."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # not supported here: pages are reclaimed by the OS instead
            pass


class FactorStore:
    """The gradient factors of ``n`` samples at ``n_pos`` positions, float32.

    Args:
        spec: the model's :class:`ModelSpec`.
        n, n_pos: samples and positions.
        shared_inputs: Q, K and V read one attention input (stored once).
        include_biases: recorded on the factors read back.
        spill: keep the factors in a memory-mapped file instead of memory.
        directory: where the spill folder is made (``None``: the system's temporary folder).
        device: where held factors live (spilled ones are read back to the caller's device).
        layers: the model's layers whose factors are kept (a contiguous range; default all).
    """

    def __init__(self, spec: ModelSpec, n: int, n_pos: int, *, shared_inputs: bool = True,
                 include_biases: bool = False, spill: bool = False, directory: Optional[str] = None,
                 device: Optional[torch.device] = None, layers: slice = slice(None)):
        start, stop, step = layers.indices(spec.n_layers)
        if step != 1:
            raise ValueError(f"a factor store holds a contiguous range of layers, not {layers}")
        self.layers = slice(start, max(start, stop))
        n_held = self.layers.stop - self.layers.start
        spill = spill and n_held > 0 and n > 0  # nothing to spill (an empty file cannot be mapped)
        self.spec, self.n, self.n_pos = spec, n, n_pos
        self.shared_inputs, self.include_biases, self.spilled = shared_inputs, include_biases, spill
        self.folder: Optional[str] = tempfile.mkdtemp(prefix="tl_circuits_spill_", dir=directory) if spill else None
        if self.folder is not None:  # removed even if the caller forgets to close (garbage collection, exit)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        shapes = array_shapes(spec, n, n_pos, shared_inputs, n_layers=n_held)
        self.arrays: dict[str, Union[Tensor, np.memmap]] = {}
        for name, shape in shapes.items():
            if self.folder is None:
                self.arrays[name] = torch.zeros(shape, device=device)
            else:
                self.arrays[name] = np.lib.format.open_memmap(os.path.join(self.folder, f"{name}.npy"), mode="w+",
                                                              dtype=np.float32, shape=shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * 4 for a in self.arrays.values())

    def __len__(self) -> int:
        return self.n

    def _names(self) -> dict[str, str]:
        names = {f"in_{b}": (f"in_{b}" if not self.shared_inputs else "in_Q") for b in _QKV}
        return names

    def put(self, start: int, factors: GradientFactors) -> None:
        """Store the factors (every layer; the held ones are kept) of samples ``start .. start + len(factors)``."""
        self.write(start, self.held(factor_arrays(factors, self.shared_inputs)))

    def held(self, arrays: dict[str, Tensor]) -> dict[str, Tensor]:
        """The held layers of arrays over every layer (:func:`factor_arrays`), as :meth:`write` takes them."""
        return {name: arrays[name][:, self.layers] for name in self.arrays}

    def shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """``{array name: shape}`` of ``n`` samples' factors as :meth:`read` gives them (the held layers)."""
        return {name: (n, *a.shape[1:]) for name, a in self.arrays.items()}

    def read(self, samples: slice) -> dict[str, Tensor]:
        """The stored arrays of some samples, ``{name: tensor}`` (what :meth:`write` takes)."""
        return {name: source[samples] if isinstance(source, Tensor) else torch.from_numpy(np.array(source[samples]))
                for name, source in self.arrays.items()}

    def write(self, start: int, values: dict[str, Tensor]) -> None:
        """Store arrays ``{name: [n, ...]}`` (as :meth:`read` gives them) at samples ``start .. start + n``."""
        missing = set(self.arrays) - set(values)
        if missing:
            raise ValueError(f"factors to store lack the arrays {sorted(missing)}")
        rows = slice(start, start + next(iter(values.values())).shape[0])
        for name in self.arrays:
            t = values[name]
            target = self.arrays[name]
            if isinstance(target, Tensor):
                target[rows] = t
            else:
                target[rows] = t.detach().cpu().numpy()
                _release(target)  # no flush: see the module docstring

    def get(self, samples: slice, layers: Optional[slice] = None, device: Optional[torch.device] = None,
            block: Optional[str] = None) -> GradientFactors:
        """The factors of some samples and layers, as tensors in memory (views when held, copies when spilled).

        ``layers``: the model's layers (among the held ones; default: all held). With ``block``, only what that
        block's rows need is read (the others are empty tensors).
        """
        layers = self._local(layers)
        needed = set(self.arrays)
        if block is not None:
            needed = {"z", "grad_O"} if block == "O" else {self._names()[f"in_{block}"], f"grad_{block}"}
        out: dict[str, Tensor] = {}
        for name, source in self.arrays.items():
            if name not in needed:
                out[name] = torch.empty(0)
                continue
            if isinstance(source, Tensor):
                out[name] = source[samples, layers]
            else:
                out[name] = torch.from_numpy(np.array(source[samples, layers]))
                _release(source)
            if device is not None:
                out[name] = out[name].to(device)
        inputs = {b: out[self._names()[f"in_{b}"]] for b in _QKV}
        grads = {b: out[f"grad_{b}"] for b in ("Q", "K", "V", "O")}
        return GradientFactors(inputs, grads, out["z"], self.spec, self.include_biases)

    def _local(self, layers: Optional[slice]) -> slice:
        """The store's own index range of some of the model's layers (which must be held)."""
        if layers is None:
            return slice(None)
        start, stop, _ = layers.indices(self.spec.n_layers)
        if start < self.layers.start or stop > self.layers.stop:
            raise ValueError(f"layers {start}..{stop - 1} are not all held by this store (it holds "
                             f"{self.layers.start}..{self.layers.stop - 1})")
        return slice(start - self.layers.start, stop - self.layers.start)

    def close(self) -> None:
        """Free the factors and remove the spill folder (idempotent)."""
        self.arrays = {}
        if self.folder is not None:
            self._finalizer()
            self.folder = None

    def __enter__(self) -> "FactorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SampleSet:
    """Several stores seen as one run of samples (A then B for the pooled matrix): index ranges map to stores."""

    def __init__(self, stores: list[FactorStore]):
        self.stores = stores
        self.offsets = np.cumsum([0] + [len(s) for s in stores]).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def pieces(self, samples: slice) -> list[tuple[FactorStore, slice, slice]]:
        """``(store, rows in the store, rows of the request)`` covering ``samples`` (a step-1 slice)."""
        start, stop = samples.start or 0, samples.stop if samples.stop is not None else len(self)
        out = []
        for store, lo in zip(self.stores, self.offsets[:-1]):
            a, b = max(start, lo), min(stop, lo + len(store))
            if a < b:
                out.append((store, slice(a - lo, b - lo), slice(a - start, b - start)))
        return out
