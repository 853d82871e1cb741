"""The file pair in which earlier versions saved a :class:`~tl_circuits.freezing.sweep.SweepResult`, read back.

A ``SweepResult`` saves as every result does (:mod:`tl_circuits.results_io`: a folder). Before that it was a file
pair, ``<stem>.safetensors`` (the numbers) and ``<stem>.json`` (the rest), format versions 1 (batch means only) and 2
(plus the per-sample and per-draw tensors); :meth:`SweepResult.load` and :func:`tl_circuits.load` still read both.

>>> [f.name for f in sweep_result_files("out/ioi_sweep.json")]
['ioi_sweep.safetensors', 'ioi_sweep.json']
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from torch import Tensor

from tl_circuits.results_io import check_record, legacy_files_present, pair_paths, read_json

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.freezing.sweep import SweepResult

SWEEP_FORMAT = "tl_circuits.SweepResult"
SWEEP_FORMAT_VERSION = 2
"""The last version of the file pair (``format``, ``version`` in its JSON); versions 1 (batch means only) and 2 (plus
``clean_per_sample``, ``per_sample_effect.*``, ``per_draw_effect.*``) are read."""
READABLE_VERSIONS = (1, 2)


sweep_result_files = pair_paths
"""The (tensors, metadata) files of a saved :class:`SweepResult` of earlier versions: ``<stem>.safetensors`` and
``<stem>.json``, for the stem or either file (:func:`tl_circuits.results_io.pair_paths`)."""


def _read_metadata(metadata_file: Path) -> dict:
    metadata = check_record(read_json(metadata_file), metadata_file, SWEEP_FORMAT, READABLE_VERSIONS, "SweepResult")
    missing = [k for k in ("replacement", "metric_name", "circuits", "settings") if k not in metadata]
    if missing:
        raise ValueError(f"{metadata_file} lacks {', '.join(missing)} (corrupt?)")
    return metadata


def load_sweep(cls: type[SweepResult], path: Union[str, Path]) -> Optional[SweepResult]:
    """Read a file pair written by an earlier version (format version 1 or 2); ``None`` when neither file is there."""
    from safetensors.torch import load_file

    tensors_file, metadata_file = pair_paths(path)
    if not legacy_files_present((tensors_file, metadata_file), "SweepResult"):
        return None
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

    return cls(clean=float(tensors["clean"][0]), frozen=grids("frozen", circuits) or {},
               replacement=metadata["replacement"], metric_name=metadata["metric_name"],
               settings=metadata["settings"],
               clean_per_sample=tensors["clean_per_sample"] if per_sample is not None else None,
               per_sample_effect=grids("per_sample_effect", per_sample),
               per_draw_effect=grids("per_draw_effect", per_draw))
