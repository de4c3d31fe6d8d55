"""Record-level differential privacy at a site: DP-SGD with Opacus, and the site's ledger of
what it has spent.

`private_training` hands a loop (fedcycle's or a task's own) Opacus's private model, optimizer
and Poisson-sampled loader: every example's gradient clipped to `dp.max-grad-norm`, Gaussian
noise of `dp.noise-multiplier` times that norm added to each step's sum. Each round the site
adds (noise multiplier, sample rate, steps) to its `PrivacyLedger`, a JSON file the site keeps,
and Opacus's RDP accountant turns the run's entries into the epsilon the site reports and its
policy's ceiling is checked against, before the round trains.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from fedcycle.config import DPSettings
from fedcycle.errors import ConfigError
from fedcycle.files import atomic_write


def check_model(model: nn.Module, task: str) -> None:
    """Refuse, in one line, a model DP-SGD cannot train (BatchNorm mixes examples in a batch)."""
    from opacus.validators import ModuleValidator  # lazily: DP runs only

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        first = str(problems[0]).splitlines()[0]
        raise ConfigError(f"task={task!r}: differential privacy (dp.noise-multiplier or dp.site-clip-norm above 0) "
                          f"cannot take this model: {first} "
                          f"({len(problems)} problem(s)); set dp.fix-model=true to let Opacus replace those layers "
                          "(BatchNorm by GroupNorm), or use a model without them")


def fixed_model(model: nn.Module) -> nn.Module:
    """The model with the layers DP-SGD cannot train replaced (Opacus's validator), for server and sites alike."""
    from opacus.validators import ModuleValidator  # lazily: DP runs only

    return ModuleValidator.fix(model)


@dataclass
class PrivateTraining:
    """What a loop trains with under DP-SGD, and what the round spends."""

    model: nn.Module  # Opacus's GradSampleModule around the site's model (trained in place)
    optimizer: torch.optim.Optimizer  # the DPOptimizer around the site's optimizer
    loader: Any  # the DPDataLoader: Poisson sampling, same number of batches per epoch
    sample_rate: float

    def close(self) -> None:
        """Take Opacus's hooks off the site's model."""
        self.model._close()


def secret(device: torch.device) -> torch.Generator:
    """A generator seeded by the operating system, not by the run's seed: DP-SGD's noise and Poisson
    sample come from it, so that a coordinator who knows the seed cannot draw the same noise and
    take it off the update."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


class RankPoisson(torch.utils.data.Sampler[list[int]]):
    """DP-SGD's Poisson sampling on one rank of a site on several processes: the rank owns every
    `world`-th example, and each step each of them joins its batch with probability
    `sample_rate`, so each of the site's examples does, as on one process. Unlike Opacus's
    distributed sampler it yields an empty draw too: every rank takes the same steps."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int) -> None:
        self.owned = torch.arange(rank, n, world)
        self.steps = math.ceil(n / batch_size)
        self.sample_rate, self.batch_size, self.world = 1 / self.steps, batch_size, world
        self.generator = secret(torch.device("cpu"))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            drawn = torch.rand(len(self.owned), generator=self.generator) < self.sample_rate
            yield self.owned[drawn].tolist()


def rank_poisson_loader(data, batch_size: int, rank: int, world: int, num_workers: int = 0) -> DataLoader:
    """The batches one rank trains on under DP-SGD (`RankPoisson`), empty ones collated as Opacus does."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty  # lazily: DP runs only

    first = data[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                      dtypes=[dtype_safe(x) for x in first])
    return DataLoader(data, batch_sampler=RankPoisson(len(data), batch_size, rank, world), collate_fn=collate,
                      num_workers=num_workers)


def private_training(model: nn.Module, optimizer: torch.optim.Optimizer, loader, dp: DPSettings) -> PrivateTraining:
    """Opacus around a site's model, optimizer and DataLoader (its noise and Poisson sample from
    `secret` generators). On one rank of a site on several processes (a `rank_poisson_loader`),
    Opacus's own DDP: each rank clips its examples' gradients, the noise is added once (rank 0)
    to the ranks' sum, and the site's sample rate and steps are one process's, so its epsilon is."""
    from opacus import GradSampleModule  # lazily: DP runs only
    from opacus.data_loader import DPDataLoader
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    noise = {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm,
             "generator": secret(next(model.parameters()).device)}
    ranks = getattr(loader, "batch_sampler", None)
    if isinstance(ranks, RankPoisson):
        return PrivateTraining(GradSampleModule(DifferentiallyPrivateDistributedDataParallel(model)),
                               DistributedDPOptimizer(optimizer, expected_batch_size=ranks.batch_size / ranks.world, **noise),
                               loader, ranks.sample_rate)
    private_loader = DPDataLoader.from_data_loader(loader, generator=secret(torch.device("cpu")))
    return PrivateTraining(GradSampleModule(model), DPOptimizer(optimizer, expected_batch_size=loader.batch_size, **noise),
                           private_loader, 1 / len(loader))


def clip_update(trained: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
                clip_norm: float) -> dict[str, torch.Tensor]:
    """Site-level DP's clip at the site: the trained model's change to the received one, over
    every floating-point array together, scaled down to norm `clip_norm` if longer (integer
    counters are not part of the update and stay as trained)."""
    floats = [k for k, v in trained.items() if v.is_floating_point()]
    norm = float(torch.sqrt(sum(((trained[k].double() - received[k].double()) ** 2).sum() for k in floats))) if floats else 0.0
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (received[k] + (v - received[k]) * factor).to(v.dtype) if k in floats else v for k, v in trained.items()}


def site_noise(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Site-level DP's noise on the server, from a generator the operating system seeds."""
    return np.random.default_rng(int.from_bytes(os.urandom(8), "little")).normal(0.0, std, size=shape)


def epsilon(entries: list[dict[str, Any]], delta: float) -> float:
    """Opacus's RDP accountant over ledger entries (noise multiplier, sample rate, steps)."""
    from opacus.accountants import RDPAccountant  # lazily: DP runs only

    if not entries:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(e["noise-multiplier"], e["sample-rate"], e["steps"]) for e in entries]
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """The site's record of DP-SGD rounds, one JSON file it keeps (node config `privacy-ledger`,
    else under the data cache): every run's entries, so a resumed run (the same run key)
    continues where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_site(cls, node_config: dict[str, Any], cache: str, site: str) -> "PrivacyLedger":
        if node_config.get("privacy-ledger"):
            return cls(Path(str(node_config["privacy-ledger"])).expanduser())
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", site).strip("-") or "site"
        return cls(Path(cache or "~/.cache/fedcycle").expanduser() / "privacy-ledger" / f"{name}.json")

    def entries(self, run: str) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            raise ConfigError(f"privacy ledger {self.path.name!r} cannot be read; the site trains no DP round "
                              "until it can (it would lose what it has spent)") from None
        return [e for e in data.get("entries", []) if e.get("run") == run]

    def add(self, entry: dict[str, Any]) -> None:
        """Append one round's entry, the ledger written whole and on disk (never half a ledger,
        never a spent round lost to a crash)."""
        data = json.loads(self.path.read_text()) if self.path.is_file() else {"entries": []}
        data["entries"].append(entry)
        atomic_write(self.path, json.dumps(data, indent=1).encode())
