"""Resuming a long interference run: finished sample shards are kept on disk and a restarted run skips them.

With ``InterferenceConfig(checkpoint_dir=...)`` the gradient pass
(:func:`tl_circuits.interference.engine.gradient_pass`) writes the gradient factors of every sample shard it
finishes to ``<checkpoint_dir>/<key>/samples_<a>-<b>.safetensors`` (atomically: a temporary file renamed into
place), and a later run with the same key reads them back instead of computing them again. Ranks of a process group
write their own shards into the same folder, and any rank (or a single process) can read any shard: shards are
named by their global sample range.

The *key* is a hash of everything the factors depend on: every parameter of the model (names, shapes, dtypes and
values), the names of the hook points that carry forward hooks (a freeze), the task's tokens and attention mask and
its name, the gradient settings (biases, method) and the shard size. A different run gets a different folder and
never reuses a shard; what a hook *does* is not visible to the key, so use a fresh ``checkpoint_dir`` when changing
a freeze's options but not its hook points.

>>> import torch, tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     shards = ShardCheckpoint(folder, "k")
...     shards.save({"z": torch.ones(2, 1, 5, 2, 2)}, slice(0, 2), bad=[1])
...     z, bad = shards.load(slice(0, 2), {"z": (2, 1, 5, 2, 2)})
...     float(z["z"].sum()), bad, shards.load(slice(2, 3), {"z": (1, 1, 5, 2, 2)})
(40.0, [1], None)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from tl_circuits import _version
from tl_circuits.models.types import Model

FORMAT = "tl_circuits.FactorShards/1"
BAD = "__bad_samples__"


def _hash_tensor(digest, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def run_key(model: Model, tokens: Tensor, mask: Tensor, what: str, settings: dict) -> str:
    """The hash naming a task's shard folder (module docstring); ``settings``: JSON-ready gradient settings."""
    digest = hashlib.sha256(f"{FORMAT} {_version.__version__} {what} {json.dumps(settings, sort_keys=True)}".encode())
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
                    settings: dict) -> ShardCheckpoint:
    """The :class:`ShardCheckpoint` of one task of a run (its key: :func:`run_key`)."""
    return ShardCheckpoint(directory, run_key(model, tokens, mask, what, settings))


__all__ = ["ShardCheckpoint", "run_key", "task_checkpoint"]
