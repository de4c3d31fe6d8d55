"""Partitioners: disjoint, complete, seeded splits with the skew each one promises.

Synthetic labels for most properties, real Fashion-MNIST labels for the skew measurements
(the decoded cache is shared with test_datasets.py through one session-wide folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcycle.tasks.partition import PARTITIONERS, partition

ALL = tuple(PARTITIONERS)  # every registered partitioner goes through every test below


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def partition_fmnist_labels(tmp_path_factory) -> np.ndarray:
    """Fashion-MNIST's 60000 train labels, decoded once per session into a shared data root."""
    from fedcycle.tasks.image.datasets import load
    from fedcycle.tasks.image.settings import ImageSettings

    root = Path(tmp_path_factory.getbasetemp()) / "fedcycle-fmnist-shared"
    root.mkdir(parents=True, exist_ok=True)
    return load(ImageSettings(data_root=str(root)), "train").labels


def synthetic_labels(per_class: int = 300, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    """`per_class` examples of each of `num_classes` classes, shuffled."""
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return np.random.default_rng(seed).permutation(labels)


def label_dist(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes) / max(len(labels), 1)


def mean_tv(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label distribution and the global one."""
    k = int(labels.max()) + 1
    glob = label_dist(labels, k)
    return float(np.mean([0.5 * np.abs(label_dist(labels[p], k) - glob).sum() for p in parts]))


def assert_disjoint_complete(parts: list[np.ndarray], n: int, num_sites: int) -> None:
    assert len(parts) == num_sites
    for p in parts:
        assert np.issubdtype(np.asarray(p).dtype, np.integer)
        assert p.ndim == 1
    together = np.concatenate(parts)
    assert len(together) == n, "parts overlap or lose examples"
    np.testing.assert_array_equal(np.sort(together), np.arange(n))


def same_split(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- every partitioner


def test_every_partitioner_is_documented_and_an_unknown_one_is_refused_by_name():
    from pathlib import Path

    row = next(line for line in (Path(__file__).parent.parent / "README.md").read_text().splitlines()
               if line.startswith("| `partitioner` |"))
    assert all(f"`{name}`" in row for name in PARTITIONERS), row
    with pytest.raises(ValueError, match=r"partitioner='shards' is unknown; choose one of \['dirichlet', 'iid'"):
        partition("shards", np.zeros(10, np.int64), 2, 0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_sites", [1, 3, 7, 10])
def test_parts_are_disjoint_and_complete(name, num_sites):
    labels = synthetic_labels(per_class=120)
    parts = partition(name, labels, num_sites, seed=5)
    assert_disjoint_complete(parts, len(labels), num_sites)


@pytest.mark.parametrize("name", ALL)
def test_parts_are_disjoint_and_complete_on_uneven_classes(name):
    # 4 classes of very different sizes, a total not divisible by the number of sites
    labels = np.random.default_rng(1).permutation(
        np.concatenate([np.full(n, c) for c, n in enumerate([500, 211, 37, 3])])
    )
    parts = partition(name, labels, 6, seed=11)
    assert_disjoint_complete(parts, len(labels), 6)


@pytest.mark.parametrize("name", ALL)
def test_parts_are_disjoint_and_complete_on_fashion_mnist(name, partition_fmnist_labels):
    labels = partition_fmnist_labels
    parts = partition(name, labels, 10, seed=42)
    assert_disjoint_complete(parts, 60000, 10)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_split_other_seed_other_split(name):
    labels = synthetic_labels()
    first = partition(name, labels, 5, seed=123)
    again = partition(name, labels, 5, seed=123)
    other = partition(name, labels, 5, seed=124)
    assert same_split(first, again)
    assert not same_split(first, other)


@pytest.mark.parametrize("name", ALL)
def test_partition_does_not_modify_labels(name):
    labels = synthetic_labels()
    before = labels.copy()
    partition(name, labels, 4, seed=0)
    np.testing.assert_array_equal(labels, before)


def test_partition_dispatches_options_by_name():
    labels = synthetic_labels()
    via_name = partition("dirichlet", labels, 5, 3, alpha=0.2, min_size=5)
    direct = PARTITIONERS["dirichlet"](labels, 5, 3, alpha=0.2, min_size=5)
    assert same_split(via_name, direct)
    # the option really reaches the partitioner: another alpha, another split
    assert not same_split(via_name, partition("dirichlet", labels, 5, 3, alpha=50.0, min_size=5))


# ----------------------------------------------------------------------------- iid


def test_iid_sizes_equal_and_labels_balanced():
    labels = synthetic_labels(per_class=1000)
    parts = partition("iid", labels, 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert mean_tv(labels, parts) < 0.05


# ----------------------------------------------------------------------------- dirichlet


def test_dirichlet_skew_grows_as_alpha_shrinks_on_fashion_mnist(partition_fmnist_labels):
    labels = partition_fmnist_labels
    tv = {
        alpha: mean_tv(labels, partition("dirichlet", labels, 10, seed=7, alpha=alpha))
        for alpha in (0.1, 1.0, 100.0)
    }
    assert tv[0.1] > tv[1.0] > tv[100.0]
    # and by clear margins: near-iid at alpha=100, strongly skewed at alpha=0.1
    assert tv[100.0] < 0.05
    assert tv[0.1] > 0.4
    assert tv[0.1] - tv[1.0] > 0.1 and tv[1.0] - tv[100.0] > 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_skew_order_holds_for_several_seeds(seed):
    labels = synthetic_labels(per_class=500)
    tvs = [mean_tv(labels, partition("dirichlet", labels, 8, seed=seed, alpha=a)) for a in (0.1, 1.0, 100.0)]
    assert tvs[0] > tvs[1] > tvs[2]


@pytest.mark.parametrize("alpha, min_size", [(0.3, 1), (0.3, 50), (5.0, 200)])
def test_dirichlet_respects_min_size(alpha, min_size):
    labels = synthetic_labels(per_class=300)  # 300 examples a site on average
    parts = partition("dirichlet", labels, 10, seed=3, alpha=alpha, min_size=min_size)
    assert min(len(p) for p in parts) >= min_size
    assert_disjoint_complete(parts, len(labels), 10)


@pytest.mark.parametrize("min_size", [10, 10**6])
def test_dirichlet_impossible_min_size_raises(min_size):
    # 100 examples, 10 sites: every site would need its exact tenth under a very skewed Dir(0.01)
    labels = synthetic_labels(per_class=10)
    with pytest.raises(ValueError, match="min-size") as info:
        partition("dirichlet", labels, 10, seed=0, alpha=0.01, min_size=min_size)
    message = str(info.value)
    assert "alpha" in message and "100 draws" in message


# ----------------------------------------------------------------------------- label shards


@pytest.mark.parametrize(
    "num_sites, shards_per_site",
    [(10, 1), (5, 2), (10, 2), (10, 3), (4, 5)],  # per-class 120 is a multiple of every shard size
)
def test_label_shards_gives_each_site_few_classes(num_sites, shards_per_site):
    labels = synthetic_labels(per_class=120)
    parts = partition("label-shards", labels, num_sites, seed=9, shards_per_site=shards_per_site)
    assert_disjoint_complete(parts, len(labels), num_sites)
    for p in parts:
        assert len(np.unique(labels[p])) <= shards_per_site
        assert len(p) == len(labels) // num_sites  # equal shards, equal sites


def test_label_shards_on_fashion_mnist_two_classes_per_site(partition_fmnist_labels):
    labels = partition_fmnist_labels
    parts = partition("label-shards", labels, 10, seed=1, shards_per_site=2)
    classes_per_site = [len(np.unique(labels[p])) for p in parts]
    assert max(classes_per_site) <= 2
    # much more skewed than dirichlet with a moderate alpha
    assert mean_tv(labels, parts) > mean_tv(labels, partition("dirichlet", labels, 10, seed=1, alpha=1.0))


def test_label_shards_default_is_two_shards_per_site():
    labels = synthetic_labels(per_class=100)
    parts = partition("label-shards", labels, 10, seed=0)
    assert max(len(np.unique(labels[p])) for p in parts) <= 2
    assert min(len(np.unique(labels[p])) for p in parts) >= 1


# ----------------------------------------------------------------------------- quantity skew


def test_quantity_skew_unequal_sizes_but_iid_labels():
    labels = synthetic_labels(per_class=2000)  # 20000 examples
    parts = partition("quantity-skew", labels, 10, seed=4, alpha=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 2 * sizes.min(), f"sizes are not skewed: {sizes}"
    assert sizes.std() / sizes.mean() > 0.3
    # the labels of every reasonably large site follow the global distribution
    big = [p for p in parts if len(p) >= 500]
    assert len(big) >= 3
    assert mean_tv(labels, big) < 0.06
    dirichlet_tv = mean_tv(labels, partition("dirichlet", labels, 10, seed=4, alpha=0.5))
    assert mean_tv(labels, big) < dirichlet_tv / 4


def test_quantity_skew_grows_as_alpha_shrinks():
    labels = synthetic_labels(per_class=1000)
    cv = {}
    for alpha in (0.1, 1.0, 100.0):
        sizes = np.array([len(p) for p in partition("quantity-skew", labels, 10, seed=2, alpha=alpha)])
        cv[alpha] = sizes.std() / sizes.mean()
    assert cv[0.1] > cv[1.0] > cv[100.0]
    assert cv[0.1] > 3 * cv[100.0]


@pytest.mark.parametrize("min_size", [10, 300])
def test_quantity_skew_respects_min_size(min_size):
    labels = synthetic_labels(per_class=500)
    parts = partition("quantity-skew", labels, 10, seed=6, alpha=0.1, min_size=min_size)
    assert min(len(p) for p in parts) >= min_size


# ----------------------------------------------------------------------------- errors


def test_unknown_partitioner_raises_naming_choices():
    with pytest.raises(ValueError) as info:
        partition("pathological", synthetic_labels(), 3, seed=0)
    message = str(info.value)
    assert "pathological" in message
    for name in ALL:
        assert repr(name) in message
