"""Resuming a long interference run: finished sample shards are kept on disk and a restarted run skips them.

With ``InterferenceConfig(checkpoint_dir=...)`` the gradient pass
(:func:`tl_circuits.interference.engine.gradient_pass`) writes the gradient factors of every sample shard it
finishes to ``<checkpoint_dir>/<key>/samples_<a>-<b>.safetensors`` (atomically: a temporary file renamed into
place), and a later run with the same key reads them back instead of computing them again. Ranks of a process group
write their own shards into the same folder, and any rank (or a single process) can read any shard: shards are
named by their global sample range.

The *key* is a hash of everything the factors depend on: every parameter of the model (names, shapes, dtypes and
values), the names of the hook points that carry forward hooks (a freeze), the task's tokens, attention mask, loss
mask and name, its ``loss_fn`` (:func:`callable_fingerprint`), the gradient settings (biases, method) and the
shard size. A different run gets a different folder and never reuses a shard; what a hook *does* is not visible to
the key, so use a fresh ``checkpoint_dir`` when changing a freeze's options but not its hook points.

A ``loss_fn`` enters the key through its code (bytecode, constants and names, nested functions included), its
qualified name, and the values it holds: default arguments, closure cells, a ``functools.partial``'s arguments, a
callable object's attributes, when they are tensors, arrays, numbers, strings or containers of them (a ValueError
for anything else it holds, which the key cannot see: a model, a tokenizer...; pass such data as tensors). The
*globals* it reads are not in the key: use a fresh ``checkpoint_dir`` after changing a module-level table it reads.

>>> import torch, tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     shards = ShardCheckpoint(folder, "k")
...     shards.save({"z": torch.ones(2, 1, 5, 2, 2)}, slice(0, 2), bad=[1])
...     z, bad = shards.load(slice(0, 2), {"z": (2, 1, 5, 2, 2)})
...     float(z["z"].sum()), bad, shards.load(slice(2, 3), {"z": (1, 1, 5, 2, 2)})
(40.0, [1], None)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import types
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from tl_circuits import _version
from tl_circuits.interference.inputs import TaskLoss
from tl_circuits.models.types import Model

FORMAT = "tl_circuits.FactorShards/1"
BAD = "__bad_samples__"


def _hash_tensor(digest, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _fingerprint_value(digest, value: Any, where: str, seen: set) -> None:
    if isinstance(value, Tensor):
        _hash_tensor(digest, value)
    elif isinstance(value, np.ndarray):
        _hash_tensor(digest, torch.from_numpy(np.ascontiguousarray(value)))
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, types.ModuleType):
        digest.update(f"module:{value.__name__};".encode())
    elif isinstance(value, (tuple, list)):
        digest.update(f"{type(value).__name__}[{len(value)}](".encode())
        for item in value:
            _fingerprint_value(digest, item, where, seen)
        digest.update(b")")
    elif isinstance(value, dict):
        digest.update(f"dict[{len(value)}](".encode())
        for key in sorted(value, key=repr):
            _fingerprint_value(digest, key, where, seen)
            _fingerprint_value(digest, value[key], where, seen)
        digest.update(b")")
    elif callable(value):
        _fingerprint_callable(digest, value, where, seen)
    else:
        raise ValueError(f"checkpoint_dir: {where} holds a {type(value).__name__}, which the checkpoint key cannot "
                         "include (it hashes tensors, arrays, numbers, strings, containers of them and functions); "
                         "give the loss_fn its data as tensors, or run without checkpoint_dir")


def _fingerprint_code(digest, code: types.CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _fingerprint_code(digest, const)
        else:
            digest.update(repr(const).encode())


def _fingerprint_callable(digest, fn: Any, where: str, seen: set) -> None:
    if id(fn) in seen:  # a recursive reference
        return
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        digest.update(b"partial")
        _fingerprint_callable(digest, fn.func, where, seen)
        _fingerprint_value(digest, (fn.args, fn.keywords), where, seen)
    elif isinstance(fn, types.MethodType):
        _fingerprint_callable(digest, fn.__func__, where, seen)
        _fingerprint_value(digest, fn.__self__, f"{where} (its object)", seen)
    elif isinstance(fn, types.FunctionType):
        digest.update(f"{fn.__module__}.{fn.__qualname__}".encode())
        _fingerprint_code(digest, fn.__code__)
        cells = [cell.cell_contents for cell in fn.__closure__ or ()]
        _fingerprint_value(digest, (fn.__defaults__, fn.__kwdefaults__, cells), where, seen)
    elif isinstance(fn, (types.BuiltinFunctionType, torch.nn.Module)) or type(fn).__module__.startswith("torch"):
        digest.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode())
        if isinstance(fn, torch.nn.Module):
            for name, t in fn.state_dict().items():
                digest.update(name.encode())
                _hash_tensor(digest, t)
    else:  # a callable object: its class's __call__ and its attributes
        digest.update(f"{type(fn).__module__}.{type(fn).__qualname__}".encode())
        _fingerprint_callable(digest, type(fn).__call__, where, seen)
        _fingerprint_value(digest, dict(vars(fn)) if hasattr(fn, "__dict__") else None, where, seen)


def callable_fingerprint(fn: Any) -> str:
    """A hash of a loss_fn's code and of the values it holds (module docstring); ValueError for what it cannot hash.

    >>> scale = torch.tensor(2.0)
    >>> callable_fingerprint(lambda x: x * scale) == callable_fingerprint(lambda x: x * scale)
    True
    >>> callable_fingerprint(lambda x: x * scale) == callable_fingerprint(lambda x: x * scale.neg())
    False
    """
    digest = hashlib.sha256()
    _fingerprint_callable(digest, fn, f"loss_fn {getattr(fn, '__qualname__', type(fn).__qualname__)}", set())
    return digest.hexdigest()


def run_key(model: Model, tokens: Tensor, mask: Tensor, what: str, settings: dict,
            loss: Optional[TaskLoss] = None) -> str:
    """The hash naming a task's shard folder (module docstring); ``settings``: JSON-ready gradient settings;
    ``loss``: the task's loss mask and loss_fn (``None``: every valid target's cross-entropy)."""
    digest = hashlib.sha256(f"{FORMAT} {_version.__version__} {what} {json.dumps(settings, sort_keys=True)}".encode())
    if loss is not None and loss.loss_mask is not None:
        digest.update(b"loss_mask")
        _hash_tensor(digest, loss.loss_mask.to(torch.int64))
    if loss is not None and loss.loss_fn is not None:
        digest.update(f"loss_fn {callable_fingerprint(loss.loss_fn.fn)}".encode())
    for name, param in model.named_parameters():
        digest.update(name.encode())
        _hash_tensor(digest, param)
    hooked = sorted(name for name, module in model.named_modules() if module._forward_hooks)
    digest.update(json.dumps(hooked).encode())
    _hash_tensor(digest, tokens.to(torch.int64))
    _hash_tensor(digest, mask.to(torch.int64))
    return digest.hexdigest()[:24]


class ShardCheckpoint:
    """The finished shards of one task in ``<directory>/<key>/``."""

    def __init__(self, directory: Union[str, Path], key: str):
        self.folder = Path(directory) / key
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"checkpoint_dir {directory}: cannot make the shard folder {self.folder}: {err}") from None

    def path(self, samples: slice) -> Path:
        return self.folder / f"samples_{samples.start}-{samples.stop}.safetensors"

    def save(self, arrays: dict[str, Tensor], samples: slice, bad: Sequence[int]) -> None:
        """Write the shard ``samples`` (its arrays over every layer,
        :func:`~tl_circuits.interference.store.factor_arrays`, and its NaN/inf samples), atomically."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in arrays.items()}
        tensors[BAD] = torch.tensor(list(bad), dtype=torch.int64)
        target = self.path(samples)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        save_file(tensors, str(partial), metadata={"format": FORMAT})
        os.replace(partial, target)

    def load(self, samples: slice, shapes: dict[str, tuple[int, ...]]) -> Optional[tuple[dict[str, Tensor], list[int]]]:
        """The saved shard ``samples`` as ``(arrays, bad samples)``, or ``None`` when there is none. A shard that
        cannot be read, or whose arrays do not have ``shapes`` (a torn or foreign file), is ``None`` too, with a
        warning naming its path and why: the shard is then computed again and overwritten."""
        from safetensors.torch import load_file

        path = self.path(samples)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            bad = tensors.pop(BAD).tolist()
        except Exception as error:  # safetensors raises its own error type for a damaged file; KeyError without BAD
            _warn_unreadable(path, f"{type(error).__name__}: {error}")
            return None
        found = {k: tuple(t.shape) for k, t in tensors.items()}
        if found != shapes:
            _warn_unreadable(path, f"its arrays are {found}, this run's shard has {shapes}")
            return None
        return tensors, bad


def _warn_unreadable(path: Path, reason: str) -> None:
    warnings.warn(f"checkpoint shard {path} cannot be used ({reason}); computing it again", RuntimeWarning,
                  stacklevel=3)


def task_checkpoint(directory: Union[str, Path], model: Model, tokens: Tensor, mask: Tensor, what: str,
                    settings: dict, loss: Optional[TaskLoss] = None) -> ShardCheckpoint:
    """The :class:`ShardCheckpoint` of one task of a run (its key: :func:`run_key`)."""
    return ShardCheckpoint(directory, run_key(model, tokens, mask, what, settings, loss))


__all__ = ["ShardCheckpoint", "callable_fingerprint", "run_key", "task_checkpoint"]
