"""The image task's datasets: one small API that simulated and real data centers share.

- `site_split(settings, node)`: this site's train and held-out (validation) data;
- `test_split(settings)`: the shared test split the server evaluates on (None when the
  dataset has none, as for a site-local folder);

Every split is an `ImageData` of uint8 images (N, C, H, W) and int64 labels. Sources are
decoded once into `.npy` files under the data root and memory-cached per process, since in
deployment Flower starts a fresh ClientApp process for every message.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from fedcycle.errors import ConfigError
from fedcycle.tasks.image import sources
from fedcycle.tasks.image.sources import ImageData
from fedcycle.tasks.partition import partition_indices, train_val_indices

if TYPE_CHECKING:
    from fedcycle.tasks.image.settings import ImageSettings


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of fedcycle needs to know about a dataset; adding one is writing its loader
    in `sources` and one entry in `_registry`."""

    name: str
    load: Callable[[str, Path], ImageData] | None  # (split, data root); None: only sites' own folders
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int] | None = None  # None: 3 channels of the run's image.image-size
    class_names: tuple[str, ...] = ()  # () : the run config's `classes` name them

    @property
    def site_local(self) -> bool:
        """Each site reads its own files, and the server has no test split."""
        return self.load is None

    def shape(self, settings: "ImageSettings") -> tuple[int, int, int]:
        return self.image_shape or (3, settings.image_size, settings.image_size)

    def classes(self, settings: "ImageSettings") -> tuple[str, ...]:
        """The class names in label order: the run config's `classes` if given (they name a
        site's folders), else the dataset's own."""
        return tuple(settings.class_list) or self.class_names


def _registry() -> dict[str, DatasetSpec]:
    return {
        "fashion-mnist": DatasetSpec(
            "fashion-mnist", sources.fashion_mnist, (0.2860,), (0.3530,), (1, 28, 28),
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ),
        "cifar10": DatasetSpec(
            "cifar10", sources.cifar10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32),
            ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        ),
        "image-folder": DatasetSpec("image-folder", None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    }


DATASETS: dict[str, DatasetSpec] = _registry()


def data_root(settings: "ImageSettings", node_config: dict | None = None) -> Path:
    """Where decoded data lives: node config, then run config, then ~/.cache/fedcycle."""
    value = (node_config or {}).get("data-root") or settings.data_root
    return Path(value or os.path.expanduser("~/.cache/fedcycle")).resolve()


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, split: str, root: Path) -> ImageData:
    return DATASETS[name].load(split, root)


@functools.lru_cache(maxsize=4)
def _load_folder(data_dir: str, root: Path, shape: tuple[int, int, int], classes: tuple[str, ...]) -> ImageData:
    return sources.image_folder(data_dir, root, channels=shape[0], image_size=shape[1], classes=classes)


def load(settings: "ImageSettings", split: str, node_config: dict | None = None) -> ImageData:
    """The whole `split` ('train' or 'test') of the run's dataset, memory-cached, labelled
    with the run's class names. A node config with `data-dir` means the site's own folder,
    read in the run's classes and image shape."""
    node_config = node_config or {}
    spec = DATASETS[settings.dataset]
    root = data_root(settings, node_config)
    if node_config.get("data-dir"):
        if split != "train":
            raise ConfigError(f"a site's data-dir has no shared {split!r} split")
        return _load_folder(str(node_config["data-dir"]), root, spec.shape(settings), spec.classes(settings))
    if spec.site_local:
        raise ConfigError(f"data-dir is not set in this node config; image.dataset={settings.dataset!r} reads each site's own folder")
    data = _load_cached(settings.dataset, split, root)
    data = ImageData(data.images, data.labels, spec.classes(settings))
    if split == "train" and settings.train_pool:  # the same pool for every seed: a fixed draw
        return data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[: settings.train_pool]))
    return data


def _train_val(data: ImageData, settings: "ImageSettings", seed: int) -> tuple[ImageData, ImageData]:
    train, val = train_val_indices(len(data), settings, seed)
    return data.subset(train), data.subset(val)


def site_split(settings: "ImageSettings", node_config: dict) -> tuple[ImageData, ImageData]:
    """This site's (train, validation) data, from its node config.

    A site with `data-dir` reads its own folder; otherwise `partition-id` of
    `num-partitions` picks its part of the dataset's train split.
    """
    if node_config.get("data-dir"):
        return _train_val(load(settings, "train", node_config), settings, settings.seed)
    full = load(settings, "train", node_config)
    train, val = partition_indices(settings, full.labels, node_config)
    return full.subset(train), full.subset(val)


def test_split(settings: "ImageSettings") -> ImageData | None:
    """The shared test split (first `test-subset` of a seeded shuffle), or None if site-local."""
    if DATASETS[settings.dataset].site_local:
        return None
    data = load(settings, "test")
    if settings.test_subset:
        order = np.random.default_rng(settings.seed).permutation(len(data))[: settings.test_subset]
        data = data.subset(np.sort(order))
    return data
