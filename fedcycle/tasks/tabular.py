"""The built-in task `tabular`: a site's table (CSV, JSONL or Parquet) with a label column,
classified by an MLP.

Run config (`tabular.*`; the label values in `classes`, in the order the model numbers them):
- `tabular.data-file`: in simulation, one file split into sites, or one per site with
  `{partition-id}` in its path (a real site's own file is `data-file` in its node config);
  `tabular.test-file`: the server's test set, if it has one;
- `tabular.label-column`; `tabular.features`: the numeric columns, in order (empty: every
  column of the run's file but the label and the categorical ones);
- `tabular.categorical = "smoker: yes, no; region: north, south, east"`: columns one-hot
  encoded by these category lists, the same on every site; a value outside its list stops
  the run naming the file, line and column;
- `tabular.hidden`: the MLP's hidden widths, e.g. "64,64".

Numeric features are standardised with the mean and variance of all sites' train data together,
computed without pooling it: each site sends its count, sums and sums of squares in the
pre-flight round and the server adds them up (`statistics`). With two classes the primary
metric is the area under the ROC curve over the whole split (torchmetrics), else accuracy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedcycle.config import SiteSettings
from fedcycle.errors import ConfigError
from fedcycle.tasks.records import (RecordError, check_columns, class_names, existing_file, label_index, rows,
                                    site_examples)


@dataclass(frozen=True)
class Table:
    numeric: np.ndarray  # float64 (N, F), raw
    onehot: np.ndarray  # float32 (N, K), the categorical columns one-hot
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Table":
        return Table(self.numeric[index], self.onehot[index], self.labels[index])


class Standardizer:
    """The numeric features' mean and standard deviation over all sites (identity until known)."""

    def __init__(self, width: int) -> None:
        self.mean, self.std = torch.zeros(width, dtype=torch.float64), torch.ones(width, dtype=torch.float64)


class TableRows(Dataset):
    """A site's rows as (features, label): numeric columns standardised, then the one-hot ones."""

    def __init__(self, table: Table, scale: Standardizer, classes: list[str]) -> None:
        self.numeric = torch.from_numpy(table.numeric)
        self.onehot = torch.from_numpy(table.onehot)
        self.labels = torch.from_numpy(table.labels)
        self.scale, self.classes = scale, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        numeric = ((self.numeric[index] - self.scale.mean) / self.scale.std).float()
        return torch.cat([numeric, self.onehot[index]]), self.labels[index]


class TabularClassification:
    def __init__(self, run_config: dict[str, Any]) -> None:
        s = self.settings = SiteSettings.from_run_config(run_config)
        options = s.task_options
        self.label_column = str(options.get("label-column", "label"))
        self.categories = parse_categorical(str(options.get("categorical", "")))
        self.hidden = parse_widths(str(options.get("hidden", "64")))
        self.classes = class_names(s, "label values")
        self.features = [f.strip() for f in str(options.get("features", "")).split(",") if f.strip()]
        if not self.features:
            self.features = self._features_from_run_file()
        clash = sorted(set(self.features) & ({self.label_column} | set(self.categories)))
        if clash:
            raise ConfigError(f"tabular.features names {clash}, which is the label or a categorical column")
        self.scale = Standardizer(len(self.features))
        # AUROC needs both classes in the split it is computed on: the server's test set has
        # them; a skewed site's held-out data may not (its AUROC would count as 0 in the mean)
        binary_with_test = len(self.classes) == 2 and bool(options.get("test-file"))
        self.primary_metric = ("auroc", "max") if binary_with_test else ("accuracy", "max")

    def _features_from_run_file(self) -> list[str]:
        """Every column of the run's own file but the label and categorical ones."""
        options = self.settings.task_options
        named = [k for k in ("test-file", "data-file") if options.get(k)]
        # one file per simulated site ({partition-id} in the path): the first site's names the columns
        path = Path(str(options[named[0]]).replace("{partition-id}", "0")).expanduser() if named else None
        if path is None or not path.is_file():
            # in deployment, tabular.test-file is the server's: the sites cannot read it
            raise ConfigError("tabular.features is empty and there is no file here to read the columns from "
                              f"({'tabular.' + named[0] + '=' + repr(str(path)) + ' is not here' if named else 'none named'}): "
                              "list the numeric feature columns in tabular.features (needed when sites and server "
                              "do not share files)")
        header, _ = rows(path)
        check_columns(path, header, [self.label_column], "tabular.label-column")
        return [c for c in header if c != self.label_column and c not in self.categories]

    @property
    def width(self) -> int:
        return len(self.features) + sum(len(v) for v in self.categories.values())

    def build_model(self) -> nn.Module:
        layers, width = [], self.width
        for hidden in self.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        return nn.Sequential(*layers, nn.Linear(width, len(self.classes)))

    def site_data(self, node_config: dict[str, Any]) -> tuple[TableRows, TableRows]:
        train, val = site_examples(self.settings, node_config, "data-file", lambda path, own: self.read(path))
        return TableRows(train, self.scale, self.classes), TableRows(val, self.scale, self.classes)

    def test_data(self) -> TableRows | None:
        path = self.settings.task_options.get("test-file", "")
        return TableRows(self.read(str(path)), self.scale, self.classes) if path else None

    def read(self, path: str) -> Table:
        return read_table(existing_file(path, "tabular file"), self.label_column, tuple(self.features),
                          _frozen(self.categories), tuple(self.classes))

    # -- statistics across sites, without pooling the data ----------------------------------

    def statistics(self, train: TableRows) -> dict[str, list[float]]:
        x = train.numeric
        return {"count": [float(len(x))], "sum": x.sum(0).tolist(), "sum-of-squares": (x * x).sum(0).tolist()}

    def use_statistics(self, totals: dict[str, list[float]]) -> None:
        n = totals["count"][0]
        mean = torch.tensor(totals["sum"], dtype=torch.float64) / n
        var = (torch.tensor(totals["sum-of-squares"], dtype=torch.float64) / n - mean**2).clamp(min=0)
        std = var.sqrt()
        self.scale.mean, self.scale.std = mean, torch.where(std > 1e-12, std, torch.ones_like(std))

    # -- metrics over the whole split -------------------------------------------------------

    def metric_collection(self):
        from torchmetrics import MetricCollection  # lazily: the tabular task's metrics only
        from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

        k = len(self.classes)
        return OnProbabilities(MetricCollection({"accuracy": MulticlassAccuracy(num_classes=k, average="micro"),
                                                 "auroc": MulticlassAUROC(num_classes=k, average="macro")}))


