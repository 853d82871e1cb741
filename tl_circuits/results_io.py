"""Every result saves and loads one way: ``result.save(folder)`` and ``tl_circuits.load(folder)``.

A saved result is a folder of two files:

- ``result.json``: ``{"format": "tl_circuits.result", "version": 1, "kind": <class name>, "tl_circuits": <version>,
  "fields": {name: entry}}`` where an entry is ``{"value": <JSON>}``, ``{"tensor": <key>}``, ``{"grid": [<names>]}``
  (a dict of tensors, e.g. block -> [n_layers, heads]; its tensors are ``<field>/<index>`` in that order) or
  ``{"none": true}``;
- ``tensors.safetensors``: every tensor, bit for bit (dtype, shape, NaN and inf kept).

There is one version number (:data:`VERSION`), written and read here only. :func:`load` returns the class the
folder names (:data:`KINDS`); it also reads the formats of earlier versions (an ``InterferenceResult`` folder with
``scores.safetensors`` and ``settings.json``; a ``SweepResult`` or ``InterferenceTestResult`` file pair
``<stem>.safetensors`` + ``<stem>.json``), through each class's ``load_legacy``.

>>> import tempfile, torch
>>> from tl_circuits.stats.conflict import conflict_test
>>> gen = torch.Generator().manual_seed(0)
>>> res = conflict_test({"O": torch.randn(5, 6, 1, 2, generator=gen)})
>>> with tempfile.TemporaryDirectory() as tmp:
...     folder = res.save(f"{tmp}/conflict")
...     back = load(folder)
>>> type(back).__name__, torch.equal(back.p_value["O"], res.p_value["O"]), back.alternative
('ConflictTestResult', True, 'less')
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar, Union

from torch import Tensor

from tl_circuits import _version

FORMAT = "tl_circuits.result"
VERSION = 1
"""The version of the folder format; :func:`read_fields` reads this version only (earlier formats: ``load_legacy``)."""
META_FILE = "result.json"
TENSORS_FILE = "tensors.safetensors"
KINDS = {
    "InterferenceResult": "tl_circuits.interference.result",
    "SweepResult": "tl_circuits.freezing.sweep_result",
    "AttributionResult": "tl_circuits.freezing.attribution_result",
    "SweepTestResult": "tl_circuits.freezing.sweep_stats",
    "InterferenceTestResult": "tl_circuits.stats.result",
    "ConflictTestResult": "tl_circuits.stats.conflict",
}
"""The saveable results: class name -> the module that defines it."""
LEGACY_FORMATS = {
    "tl_circuits.InterferenceResult/1": "InterferenceResult",
    "tl_circuits.SweepResult": "SweepResult",
    "tl_circuits.InterferenceTestResult": "InterferenceTestResult",
}
"""The ``format`` strings of the files earlier versions wrote -> the class that reads them."""

R = TypeVar("R", bound="SavedResult")


def _own(tensor: Tensor) -> Tensor:
    # safetensors refuses tensors that share storage (views of one vector, e.g. the blocks of one q-value vector)
    return tensor.detach().cpu().contiguous().clone()


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(isinstance(v, Tensor) for v in value.values())


def _encode(name: str, value: Any, tensors: dict[str, Tensor]) -> dict[str, Any]:
    if value is None:
        return {"none": True}
    if isinstance(value, Tensor):
        tensors[name] = _own(value)
        return {"tensor": name}
    if _is_grid(value):
        for index, grid in enumerate(value.values()):
            tensors[f"{name}/{index}"] = _own(grid)
        return {"grid": [str(key) for key in value]}
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"field {name!r} must hold tensors or JSON values to be saved: {error}") from None
    return {"value": value}


def write_fields(path: Union[str, Path], kind: str, fields: Mapping[str, Any]) -> Path:
    """Write ``fields`` (name -> tensor, dict of tensors, None or JSON value) as a result folder of ``kind``.

    The folder is made (with its parents); its two files are replaced. Returns the folder.
    """
    from safetensors.torch import save_file

    folder = Path(path)
    if folder.suffix in (".json", ".safetensors"):
        raise ValueError(f"save() writes a folder; {folder} names a file (drop the {folder.suffix!r} suffix)")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save() writes a folder, and {folder} is a file")
    tensors: dict[str, Tensor] = {}
    entries = {name: _encode(name, value, tensors) for name, value in fields.items()}
    record = {"format": FORMAT, "version": VERSION, "kind": kind, "tl_circuits": _version.__version__,
              "fields": entries}
    text = json.dumps(record, indent=1, allow_nan=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": FORMAT, "kind": kind})
    (folder / META_FILE).write_text(text + "\n", encoding="utf-8")
    return folder


def read_kind(path: Union[str, Path]) -> Optional[str]:
    """The kind of the result folder ``path``, or ``None`` when it is not one (no ``result.json``).

    Raises ValueError for a ``result.json`` that is damaged, of another format or of an unknown version.
    """
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        return None
    record = check_record(read_json(meta_file), meta_file, FORMAT, (VERSION,), "tl_circuits result")
    kind = record.get("kind")
    if kind not in KINDS or not isinstance(record.get("fields"), dict):
        raise ValueError(f"{meta_file} names an unknown kind of result {kind!r} (known: {', '.join(KINDS)})")
    return kind


def read_json(file: Path) -> Any:
    """The JSON value in ``file``; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON (damaged?): {error}") from None


