"""Partitioners: turn one labelled dataset into simulated data centers.

Each takes the labels of the whole training set, the number of sites and a seed, and
returns one index array per site. They are pure functions of their arguments, so every
node that computes a split gets the same one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

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
