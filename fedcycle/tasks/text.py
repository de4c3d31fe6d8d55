"""The built-in task `text`: a site's documents (JSONL or CSV: a text and a label per record),
classified from their UTF-8 bytes.

The tokenizer is the bytes themselves (ids 1-256, 0 pads): nothing to download from a hub and
nothing to train, so every site encodes text the same way without sharing any. Each document is
cut or padded to `text.max-length` bytes.

Run config (`text.*`; the labels in `classes`, in the order the model numbers them):
- `text.data-file`: in simulation, one file split into sites, or one per site with
  `{partition-id}` in its path (a real site's own file is `data-file` in its node config);
  `text.test-file`: the server's test set, if it has one;
- `text.text-column`, `text.label-column`, `text.max-length`;
- `text.model`: `embedding-bag` (the mean of byte and hashed byte-bigram embeddings, as
  fastText does with n-grams; fast on a CPU) or `transformer` (a small encoder over the bytes).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcycle.config import SiteSettings
from fedcycle.errors import ConfigError
from fedcycle.tasks.records import (Examples, LabelledSet, RecordError, check_columns, class_names, existing_file,
                                    label_index, rows, site_examples)

MODELS = ("embedding-bag", "transformer")
BYTE_IDS = 257  # 0 pads, byte b is b + 1
BIGRAM_BUCKETS = 4096


class ByteBag(nn.Module):
    """The mean of the embeddings of a document's bytes and hashed byte bigrams, then a linear layer."""

    def __init__(self, classes: int, dim: int = 64) -> None:
        super().__init__()
        self.bytes = nn.Embedding(BYTE_IDS, dim, padding_idx=0)
        self.bigrams = nn.Embedding(BIGRAM_BUCKETS, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens > 0).float()
        pair = (tokens[:, :-1] * BYTE_IDS + tokens[:, 1:]) % BIGRAM_BUCKETS
        pair_mask = mask[:, :-1] * mask[:, 1:]
        total = (self.bytes(tokens) * mask[..., None]).sum(1) + (self.bigrams(pair) * pair_mask[..., None]).sum(1)
        count = (mask.sum(1) + pair_mask.sum(1)).clamp(min=1)[:, None]
        return self.out(total / count)


class ByteTransformer(nn.Module):
    """A small transformer encoder over the bytes, mean-pooled over the non-padding positions."""

    def __init__(self, classes: int, max_length: int, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.bytes = nn.Embedding(BYTE_IDS, dim, padding_idx=0)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        x = self.bytes(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).float()[..., None]
        return self.out((x * keep).sum(1) / keep.sum(1).clamp(min=1))


class TextClassification:
    def __init__(self, run_config: dict[str, Any]) -> None:
        s = self.settings = SiteSettings.from_run_config(run_config)
        options = s.task_options
        self.text_column = str(options.get("text-column", "text"))
        self.label_column = str(options.get("label-column", "label"))
        self.max_length = options.get("max-length", 256)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"text.max-length={self.max_length!r} must be an integer of at least 2 (bytes per document)")
        self.model = str(options.get("model", "embedding-bag"))
        if self.model not in MODELS:
            raise ConfigError(f"text.model={self.model!r} is unknown; choose one of {list(MODELS)}")
        self.classes = class_names(s, "label values")

    def build_model(self) -> nn.Module:
        if self.model == "transformer":
            return ByteTransformer(len(self.classes), self.max_length)
        return ByteBag(len(self.classes))

    def site_data(self, node_config: dict[str, Any]) -> tuple[LabelledSet, LabelledSet]:
        train, val = site_examples(self.settings, node_config, "data-file", lambda path, own: self.read(path))
        return LabelledSet(train, self.classes), LabelledSet(val, self.classes)

    def test_data(self) -> LabelledSet | None:
        path = self.settings.task_options.get("test-file", "")
        return LabelledSet(self.read(str(path)), self.classes) if path else None

    def read(self, path: str) -> Examples:
        return read_documents(existing_file(path, "text file"), self.text_column, self.label_column, self.max_length,
                              tuple(self.classes))


def encode(text: str, max_length: int) -> np.ndarray:
    """A document's UTF-8 bytes as ids 1-256, cut or 0-padded to `max_length`."""
    ids = np.frombuffer(text.encode("utf-8")[:max_length], dtype=np.uint8).astype(np.int64) + 1
    return np.pad(ids, (0, max_length - len(ids)))


@functools.lru_cache(maxsize=4)
def read_documents(path: Path, text_column: str, label_column: str, max_length: int, classes: tuple[str, ...]) -> Examples:
    """A documents file as byte ids and labels; a missing text or an unknown label stops with its
    file, line and column."""
    header, records = rows(path)
    check_columns(path, header, [text_column], "text.text-column")
    check_columns(path, header, [label_column], "text.label-column")
    tokens, labels = [], []
    for where, record in records:
        text = record.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}, column {text_column!r}: missing text")
        tokens.append(encode(text, max_length))
        labels.append(label_index(where, record.get(label_column), list(classes), label_column))
    if not labels:
        raise RecordError(f"{path.name}: the file holds no documents")
    return Examples(np.stack(tokens), np.asarray(labels, dtype=np.int64))
