"""The site trainer: a plain PyTorch loop that knows nothing of Flower.

The ClientApp calls it with the global model, the site's data and the round's settings; the
centralized baseline calls it with the pooled data. The learning rate is set every optimizer
step by the server's schedule (`fedcycle.schedules`), as a `torch.optim.lr_scheduler` object.
A task that brings its own loop (`train(model, loader, optimizer, scheduler, epochs, device)`)
gets the same optimizer and scheduler; either way every optimizer step's learning rate is
recorded, and a loop that steps the optimizer without the scheduler is refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import Subset

from fedcycle.batches import batch_size_of, batches, describe, detach, to_device
from fedcycle.config import DPSettings, RunSettings
from fedcycle.errors import TaskError
from fedcycle.privacy import private_training
from fedcycle.schedules import LRSchedule
from fedcycle.tasks import Task


# What fails in a task's code but is the machine's, not the code's: it may pass, so the round goes on
PASSING = (MemoryError, OSError, torch.OutOfMemoryError)


def task_fault(err: BaseException) -> bool:
    """Whether the task's own code failed (a TaskError not caused by memory or a file, which
    would fail the same way on every try)."""
    return isinstance(err, TaskError) and not isinstance(err.__cause__, PASSING)


@dataclass(frozen=True)
class TrainConfig:
    """One call's training: the round's values (`fedcycle.wire.RoundConfig`, or the centralized
    baseline's), and the site's seed and workers. The defaults are the run config's (RunSettings)."""

    schedule: LRSchedule
    epochs: int
    server_round: int = 1
    epochs_before: int = 0  # local epochs this site's schedule has already run (for epoch/step cycles)
    batch_size: int = RunSettings.batch_size
    optimizer: str = RunSettings.optimizer
    momentum: float = RunSettings.momentum
    weight_decay: float = RunSettings.weight_decay
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2
    mixed_precision: bool = RunSettings.mixed_precision  # bfloat16 autocast, CUDA only
    seed: int = 0
    num_workers: int = 0  # DataLoader workers (the in-memory fast path needs none)
    dp: DPSettings = DPSettings()  # DP-SGD (fedcycle.privacy) when dp.noise-multiplier > 0


@dataclass(frozen=True)
class TrainResult:
    loss: float
    metrics: dict[str, float]
    num_examples: int
    seconds: float
    steps: int
    lr_first: float
    lr_peak: float
    lr_last: float
    lrs: list[float] = field(default_factory=list, repr=False)  # every optimizer step's learning rate
    sample_rate: float | None = None  # DP-SGD's Poisson sampling rate (None: trained without DP)
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


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """`optimizer` in the run config: SGD with momentum (the default) or AdamW; the schedule drives either."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.schedule.lr_max, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.schedule.lr_max, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer={cfg.optimizer!r} is unknown; choose one of ['adamw', 'sgd']")


class StepLog:
    """Every optimizer step's learning rate (read as the step is taken), and how often the
    scheduler stepped: what the reply reports, and how a loop that ignores the schedule is found.
    A step the loop skips (GradScaler on inf gradients) counts as one the scheduler took alone,
    and is refused like one: fedcycle's mixed precision is bfloat16, which needs no scaler."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        self.lrs: list[float] = []
        self.scheduler, self.scheduler_start = scheduler, scheduler.last_epoch
        self.handle = optimizer.register_step_pre_hook(lambda opt, *_: self.lrs.append(opt.param_groups[0]["lr"]))

    def close(self, task: Task) -> None:
        self.handle.remove()
        scheduler_steps = self.scheduler.last_epoch - self.scheduler_start
        if scheduler_steps != len(self.lrs):
            raise TaskError(
                f"task={task.name!r}: train() stepped the optimizer {len(self.lrs)} times and the scheduler "
                f"{scheduler_steps} times; the server's schedule governs every step: call scheduler.step() "
                "once after each optimizer.step()"
            )


def train(task: Task, model: nn.Module, data, cfg: TrainConfig, device: torch.device,
          epoch_end: Callable[[int], None] | None = None, loader: Iterable | None = None) -> TrainResult:
    """Train `model` in place for `cfg.epochs` epochs over `data`, by the task's own loop if it
    has one, else by fedcycle's, with one optimizer and one scheduler throughout.
    `epoch_end(epoch)` is called after each epoch (the centralized baseline evaluates there): a
    task's own loop then runs one epoch a call, else all its epochs in one call. `loader`: the
    batches to train on, where the caller cuts them (one process's share of a site's batches,
    `fedcycle.distributed`); by default all of `data`'s, shuffled by the seed."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    if loader is None:
        generator = torch.Generator().manual_seed(cfg.seed)
        loader = batches(data, cfg.batch_size, device, shuffle=True, generator=generator,
                         num_workers=cfg.num_workers, plain=cfg.dp.enabled)
    spe = len(loader)
    optimizer = make_optimizer(cfg, model.parameters())
    # under DP-SGD the loop gets Opacus's model, optimizer and loader; the schedule drives its optimizer
    private = private_training(model, optimizer, loader, cfg.dp) if cfg.dp.enabled else None
    step_with = private.optimizer if private else optimizer
    start, cycle, before = cfg.schedule.site_clock(spe, cfg.epochs, cfg.server_round, cfg.epochs_before)
    scheduler = cfg.schedule.build(step_with, cycle, start, steps_before=before)
    log = StepLog(optimizer, scheduler)
    net, feed = (private.model, private.loader) if private else (model, loader)
    if task.own_train is not None:
        if cfg.proximal_mu > 0:
            raise TaskError(
                f"task={task.name!r} brings its own train(), which cannot add FedProx's proximal term "
                f"(proximal-mu={cfg.proximal_mu}); choose another strategy, or drop the task's train()"
            )
        # a caller that watches epochs (the centralized baseline) gets the loop one epoch at a
        # time, with the same optimizer and scheduler throughout
        calls = [(epoch, 1) for epoch in range(cfg.epochs)] if epoch_end is not None else [(cfg.epochs - 1, cfg.epochs)]
        for epoch, epochs in calls:
            net.train()
            returned = task._call("train", task.own_train, net, feed, step_with, scheduler, epochs, device)
            if epoch_end is not None:
                epoch_end(epoch)
        loss, metrics = own_loop_result(task, returned)
    else:
        loss, metrics = fit(task, net, feed, step_with, scheduler, cfg, device, epoch_end)
    if private:
        private.close()
    log.close(task)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    lrs = log.lrs
    return TrainResult(
        loss=loss,
        metrics=metrics,
        num_examples=len(data),
        seconds=time.perf_counter() - started,
        steps=len(lrs),
        lr_first=lrs[0] if lrs else float("nan"),
        lr_peak=max(lrs) if lrs else float("nan"),
        lr_last=lrs[-1] if lrs else float("nan"),
        lrs=lrs,
        sample_rate=private.sample_rate if private else None,
    )


def fit(task: Task, model: nn.Module, loader, optimizer, scheduler, cfg: TrainConfig,
        device: torch.device, epoch_end: Callable[[int], None] | None = None) -> tuple[float, dict[str, float]]:
    """fedcycle's own loop: the task's loss, the schedule stepped after every optimizer step;
    returns the mean loss and metrics over the examples seen."""
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    autocast = cfg.mixed_precision and device.type == "cuda"
    loss_sum = torch.zeros((), device=device)
    tracker = task.metric_tracker(device)
    seen = 0
    for epoch in range(cfg.epochs):
        for inputs, targets in loader:
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                outputs = model(inputs)
                loss = task._call("loss", task.loss, outputs, targets)
            objective = loss
            if anchor is not None:
                prox = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                objective = loss + 0.5 * cfg.proximal_mu * prox
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            scheduler.step()
            n = batch_size_of(targets)
            if not n:  # DP-SGD's Poisson sampling may draw an empty batch: a step of noise, nothing to count
                continue
            with torch.no_grad():
                loss_sum += loss.detach() * n
                task._call("metrics", tracker.update, detach(outputs), targets)
            seen += n
        if epoch_end is not None:
            epoch_end(epoch)
            model.train()
    return float(loss_sum) / max(seen, 1), {k: float(v) for k, v in tracker.compute().items()}


def own_loop_result(task: Task, returned: Any) -> tuple[float, dict[str, float]]:
    """The loss a task's own train() returned, and the rest of what it returned (the task's
    metrics, if it tracks any: `own_loop_metrics` checks them)."""
    if not isinstance(returned, dict) or "loss" not in returned:
        got = f"a dict with keys {sorted(returned)}" if isinstance(returned, dict) else type(returned).__name__
        raise TaskError(
            f"task={task.name!r}: train() returned {got}; it returns a dict with 'loss' (the mean training "
            "loss), and, if the loop tracks them, any of the task's metrics"
        )
    return _number(task, "loss", returned["loss"]), {k: v for k, v in returned.items() if k != "loss"}


def own_loop_metrics(task: Task, returned: dict[str, Any], names: list[str]) -> dict[str, float]:
    """The task's metrics among what its own train() returned besides the loss. A loop that tracks
    only its loss reports no training metrics; a key that is not one of the task's is refused
    (a misspelt metric would otherwise vanish)."""
    unknown = sorted(set(returned) - set(names))
    if unknown:
        raise TaskError(f"task={task.name!r}: train() returned {unknown} besides the loss, which are not the task's "
                        f"metrics {names}; return 'loss' and any of those")
    return {name: _number(task, name, returned[name]) for name in names if name in returned}


def _number(task: Task, key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one number
        raise TaskError(f"task={task.name!r}: train() returned {key}={describe(value)}; it must be a number") from None


# A rehearsal trains this many batches of a site's own train() on a copy of the model, at rates
# small enough that a loop stable at any run's rates is stable there (a NaN then is the loop's).
REHEARSAL_BATCHES = 2
REHEARSAL_SCHEDULE = LRSchedule(lr_min=1e-5, lr_max=1e-4)


def rehearse(task: Task, model: nn.Module, data, batch_size: int, device: torch.device,
             metric_names: list[str], dp: DPSettings = DPSettings()) -> list[str]:
    """Run a task's own train() for a couple of batches on `model` (a copy the caller throws
    away) under a cyclical schedule, and check what only training shows: the scheduler stepped
    with every optimizer step, at least one step, a finite loss, keys that are the task's.
    The names of the metrics its loop reports (fedcycle's own loop: all of them). Pre-flight
    runs it, so a loop's mistake stops the run before round 1, not in it; under DP-SGD (`dp`)
    with Opacus's model, optimizer and loader, as the rounds run it (nothing leaves the site)."""
    if task.own_train is None:
        return list(metric_names)
    sample = Subset(data, range(min(len(data), REHEARSAL_BATCHES * batch_size)))
    result = train(task, model, sample, TrainConfig(REHEARSAL_SCHEDULE, epochs=1, batch_size=batch_size, dp=dp), device)
    if not math.isfinite(result.loss):
        raise TaskError(f"task={task.name!r}: train() returned loss={result.loss} after {result.steps} step(s) at "
                        f"a rate of at most {REHEARSAL_SCHEDULE.lr_max}; the loss must be a finite number")
    if result.steps == 0:
        raise TaskError(f"task={task.name!r}: train() took no optimizer step over {len(sample)} examples; "
                        "it must call optimizer.step() (and then scheduler.step()) for its batches")
    return list(own_loop_metrics(task, result.metrics, metric_names))


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data, device: torch.device, batch_size: int = 256,
             num_workers: int = 0) -> tuple[float, dict[str, float]]:
    """(mean loss, metrics) of `model` on `data`: the loss a mean over examples, the metrics the
    task's (means over examples, or computed over the whole split)."""
    model.to(device).eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    tracker = task.metric_tracker(device)
    seen = 0
    for inputs, targets in batches(data, batch_size, device, shuffle=False, num_workers=num_workers):
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        outputs = model(inputs)
        outputs = outputs.float() if isinstance(outputs, torch.Tensor) else outputs
        n = batch_size_of(targets)
        loss_sum += task._call("loss", task.loss, outputs, targets).double() * n
        task._call("metrics", tracker.update, outputs, targets)
        seen += n
    return float(loss_sum) / max(seen, 1), {k: float(v) for k, v in tracker.compute().items()}