def read_fields(path: Union[str, Path], kind: str) -> dict[str, Any]:
    """The fields of the result folder ``path``, which must hold a ``kind``; inverse of :func:`write_fields`."""
    from safetensors.torch import load_file

    folder = Path(path)
    found = read_kind(folder)
    if found is None:
        raise not_a_result(folder, kind)
    if found != kind:
        raise ValueError(f"{folder} holds a saved {found}, not a {kind}: read it with tl_circuits.load")
    record = read_json(folder / META_FILE)
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as error:  # safetensors raises its own error type for a damaged header; OSError when missing
        raise ValueError(f"{folder / TENSORS_FILE} is not a readable safetensors file (damaged or missing?): "
                         f"{error}") from None
    fields: dict[str, Any] = {}
    for name, entry in record["fields"].items():
        try:
            if "none" in entry:
                fields[name] = None
            elif "tensor" in entry:
                fields[name] = tensors[entry["tensor"]]
            elif "grid" in entry:
                fields[name] = {key: tensors[f"{name}/{index}"] for index, key in enumerate(entry["grid"])}
            else:
                fields[name] = entry["value"]
        except (KeyError, TypeError):
            raise ValueError(f"{folder / TENSORS_FILE} lacks the tensors of field {name!r} that {META_FILE} "
                             "lists (damaged?)") from None
    return fields


def not_a_result(path: Path, kind: str = "tl_circuits result") -> Exception:
    """The error for a path that holds no saved result: FileNotFoundError when it does not exist."""
    if not path.exists() and not path.with_name(path.name + ".json").exists():
        return FileNotFoundError(f"no saved {kind} at {path}: it does not exist")
    return ValueError(f"{path} is not a saved {kind}: it has no {META_FILE} (save() writes a folder with "
                      f"{META_FILE} and {TENSORS_FILE})")


def result_class(kind: str) -> type[SavedResult]:
    """The class of a result kind (:data:`KINDS`)."""
    return getattr(importlib.import_module(KINDS[kind]), kind)


def pair_paths(path: Union[str, Path]) -> tuple[Path, Path]:
    """``(<stem>.safetensors, <stem>.json)``, the file pair of earlier versions, for the stem or either file.

    >>> [p.name for p in pair_paths("out/run.json")]
    ['run.safetensors', 'run.json']
    """
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def legacy_files_present(files: tuple[Path, ...], kind: str) -> bool:
    """Whether the files of an earlier format are there: False when none is; FileNotFoundError naming the one that
    is missing when only some are."""
    present = [file.is_file() for file in files]
    if not any(present):
        return False
    for file, here in zip(files, present):
        if not here:
            raise FileNotFoundError(f"cannot load the {kind} saved at {file.parent}: {file} is missing")
    return True


