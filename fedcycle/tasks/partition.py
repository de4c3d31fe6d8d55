"""Partitioners: turn one labelled dataset into simulated data centers, for every task.

Each takes the labels of the whole training set, the number of sites and a seed, and
returns one index array per site. They are pure functions of their arguments, so every
node that computes a split gets the same one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from fedcycle.errors import ConfigError

if TYPE_CHECKING:
    from fedcycle.config import SiteSettings

Partition = list[np.ndarray]


def iid(labels: np.ndarray, num_sites: int, seed: int, **_: float) -> Partition:
    """Equal shares drawn uniformly at random."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet(
    labels: np.ndarray, num_sites: int, seed: int, alpha: float = 0.5, min_size: int = 10, **_: float
) -> Partition:
    """Label skew: each class is spread over the sites by proportions drawn from Dir(alpha).

    Smaller alpha, more skew. Draws again (up to 100 times) until every site holds at
    least `min_size` examples, as in Hsu et al. (2019) and most FL benchmarks.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _attempt in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min(min_size, len(labels) // num_sites):
            break
    else:
        raise ValueError(
            f"dirichlet.alpha={alpha}: could not give every one of {num_sites} sites "
            f"at least dirichlet.min-size={min_size} examples in 100 draws; raise alpha or lower min-size"
        )
    return [np.sort(np.concatenate(p)) for p in parts]


def label_shards(
    labels: np.ndarray, num_sites: int, seed: int, shards_per_site: int = 2, **_: float
) -> Partition:
    """Pathological non-iid of McMahan et al. (2017): sort by label, deal out shards."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_sites * shards_per_site)
    assignment = rng.permutation(len(shards))
    return [
        np.sort(np.concatenate([shards[s] for s in assignment[i::num_sites]]))
        for i in range(num_sites)
    ]


def quantity_skew(
    labels: np.ndarray, num_sites: int, seed: int, alpha: float = 0.5, min_size: int = 10, **_: float
) -> Partition:
    """Sites of unequal size (proportions from Dir(alpha)), each an iid sample."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    floor = min(min_size, len(labels) // num_sites)
    spare = len(labels) - floor * num_sites
    extra = np.floor(rng.dirichlet(np.full(num_sites, alpha)) * spare).astype(int)
    sizes = floor + extra
    sizes[-1] += len(labels) - sizes.sum()
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "label-shards": label_shards,
    "quantity-skew": quantity_skew,
}


def partition(name: str, labels: np.ndarray, num_sites: int, seed: int, **options: float) -> Partition:
    """Split `labels`' indices into `num_sites` disjoint, complete parts."""
    if name not in PARTITIONERS:
        raise ValueError(f"partitioner={name!r} is unknown; choose one of {sorted(PARTITIONERS)}")
    return PARTITIONERS[name](labels, num_sites, seed, **options)


def train_val_indices(n: int, settings: "SiteSettings", seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `val-fraction` of a site's `n` examples (seeded), cap the rest at `train-subset`:
    the sorted (train, validation) indices."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(len(order) * settings.val_fraction))
    val, train = order[:n_val], order[n_val:]
    if settings.train_subset:
        train = train[: settings.train_subset]
        val = val[: max(1, int(round(settings.train_subset * settings.val_fraction)))] if n_val else val
    return np.sort(train), np.sort(val)


def check_partition(node_config: dict, own_data_key: str) -> None:
    """Raise ConfigError unless the node config names a simulated site's part: `partition-id`
    of `num-partitions` (a real site names its own data under `own_data_key` instead)."""
    for key in ("partition-id", "num-partitions"):
        if not isinstance(node_config.get(key), int) or isinstance(node_config.get(key), bool):
            raise ConfigError(f"{key}={node_config.get(key)!r} in the node config must be an integer (or set {own_data_key})")
    parts, pid = node_config["num-partitions"], node_config["partition-id"]
    if parts < 1:
        raise ConfigError(f"num-partitions={parts} must be at least 1")
    if not 0 <= pid < parts:
        raise ConfigError(f"partition-id={pid} must be in 0..{parts - 1} (num-partitions={parts})")


def partition_indices(settings: "SiteSettings", labels: np.ndarray, node_config: dict) -> tuple[np.ndarray, np.ndarray]:
    """A simulated site's part of a labelled set: part `partition-id` of `num-partitions` by the
    run's partitioner, as (train, validation) indices into `labels`."""
    pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    index = partition(settings.partitioner, labels, parts, settings.seed, **_partition_options(settings))[pid]
    train, val = train_val_indices(len(index), settings, settings.seed + pid)
    return index[train], index[val]


def _partition_options(settings: "SiteSettings") -> dict:
    return {k.replace("-", "_"): v for k, v in settings.partitioner_options.items()}
