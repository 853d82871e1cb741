"""Records of a prompt -> completion task file: JSON Lines, CSV, Parquet, or a ``datasets`` dataset directory.

Each record is a mapping of field names to values, read with where it is in the file:

- **JSON Lines** (``.jsonl``, ``.json``): one JSON object per line; blank lines are skipped but counted. A record
  is located by its 1-based line number: ``a.jsonl:3``.
- **CSV** (``.csv``, through ``datasets``): a header line naming the fields, every value read as text exactly as
  written (leading spaces and zeros kept, an empty cell is ``""``). Located by its 1-based row, header not
  counted: ``a.csv: row 3`` (the row is also the line minus one when no field holds a line break).
- **Parquet** (``.parquet``, through ``datasets``) and a directory written by ``Dataset.save_to_disk``
  (``datasets.load_from_disk``; a ``DatasetDict`` directory names its splits: give one split's directory).
  Located by 1-based row: ``a.parquet: row 3``.

Sample ids are ``<file stem>:<n>`` with ``n`` the line (JSON Lines) or the row (tables), unless the record has a
non-empty ``id``.

>>> import tempfile
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as folder:
...     path = Path(folder) / "task.jsonl"
...     _ = path.write_text('{"prompt": "2+2=", "completion": "4"}\\n\\n{"prompt": "3+3=", "completion": "6"}\\n')
...     [(r.number, r.fields["completion"]) for r in read_records(path)]
[(1, '4'), (3, '6')]
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from tl_circuits.cli.task_input import TaskInputError

JSONL, CSV, PARQUET, DATASET = "jsonl", "csv", "parquet", "dataset"
RECORD_SUFFIXES = {".jsonl": JSONL, ".json": JSONL, ".csv": CSV, ".parquet": PARQUET}


@dataclass(frozen=True)
class Record:
    """One record: its fields, its 1-based line (JSON Lines) or row (tables), and where it is in words."""

    fields: dict[str, Any]
    number: int
    where: str  # "a.jsonl:3" or "a.csv: row 3": the start of every error message about the record


def record_format(path: Path) -> Optional[str]:
    """The record format of ``path`` (a directory: a ``datasets`` dataset), or None for other task files."""
    if path.is_dir():
        return DATASET
    return RECORD_SUFFIXES.get(path.suffix.lower())


def read_records(path: Path, fmt: Optional[str] = None, max_records: Optional[int] = None) -> list[Record]:
    """The first ``max_records`` records of ``path`` (default all) in file order; TaskInputError on anything that
    cannot be read (naming the file, and the line where there is one)."""
    fmt = fmt or record_format(path)
    if fmt == JSONL:
        records = _jsonl_records(path, max_records)
    elif fmt in (CSV, PARQUET, DATASET):
        records = _table_records(path, fmt, max_records)
    else:
        raise TaskInputError(f"{path}: not a record file (expected .jsonl, .csv, .parquet or a dataset directory)")
    if not records:
        raise TaskInputError(f"{path}: empty task (no records)")
    return records


def _jsonl_records(path: Path, max_records: Optional[int]) -> list[Record]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TaskInputError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise TaskInputError(f"{path}: cannot read ({err.strerror or err})") from None
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if max_records is not None and len(records) >= max_records:
            break
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskInputError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); a JSON Lines task "
                                 "holds one JSON object per line") from None
        if not isinstance(fields, dict):
            raise TaskInputError(f"{where}: expected a JSON object with the record's fields, got "
                                 f"{type(fields).__name__}")
        records.append(Record(fields, number, where))
    return records


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` without its progress bars and info logging (restored after)."""
    import datasets.utils as ds_utils
    from datasets.utils import logging as ds_logging

    bars_were_off = ds_utils.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    ds_utils.disable_progress_bars()
    ds_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not bars_were_off:
            ds_utils.enable_progress_bars()


def _load_table(path: Path, fmt: str, cache_dir: str) -> Any:
    import datasets

    if fmt == CSV:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            raise TaskInputError(f"{path}: empty CSV file (expected a header line naming the fields)")
        text = datasets.Features({name: datasets.Value("string") for name in header})
        return datasets.Dataset.from_csv(str(path), features=text, keep_default_na=False, keep_in_memory=True,
                                         cache_dir=cache_dir)
    if fmt == PARQUET:
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=cache_dir)
    return datasets.load_from_disk(str(path), keep_in_memory=True)


def _table_records(path: Path, fmt: str, max_records: Optional[int]) -> list[Record]:
    import datasets

    try:
        with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="tl_circuits_records_") as cache_dir:
            table = _load_table(path, fmt, cache_dir)
            if isinstance(table, datasets.DatasetDict):
                raise TaskInputError(f"{path}: a DatasetDict with splits {sorted(table)}; give one split's "
                                     f"directory (e.g. {path / next(iter(table))})")
            n = len(table) if max_records is None else min(len(table), max_records)
            rows = table.select(range(n)).to_list() if n else []
    except TaskInputError:
        raise
    except UnicodeDecodeError:
        raise TaskInputError(f"{path}: not a UTF-8 text file") from None
    except Exception as err:  # a foreign or corrupt file: one line naming it
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        what = "a datasets directory (Dataset.save_to_disk)" if fmt == DATASET else f"a {fmt.upper()} file"
        raise TaskInputError(f"{path}: cannot read as {what} ({type(err).__name__}: {first})") from None
    return [Record(dict(row), number, f"{path}: row {number}") for number, row in enumerate(rows, start=1)]
