"""Datasets: real Fashion-MNIST and its .npy cache, site and test splits, CIFAR-10 through
torchvision's own loader on small files written here, and site-local image folders."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

import fedcycle.tasks.image.datasets as ds
from fedcycle.config import ConfigError
from fedcycle.tasks.image.datasets import DATASETS, DatasetSpec, ImageData, sources
from fedcycle.tasks.image.settings import ImageSettings

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def datasets_fmnist_root(tmp_path_factory) -> str:
    """A data root holding decoded Fashion-MNIST, shared with test_partition.py (decoded once)."""
    root = Path(tmp_path_factory.getbasetemp()) / "fedcycle-fmnist-shared"
    root.mkdir(parents=True, exist_ok=True)
    settings = ImageSettings(data_root=str(root))
    ds.load(settings, "train")
    ds.load(settings, "test")
    return str(root)


_WEIGHTS = np.random.default_rng(12345).integers(1, 2**63 - 1, size=(2, 28 * 28 + 1), dtype=np.uint64)


def row_hashes(data: ImageData) -> np.ndarray:
    """One (wrapping) 64-bit hash per (image, label) pair, for multiset comparisons."""
    flat = data.images.reshape(len(data), -1).astype(np.uint64)
    rows = np.concatenate([flat, data.labels.astype(np.uint64)[:, None]], axis=1)
    w = _WEIGHTS[:, : rows.shape[1]]
    with np.errstate(over="ignore"):
        return (rows @ w[0]) ^ ((rows @ w[1]) >> np.uint64(7))


def index_probe(num: int = 3000, test_num: int = 1000) -> DatasetSpec:
    """A dataset whose images spell out their own index, so splits can be checked exactly."""

    def load(split, root, **_):
        n = num if split == "train" else test_num
        idx = np.arange(n)
        images = np.stack([idx // 256, idx % 256], axis=1).astype(np.uint8).reshape(n, 1, 1, 2)
        return ImageData(images, (idx % 10).astype(np.int64), tuple(str(c) for c in range(10)))

    return DatasetSpec("index-probe", load, (0.5,), (0.5,))


def probe_index(data: ImageData) -> np.ndarray:
    flat = data.images.reshape(len(data), 2).astype(np.int64)
    return flat[:, 0] * 256 + flat[:, 1]


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """Register the index-probe dataset; return settings that use it."""
    monkeypatch.setitem(DATASETS, "index-probe", index_probe())
    ds._load_cached.cache_clear()
    yield ImageSettings(dataset="index-probe", data_root=str(tmp_path))
    ds._load_cached.cache_clear()


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_real_train_and_test(datasets_fmnist_root):
    settings = ImageSettings(data_root=datasets_fmnist_root)
    train, test = ds.load(settings, "train"), ds.load(settings, "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == np.uint8
    assert train.labels.shape == (60000,) and train.labels.dtype == np.int64
    assert test.labels.shape == (10000,) and test.labels.dtype == np.int64
    # ten balanced classes: 6000 train and 1000 test images each
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1000))
    assert train.classes == test.classes == DATASETS["fashion-mnist"].class_names
    assert len(train.classes) == 10
    # real pictures, not zeros: dark background, bright garments
    assert train.images.max() == 255 and train.images[:, :, 0, 0].mean() < 5
    assert 50 < train.images.mean() < 100
    spec = DATASETS["fashion-mnist"]
    assert spec.shape(settings) == (1, 28, 28)
    assert spec.classes(settings) == train.classes


def test_load_is_memory_cached(datasets_fmnist_root):
    settings = ImageSettings(data_root=datasets_fmnist_root)
    first, again = ds.load(settings, "train"), ds.load(ImageSettings(data_root=datasets_fmnist_root), "train")
    assert first.images is again.images and first.labels is again.labels


def test_fashion_mnist_npy_cache_is_written_and_reused(datasets_fmnist_root, monkeypatch):
    import torchvision.datasets

    folder = Path(datasets_fmnist_root) / "fashion-mnist"
    files = [folder / f"{split}-{part}" for split in ("train", "test")
             for part in ("images.npy", "labels.npy", "classes.json")]
    for f in files:
        assert f.is_file(), f"{f} was not written"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
    settings = ImageSettings(data_root=datasets_fmnist_root)
    first = ds.load(settings, "train")
    np.testing.assert_array_equal(np.load(folder / "train-images.npy"), first.images)
    np.testing.assert_array_equal(np.load(folder / "train-labels.npy"), first.labels)
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    # A fresh process-level cache must read the .npy files: torchvision may not be asked again.
    def no_decode(*args, **kwargs):
        raise AssertionError("FashionMNIST decoded again although the .npy cache exists")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_decode)
    ds._load_cached.cache_clear()
    second = ds.load(settings, "train")
    assert second is not first
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.classes == first.classes
    assert ds.load(settings, "test").images.shape == (10000, 1, 28, 28)
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes


def test_data_root_precedence(tmp_path):
    settings = ImageSettings(data_root=str(tmp_path / "run"))
    assert ds.data_root(settings) == (tmp_path / "run").resolve()
    assert ds.data_root(settings, {"data-root": str(tmp_path / "node")}) == (tmp_path / "node").resolve()
    assert ds.data_root(ImageSettings()) == Path(os.path.expanduser("~/.cache/fedcycle")).resolve()


# ----------------------------------------------------------------------------- site_split


def test_site_split_real_sites_are_disjoint_and_cover_the_train_split(datasets_fmnist_root):
    settings = ImageSettings(data_root=datasets_fmnist_root, seed=42, val_fraction=0.1)
    full = ds.load(settings, "train")
    sites = [ds.site_split(settings, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    for train, val in sites:
        assert len(train) + len(val) == 20000
        assert len(val) == 2000  # val-fraction held out
        assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == np.uint8
        assert train.labels.dtype == np.int64
    # every example lands in exactly one place: the multiset of all sites' train + val data
    # is the whole train split (any overlap would push another example out)
    together = np.concatenate([row_hashes(d) for site in sites for d in site])
    np.testing.assert_array_equal(np.sort(together), np.sort(row_hashes(full)))
    # Fashion-MNIST's train split has no two identical (image, label) pairs, so hashes stand
    # for examples: no two sites' train parts share one
    hashes = [row_hashes(train) for train, _ in sites]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.isin(hashes[a], hashes[b]).any()


def test_site_split_exact_indices_disjoint(probe):
    settings = probe
    seen_train, seen_all = [], []
    for i in range(3):
        train, val = ds.site_split(settings, {"partition-id": i, "num-partitions": 3})
        t, v = probe_index(train), probe_index(val)
        assert len(np.intersect1d(t, v)) == 0, "validation examples also in train"
        assert len(v) == round(1000 * settings.val_fraction)
        seen_train.append(t)
        seen_all.extend([t, v])
    for a in range(3):
        for b in range(a + 1, 3):
            assert len(np.intersect1d(seen_train[a], seen_train[b])) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(seen_all)), np.arange(3000))


def test_site_split_val_fraction(datasets_fmnist_root):
    for fraction, expected in ((0.0, 0), (0.25, 5000)):
        settings = ImageSettings(data_root=datasets_fmnist_root, val_fraction=fraction)
        train, val = ds.site_split(settings, {"partition-id": 1, "num-partitions": 3})
        assert len(val) == expected
        assert len(train) == 20000 - expected


def test_site_split_train_subset_caps_size(datasets_fmnist_root):
    node = {"partition-id": 2, "num-partitions": 3}
    capped_train, capped_val = ds.site_split(ImageSettings(data_root=datasets_fmnist_root, train_subset=500), node)
    full_train, full_val = ds.site_split(ImageSettings(data_root=datasets_fmnist_root), node)
    assert len(capped_train) == 500
    assert len(capped_val) == 50  # val shrinks with it: round(500 * 0.1)
    # the capped parts are drawn from this site's own train / validation parts
    assert np.isin(row_hashes(capped_train), row_hashes(full_train)).all()
    assert np.isin(row_hashes(capped_val), row_hashes(full_val)).all()
    assert not np.isin(row_hashes(capped_val), row_hashes(capped_train)).any()


def test_site_split_same_seed_same_split(datasets_fmnist_root):
    node = {"partition-id": 0, "num-partitions": 3}
    a_train, a_val = ds.site_split(ImageSettings(data_root=datasets_fmnist_root, seed=7), node)
    ds._load_cached.cache_clear()  # as in a fresh ClientApp process
    b_train, b_val = ds.site_split(ImageSettings(data_root=datasets_fmnist_root, seed=7), node)
    np.testing.assert_array_equal(a_train.images, b_train.images)
    np.testing.assert_array_equal(a_train.labels, b_train.labels)
    np.testing.assert_array_equal(a_val.labels, b_val.labels)
    c_train, _ = ds.site_split(ImageSettings(data_root=datasets_fmnist_root, seed=8), node)
    assert len(c_train) == len(a_train)
    assert not np.array_equal(row_hashes(c_train), row_hashes(a_train))


def test_site_split_passes_hyphenated_partitioner_options(datasets_fmnist_root):
    # label-shards with one 6000-image shard per site: each of 10 sites holds exactly one class
    settings = ImageSettings(
        data_root=datasets_fmnist_root, partitioner="label-shards",
        options={"label-shards": {"shards-per-site": 1}},
    )
    classes = set()
    for i in range(10):
        train, val = ds.site_split(settings, {"partition-id": i, "num-partitions": 10})
        site_classes = set(np.unique(np.concatenate([train.labels, val.labels])).tolist())
        assert len(site_classes) == 1
        classes |= site_classes
    assert classes == set(range(10))


def test_pooled_data_is_every_site_together_and_stays_in_memory(probe):
    """The centralized baseline's data: every site's split joined, still on the fast path."""
    from fedcycle.batches import join
    from fedcycle.tasks.image.in_memory import InMemoryImages

    parts = [ds.site_split(probe, {"partition-id": i, "num-partitions": 4}) for i in range(4)]
    pooled = [join([InMemoryImages(d.images, d.labels, d.classes, (0.5,), (0.5,)) for d in split]) for split in zip(*parts)]
    assert all(isinstance(p, InMemoryImages) and p.fits_fast_path for p in pooled)
    assert sum(len(p) for p in pooled) == 3000
    index = [probe_index(ImageData(p.images.numpy(), p.labels.numpy(), ())) for p in pooled]
    np.testing.assert_array_equal(np.sort(np.concatenate(index)), np.arange(3000))


# ----------------------------------------------------------------------------- test_split


def test_test_split_real(datasets_fmnist_root):
    full = ds.test_split(ImageSettings(data_root=datasets_fmnist_root))
    assert len(full) == 10000
    sub = ds.test_split(ImageSettings(data_root=datasets_fmnist_root, test_subset=1000, seed=3))
    assert len(sub) == 1000 and sub.images.shape == (1000, 1, 28, 28)
    assert np.isin(row_hashes(sub), row_hashes(full)).all()
    again = ds.test_split(ImageSettings(data_root=datasets_fmnist_root, test_subset=1000, seed=3))
    np.testing.assert_array_equal(again.images, sub.images)
    other = ds.test_split(ImageSettings(data_root=datasets_fmnist_root, test_subset=1000, seed=4))
    assert not np.array_equal(other.images, sub.images)
    assert len(np.unique(sub.labels)) == 10  # a random sample, not the first classes


def test_test_split_subset_exact(probe):
    sub = ds.test_split(ImageSettings(dataset="index-probe", data_root=probe.data_root, test_subset=100))
    idx = probe_index(sub)
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    assert np.all(np.diff(idx) > 0)  # original order kept
    assert idx.min() >= 0 and idx.max() < 1000
    assert idx.max() > 100  # a shuffle, not the first 100
    bigger = ds.test_split(ImageSettings(dataset="index-probe", data_root=probe.data_root, test_subset=5000))
    assert len(bigger) == 1000


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_files(tmp_path, monkeypatch):
    """Small files in CIFAR-10's python format; torchvision's checksums point at them."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}

    def write(name, n):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        # the real files are Python 2 pickles whose keys torchvision reads (latin1) as str
        entry = {"batch_label": name, "data": data, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)

    for b in range(1, 6):
        write(f"data_batch_{b}", 4)
    write("test_batch", 6)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": 4, "num_vis": 3072}, f, protocol=2)

    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{b}", _md5(folder / f"data_batch_{b}")] for b in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return tmp_path, written


