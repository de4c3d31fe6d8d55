"""Where each dataset's images come from: torchvision's own loaders, decoded once to .npy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedcycle.errors import ConfigError
from fedcycle.files import atomic_write


@dataclass(frozen=True)
class ImageData:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageData":
        return ImageData(self.images[index], self.labels[index], self.classes)


# Debian's `dataset-fashion-mnist` package: the complete set, offline.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

def _npy_cache(folder: Path, split: str, build: Callable[[], ImageData]) -> ImageData:
    """Load `split` from `folder`'s .npy files, building them first if missing.

    Files are written to a temporary name and renamed, so concurrent first loads by
    several simulated sites never read a half-written file.
    """
    images, labels, meta = (folder / f"{split}-{part}" for part in ("images.npy", "labels.npy", "classes.json"))
    if not (images.exists() and labels.exists() and meta.exists()):
        data = build()
        folder.mkdir(parents=True, exist_ok=True)
        for path, write in (
            (images, lambda f: np.save(f, np.ascontiguousarray(data.images))),
            (labels, lambda f: np.save(f, data.labels.astype(np.int64))),
            (meta, lambda f: f.write(json.dumps(list(data.classes)).encode())),
        ):
            atomic_write(path, write)
        return data
    return ImageData(np.load(images), np.load(labels), tuple(json.loads(meta.read_text())))


def fashion_mnist(split: str, root: Path, **_: object) -> ImageData:
    def build() -> ImageData:
        from torchvision.datasets import FashionMNIST  # lazily: only to build the .npy cache

        raw = root / "FashionMNIST" / "raw"
        if DEBIAN_FASHION_MNIST.is_dir():
            raw.mkdir(parents=True, exist_ok=True)
            for gz in DEBIAN_FASHION_MNIST.glob("*.gz"):
                target = raw / gz.stem
                if not target.exists():
                    with gzip.open(gz, "rb") as src:
                        atomic_write(target, lambda dst: shutil.copyfileobj(src, dst))
        ds = FashionMNIST(str(root), train=split == "train", download=not _has_files(raw, 4))
        return ImageData(ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64), tuple(ds.classes))

    return _npy_cache(root / "fashion-mnist", split, build)


def cifar10(split: str, root: Path, **_: object) -> ImageData:
    """CIFAR-10 through torchvision, which downloads it (checksummed) when missing."""

    def build() -> ImageData:
        from torchvision.datasets import CIFAR10

        present = (root / "cifar-10-batches-py").is_dir()
        ds = CIFAR10(str(root), train=split == "train", download=not present)
        images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        return ImageData(images, np.asarray(ds.targets, dtype=np.int64), tuple(ds.classes))

    return _npy_cache(root / "cifar10", split, build)


def image_folder(data_dir: str, root: Path, *, channels: int, image_size: int, classes: tuple[str, ...]) -> ImageData:
    """A site's own files: `data-dir/<class name>/<image>`, as torchvision's ImageFolder reads them,
    resized and center-cropped to `image_size`, with `channels` (1: grayscale, 3: RGB).

    Labels follow the order of the run's `classes`, not the folders' sort order, so every
    site numbers the classes alike. Decoded once into `root/image-folder/<key>/`.
    """
    if not data_dir:
        raise ConfigError("data-dir is not set in this SuperNode's node config; image-folder needs it")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ConfigError(f"data-dir={data_dir!r} does not exist or is not a directory",
                          without_values=f"data-dir={folder.name!r} does not exist or is not a directory")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if found != sorted(classes):
        raise ConfigError(
            f"data-dir={data_dir!r} has class folders {found}, but the run config's classes are {list(classes)}",
            without_values=f"data-dir={folder.name!r}: its class folders are not the run config's classes {list(classes)}",
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    if not files:
        raise ConfigError(f"data-dir={data_dir!r} holds no images", without_values=f"data-dir={folder.name!r} holds no images")
    # Every file's place, size and time: moving an image to another class changes the key.
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    stamp = json.dumps([str(folder.resolve()), channels, image_size, list(classes), listing])
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]

    def build() -> ImageData:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        class RunClassesFolder(ImageFolder):
            """ImageFolder that numbers classes in the run config's order and skips other folders."""

            def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
                return list(classes), {name: i for i, name in enumerate(classes)}

        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        steps += [transforms.Grayscale(num_output_channels=1)] if channels == 1 else []
        tf = transforms.Compose([*steps, transforms.PILToTensor()])
        try:
            ds = RunClassesFolder(str(folder), transform=tf)
        except FileNotFoundError as err:
            raise ConfigError(f"data-dir={data_dir!r} holds no images ({err})",
                              without_values=f"data-dir={folder.name!r} holds no images") from None
        images = np.stack([img.numpy() for img, _ in ds]).astype(np.uint8)
        return ImageData(images, np.asarray(ds.targets, dtype=np.int64), tuple(classes))

    return _npy_cache(root / "image-folder" / key, "train", build)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _has_files(folder: Path, count: int) -> bool:
    return folder.is_dir() and sum(1 for p in folder.iterdir() if not p.name.endswith(".gz")) >= count
