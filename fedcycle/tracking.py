"""A run's numbers where PyTorch users watch training: TensorBoard and MLflow, live.

The ServerApp alone writes them (the sites need no tracker and no credentials): after each
round, the same line metrics.jsonl gets, as named series — `global/<metric>`, `global/loss`,
`swa/<metric>` (the server's mean of cycle ends), `train/loss` (the sites' example-weighted mean
training loss), `site/<site>/<key>` for each site's train loss and metrics, learning rates,
update ratio and peer measures, `sites-evaluation/<metric>` (the sites' weighted evaluation of the
global model, where they evaluate), `round/seconds` — at the round as step; `lr/step`, the
learning rate at every optimizer step as the sites ran the server's schedule, at the optimizer
steps trained so far as step (`round_lrs`, which the run's plot draws too); the replies left out
as text, and the run config as parameters. metrics.jsonl stays the record: a tracker that fails
(its server down, a full disk) is logged once and dropped; training goes on.

A resumed run continues the same TensorBoard folder (steps after the checkpoint's round are
purged) and the same MLflow run (its id is kept in the run folder's `tracking.json`; rounds it
already has are not logged twice).
"""

from __future__ import annotations

import json
import math
import os
import time
from logging import WARNING
from pathlib import Path
from typing import Any, Iterable, Mapping

from flwr.common.logger import log

from fedcycle.errors import ConfigError
from fedcycle.files import atomic_write
from fedcycle.metrics_lines import finite_number, read_metrics, round_lrs, train_loss
from fedcycle.wire import SCREEN_EVENTS

TRACKING = ("tensorboard", "mlflow", "both", "off")
STATE_FILE = "tracking.json"
# MLflow's client retries a failed request 7 times with backoff by default: minutes of a
# round. Once is enough to tell a server that is down.
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def uses(tracking: str) -> tuple[str, ...]:
    """The trackers a `tracking` value names."""
    return {"both": ("tensorboard", "mlflow"), "off": ()}.get(tracking, (tracking,))


def check_tracking(tracking: str) -> None:
    """ConfigError unless `tracking`'s packages import: the server's check (a site needs neither)."""
    if problem := missing_package(tracking):
        raise ConfigError(problem)


def missing_package(tracking: str) -> str | None:
    """What to install for `tracking`, or None when its packages import."""
    for name in uses(tracking):
        try:
            __import__({"tensorboard": "tensorboard", "mlflow": "mlflow"}[name])
        except ImportError:
            return f"tracking={tracking!r} needs the {name} package: pip install {name}"
    return None


def site_label(site: Mapping[str, Any]) -> str:
    """A site's name as a series name: 'partition 0/4' becomes 'partition 0 of 4'."""
    return str(site.get("site") or f"node {site.get('node_id')}").replace("/", " of ")


def series(line: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as named numbers (the finite ones)."""
    out: dict[str, Any] = {f"global/{k}": v for k, v in (line.get("metrics") or {}).items()}
    out["global/loss"] = line.get("loss")
    out["train/loss"] = train_loss(line)
    swa = line.get("swa") or {}
    out.update({f"swa/{k}": v for k, v in (swa.get("metrics") or {}).items()})
    out["swa/loss"] = swa.get("loss")
    for site in line.get("sites") or []:
        label = site_label(site)
        out.update({f"site/{label}/{k}": v for k, v in site.items() if k not in ("node_id", "site")})
    out.update({f"sites-evaluation/{k}": v for k, v in (line.get("sites_evaluation") or {}).items()})
    out["privacy/site-epsilon"] = line.get("site_epsilon")  # site-level DP; DP-SGD's is each site's row
    out["round/seconds"] = line.get("seconds")
    out["round/left-out"] = sum(e.get("event") in SCREEN_EVENTS for e in line.get("events") or [])
    return {k: float(v) for k, v in out.items() if finite_number(v)}


def events_text(line: Mapping[str, Any]) -> str:
    """The round's events (replies left out, sites missing) as a Markdown table; '' if none."""
    events = line.get("events", [])
    if not events:
        return ""
    rows = [f"| {e.get('site') or e.get('node_id', '')} | {e.get('event')} | {e.get('reason', '')} |" for e in events]
    return "\n".join(["| site | event | reason |", "|---|---|---|", *rows])


def earlier_rounds(run_dir: Path, first_round: int) -> list[dict[str, Any]]:
    """A resumed run's lines in metrics.jsonl before `first_round`; [] when they do not read."""
    try:
        return [line for line in read_metrics(run_dir / "metrics.jsonl") if line.get("round", first_round) < first_round]
    except (OSError, ValueError):
        return []


class TensorBoard:
    def __init__(self, run_dir: Path, run_config: Mapping[str, Any], first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazily: the server's, and only if asked for

        self.run_config = dict(run_config)
        # a resumed run: steps from the first round it does again on are purged, not doubled
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_round or None)
        if not first_round:
            self.writer.add_text("run-config", "```\n" + json.dumps(self.run_config, indent=1, default=str) + "\n```", 0)
        else:
            # the purge takes every series' steps from `first_round` on, also `lr/step`'s, whose steps
            # count optimizer steps: the rates of the rounds kept are written again from there
            for line in earlier_rounds(run_dir, first_round):
                self.log_lrs(line, from_step=first_round)

    def log_lrs(self, line: Mapping[str, Any], from_step: int = 0) -> None:
        """`lr/step`: the round's learning rate at each optimizer step (those from `from_step` on)."""
        if lrs := round_lrs(line):
            for step, lr in zip(lrs.global_steps(), lrs.lrs):
                if step >= from_step:
                    self.writer.add_scalar("lr/step", lr, step)

    def log_round(self, line: Mapping[str, Any]) -> None:
        step = int(line["round"])
        for name, value in series(line).items():
            self.writer.add_scalar(name, value, step)
        self.log_lrs(line)
        if text := events_text(line):
            self.writer.add_text("events", text, step)
        if line.get("failed"):
            self.writer.add_text("failed", str(line["failed"]), step)
        self.writer.flush()

    def finish(self, status: str, final: Mapping[str, float], artifacts: list[Path]) -> None:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.run_config.items()}
        self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.close()