def test_cifar10_through_torchvision_pixel_exact(cifar_files):
    root, written = cifar_files
    train = sources.cifar10("train", root)
    data = np.concatenate([written[f"data_batch_{b}"][0] for b in range(1, 6)])
    labels = sum((written[f"data_batch_{b}"][1] for b in range(1, 6)), [])
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == np.uint8
    assert train.images.flags["C_CONTIGUOUS"]
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each plane row-major
    np.testing.assert_array_equal(train.images, data.reshape(20, 3, 32, 32))
    assert train.images[0, 0, 0, 1] == data[0, 1]  # red, row 0, column 1
    assert train.images[0, 0, 1, 0] == data[0, 32]  # red, row 1, column 0
    assert train.images[0, 1, 0, 0] == data[0, 1024]  # green
    assert train.images[3, 2, 31, 30] == data[3, 2048 + 31 * 32 + 30]  # blue
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels, labels)
    assert train.classes == tuple(CIFAR_NAMES)

    test = sources.cifar10("test", root)
    assert test.images.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(test.images, written["test_batch"][0].reshape(6, 3, 32, 32))
    np.testing.assert_array_equal(test.labels, written["test_batch"][1])


def test_cifar10_npy_cache_and_registry(cifar_files, monkeypatch):
    import torchvision.datasets

    root, written = cifar_files
    first = sources.cifar10("train", root)
    assert (root / "cifar10" / "train-images.npy").is_file()
    assert (root / "cifar10" / "train-labels.npy").is_file()

    def no_decode(*args, **kwargs):
        raise AssertionError("CIFAR10 decoded again although the .npy cache exists")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_decode)
    again = sources.cifar10("train", root)
    np.testing.assert_array_equal(again.images, first.images)
    assert again.classes == first.classes

    settings = ImageSettings(dataset="cifar10", data_root=str(root))
    ds._load_cached.cache_clear()
    loaded = ds.load(settings, "train")
    np.testing.assert_array_equal(loaded.images, first.images)
    assert DATASETS["cifar10"].shape(settings) == (3, 32, 32)
    ds._load_cached.cache_clear()