def check_record(record: Any, file: Path, format_name: str, versions: tuple, kind: str) -> dict:
    """``record`` (the JSON of ``file``) when it is a ``format_name`` record of one of ``versions``; else ValueError."""
    if not isinstance(record, dict) or record.get("format") != format_name:
        raise ValueError(f"{file} is not a saved {kind} (no format {format_name!r})")
    if record.get("version") not in versions:
        raise ValueError(f"{file} has {kind} format version {record.get('version')!r}; this tl_circuits "
                         f"({_version.__version__}) reads version {', '.join(map(str, versions))}")
    return record


def legacy_kind(path: Union[str, Path]) -> Optional[str]:
    """The kind of a result written by an earlier version at ``path``, or ``None``."""
    path = Path(path)
    candidates = [path / "settings.json"] if path.is_dir() else []
    candidates.append(pair_paths(path)[1])
    for meta_file in candidates:
        if meta_file.is_file():
            try:
                record = read_json(meta_file)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("format") in LEGACY_FORMATS:
                return LEGACY_FORMATS[record["format"]]
    return None


def load(path: Union[str, Path]) -> Any:
    """The result saved at ``path`` by any ``result.save(path)``, as its own class (:data:`KINDS`).

    Also reads the files of earlier versions (module docstring). Raises FileNotFoundError when ``path`` does not
    exist and ValueError when it holds no saved result, or a damaged one.
    """
    path = Path(path)
    kind = read_kind(path) if path.is_dir() else None
    if kind is None:
        kind = legacy_kind(path)
    if kind is None:
        raise not_a_result(path)
    return result_class(kind).load(path)


class SavedResult:
    """What makes a result saveable: :meth:`save` and :meth:`load` through this module's one folder format.

    A dataclass result saves its fields as they are; a class with other fields overrides :meth:`saved_fields` and
    :meth:`from_saved_fields`, and one that earlier versions wrote differently overrides :meth:`load_legacy`.
    """

    def saved_fields(self) -> dict[str, Any]:
        """What is written: name -> tensor, dict of tensors, None or JSON value."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_saved_fields(cls: type[R], fields: dict[str, Any]) -> R:
        """The result from what :meth:`saved_fields` wrote."""
        return cls(**fields)

    def save(self, path: Union[str, Path]) -> Path:
        """Write this result to the folder ``path`` (``result.json`` and ``tensors.safetensors``; made if needed,
        its two files replaced); returns the folder. Read it back with :func:`tl_circuits.load` or ``load``."""
        return write_fields(path, type(self).__name__, self.saved_fields())

    @classmethod
    def load(cls: type[R], path: Union[str, Path]) -> R:
        """Read a result of this class written by :meth:`save` (or by an earlier version, see ``load_legacy``)."""
        path = Path(path)
        if path.is_dir() and read_kind(path) is not None:
            return cls.from_saved_fields(read_fields(path, cls.__name__))
        legacy = cls.load_legacy(path)
        if legacy is None:
            raise not_a_result(path, cls.__name__)
        return legacy

    @classmethod
    def load_legacy(cls: type[R], path: Path) -> Optional[R]:
        """The result in an earlier version's format at ``path``, or ``None`` when there is none."""
        return None


def json_ready(value: Any) -> Any:
    """``value`` as JSON values: tuples become lists, tensors lists, dict keys strings (NaN floats kept)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    return value


__all__ = ["FORMAT", "KINDS", "META_FILE", "TENSORS_FILE", "VERSION", "SavedResult", "check_record", "json_ready",
           "legacy_files_present", "legacy_kind", "load", "pair_paths", "read_fields", "read_json", "read_kind",
           "result_class", "write_fields"]
