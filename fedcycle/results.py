"""A run's files under `<results-dir>/<run-name>/`, written so that a crash loses nothing.

- `config.json`: the run config and settings as the run used them, seed, versions and machine;
- `metrics.jsonl`: one JSON object per round (round 0 = the initial model), appended and
  flushed to disk as each round ends;
- `global-final.safetensors` (the latest global model, replaced each round),
  `global-best.safetensors` and, with `swa-start`, `global-swa.safetensors`;
- `<metric>.png` (`accuracy.png` for classification): the task's primary metric, the loss and
  the learning rate at every optimizer step, against rounds (`draw_run`), drawn again after each
  round from metrics.jsonl alone;
- `run.lock`: held (an OS file lock) by the ServerApp process writing the folder, and released
  when that process ends however it ends: a second run never writes into a folder in use.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save

from fedcycle.config import TASK_TABLES, RunSettings
from fedcycle.errors import ConfigError
from fedcycle.files import atomic_write
from fedcycle.strategies import STRATEGIES
from fedcycle.tasks import BUILTIN
from fedcycle.tasks.partition import PARTITIONERS
from fedcycle.metrics_lines import finite_number, read_metrics, round_lrs, train_loss

PACKAGES = ("flwr", "torch", "torchvision", "numpy", "ray", "safetensors")


def resolve_run_dir(settings: RunSettings, run_id: int, what: str) -> Path:
    """`results-dir` (relative to this process's working directory) / `run-name`.

    An empty run-name becomes `<what>-<strategy>-<lr-schedule>-<time>-run<id>` (`what`: what the
    task trains on, `Task.label`); a name whose folder already holds a run gets a numeric
    suffix, so no run is overwritten.
    """
    name = settings.run_name or (
        f"{what.replace(':', '.')}-{settings.strategy.replace(':', '.')}-{settings.lr_schedule}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
    )
    base = Path(settings.results_dir).expanduser().resolve() / name
    path, n = base, 1
    while (path / "metrics.jsonl").exists() or not claim(path):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


LOCK = "run.lock"
_held: dict[Path, Any] = {}  # the run folders this process holds, their lock files kept open


def claim(path: Path) -> bool:
    """Take the run folder's lock for this process (held until it ends); False if another
    process holds it. A lock, not a marker file: a run that crashes leaves nothing to clean up."""
    path = path.resolve()
    if path in _held:
        return True
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - kept open: the lock lives as long as it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[path] = handle
    return True


def take_for_resume(path: Path) -> Path:
    """The folder a resumed run continues, its lock taken; a folder another run writes is refused."""
    if not claim(path):
        raise ConfigError(f"resume-from={str(path)!r} is in use by another run ({LOCK} is held: "
                          f"{(path / LOCK).read_text().strip() or 'a process'}); resume it when that run has ended")
    return path


def unused_tables(settings: RunSettings) -> frozenset[str]:
    """The option tables of the built-in tasks, partitioners and strategies a run does not use:
    Flower gives every run their declared defaults, which say nothing of this run (a tabular
    task's run is no Fashion-MNIST run). A table no built-in owns (a task's own) is used."""
    tables = {TASK_TABLES.get(task, task) for task in BUILTIN} | set(PARTITIONERS) | set(STRATEGIES)
    return frozenset(tables - {settings.task_table, settings.partitioner, settings.strategy})


def used_run_config(settings: RunSettings, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config less the keys of the tables the run does not use."""
    unused = unused_tables(settings)
    return {k: v for k, v in run_config.items() if "." not in k or k.split(".", 1)[0] not in unused}


def used_settings(settings: RunSettings) -> dict[str, Any]:
    """The settings as config.json holds them: what the run used, less the unused tables' options."""
    unused = unused_tables(settings)
    return {**settings.as_dict(), "options": {t: dict(o) for t, o in settings.options.items() if t not in unused}}


def machine() -> dict[str, Any]:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class RunResults:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics_path = path / "metrics.jsonl"

    def write_config(self, settings: RunSettings, run_config: dict, **extra: Any) -> None:
        """config.json: the run config and settings as the run used them, seed, versions, machine, `extra`."""
        record = {
            "run_config": used_run_config(settings, run_config),
            "settings": used_settings(settings),
            "seed": settings.seed,
            "versions": versions(),
            "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        atomic_write(self.path / "config.json", json.dumps(record, indent=2, default=str).encode())

    def read_config(self) -> dict[str, Any]:
        """config.json as written, or {} when there is none that reads."""
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return {}

    def append_round(self, line: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json_line(line))
            f.flush()
            os.fsync(f.fileno())

    def rewrite_rounds(self, lines: list[dict[str, Any]]) -> None:
        """metrics.jsonl holding exactly these lines (a resumed run's rounds so far)."""
        data = "".join(json_line(line) for line in lines)
        atomic_write(self.metrics_path, data.encode())

    def save_model(self, name: str, state_dict: dict[str, torch.Tensor]) -> Path:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        return atomic_write(self.path / f"{name}.safetensors", save(tensors))

    def plot(self, metric: str | None = None) -> Path:
        """`<metric>.png` (`metric`: the lines' primary metric by default), drawn from metrics.jsonl
        alone, so that it can be drawn again from the file at any time (`draw_run`)."""
        lines = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        metric = metric or next((line["primary_metric"] for line in lines if line.get("primary_metric")), "accuracy")
        return save_figure(draw_run(lines, metric, self.path.name), self.path / f"{metric}.png")


def load_model(path: str | Path) -> dict[str, torch.Tensor]:
    """A saved global model, as a state_dict (safetensors: no code is unpickled)."""
    return load_file(str(path))


# metrics_source -> how the plot names the global model's values: "test" only for a test split.
EVALUATED_ON = {"server-test": ("test ", ""), "sites-weighted": ("validation ", "\n(sites' held-out data)")}
# The learning-rate panel's points over the whole run (at least LR_ROUND_POINTS a round): every
# optimizer step of a short run, a curve as fine as the figure's pixels for a long one.
LR_POINTS, LR_ROUND_POINTS = 4000, 16


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported lazily: the server's alone draws."""
    import matplotlib

    matplotlib.use("Agg")  # chosen before pyplot is imported: no display needed
    import matplotlib.pyplot as plt

    return plt


def draw_run(lines: list[dict[str, Any]], metric: str, name: str):
    """A run's metrics.jsonl lines as one figure on one round axis, with integer ticks: the primary
    metric per round (the global model, and the server's mean of cycle ends if kept); the loss
    per round (the global model's, and the sites' example-weighted mean training loss); the learning
    rate at every optimizer step as the sites ran the server's schedule (round r's steps between
    r - 1 and r, so each round's cycle shows within it). "test" names the server's test split
    only (EVALUATED_ON). A failed round is a red line and the title says where and why the run failed."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(7, 8), dpi=110,
                                              gridspec_kw={"height_ratios": (3, 2, 2)})
    source = next((line["metrics_source"] for line in reversed(lines) if line.get("metrics_source")), None)
    evaluated, where = EVALUATED_ON.get(source, ("", ""))
    xs: list[float] = []

    def draw(ax, points: list[tuple[float, Any]], label: str, **style: Any) -> None:
        points = [(x, y) for x, y in points if finite_number(y)]
        if points:
            ax.plot(*zip(*points), label=label, **style)
            xs.extend(x for x, _ in points)

    draw(top, [(line["round"], line.get(metric)) for line in lines], "global model", marker="o")
    draw(top, [(line["round"], (line.get("swa") or {}).get(metric)) for line in lines],
         "mean of cycle-end models (swa)", marker="s", linestyle="--")
    top.set_ylabel(f"{evaluated}{metric}{where}")
    draw(middle, [(line["round"], line.get("loss")) for line in lines], f"{evaluated}loss (global model)", marker="o")
    draw(middle, [(line["round"], train_loss(line)) for line in lines], "train loss (sites' mean)", marker="^")
    middle.set_ylabel("loss")

    trained = [line for line in lines if line.get("train_config")]
    per_round = max(LR_ROUND_POINTS, LR_POINTS // max(len(trained), 1))
    curves = [lrs for lrs in (round_lrs(line, per_round) for line in trained) if lrs is not None]
    schedule = trained[-1]["train_config"].get("lr-schedule", "the schedule") if trained else ""
    draw(bottom, [(x, lr) for lrs in curves for x, lr in zip(lrs.rounds(), lrs.lrs)],
         f"{schedule}, every optimizer step", linewidth=1)
    if not curves:
        bottom.text(0.5, 0.5, "no round trained yet", transform=bottom.transAxes, ha="center", color="gray")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("round")

    failed = [line for line in lines if line.get("failed")]
    for line in failed:
        for ax in (top, middle, bottom):
            ax.axvline(line["round"], color="red", linestyle="--", linewidth=1.5)
        xs.append(line["round"])
    if failed:
        fig.suptitle(f"{name}: failed at round {failed[-1]['round']}\n{shortened(str(failed[-1]['failed']))}",
                     color="red", fontsize=9)
    else:
        fig.suptitle(name if lines else f"{name}: no round yet", fontsize=10)

    low, high = (min(xs), max(xs)) if xs else (0, 1)
    bottom.set_xlim(low - 0.3, max(high, low + 1) + 0.3)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds: no 0.5 or 1.5
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def shortened(reason: str, limit: int = 100) -> str:
    """A failure's reason for a title: its first line, at most `limit` characters."""
    first = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
    return first if len(first) <= limit else first[:limit - 1] + "…"


def save_figure(fig, out: Path) -> Path:
    """The figure as a PNG, whole or not at all; the figure is closed."""
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    pyplot().close(fig)
    return out


def json_line(line: dict[str, Any]) -> str:
    """One line of strict JSON: a NaN or Inf (a diverged loss) is written as null, which every
    JSON reader accepts; Python's json would write a bare NaN, which strict readers refuse."""
    return json.dumps(_finite(line), default=jsonable, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a NumPy or torch scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
