"""How a site's data becomes mini-batches (fedcycle.batches), on real Fashion-MNIST: the image
task's fast path gives the same normalized batches as torch's DataLoader over the same Dataset;
every example once per pass, a new seeded order each pass; other datasets go through the
DataLoader; a batch's structure is described and counted whatever it nests."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from fedcycle.batches import batch_size_of, batches, describe, join, map_tensors
from fedcycle.tasks import load_task
from fedcycle.tasks.image.in_memory import DeviceBatches, InMemoryImages

CPU = torch.device("cpu")


@pytest.fixture
def images(data_root) -> InMemoryImages:
    """A site's real Fashion-MNIST train split, as the image task holds it."""
    train, _ = load_task({"data-root": data_root, "train-subset": 150}).site_data({"partition-id": 0, "num-partitions": 2})
    assert isinstance(train, InMemoryImages) and len(train) == 150
    return train


def test_the_fast_path_gives_what_the_dataloader_gives(images):
    fast = batches(images, 64, CPU, shuffle=False)
    assert isinstance(fast, DeviceBatches) and len(fast) == math.ceil(150 / 64) == 3
    reference = DataLoader(images, batch_size=64)  # one item at a time through __getitem__
    got = list(fast)
    assert [len(y) for _, y in got] == [64, 64, 22]
    for (x, y), (rx, ry) in zip(got, reference, strict=True):
        assert x.dtype == rx.dtype == torch.float32 and x.shape == rx.shape
        assert torch.equal(y, ry) and torch.allclose(x, rx, rtol=0, atol=1e-6)
    assert abs(float(torch.cat([x for x, _ in got]).mean())) < 0.5  # normalized: about mean 0, not pixels


def test_shuffled_passes_hold_every_example_once_in_a_new_seeded_order(images):
    def labels_per_pass(seed: int, passes: int) -> list[torch.Tensor]:
        loader = batches(images, 32, CPU, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [torch.cat([y for _, y in loader]) for _ in range(passes)]

    first, second = labels_per_pass(7, 2)
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(images.labels.tolist())
    assert not torch.equal(first, second)  # another order each pass
    again = labels_per_pass(7, 2)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)  # the same seed, the same orders


def test_a_dataset_without_a_fast_path_goes_through_the_dataloader(images, data_root):
    data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = batches(data, 4, CPU, shuffle=False)
    assert isinstance(loader, DataLoader) and [len(y) for _, y in loader] == [4, 4, 2]
    augmented, _ = load_task({"data-root": data_root, "train-subset": 150, "image.augment": "flip"}).site_data(
        {"partition-id": 0, "num-partitions": 2})
    assert isinstance(batches(augmented, 64, CPU, shuffle=True), DataLoader)  # a transform per image


def test_sites_data_pooled_keeps_the_fast_path_when_it_can(images, data_root):
    other, _ = load_task({"data-root": data_root, "train-subset": 150}).site_data({"partition-id": 1, "num-partitions": 2})
    pooled = join([images, other])
    assert isinstance(pooled, InMemoryImages) and len(pooled) == 300
    assert torch.equal(pooled.labels, torch.cat([images.labels, other.labels]))
    mixed = join([images, TensorDataset(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))])
    assert isinstance(mixed, ConcatDataset) and len(mixed) == 152


def test_a_batch_of_any_structure_is_described_counted_and_mapped():
    inputs = {"ids": torch.zeros(4, 128, dtype=torch.int64), "mask": torch.ones(4, 128, dtype=torch.bool)}
    assert describe(torch.zeros(1, 28, 28)) == "float32[1, 28, 28]"
    assert describe({k: v[0] for k, v in inputs.items()}) == "{ids: int64[128], mask: bool[128]}"
    assert describe((torch.zeros(2), 3)) == "[float32[2], int]"
    assert batch_size_of(torch.zeros(5)) == 5 and batch_size_of(torch.tensor(1.0)) == 1
    assert batch_size_of(inputs) == 4 and batch_size_of([torch.zeros(3, 2), torch.zeros(3)]) == 3
    doubled = map_tensors({"a": [torch.ones(2), (torch.ones(1),)], "n": 3}, lambda t: t * 2)
    assert doubled["n"] == 3 and isinstance(doubled["a"][1], tuple)
    assert torch.equal(doubled["a"][0], torch.full((2,), 2.0)) and torch.equal(doubled["a"][1][0], torch.full((1,), 2.0))
