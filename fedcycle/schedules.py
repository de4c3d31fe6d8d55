"""Learning-rate schedules that the server sets and every site follows.

The server describes a schedule with a few plain numbers (`LRSchedule`), sends them in
each round's train config, and the site turns them into one of PyTorch's own
`torch.optim.lr_scheduler` objects, stepped once per optimizer step. The paper's
schedules are Smith's cyclical learning rates (`CyclicLR`: triangular, triangular2,
exp_range) and SGDR (`CosineAnnealingWarmRestarts`).

Where a cycle sits in time is set by `cycle_unit` and `cycle_length`:
- `round`: one cycle spans `cycle_length` rounds of local training (default 1: every
  round trains one whole cycle, so the server averages end-of-cycle snapshots);
- `epochs`: one cycle spans `cycle_length` local epochs;
- `steps`: one cycle spans `cycle_length` optimizer steps.
The schedule runs on across rounds: a site starts round r where its cycle stands (with
cycles of rounds, at the round's place in its cycle, also when local epochs grow), and
exp_range's decay counts the steps it actually trained before. Every schedule's rate is a
closed-form function of the step, so a site (and a resumed run) sets its scheduler there at
once, in constant time.

Across rounds the server may also move the schedule's peak (`Envelope`): a warm-up over the
first rounds, and a decay of the peak from cycle to cycle (exponential, or a cosine over the
whole run). The server applies it before it sends a round's `lr-max`, so a site sees plain
numbers, and a resumed run sends exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LRScheduler,
)

CYCLE_UNITS = ("round", "epochs", "steps")
ENVELOPES = ("flat", "exponential", "cosine")


Builder = Callable[[torch.optim.Optimizer, "LRSchedule", int, int], LRScheduler]


def _constant(opt: torch.optim.Optimizer, s: "LRSchedule", cycle_steps: int, decay_lag: int) -> LRScheduler:
    return ConstantLR(opt, factor=1.0, total_iters=0)


def _cyclic(mode: str) -> Builder:
    def build(opt: torch.optim.Optimizer, s: "LRSchedule", cycle_steps: int, decay_lag: int) -> LRScheduler:
        up = max(1, math.floor(cycle_steps / 2))  # a 1-step cycle: up 1, down 0, period 1
        # exp_range decays with the steps a site has trained, which lag the cycle's clock when
        # local epochs grow (the clock places a round-long cycle; see LRSchedule.start_step)
        decay = {"scale_fn": lambda step: s.gamma ** (step - decay_lag), "scale_mode": "iterations"} if mode == "exp_range" else {}
        return CyclicLR(
            opt,
            base_lr=s.lr_min,
            max_lr=s.lr_max,
            step_size_up=up,
            step_size_down=cycle_steps - up,
            mode=mode,
            gamma=s.gamma,
            cycle_momentum=False,
            **decay,
        )

    return build


def _cosine(opt: torch.optim.Optimizer, s: "LRSchedule", cycle_steps: int, decay_lag: int) -> LRScheduler:
    return CosineAnnealingWarmRestarts(opt, T_0=cycle_steps, eta_min=s.lr_min)


# name -> builder(optimizer, schedule, steps per cycle, decay lag). Adding a schedule is one entry.
SCHEDULES: dict[str, Builder] = {
    "constant": _constant,
    "triangular": _cyclic("triangular"),
    "triangular2": _cyclic("triangular2"),
    "exp_range": _cyclic("exp_range"),
    "cosine": _cosine,
}


# LRSchedule field -> its key in the run config and in every round's train config
WIRE_KEYS = {
    "name": "lr-schedule",
    "lr_min": "lr-min",
    "lr_max": "lr-max",
    "cycle_unit": "lr-cycle-unit",
    "cycle_length": "lr-cycle-length",
    "gamma": "lr-gamma",
}


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule as the server sends it (plain numbers only)."""

    name: str = "triangular"
    lr_min: float = 0.005
    lr_max: float = 0.05
    cycle_unit: str = "round"
    cycle_length: float = 1.0
    gamma: float = 0.999

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(
                f"lr-schedule={self.name!r} is unknown; choose one of {sorted(SCHEDULES)}"
            )
        if not (self.lr_max > 0 and math.isfinite(self.lr_max)):
            raise ValueError(f"lr-max={self.lr_max} must be a positive number")
        if not 0 <= self.lr_min <= self.lr_max:
            raise ValueError(
                f"lr-min={self.lr_min} must be between 0 and lr-max={self.lr_max}"
            )
        if self.cycle_unit not in CYCLE_UNITS:
            raise ValueError(
                f"lr-cycle-unit={self.cycle_unit!r} is unknown; choose one of {list(CYCLE_UNITS)}"
            )
        if not self.cycle_length > 0:
            raise ValueError(f"lr-cycle-length={self.cycle_length} must be above 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"lr-gamma={self.gamma} must be in (0, 1]")

    def to_config(self) -> dict[str, float | str]:
        """The schedule under the run config's own key names, for a Flower ConfigRecord."""
        return {wire: getattr(self, field) for field, wire in WIRE_KEYS.items()}

    @classmethod
    def from_config(cls, config: dict) -> "LRSchedule":
        return cls(**{field: config[wire] for field, wire in WIRE_KEYS.items() if wire in config})

    def cycle_steps(self, steps_per_epoch: int, epochs_this_round: int) -> int:
        """Optimizer steps in one cycle, for a site with this many steps per epoch."""
        if self.cycle_unit == "round":
            steps = self.cycle_length * epochs_this_round * steps_per_epoch
        elif self.cycle_unit == "epochs":
            steps = self.cycle_length * steps_per_epoch
        else:
            steps = self.cycle_length
        return max(1, round(steps))

    def start_step(
        self, steps_per_epoch: int, epochs_this_round: int, server_round: int, epochs_before: int
    ) -> int:
        """The step at which round `server_round` begins on this site's cycle clock. With cycles
        of rounds, the clock counts rounds of this round's length, so each round starts at its
        place in its cycle (and triangular2 halves per cycle) even when local epochs grow; the
        steps actually trained before (`epochs_before` x steps per epoch) drive exp_range's decay."""
        if self.cycle_unit == "round":
            return (server_round - 1) * epochs_this_round * steps_per_epoch
        return epochs_before * steps_per_epoch

    def site_clock(self, steps_per_epoch: int, epochs_this_round: int, server_round: int,
                   epochs_before: int) -> tuple[int, int, int]:
        """Where a site's schedule stands in a round: (its start step, its cycle's length in steps,
        the optimizer steps it trained before). The trainer builds its scheduler there; the
        server's screen and the run's plot compute the same rates from it in closed form."""
        return (self.start_step(steps_per_epoch, epochs_this_round, server_round, epochs_before),
                self.cycle_steps(steps_per_epoch, epochs_this_round), epochs_before * steps_per_epoch)

    def build(
        self, optimizer: torch.optim.Optimizer, cycle_steps: int, start_step: int = 0, steps_before: int | None = None
    ) -> LRScheduler:
        """A PyTorch scheduler at `start_step` of its clock (`steps_before`: the optimizer steps
        the site actually trained before, for exp_range's decay; default `start_step`); call
        `.step()` after each batch. Every schedule's rate is a closed-form function of the step,
        so the scheduler is set there at once, not stepped there."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr_max if self.name in ("constant", "cosine") else self.lr_min
            group.pop("initial_lr", None)
        lag = start_step - (start_step if steps_before is None else steps_before)
        scheduler = SCHEDULES[self.name](optimizer, self, cycle_steps, lag)
        if start_step:
            with warnings.catch_warnings():  # PyTorch warns when a scheduler steps before the optimizer
                warnings.simplefilter("ignore", UserWarning)
                if isinstance(scheduler, CosineAnnealingWarmRestarts):
                    scheduler.step(start_step)
                else:
                    scheduler.last_epoch = start_step - 1
                    scheduler.step()
        return scheduler

    def lr_at(self, step: int, cycle_steps: int, steps_before: int | None = None) -> float:
        """The learning rate at a step (`steps_before`: the steps trained before it, for
        exp_range's decay), computed by the same PyTorch scheduler, in constant time."""
        return self.lrs(step, 1, cycle_steps, steps_before)[0]

    def lrs(self, start_step: int, steps: int, cycle_steps: int, steps_before: int | None = None) -> list[float]:
        """The learning rates of `steps` optimizer steps from `start_step`, as a site's scheduler sets them."""
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=self.lr_max)
        scheduler = self.build(opt, cycle_steps, start_step=start_step, steps_before=steps_before)
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                out.append(opt.param_groups[0]["lr"])
                scheduler.step()
        return out


@dataclass(frozen=True)
class Envelope:
    """How the server moves a schedule's peak learning rate from round to round.

    The envelope's clock is the cycle when cycles span rounds (`lr-cycle-unit = "round"`: the
    peak changes only between cycles), else the round. `exponential` multiplies the peak by
    `decay` per cycle; `cosine` takes it from lr-max down towards lr-min over the run's cycles;
    a warm-up scales it by r/(warmup_rounds+1) in rounds r <= warmup_rounds. The peak never
    falls below lr-min."""

    shape: str = "flat"
    decay: float = 1.0
    warmup_rounds: int = 0

    def __post_init__(self) -> None:
        if self.shape not in ENVELOPES:
            raise ValueError(f"lr-envelope={self.shape!r} is unknown; choose one of {list(ENVELOPES)}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"lr-decay={self.decay} must be in (0, 1]")
        if self.warmup_rounds < 0:
            raise ValueError(f"lr-warmup-rounds={self.warmup_rounds} must be at least 0")

    def factor(self, schedule: LRSchedule, server_round: int, num_rounds: int) -> float:
        """The fraction of (lr-max - lr-min) that round `server_round` peaks at."""
        if schedule.cycle_unit == "round":
            tick = math.floor((server_round - 1) / schedule.cycle_length)
            ticks = math.ceil(num_rounds / schedule.cycle_length)
        else:
            tick, ticks = server_round - 1, num_rounds
        if self.shape == "exponential":
            factor = self.decay**tick
        elif self.shape == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * tick / max(ticks, 1)))
        else:
            factor = 1.0
        if server_round <= self.warmup_rounds:
            factor *= server_round / (self.warmup_rounds + 1)
        return factor

    def apply(self, schedule: LRSchedule, server_round: int, num_rounds: int) -> LRSchedule:
        """The schedule a site follows in round `server_round`: the same shape, its peak moved."""
        factor = self.factor(schedule, server_round, num_rounds)
        if factor == 1.0:
            return schedule
        return replace(schedule, lr_max=schedule.lr_min + factor * (schedule.lr_max - schedule.lr_min))


def local_epochs_for_round(base: int, growth: float, maximum: int, server_round: int) -> int:
    """Local epochs in a round: `base`, plus `growth` more per round, capped at `maximum` (0 = no cap)."""
    epochs = base + math.floor(growth * (server_round - 1))
    return min(epochs, maximum) if maximum > 0 else epochs
