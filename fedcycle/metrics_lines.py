"""A run's metrics.jsonl lines: read, and what a line says beyond its own numbers (the sites'
training loss, the learning rate at every optimizer step of its round). The run's plot
(fedcycle.results) and the trackers (fedcycle.tracking) draw the same curves from here, from
the lines alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedcycle.wire import RoundConfig


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def finite_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a line's null, NaN or text is not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def train_loss(line: Mapping[str, Any]) -> float | None:
    """The round's training loss: the sites' train losses, each weighted by its examples (as the
    global model weighs them); None when no site reported one."""
    rows = [(s["train-loss"], s["num-examples"]) for s in line.get("sites") or []
            if finite_number(s.get("train-loss")) and finite_number(s.get("num-examples")) and s["num-examples"] > 0]
    total = sum(n for _, n in rows)
    return sum(loss * n for loss, n in rows) / total if total else None


@dataclass(frozen=True)
class RoundLRs:
    """A round's learning rates as a site ran the server's schedule."""

    server_round: int  # the line's round
    steps_before: int  # the optimizer steps the site's schedule counts before the round
    steps: int  # its optimizer steps in the round
    at: list[int]  # the round's steps (from 0) that `lrs` gives
    lrs: list[float]

    def global_steps(self) -> list[int]:
        """The steps as counted over the run: TensorBoard's and MLflow's x."""
        return [self.steps_before + j for j in self.at]

    def rounds(self) -> list[float]:
        """The steps in rounds, round r's from r - 1 on: the plot's x, where a round's cycle shows in it."""
        return [self.server_round - 1 + j / self.steps for j in self.at]


def round_lrs(line: Mapping[str, Any], points: int | None = None) -> RoundLRs | None:
    """The learning rate at each optimizer step of the line's round, from its `train_config` and
    the steps the sites reported, by the schedule's closed form (the sites need not send every
    step's rate). The site with the most steps stands for all: with cycles of rounds every site
    runs the same cycle in its own number of steps. `points`: at most this many steps, evenly
    spread with the first and the last among them (a plot's resolution); None: every step.
    None when the round trained nothing (round 0, a round no site finished)."""
    try:
        sent = RoundConfig.from_record(line.get("train_config") or {})
    except (KeyError, TypeError, ValueError):  # round 0, or a line without a schedule
        return None
    ran = [s for s in line.get("sites") or [] if isinstance(s.get("steps"), int) and s["steps"] > 0
           and isinstance(s.get("local-epochs"), int) and s["local-epochs"] > 0]
    if not ran:
        return None
    site = max(ran, key=lambda s: s["steps"])
    steps, epochs = site["steps"], site["local-epochs"]
    per_epoch, schedule = steps // epochs, sent.schedule
    # the site's clock, as its trainer set it (fedcycle.trainer.train)
    start, cycle, before = schedule.site_clock(per_epoch, epochs, sent.server_round, sent.epochs_before)
    at = list(range(steps)) if points is None or steps <= points else sorted(
        {round(i * (steps - 1) / (points - 1)) for i in range(points)})
    lrs = [schedule.lr_at(start + j, cycle, steps_before=before + j) for j in at]
    return RoundLRs(int(line["round"]), before, steps, at, lrs)
