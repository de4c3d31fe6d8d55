"""The site trainer: a plain PyTorch loop that knows nothing of Flower.

The ClientApp calls it with the global model and the round's settings; the centralized
baseline calls it with the pooled data. The learning rate is set every optimizer step by
the server's schedule (`fedcycle.schedules`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcycle.datasets import ImageData
from fedcycle.schedules import LRSchedule


@dataclass(frozen=True)
class TrainConfig:
    schedule: LRSchedule
    epochs: int
    server_round: int = 1
    epochs_before: int = 0  # local epochs this site's schedule has already run (for epoch/step cycles)
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2
    mixed_precision: bool = False  # bfloat16 autocast, CUDA only
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    loss: float
    accuracy: float
    num_examples: int
    seconds: float
    steps: int
    lr_first: float
    lr_peak: float
    lr_last: float


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: the first CUDA device if there is one, else the CPU. Refuses a missing GPU."""
    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device={requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ValueError(f"device={requested!r} is not available: this machine has {count} CUDA device(s)")
    return device


class Batches:
    """Mini-batches from uint8 images held on the device, normalized on the fly."""

    def __init__(self, data: ImageData, device: torch.device, mean: tuple, std: tuple) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
        self.labels = torch.from_numpy(data.labels).to(device)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape) * 255
        self.std = torch.tensor(std, device=device).view(shape) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def iterate(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple]:
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = (self.images[idx].float() - self.mean) / self.std
            yield x, self.labels[idx]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))


def train(
    model: nn.Module, data: ImageData, cfg: TrainConfig, device: torch.device, mean: tuple, std: tuple
) -> TrainResult:
    """Train `model` in place for `cfg.epochs` epochs over `data`."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    batches = Batches(data, device, mean, std)
    spe = steps_per_epoch(len(batches), cfg.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.schedule.lr_max, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = cfg.schedule.build(
        optimizer,
        cfg.schedule.cycle_steps(spe, cfg.epochs),
        cfg.schedule.start_step(spe, cfg.epochs, cfg.server_round, cfg.epochs_before),
    )
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    autocast = cfg.mixed_precision and device.type == "cuda"

    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, steps, lrs = 0, 0, []
    for _epoch in range(cfg.epochs):
        for x, y in batches.iterate(cfg.batch_size, generator):
            lrs.append(optimizer.param_groups[0]["lr"])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            objective = loss
            if anchor is not None:
                prox = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                objective = loss + 0.5 * cfg.proximal_mu * prox
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(
        loss=float(loss_sum) / max(seen, 1),
        accuracy=float(correct) / max(seen, 1),
        num_examples=len(batches),
        seconds=time.perf_counter() - started,
        steps=steps,
        lr_first=lrs[0] if lrs else float("nan"),
        lr_peak=max(lrs) if lrs else float("nan"),
        lr_last=lrs[-1] if lrs else float("nan"),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ImageData, device: torch.device, mean: tuple, std: tuple, batch_size: int = 1024
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on `data`."""
    model.to(device).eval()
    batches = Batches(data, device, mean, std)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches.iterate(batch_size):
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    n = max(len(batches), 1)
    return float(loss_sum) / n, float(correct) / n
