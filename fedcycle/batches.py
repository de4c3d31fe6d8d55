"""How a site's `Dataset` becomes mini-batches: its own fast path, or through a DataLoader.

A task's datasets are ordinary `torch.utils.data.Dataset`s yielding `(inputs, targets)`, where
inputs are a tensor or a dict of tensors. `batches()` feeds them through torch's `DataLoader`
(workers, pinned memory, a seeded sampler), so a site's data need not fit in memory. A dataset
may offer a fast path of its own, `device_batches(batch_size, device, generator)`, returning
None where it cannot take it: the image task's `InMemoryImages` (uint8 tensors) is copied to the
device once, cut into batches and normalized there, with no per-item collation (about 8x less
CPU per sample to feed, measured in docs/bench.md; on a GPU it also saves the host-to-device
copy of every batch). A dataset with a `joined(datasets)` class method pools several of its
kind into one (the centralized baseline keeps the fast path).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

def batches(data: Dataset, batch_size: int, device: torch.device, *, shuffle: bool,
            generator: torch.Generator | None = None, num_workers: int = 0, plain: bool = False) -> Iterable:
    """Mini-batches of `data` for `device`: an iterable with `len()` (batches per pass), a new
    order each pass when `shuffle` (drawn from `generator`). `plain`: a DataLoader even where
    the dataset has a fast path (DP-SGD samples its own batches from a DataLoader)."""
    own = None if plain else getattr(data, "device_batches", None)
    fast = own(batch_size, device, generator if shuffle else None) if callable(own) else None
    if fast is not None:
        return fast
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`fn` applied to every tensor of a batch's inputs, targets or outputs (a tensor, or a dict /
    list / tuple of them), the structure kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """A batch's inputs or targets on `device`."""
    return map_tensors(value, lambda t: t.to(device, non_blocking=True))


def detach(value: Any) -> Any:
    """Model outputs cut from the autograd graph."""
    return map_tensors(value, torch.Tensor.detach)


def batch_size_of(targets: Any) -> int:
    """How many examples a batch holds, from its targets (a tensor, or a dict / list / tuple of them)."""
    if isinstance(targets, dict) and targets:
        return batch_size_of(next(iter(targets.values())))
    if isinstance(targets, (list, tuple)) and targets:
        return batch_size_of(targets[0])
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) and targets.dim() else 1


def join(datasets: Sequence[Dataset]) -> Dataset:
    """Several sites' datasets as one (the pooled data of the centralized baseline): datasets of
    one kind that can pool themselves (`joined`) stay one of their kind, keeping their fast path."""
    kind = type(datasets[0])
    if all(type(d) is kind for d in datasets) and callable(getattr(kind, "joined", None)):
        pooled = kind.joined(datasets)
        if pooled is not None:
            return pooled
    return ConcatDataset(list(datasets))


def describe(value: Any) -> str:
    """One example's structure, e.g. `float32[1, 28, 28]` or `{ids: int64[128], mask: bool[128]}`."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return type(value).__name__