class MLflow:
    """One MLflow run: a new one, or `run_id` continued (the rounds it has are not logged again)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                 run_id: str | None = None, artifact_location: str | None = None) -> None:
        for key, value in MLFLOW_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow.entities import Param  # lazily: MLflow is the optional `mlflow` extra
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.logged = {m.step for m in self.client.get_metric_history(run_id, "round/seconds")}
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=artifact_location)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            values = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for start in range(0, len(values), 100):  # MLflow takes at most 100 params a call
                self.client.log_batch(run_id, params=values[start:start + 100])
            self.logged = set()
        self.run_id = run_id

    def log_metrics(self, values: Iterable[tuple[str, float, int]]) -> None:
        """(name, value, step) triples, in as few calls as MLflow takes."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value, step in values]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        self.log_metrics((name, value, step) for name, value in values.items())
        self.logged.add(step)

    def log_round(self, line: Mapping[str, Any]) -> None:
        step = int(line["round"])
        if step in self.logged:
            return
        if text := events_text(line):
            self.client.log_text(self.run_id, text, f"events/round-{step:04d}.md")
        if lrs := round_lrs(line):
            self.log_metrics(("lr/step", lr, s) for s, lr in zip(lrs.global_steps(), lrs.lrs))
        self.log_step(step, series(line))

    def finish(self, status: str, final: Mapping[str, float], artifacts: list[Path]) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path), "models")
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "FAILED")


def local_store(folder: Path) -> tuple[str, str]:
    """The MLflow store kept beside a folder's runs: a SQLite file (MLflow 3.17 refuses its old
    file store) and an artifact folder, so that the MLflow UI compares the runs."""
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri()


def mlflow_store(tracking_uri: str, folder: Path) -> tuple[str, str | None]:
    """The MLflow store and artifact location for `tracking_uri`: a server keeps the artifacts
    it was started for; a SQLite file keeps them in mlartifacts/ beside it (MLflow's own
    default, ./mlruns, is the folder the process happens to run in); none: local_store(folder)."""
    if not tracking_uri:
        return local_store(folder)
    if tracking_uri.startswith("sqlite:///"):
        return tracking_uri, (Path(tracking_uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
    return tracking_uri, None


def log_finished_run(tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                     steps: Mapping[str, list[float | None]], artifact_location: str | None = None) -> None:
    """A run trained in this process, logged to MLflow once it is done (the study's centralized
    runs): each named list holds one value per step (epoch)."""
    run = MLflow(tracking_uri, experiment, run_name, params, artifact_location=artifact_location)
    for step in range(max(map(len, steps.values()), default=0)):
        run.log_step(step, {name: float(v[step]) for name, v in steps.items()
                            if step < len(v) and v[step] is not None and math.isfinite(v[step])})
    run.finish("finished", {}, [])


class Trackers:
    """The run's trackers; each call goes to every one still working."""

    def __init__(self, settings: Any, run_dir: Path, run_config: Mapping[str, Any], first_round: int) -> None:
        self.state_path = run_dir / STATE_FILE
        try:
            self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if first_round else {}
        except (OSError, ValueError):
            self.state = {}
        self.active: dict[str, Any] = {}
        for name in uses(settings.tracking):
            self._safely(name, lambda name=name: self.active.__setitem__(name, self._open(
                name, settings, run_dir, run_config, first_round)))
        if self.state:

            atomic_write(self.state_path, json.dumps(self.state, indent=1).encode())

    def _open(self, name: str, settings: Any, run_dir: Path, run_config: Mapping[str, Any], first_round: int) -> Any:
        if name == "tensorboard":
            return TensorBoard(run_dir, run_config, first_round)
        uri, artifacts = mlflow_store(settings.mlflow_tracking_uri, run_dir.parent)
        same_store = self.state.get("mlflow_tracking_uri") == uri
        tracker = MLflow(uri, settings.mlflow_experiment, run_dir.name, run_config,
                         run_id=self.state.get("mlflow_run_id") if first_round and same_store else None,
                         artifact_location=artifacts)
        self.state.update(mlflow_run_id=tracker.run_id, mlflow_tracking_uri=uri)
        # a resumed run: the rounds before it that MLflow lacks (a run stopped between writing a
        # round's line and logging it), from metrics.jsonl; those it has are not logged twice
        for line in earlier_rounds(run_dir, first_round):
            tracker.log_round(line)
        return tracker

    def _safely(self, name: str, call) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - any tracker failure: say so once, train on
            self.active.pop(name, None)
            log(WARNING, "fedcycle: %s tracking stopped (%s: %s); training goes on, metrics.jsonl has every round",
                name, type(err).__name__, err)

    def log_round(self, line: Mapping[str, Any]) -> None:
        for name, tracker in list(self.active.items()):
            self._safely(name, lambda: tracker.log_round(line))

    def finish(self, status: str, final: Mapping[str, float], artifacts: list[Path]) -> None:
        for name, tracker in list(self.active.items()):
            self._safely(name, lambda: tracker.finish(status, final, [p for p in artifacts if p.exists()]))
        self.active.clear()