class OnProbabilities:
    """A MetricCollection fed softmax probabilities: torchmetrics decides batch by batch whether
    scores are logits, so a batch of logits that happen to lie in [0, 1] would be taken raw."""

    def __init__(self, collection) -> None:
        self.collection = collection

    def to(self, device: torch.device) -> "OnProbabilities":
        self.collection = self.collection.to(device)
        return self

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.collection.update(outputs.float().softmax(-1), targets)

    def compute(self) -> dict[str, torch.Tensor]:
        return self.collection.compute()


@functools.lru_cache(maxsize=4)
def read_table(path: Path, label_column: str, features: tuple[str, ...], categories: tuple,
               classes: tuple[str, ...]) -> Table:
    """A table file as numbers; any missing or unparsable value stops with its file, line and column."""
    cats = dict(categories)
    header, records = rows(path)
    check_columns(path, header, [label_column], "tabular.label-column")
    check_columns(path, header, list(features), "tabular.features")
    check_columns(path, header, list(cats), "tabular.categorical")
    numeric, onehot, labels = [], [], []
    for where, record in records:
        numeric.append([_number(where, c, record.get(c)) for c in features])
        row = []
        for column, allowed in cats.items():
            value = "" if record.get(column) is None else str(record[column]).strip()
            if value not in allowed:
                raise RecordError(f"{where}, column {column!r}: category {value!r} is not in tabular.categorical's "
                                  f"list {list(allowed)}",
                                  without_values=f"{where}, column {column!r}: a category not in tabular.categorical's list")
            row += [1.0 if value == a else 0.0 for a in allowed]
        onehot.append(row)
        labels.append(label_index(where, record.get(label_column), list(classes), label_column))
    if not labels:
        raise RecordError(f"{path.name}: the file holds no rows")
    return Table(np.asarray(numeric, dtype=np.float64).reshape(len(labels), len(features)),
                 np.asarray(onehot, dtype=np.float32).reshape(len(labels), -1), np.asarray(labels, dtype=np.int64))


def _number(where: str, column: str, value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RecordError(f"{where}, column {column!r}: missing value")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecordError(f"{where}, column {column!r}: {value!r} is not a number",
                          without_values=f"{where}, column {column!r}: not a number") from None
    if not math.isfinite(number):
        raise RecordError(f"{where}, column {column!r}: {value!r} is not a finite number",
                          without_values=f"{where}, column {column!r}: not a finite number")
    return number


def parse_categorical(spec: str) -> dict[str, tuple[str, ...]]:
    """`"smoker: yes, no; region: north, south"` -> {"smoker": ("yes", "no"), ...}."""
    out: dict[str, tuple[str, ...]] = {}
    for part in filter(str.strip, spec.split(";")):
        column, sep, values = part.partition(":")
        allowed = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not column.strip() or not allowed or len(set(allowed)) != len(allowed):
            raise ConfigError(f"tabular.categorical={spec!r}: write 'column: a, b, c; other: x, y' "
                              f"(each column with its distinct categories), not {part.strip()!r}")
        out[column.strip()] = allowed
    return out


def parse_widths(spec: str) -> list[int]:
    try:
        widths = [int(w) for w in spec.split(",") if w.strip()]
    except ValueError:
        widths = [0]
    if any(w < 1 for w in widths):
        raise ConfigError(f"tabular.hidden={spec!r}: comma-separated layer widths of at least 1, e.g. '64,64' ('' for none)")
    return widths


def _frozen(categories: dict[str, tuple[str, ...]]) -> tuple:
    return tuple(categories.items())
