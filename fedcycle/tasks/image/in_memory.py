"""The image task's data held in memory: uint8 images (N, C, H, W) and int64 labels, and the
fast path that `fedcycle.batches` takes for them (the whole set on the device, batches cut and
normalized there; docs/bench.md measures it)."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

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

    def device_batches(self, batch_size: int, device: torch.device,
                       generator: torch.Generator | None) -> "DeviceBatches | None":
        """The fast path (`fedcycle.batches`), or None for a set too large or with a transform."""
        return DeviceBatches(self, batch_size, device, generator) if self.fits_fast_path else None

    @classmethod
    def joined(cls, sets: Sequence["InMemoryImages"]) -> "InMemoryImages | None":
        """Several sets as one in-memory set (None if one has a transform)."""
        if any(s.transform is not None for s in sets):
            return None
        first = sets[0]
        return cls(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                   first.classes, first.mean, first.std)


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
