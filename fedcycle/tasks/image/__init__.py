"""The built-in task `image-classification` (this folder: the task, its `datasets` and their
`sources`, its `models`, and `in_memory`, the images held as uint8 tensors for the fast path): Fashion-MNIST, CIFAR-10 or a site's own image
folder (`dataset`), split into simulated sites (`partitioner`) or read from each site's
`data-dir`, with one of fedcycle's models or any torchvision classifier (`model`).

Cross-entropy and accuracy are the task defaults. Images are held in memory as uint8 and take
the trainer's fast path; `augment = "crop,flip"` adds torchvision's random crop (padding 4) and
horizontal flip to the train split (off by default, so results stay comparable).
"""

from __future__ import annotations

import math
from typing import Any

from fedcycle.tasks.image.datasets import DATASETS, ImageData, site_split, test_split
from fedcycle.tasks.partition import PARTITIONERS, check_partition
from fedcycle.errors import ConfigError
from fedcycle.tasks.image.in_memory import InMemoryImages
from fedcycle.tasks.image.settings import ImageSettings
from fedcycle.tasks.image.models import build_model, check_fits

AUGMENTATIONS = ("crop", "flip")


class ImageClassification:
    primary_metric = ("accuracy", "max")

    def __init__(self, run_config: dict[str, Any]) -> None:
        s = self.settings = ImageSettings.from_run_config(run_config)
        if s.dataset not in DATASETS:
            raise ConfigError(f"image.dataset={s.dataset!r} is unknown; choose one of {sorted(DATASETS)}")
        if s.partitioner not in PARTITIONERS:
            raise ConfigError(f"partitioner={s.partitioner!r} is unknown; choose one of {sorted(PARTITIONERS)}")
        self.spec = DATASETS[s.dataset]
        self.label = s.dataset
        builtin = self.spec.class_names
        if s.class_list and builtin and len(s.class_list) != len(builtin):
            raise ConfigError(f"classes has {len(s.class_list)} names, but image.dataset={s.dataset!r} has {len(builtin)} classes")
        if self.spec.site_local and len(s.class_list) < 2:
            raise ConfigError(
                f"classes={s.classes!r}: the {s.dataset} dataset needs the class list, "
                "comma-separated, in the order the model numbers them (at least 2)"
            )
        _check_partitioner_options(s)
        self.augment = [a.strip() for a in s.augment.split(",") if a.strip()]
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise ConfigError(f"image.augment={s.augment!r}: unknown {unknown}; use a comma-separated list of {list(AUGMENTATIONS)}")
        self.shape = self.spec.shape(s)
        self.classes = list(self.spec.classes(s))
        check_fits(s.model, self.shape, len(self.classes))

    def build_model(self):
        return build_model(self.settings.model, self.shape, len(self.classes))

    def site_data(self, node_config: dict[str, Any]) -> tuple[InMemoryImages, InMemoryImages]:
        """A site's own folder (`data-dir`), or part `partition-id` of `num-partitions` of the dataset."""
        check_node_config(node_config, self.settings)
        train, val = site_split(self.settings, node_config)
        return self._dataset(train, self._train_transform()), self._dataset(val)

    def test_data(self) -> InMemoryImages | None:
        test = test_split(self.settings)
        return None if test is None else self._dataset(test)

    def _dataset(self, data: ImageData, transform=None) -> InMemoryImages:
        return InMemoryImages(data.images, data.labels, self.classes, self.spec.mean, self.spec.std, transform)

    def _train_transform(self):
        if not self.augment:
            return None
        from torchvision import transforms  # lazily: torchvision costs a ClientApp process seconds

        steps = []
        if "crop" in self.augment:
            steps.append(transforms.RandomCrop(self.shape[1], padding=4))
        if "flip" in self.augment:
            steps.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(steps)


def check_node_config(node_config: dict[str, Any], settings: ImageSettings) -> None:
    """Raise ConfigError naming the node-config key that cannot work."""
    if node_config.get("data-dir"):
        return  # the folder itself is checked when it is read
    if DATASETS[settings.dataset].site_local:
        raise ConfigError(f"data-dir is missing from the node config; image.dataset={settings.dataset!r} reads each site's own folder")
    check_partition(node_config, "data-dir")


def _check_partitioner_options(s: ImageSettings) -> None:
    options = s.partitioner_options
    alpha = options.get("alpha", 0.5)
    if s.partitioner in ("dirichlet", "quantity-skew") and not (
        isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)
    ):
        raise ConfigError(f"{s.partitioner}.alpha={alpha} must be a number above 0")
    shards = options.get("shards-per-site", 2)
    if s.partitioner == "label-shards" and not (isinstance(shards, int) and shards >= 1):
        raise ConfigError(f"label-shards.shards-per-site={shards} must be an integer of at least 1")