# ----------------------------------------------------------------------------- image folder

COLORS = {"zebra": (200, 20, 20), "cat": (20, 200, 20), "dog": (20, 20, 200)}  # one dominant channel each
RUN_CLASSES = ("zebra", "cat", "dog")  # not the folders' sort order (cat, dog, zebra)


def write_tree(folder: Path, per_class: int = 3, colors=COLORS) -> Path:
    from PIL import Image

    for name, color in colors.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (40, 30), tuple(c + 10 * j for c in color)).save(folder / name / f"{j}.png")
    return folder


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return write_tree(tmp_path / "site-data")


def load_folder(root: Path, folder: Path, classes=RUN_CLASSES, size: int = 32) -> ImageData:
    return sources.image_folder(str(folder), root, channels=3, image_size=size, classes=tuple(classes))


def test_image_folder_labels_follow_run_class_order(tmp_path, image_tree):
    data = load_folder(tmp_path / "root", image_tree)
    assert data.images.shape == (9, 3, 32, 32) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert data.classes == RUN_CLASSES
    np.testing.assert_array_equal(np.bincount(data.labels, minlength=3), [3, 3, 3])
    # each image's colour says which folder it came from; its label must be that folder's
    # position in the run's class list (zebra = 0), not in the sorted folder list
    dominant = data.images.reshape(9, 3, -1).mean(axis=2).argmax(axis=1)
    folder_of_channel = {0: "zebra", 1: "cat", 2: "dog"}
    expected = [RUN_CLASSES.index(folder_of_channel[int(c)]) for c in dominant]
    np.testing.assert_array_equal(data.labels, expected)
    assert set(data.labels[dominant == 0].tolist()) == {0}  # zebra
    # solid colours survive resize and crop
    for img in data.images:
        assert np.ptp(img.reshape(3, -1), axis=1).max() <= 1


