"""Judging a round's replies against each other, not against the global model alone.

A reply can be well-formed, finite, on the server's schedule and of ordinary size, and still be
wrong: a sign-flipped update, a site that claims a huge data set to dominate the average, a
replay of an old reply. With three or more candidate replies in a round, their coordinate-wise
median update is a reference no single site controls: an update that pulls the model back
against it by much of the round's median update norm is left out, one far longer than that norm
is scaled down, and a claimed example count far above the round's median is capped. With two sites there is no majority: neither can be told
apart from the other (see README, "When things fail").
"""

from __future__ import annotations

import hashlib
import math
import statistics

import numpy as np
from flwr.app import ArrayRecord


def cosines_to_median(updates: list[dict[str, np.ndarray]], norms: list[float]) -> list[float]:
    """Each update's cosine with the coordinate-wise median of all updates. Updates map array
    names to float arrays (the reply minus the global model), `norms` are their L2 norms; the
    median is taken array by array, so memory stays at one array's worth per reply."""
    dots = [0.0] * len(updates)
    median_sq = 0.0
    for key in updates[0]:
        stacked = np.stack([u[key].ravel() for u in updates])
        median = np.median(stacked, axis=0).astype(np.float64)
        median_sq += float(median @ median)
        for i, row in enumerate(stacked):
            dots[i] += float(row.astype(np.float64) @ median)
    median_norm = math.sqrt(median_sq)
    return [d / (n * median_norm) if n and median_norm else 1.0 for d, n in zip(dots, norms)]


def weight_cap(examples: list[float], ratio: float) -> float | None:
    """The most examples one reply may weigh: `ratio` times the round's lower median (None: no
    cap). The lower median, not the mean of the two middle values: with an even count, half the
    sites claiming huge sizes would otherwise move the cap with them."""
    if not ratio or len(examples) < 3:
        return None
    return ratio * statistics.median_low(examples)


def digest(arrays: ArrayRecord) -> str:
    """A SHA-256 of a reply's arrays (names and bytes): the same weights sent twice match."""
    h = hashlib.sha256()
    for key, array in arrays.items():
        h.update(key.encode())
        h.update(array.data)
    return h.hexdigest()
