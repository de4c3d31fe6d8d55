"""A run's files under `<results-dir>/<run-name>/`, written so that a crash loses nothing.

- `config.json`: the full run config, seed, versions and machine;
- `metrics.jsonl`: one JSON object per round (round 0 = the initial model), appended and
  flushed to disk as each round ends;
- `global-final.safetensors` (the latest global model, replaced each round),
  `global-best.safetensors` and, with `swa-start`, `global-swa.safetensors`;
- `<metric>.png` (`accuracy.png` for classification): the task's primary metric per round;
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
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save

from fedcycle.config import RunSettings
from fedcycle.errors import ConfigError
from fedcycle.files import atomic_write

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
        record = {
            "run_config": dict(run_config),
            "settings": settings.as_dict(),
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

    def plot(self, metric: str = "accuracy") -> Path:
        """`<metric>.png`: the global model per round, and the server's mean of cycle ends if kept."""
        rounds = read_metrics(self.metrics_path)
        series = {"global model": rounds}
        averaged = [{"round": r["round"], metric: r["swa"][metric]} for r in rounds if r.get("swa")]
        if averaged:
            series["mean of cycle-end models (swa)"] = averaged
        return plot_metric(series, self.path / f"{metric}.png", metric)


def load_model(path: str | Path) -> dict[str, torch.Tensor]:
    """A saved global model, as a state_dict (safetensors: no code is unpickled)."""
    return load_file(str(path))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metric(runs: dict[str, Iterable[dict]], out: Path, metric: str = "accuracy") -> Path:
    """`metric` (a key of each metrics.jsonl line) against the round, one line per run."""
    import matplotlib  # lazily: the server's plots; the Agg backend is chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, rounds in runs.items():
        rows = [r for r in rounds if r.get(metric) is not None]
        ax.plot([r["round"] for r in rows], [r[metric] for r in rows], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
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
