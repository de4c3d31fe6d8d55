"""Server-side averaging of cycle ends: stochastic weight averaging (Izmailov et al. 2018) on
the server, as in FedAvg with a cyclical learning rate and SWA (Caldarola et al. 2022).

From round `swa-start` on, at the end of every cycle of the server's schedule (every round
when a cycle lasts a round or less), the global model joins a running mean. The sum is kept
in float64, so the mean is that of the models themselves, and is saved in each checkpoint,
so a resumed run continues the same mean. Integer buffers (BatchNorm's batch counters) are
taken from the newest global model. BatchNorm's running statistics are averaged like any
other float array, not recomputed: recomputing them needs a pass over training data, which
only the sites hold (`has_batchnorm` tells the report which case a model is).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedcycle.schedules import LRSchedule


class CycleAverage:
    """The running mean of the global models at the cycle ends from `start_round` on."""

    def __init__(self, start_round: int, schedule: LRSchedule) -> None:
        self.start_round, self.schedule = start_round, schedule
        self.total: dict[str, torch.Tensor] = {}  # float arrays' sum, float64
        self.rounds: list[int] = []  # the rounds whose global models are in the mean

    def cycle_ends_in(self, server_round: int) -> bool:
        """Whether a cycle of the schedule ends in round `server_round`."""
        if self.schedule.cycle_unit != "round":
            return True
        length = self.schedule.cycle_length
        return math.floor(server_round / length + 1e-9) > math.floor((server_round - 1) / length + 1e-9)

    def add(self, server_round: int, state: dict[str, torch.Tensor]) -> bool:
        """Take round `server_round`'s global model into the mean if that round ends a cycle
        at or after the start; returns whether it did."""
        if server_round < self.start_round or not self.cycle_ends_in(server_round):
            return False
        for key, value in state.items():
            if value.is_floating_point():
                value = value.detach().to("cpu", torch.float64)
                self.total[key] = value.clone() if not self.rounds else self.total[key] + value
        self.rounds.append(server_round)
        return True

    def model(self, latest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean as a state_dict in the model's dtypes; other arrays from `latest`."""
        n = len(self.rounds)
        return {k: (self.total[k] / n).to(v.dtype) if k in self.total else v for k, v in latest.items()}

    def restore(self, total: dict[str, torch.Tensor], rounds: list[int]) -> None:
        """Continue the mean a checkpoint holds."""
        self.total, self.rounds = {k: v.to(torch.float64) for k, v in total.items()}, list(rounds)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