def test_image_folder_orientation_and_size(tmp_path):
    from PIL import Image

    folder = tmp_path / "two"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        img = np.zeros((30, 40, 3), dtype=np.uint8)  # height 30, width 40
        img[:15, :, 0] = 255  # top half red
        img[15:, :, 2] = 255  # bottom half blue
        Image.fromarray(img).save(folder / name / "x.png")
    data = load_folder(tmp_path / "root", folder, classes=("b", "a"), size=16)
    assert data.images.shape == (2, 3, 16, 16)
    img = data.images[0]
    assert img[0, 0, :].min() > 200 and img[2, 0, :].max() < 50  # top row red
    assert img[2, -1, :].min() > 200 and img[0, -1, :].max() < 50  # bottom row blue
    np.testing.assert_array_equal(sorted(data.labels.tolist()), [0, 1])


def test_image_folder_cache_written_and_refreshed_when_files_change(tmp_path, image_tree):
    from PIL import Image

    root = tmp_path / "root"
    first = load_folder(root, image_tree)
    cached = list((root / "image-folder").glob("*/train-images.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), first.images)
    Image.new("RGB", (40, 30), (20, 200, 20)).save(image_tree / "cat" / "new.png")
    second = load_folder(root, image_tree)
    assert len(second) == 10
    np.testing.assert_array_equal(np.bincount(second.labels, minlength=3), [3, 4, 3])


def test_image_folder_cache_notices_an_image_moved_to_another_class(tmp_path, image_tree):
    root = tmp_path / "root"
    load_folder(root, image_tree)
    os.rename(image_tree / "cat" / "0.png", image_tree / "dog" / "moved.png")  # relabel: cat -> dog
    data = load_folder(root, image_tree)
    np.testing.assert_array_equal(np.bincount(data.labels, minlength=3), [3, 2, 4])


def test_image_folder_ignores_hidden_folders(tmp_path, image_tree):
    from PIL import Image

    (image_tree / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (40, 30)).save(image_tree / ".ipynb_checkpoints" / "0.png")
    data = load_folder(tmp_path / "root", image_tree)
    assert len(data) == 9


def test_image_folder_class_mismatch_names_data_dir(tmp_path, image_tree):
    with pytest.raises(ConfigError, match="data-dir") as info:
        load_folder(tmp_path / "root", image_tree, classes=("zebra", "cat", "horse"))
    assert "horse" in str(info.value) and "dog" in str(info.value)
    with pytest.raises(ConfigError, match="data-dir"):
        load_folder(tmp_path / "root", image_tree, classes=("zebra", "cat"))
    (image_tree / "horse").mkdir()
    with pytest.raises(ConfigError, match="data-dir"):
        load_folder(tmp_path / "root", image_tree)


def test_image_folder_missing_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="data-dir"):
        load_folder(tmp_path / "root", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data-dir"):
        sources.image_folder("", tmp_path / "root", channels=3, image_size=32, classes=RUN_CLASSES)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ConfigError, match="data-dir"):
        load_folder(tmp_path / "root", tmp_path / "a-file")


def test_image_folder_without_images(tmp_path):
    empty = tmp_path / "empty"
    for name in RUN_CLASSES:
        (empty / name).mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no images"):
        load_folder(tmp_path / "root", empty)
    # files, but none of them images: torchvision finds nothing either
    for name in RUN_CLASSES:
        (empty / name / "notes.txt").write_text("no pictures here")
    with pytest.raises(ConfigError, match="holds no images"):
        load_folder(tmp_path / "root", empty)
    assert not (tmp_path / "root" / "image-folder").exists() or not list(
        (tmp_path / "root" / "image-folder").glob("*/train-images.npy")
    )


def test_image_folder_has_no_test_split(tmp_path, image_tree):
    settings = ImageSettings(dataset="image-folder", classes="zebra,cat,dog", data_root=str(tmp_path / "root"))
    with pytest.raises(ConfigError, match="has no shared 'test' split"):
        ds.load(settings, "test", {"data-dir": str(image_tree)})
    with pytest.raises(ConfigError, match="data-dir is not set"):
        ds.load(settings, "train")
    assert ds.test_split(settings) is None


def test_a_site_folder_beside_a_public_dataset_takes_its_classes_and_shape(tmp_path, image_tree, datasets_fmnist_root):
    """A real site with its own files in a run on Fashion-MNIST: grayscale, 28x28, the run's labels."""
    names = ("zebra", "cat", "dog", "d3", "d4", "d5", "d6", "d7", "d8", "d9")
    for extra in names[3:]:
        (image_tree / extra).mkdir()
        shutil.copy(next((image_tree / "cat").iterdir()), image_tree / extra / "x.png")
    settings = ImageSettings(classes=",".join(names), data_root=datasets_fmnist_root)
    train, val = ds.site_split(settings, {"data-dir": str(image_tree)})
    assert train.images.shape[1:] == (1, 28, 28) and train.classes == names
    assert sorted(np.concatenate([train.labels, val.labels]).tolist()) == [0] * 3 + [1] * 3 + [2] * 3 + list(range(3, 10))
    assert ds.load(settings, "test").classes == names  # the public test split carries the same names


def test_image_folder_site_split(tmp_path, image_tree):
    settings = ImageSettings(dataset="image-folder", classes="zebra,cat,dog", data_root=str(tmp_path / "root"))
    node = {"data-dir": str(image_tree)}
    train, val = ds.site_split(settings, node)
    assert len(train) + len(val) == 9
    assert len(val) == 1  # round(9 * 0.1)
    assert train.images.shape[1:] == (3, 32, 32)
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([train.labels, val.labels]), minlength=3), [3, 3, 3]
    )
    assert train.classes == RUN_CLASSES
    assert DATASETS["image-folder"].shape(settings) == (3, 32, 32)
    assert DATASETS["image-folder"].classes(settings) == RUN_CLASSES
    # decoded under the run's data root
    assert list((tmp_path / "root" / "image-folder").glob("*/train-images.npy"))
    third = ImageSettings(dataset="image-folder", classes="zebra,cat,dog", data_root=str(tmp_path / "root"),
                        val_fraction=1 / 3)
    train3, val3 = ds.site_split(third, node)
    assert (len(train3), len(val3)) == (6, 3)
