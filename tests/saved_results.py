"""Saved results in the tests: a field-by-field comparison, and writers of the files of earlier versions.

Before the one folder format (tl_circuits/results_io.py) results were saved three ways. The library only reads
those formats now; the tests that prove it write them here, as the removed writers did (the same keys, metadata and
JSON records), from a result of today.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

OLD_GRID_NAMES = {"p_value_maxstat": "p_maxstat", "p_value_cluster": "p_cluster"}


def assert_same_result(back, res, skip=()):
    """Every dataclass field equal: same keys in the same order, dtypes, values bit for bit (NaN == NaN)."""
    for f in dataclasses.fields(res):
        if f.name in skip:
            continue
        assert_same_value(getattr(back, f.name), getattr(res, f.name), f.name)


def assert_same_value(got, want, name: str) -> None:
    if want is None or isinstance(want, (bool, int, float, str)):
        assert type(got) is type(want) and (got == want or (got != got and want != want)), name
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) if want.is_floating_point() else True, name
    elif isinstance(want, dict):
        assert list(got) == list(want), name
        for key in want:
            assert_same_value(got[key], want[key], f"{name}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert list(got) == list(want), name
    else:
        assert got == want, name


def _own(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().clone()


def write_interference_result_folder(result, folder: Path) -> Path:
    """``scores.safetensors`` + ``settings.json`` (format ``tl_circuits.InterferenceResult/1``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"scores.{b}": _own(s) for b, s in result.scores.items()}
    if result.fisher is not None:
        tensors.update({f"fisher.{b}": _own(f) for b, f in result.fisher.per_block.items()})
    meta = {"format": "tl_circuits.InterferenceResult/1", "ids_a": list(result.ids_a), "ids_b": list(result.ids_b),
            "config": result.config.to_dict(), "settings": result.settings,
            "fisher": None if result.fisher is None else {"n_samples": result.fisher.n_samples,
                                                          "include_biases": result.fisher.include_biases,
                                                          "source": result.fisher.source}}
    save_file(tensors, str(folder / "scores.safetensors"))
    (folder / "settings.json").write_text(json.dumps(meta, indent=1, allow_nan=True))
    return folder


def write_sweep_pair(result, stem: Path, version: int = 2) -> tuple[Path, Path]:
    """``<stem>.safetensors`` + ``<stem>.json`` (format ``tl_circuits.SweepResult``, version 1 or 2)."""
    tensors = {"clean": torch.tensor([result.clean], dtype=torch.float64)}
    tensors.update({f"frozen.{c}": _own(v) for c, v in result.frozen.items()})
    metadata = dict(format="tl_circuits.SweepResult", version=version, replacement=result.replacement,
                    metric_name=result.metric_name, circuits=list(result.frozen), settings=result.settings)
    if version >= 2:
        per_sample, per_draw = result.per_sample_effect, result.per_draw_effect
        metadata.update(per_sample_circuits=None if per_sample is None else list(per_sample),
                        per_draw_circuits=None if per_draw is None else list(per_draw))
        if result.per_sample_effect is not None:
            tensors["clean_per_sample"] = _own(result.clean_per_sample)
            tensors.update({f"per_sample_effect.{c}": _own(v) for c, v in result.per_sample_effect.items()})
        tensors.update({f"per_draw_effect.{c}": _own(v) for c, v in (result.per_draw_effect or {}).items()})
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors_file, metadata_file = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    save_file(tensors, str(tensors_file), metadata={"format": "tl_circuits.SweepResult"})
    metadata_file.write_text(json.dumps(metadata, indent=2) + "\n")
    return tensors_file, metadata_file


def write_test_result_pair(result, stem: Path) -> tuple[Path, Path]:
    """``<stem>.safetensors`` + ``<stem>.json`` of an InterferenceTestResult (format version 1, the old grid names)."""
    from tl_circuits.stats.result import GRID_FIELDS

    blocks, tensors, absent = list(result.blocks), {}, []
    for name in GRID_FIELDS:
        grid, stored = getattr(result, name), OLD_GRID_NAMES.get(name, name)
        if grid is None:
            absent.append(stored)
            continue
        for index, block in enumerate(blocks):
            tensors[f"{stored}/{index}"] = _own(grid[block])
    for index, block in enumerate(result.null_distribution):
        tensors[f"null_distribution/{index}"] = _own(result.null_distribution[block])
    if result.permutations is None:
        absent.append("permutations")
    else:
        tensors["permutations"] = _own(result.permutations)
    settings = {k: v for k, v in result.settings.items() if k != "screen"}  # the old files had no "screen"
    record = {"format": "tl_circuits.InterferenceTestResult", "version": 1, "blocks": blocks,
              "null_distribution_blocks": list(result.null_distribution), "absent": absent, "settings": settings}
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensor_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    save_file(tensors, str(tensor_path), metadata={"format": "tl_circuits.InterferenceTestResult"})
    json_path.write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
    return tensor_path, json_path
