"""A :class:`~tl_circuits.freezing.sweep.SweepResult` on disk: a safetensors file for the numbers, JSON for the rest.

Format version 2 adds the optional per-sample and per-draw tensors; version 1 files (batch means only)
are still read.

>>> [f.name for f in sweep_result_files("out/ioi_sweep.json")]
['ioi_sweep.safetensors', 'ioi_sweep.json']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.freezing.sweep import SweepResult

SWEEP_FORMAT = "tl_circuits.SweepResult"
SWEEP_FORMAT_VERSION = 2
"""Written by :meth:`SweepResult.save` in its JSON (``format``, ``version``); :meth:`SweepResult.load` reads
versions 1 (batch means only) and 2 (plus ``clean_per_sample``, ``per_sample_effect.*``, ``per_draw_effect.*``)."""
ATTRIBUTION_FORMAT_VERSION = 3
"""The version of an :class:`~tl_circuits.freezing.attribution_result.AttributionResult` file (``"kind":
"attribution"``): version 2 plus its estimates, verified cells and bound, so that a reader of versions 1-2 refuses
it rather than take first-order estimates for freeze effects."""
READABLE_VERSIONS = (1, 2, 3)


def sweep_result_files(path: Union[str, Path]) -> tuple[Path, Path]:
    """The (tensors, metadata) files of a saved :class:`SweepResult`: ``<stem>.safetensors`` and ``<stem>.json``.

    ``path`` is the stem, or either file (its suffix is dropped).

    >>> [f.name for f in sweep_result_files("out/ioi_sweep")]
    ['ioi_sweep.safetensors', 'ioi_sweep.json']
    """
    stem = Path(path)
    if stem.is_dir():
        raise ValueError(f"{stem} is a directory; give a file stem inside it, e.g. {stem / 'sweep'}")
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_sweep(result: SweepResult, path: Union[str, Path], extra_tensors: Optional[dict[str, Tensor]] = None,
               extra_metadata: Optional[dict] = None) -> tuple[Path, Path]:
    """Write ``result`` as a file pair (see :meth:`SweepResult.save`); returns ``(tensors_file, metadata_file)``.

    ``extra_tensors`` / ``extra_metadata``: a subclass's own fields (an attribution result's, written as version 3)."""
    from safetensors.torch import save_file

    tensors_file, metadata_file = sweep_result_files(path)
    version = SWEEP_FORMAT_VERSION if extra_metadata is None else ATTRIBUTION_FORMAT_VERSION
    metadata = dict(format=SWEEP_FORMAT, version=version, replacement=result.replacement,
                    metric_name=result.metric_name, circuits=list(result.frozen), settings=result.settings,
                    per_sample_circuits=None if result.per_sample_effect is None else list(result.per_sample_effect),
                    per_draw_circuits=None if result.per_draw_effect is None else list(result.per_draw_effect))
    metadata.update(extra_metadata or {})
    try:
        text = json.dumps(metadata, indent=2)
    except (TypeError, ValueError) as error:
        raise TypeError(f"SweepResult.settings must hold only JSON values to be saved: {error}") from None
    tensors = {"clean": torch.tensor([result.clean], dtype=torch.float64)}
    for circuit, values in result.frozen.items():
        tensors[f"frozen.{circuit}"] = values.detach().cpu().contiguous()
    if result.per_sample_effect is not None:
        if result.clean_per_sample is None:
            raise ValueError("a SweepResult with per_sample_effect needs clean_per_sample to be saved")
        tensors["clean_per_sample"] = result.clean_per_sample.detach().cpu().contiguous()
        for circuit, values in result.per_sample_effect.items():
            tensors[f"per_sample_effect.{circuit}"] = values.detach().cpu().contiguous()
    if result.per_draw_effect is not None:
        for circuit, values in result.per_draw_effect.items():
            tensors[f"per_draw_effect.{circuit}"] = values.detach().cpu().contiguous()
    for name, values in (extra_tensors or {}).items():
        tensors[name] = values.detach().cpu().contiguous()
    tensors_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tensors_file), metadata={"format": SWEEP_FORMAT})
    metadata_file.write_text(text + "\n", encoding="utf-8")
    return tensors_file, metadata_file


def _read_metadata(metadata_file: Path) -> dict:
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{metadata_file} is not valid JSON (corrupt?): {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{metadata_file} is not a saved SweepResult (no format {SWEEP_FORMAT!r})")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{metadata_file} has SweepResult format version {metadata.get('version')!r}; "
                         f"this tl_circuits reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    missing = [k for k in ("replacement", "metric_name", "circuits", "settings") if k not in metadata]
    if missing:
        raise ValueError(f"{metadata_file} lacks {', '.join(missing)} (corrupt?)")
    return metadata


def load_sweep(cls: type[SweepResult], path: Union[str, Path]) -> SweepResult:
    """Read a result written by :func:`save_sweep` (version 1 or 2); see :meth:`SweepResult.load`."""
    from safetensors.torch import load_file

    tensors_file, metadata_file = sweep_result_files(path)
    for file in (tensors_file, metadata_file):
        if not file.is_file():
            raise FileNotFoundError(f"cannot load a SweepResult from {path}: {file} is missing")
    metadata = _read_metadata(metadata_file)
    try:
        tensors = load_file(str(tensors_file))
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header
        raise ValueError(f"{tensors_file} is not a readable safetensors file (corrupt?): {error}") from None
    circuits = metadata["circuits"]
    per_sample, per_draw = metadata.get("per_sample_circuits"), metadata.get("per_draw_circuits")  # None in v1
    wanted = ["clean"] + [f"frozen.{circuit}" for circuit in circuits]
    if per_sample is not None:
        wanted += ["clean_per_sample"] + [f"per_sample_effect.{circuit}" for circuit in per_sample]
    if per_draw is not None:
        wanted += [f"per_draw_effect.{circuit}" for circuit in per_draw]
    absent = [name for name in wanted if name not in tensors]
    if absent:
        raise ValueError(f"{tensors_file} lacks the tensors {absent} that {metadata_file.name} names (corrupt?)")
    if tensors["clean"].shape != (1,):
        raise ValueError(f"{tensors_file}: 'clean' has shape {tuple(tensors['clean'].shape)}, expected (1,)")

    def grids(prefix: str, names: Optional[list[str]]) -> Optional[dict[str, Tensor]]:
        return None if names is None else {circuit: tensors[f"{prefix}.{circuit}"] for circuit in names}

    fields = dict(clean=float(tensors["clean"][0]), frozen=grids("frozen", circuits) or {},
                  replacement=metadata["replacement"], metric_name=metadata["metric_name"],
                  settings=metadata["settings"],
                  clean_per_sample=tensors["clean_per_sample"] if per_sample is not None else None,
                  per_sample_effect=grids("per_sample_effect", per_sample),
                  per_draw_effect=grids("per_draw_effect", per_draw))
    if metadata.get("kind") == "attribution":  # an AttributionResult whichever class is asked to load it
        from tl_circuits.freezing.attribution_result import AttributionResult

        return AttributionResult.from_saved(fields, tensors, metadata, tensors_file)
    if getattr(cls, "from_saved", None) is not None:
        raise ValueError(f"{metadata_file} holds an exact freeze sweep, not an attribution sweep: load it with "
                         "SweepResult.load")
    return cls(**fields)
