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
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from fedcycle.config import RunSettings
from fedcycle.datasets import check_partition, partition_indices, train_val_indices
from fedcycle.errors import ConfigError


class RecordError(ConfigError):
    """A record that cannot be read: the message names the file, the line (or row) and the column."""


class Records(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...
    def subset(self, index: np.ndarray) -> "Records": ...


def site_source(settings: RunSettings, node_config: dict, key: str) -> tuple[str, bool]:
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


def site_records(settings: RunSettings, node_config: dict, read: Callable[[Path], Records]) -> tuple[Records, Records]:
    """This site's (train, validation) records: its own, or its part of the run's."""
    path, own = site_source(settings, node_config, "data-file")
    records = read(existing_file(path, "data-file" if node_config.get("data-file") else f"{settings.task}.data-file"))
    if own:
        train, val = train_val_indices(len(records), settings, settings.seed)
    else:
        train, val = partition_indices(settings, records.labels, node_config)
    return records.subset(train), records.subset(val)


def existing_file(path: str, key: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}={path!r}: no such file")
    return file


def rows(path: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    """A CSV, JSONL or Parquet file's column names, and its records as (where, record) with
    `where` the file and line (or row) a message about the record names."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise ConfigError(f"{path}: unknown file type {suffix!r}; use .csv, .jsonl or .parquet")


def _csv_rows(path: Path):
    handle = path.open(newline="", encoding="utf-8")
    reader = csv.reader(handle)
    header = next(reader, None)
    if not header:
        handle.close()
        raise RecordError(f"{path}: the file is empty; its first line must name the columns")
    header = [h.strip() for h in header]

    def records():
        with handle:
            for values in reader:
                if not values:
                    continue
                where = f"{path}, line {reader.line_num}"
                if len(values) != len(header):
                    raise RecordError(f"{where}: {len(values)} values, but the header names {len(header)} columns")
                yield where, dict(zip(header, values))

    return header, records()


def _jsonl_rows(path: Path):
    import json

    lines = path.read_text(encoding="utf-8").splitlines()
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise RecordError(f"{where}: not a JSON object ({err})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{where}: a {type(record).__name__}, not a JSON object")
        parsed.append((where, record))
    if not parsed:
        raise RecordError(f"{path}: the file holds no records")
    return list(parsed[0][1]), iter(parsed)


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    return list(table.column_names), ((f"{path}, row {i + 1}", r) for i, r in enumerate(table.to_pylist()))


def check_columns(path: Path, header: list[str], needed: list[str], key: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise RecordError(f"{path}: no column {', '.join(map(repr, missing))} ({key}); its columns are {header}")


def label_index(where: str, value: Any, classes: list[str], column: str) -> int:
    label = "" if value is None else str(value).strip()
    if label not in classes:
        raise RecordError(f"{where}, column {column!r}: label {label!r} is not one of the run's classes {classes}")
    return classes.index(label)
