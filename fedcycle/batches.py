"""How a site's `Dataset` becomes mini-batches: in memory on the device, or through a DataLoader.

A task's datasets are ordinary `torch.utils.data.Dataset`s yielding `(inputs, targets)`, where
inputs are a tensor or a dict of tensors. `batches()` feeds them through torch's `DataLoader`
(workers, pinned memory, a seeded sampler), so a site's data need not fit in memory. A small
image set held as uint8 tensors (`InMemoryImages`, what the built-in image task makes) takes the
fast path instead: copied to the device once, cut into batches and normalized there, with no
per-item collation (about 8x less CPU per sample to feed, measured in docs/bench.md; on a GPU it
also saves the host-to-device copy of every batch). The choice is automatic.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

# A set larger than this goes through the DataLoader even when it is in memory.
FAST_PATH_MAX_BYTES = 1 << 30


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) and int64 labels, normalized per channel on the way out.

    `transform` (torchvision's, on one uint8 image) is applied before normalizing; a set with
    a transform goes through the DataLoader, one item at a time."""

    def __init__(self, images, labels, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 transform=None) -> None:
        self.images = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.classes = list(classes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = transform
        self.scale = self.scale_on(torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return normalize(image[None], *self.scale)[0], self.labels[index]

    def scale_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and std on `device`, in uint8 units (B, C, H, W broadcast)."""
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, device=device).view(shape) * 255,
                torch.tensor(self.std, device=device).view(shape) * 255)

    @property
    def fits_fast_path(self) -> bool:
        return self.transform is None and self.images.nbytes + self.labels.nbytes <= FAST_PATH_MAX_BYTES


class DeviceBatches:
    """The fast path: the whole set on the device, a new seeded order each time it is iterated."""

    def __init__(self, data: InMemoryImages, batch_size: int, device: torch.device,
                 generator: torch.Generator | None) -> None:
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.scale = data.scale_on(device)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.generator is not None else torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield normalize(self.images[idx], *self.scale), self.labels[idx]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 `(x - mean) / std`, mean and std in uint8 units."""
    return (images.float() - mean) / std


def batches(data: Dataset, batch_size: int, device: torch.device, *, shuffle: bool,
            generator: torch.Generator | None = None, num_workers: int = 0) -> DeviceBatches | DataLoader:
    """Mini-batches of `data` for `device`: an iterable with `len()` (batches per pass), a new
    order each pass when `shuffle` (drawn from `generator`)."""
    if isinstance(data, InMemoryImages) and data.fits_fast_path:
        return DeviceBatches(data, batch_size, device, generator if shuffle else None)
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
    """Several sites' datasets as one (the pooled data of the centralized baseline); in-memory
    image sets stay one in-memory set, so they keep the fast path."""
    if all(isinstance(d, InMemoryImages) and d.transform is None for d in datasets):
        first = datasets[0]
        return InMemoryImages(torch.cat([d.images for d in datasets]), torch.cat([d.labels for d in datasets]),
                              first.classes, first.mean, first.std)
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
