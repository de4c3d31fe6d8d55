"""What the built-in tabular, text and audio tasks share: where a site's data is, and reading
a site's labelled records from one file.

A real site names its own data in its node config (`data-file`, or `data-dir` for a folder).
In simulation the run config names it (`<task>.data-file` or `<task>.data-dir`): either one
source split into sites by the run's partitioner (part `partition-id` of `num-partitions`), as
the image task splits Fashion-MNIST, or, when the path holds `{partition-id}`, one source per
simulated site (`voices/site-{partition-id}`), read as a real site reads its own. Either way
the site holds out `val-fraction` of its examples for validation. A bad record stops the run
with its file, line and column (`RecordError`), never silently dropped.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from fedcycle.config import SiteSettings
from fedcycle.tasks.partition import check_partition, partition_indices, train_val_indices
from fedcycle.errors import ConfigError


class RecordError(ConfigError):
    """A record that cannot be read: the message names the file's base name, the line (or row)
    and the column, and `without_values` the same without the cell's value."""


@dataclass(frozen=True)
class Examples:
    """Examples as one array (N, ...) and their int64 labels (N,): what the text and audio tasks read."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Examples":
        return Examples(self.inputs[index], self.labels[index])


class LabelledSet(torch.utils.data.TensorDataset):
    """(inputs, label) per example, with the run's class names."""

    def __init__(self, examples: Examples, classes: list[str]) -> None:
        super().__init__(torch.from_numpy(examples.inputs), torch.from_numpy(examples.labels))
        self.classes = classes


class Records(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...
    def subset(self, index: np.ndarray) -> "Records": ...


def site_source(settings: SiteSettings, node_config: dict, key: str) -> tuple[str, bool]:
    """The path of this site's data under `key` ('data-file' or 'data-dir'), and whether it is
    the site's own (True) or a source to split into simulated sites (False)."""
    if node_config.get(key):
        return str(node_config[key]), True
    shared = str(settings.task_options.get(key, ""))
    if not shared:
        raise ConfigError(
            f"{key} is not set: a site names its own data in its node config ({key}), or the run config names "
            f"the data of simulated sites ({settings.task}.{key}, split by the partitioner, or one per site "
            "with {partition-id} in the path)"
        )
    check_partition(node_config, key)
    if "{partition-id}" in shared:
        return shared.replace("{partition-id}", str(node_config["partition-id"])), True
    return shared, False


def site_examples(settings: SiteSettings, node_config: dict, key: str,
                  read: Callable[[str, bool], Records]) -> tuple[Records, Records]:
    """This site's (train, validation) examples under `key` ('data-file' or 'data-dir'): its own,
    or its part of the run's. `read(path, own)` reads them (`own`: the site's own source)."""
    path, own = site_source(settings, node_config, key)
    records = read(path, own)
    if own:
        train, val = train_val_indices(len(records), settings, settings.seed)
    else:
        train, val = partition_indices(settings, records.labels, node_config)
    return records.subset(train), records.subset(val)


def class_names(settings: SiteSettings, what: str) -> list[str]:
    """The run's `classes`, in the order the model numbers them; a built-in task needs 2 or more."""
    if len(settings.class_list) < 2:
        raise ConfigError(f"classes={settings.classes!r}: the {settings.task} task needs the {what}, comma-separated, "
                          "in the order the model numbers them (at least 2)")
    return settings.class_list


def existing_file(path: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{what} {file.name!r}: no such file (data-file in the node config, or the run config's file keys)")
    return file


def rows(path: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    """A CSV, JSONL or Parquet file's column names, and its records as (where, record) with
    `where` the file and line (or row) a message about the record names. A file that cannot be
    decoded raises RecordError naming it."""
    suffix = path.suffix.lower()
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}
    if suffix not in readers:
        raise ConfigError(f"{path.name}: unknown file type {suffix!r}; use .csv, .jsonl or .parquet")
    try:
        header, records = readers[suffix](path)
    except UnicodeDecodeError as err:
        raise RecordError(f"{path.name}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    names = [h for h in header if h]
    duplicated = sorted({h for h in names if names.count(h) > 1})
    if len(names) != len(header) or duplicated:
        raise RecordError(f"{path.name}: every column needs a name of its own (columns {header}); an unnamed first "
                          "column is often a row index written with the data")
    return header, records


def _csv_rows(path: Path):
    csv.field_size_limit(sys.maxsize)  # a document may be longer than csv's default 128 KiB field
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise RecordError(f"{path.name}, line 1: {err}") from None
    if not header:
        raise RecordError(f"{path.name}: the file is empty; its first line must name the columns")
    header = [h.strip() for h in header]

    def records():
        while True:
            try:
                values = next(reader, None)
            except csv.Error as err:
                raise RecordError(f"{path.name}, line {reader.line_num}: {err}") from None
            if values is None:
                return
            if not values:
                continue
            where = f"{path.name}, line {reader.line_num}"
            if len(values) != len(header):
                raise RecordError(f"{where}: {len(values)} values, but the header names {len(header)} columns")
            yield where, dict(zip(header, values))

    return header, records()


def _jsonl_rows(path: Path):
    parsed = []
    # "\n" only: str.splitlines would also split at U+2028 and U+0085, which JSON strings may hold
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path.name}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise RecordError(f"{where}: not a JSON object ({err})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{where}: a {type(record).__name__}, not a JSON object")
        parsed.append((where, record))
    if not parsed:
        raise RecordError(f"{path.name}: the file holds no records")
    return list(parsed[0][1]), iter(parsed)


def _parquet_rows(path: Path):
    try:
        import pyarrow as pa  # lazily: Parquet files only
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path.name}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise RecordError(f"{path.name}: not a readable Parquet file ({err})") from None
    # pandas keeps its row index as a column of its own: not data
    names = [n for n in table.column_names if not n.startswith("__index_level_")]
    table = table.select(names)
    return names, ((f"{path.name}, row {i + 1}", r) for i, r in enumerate(table.to_pylist()))


def check_columns(path: Path, header: list[str], needed: list[str], key: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise RecordError(f"{path.name}: no column {', '.join(map(repr, missing))} ({key}); its columns are {header}")


def label_index(where: str, value: Any, classes: list[str], column: str) -> int:
    label = "" if value is None else str(value).strip()
    if label not in classes:
        raise RecordError(f"{where}, column {column!r}: label {label!r} is not one of the run's classes {classes}",
                          without_values=f"{where}, column {column!r}: a label not among the run's classes")
    return classes.index(label)
