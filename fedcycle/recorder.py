"""What the server keeps of every round: the global model's loss and metrics (on the task's test
split, or the sites' held-out splits when it has none), a line in metrics.jsonl, the latest and
best models and a checkpoint; and how a run picks up from its newest checkpoint.

The recorder writes what a round produced (`fedcycle.round_loop.RoundOutcome`); it sends no
message and reads nothing of the strategy.

With `swa-start`, the server also keeps the mean of the global models at cycle ends
(`fedcycle.averaging`), evaluates it beside the global model every round (`swa` in
metrics.jsonl) and saves it as `global-swa.safetensors`.

"Best" follows the task's primary metric and its direction (accuracy, higher is better, for
classification; a regression's mean absolute error, lower is better).
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log

from fedcycle.averaging import CycleAverage, has_batchnorm
from fedcycle.checkpoint import Checkpoint, check_identity, latest_checkpoint, save_checkpoint
from fedcycle.config import RunSettings
from fedcycle.errors import ConfigError
from fedcycle.privacy import epsilon
from fedcycle.results import RunResults
from fedcycle.round_loop import RoundOutcome
from fedcycle.tasks import Task
from fedcycle.tracking import Trackers
from fedcycle.trainer import evaluate, pick_device


# Run-config keys a resumed run may change: where things are and how long to wait or go on,
# not what is computed. Every other key must match the checkpoint's.
RESUMABLE_KEYS = frozenset({
    "num-server-rounds", "round-timeout", "round-retries", "min-replies", "min-reply-fraction", "min-sites",
    "checkpoints-keep", "resume-from", "run-name", "results-dir", "data-root",
    "tracking", "mlflow-tracking-uri", "mlflow-experiment",
})


def run_identity(settings: RunSettings, task: Task) -> dict[str, Any]:
    """What a run computes: every run-config setting outside RESUMABLE_KEYS (with the chosen
    partitioner's, strategy's and task's options), the task's classes and primary metric. A run
    resumes only from a checkpoint of the same."""
    # the task's classes (the run config's `classes`, resolved) go last, after the keys that set them
    identity = {k: v for k, v in settings.as_run_config().items() if k not in RESUMABLE_KEYS | {"classes"}}
    if settings.lr_envelope == "cosine":  # the envelope spans the run: more rounds reshape the rest
        identity["num-server-rounds"] = settings.num_server_rounds
    return {**identity, "classes": task.classes, "primary-metric": [task.primary_metric, task.direction]}


def load_resume_point(settings: RunSettings, task: Task, model: torch.nn.Module) -> tuple[Path, Checkpoint]:
    """The run folder named by resume-from and its newest checkpoint that loads and fits."""
    run_dir = Path(settings.resume_from).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"resume-from={settings.resume_from!r}: {run_dir} is not a folder; give <results-dir>/<run-name>")
    ckpt = latest_checkpoint(run_dir)
    order = model.state_dict()
    check_identity(ckpt, run_identity(settings, task), order)
    # in the model's own order: replies are checked against the global model's array names in order
    ckpt.model = {k: ckpt.model[k] for k in order}
    ckpt.best_model = {k: ckpt.best_model[k] for k in order} if ckpt.best_model else {}
    return run_dir, ckpt


class RoundRecorder:
    """Called after every round: evaluates the global model, writes the round's line, the
    models and a checkpoint."""

    def __init__(self, settings: RunSettings, task: Task, test, results: RunResults, trackers: Trackers,
                 metric_names: list[str]) -> None:
        self.settings, self.task, self.test = settings, task, test
        self.results, self.trackers = results, trackers
        self.metric_names = list(metric_names)  # the task's metrics, as the sites report them
        self.metric = task.primary_metric
        self.model = task.build_model()
        self.device = pick_device("auto")
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] = {}
        self.lines: list[dict[str, Any]] = []
        self.swa = CycleAverage(settings.swa_start, settings.schedule) if settings.swa_start else None
        self.started = self.last = time.perf_counter()

    def resume(self, ckpt: Checkpoint) -> float | None:
        """Continue from a checkpoint: its metrics lines replace metrics.jsonl (a round that
        was under way when the run stopped is dropped); returns the loaded model's primary
        metric, evaluated again."""
        self.lines = list(ckpt.metrics)
        self.best, self.best_state = ckpt.best_value, ckpt.best_model
        if self.swa is not None:
            self.swa.restore(ckpt.swa_total, ckpt.swa_rounds)
        self.results.rewrite_rounds(self.lines)
        # the models as of the checkpoint: a run that stopped between its checkpoint and these
        # files would otherwise leave them a round behind it
        self.results.save_model("global-final", ckpt.model)
        if self.best_state:
            self.results.save_model("global-best", self.best_state)
        self.last = time.perf_counter()
        self.started = self.last - float(self.lines[-1].get("elapsed", 0.0) if self.lines else 0.0)
        if self.test is None:
            return None
        self.model.load_state_dict(ckpt.model)
        return evaluate(self.task, self.model, self.test, self.device, self.settings.batch_size)[1][self.metric]

    def record(self, outcome: RoundOutcome) -> None:
        """Evaluate the round's global model and write the round: its line, models, checkpoint."""
        server_round, started = outcome.server_round, time.perf_counter()
        state = outcome.arrays.to_torch_state_dict()
        self.model.load_state_dict(state)
        loss, metrics, source = self._evaluate(outcome)
        value = None if metrics is None else metrics[self.metric]
        now = time.perf_counter()
        line = {
            "round": server_round,
            "primary_metric": self.metric,
            self.metric: value,
            "loss": loss,
            "metrics": metrics,
            "metrics_source": source,
            "seconds": round(now - self.last, 3),
            "elapsed": round(now - self.started, 3),
            "train_config": outcome.train_config,
            "sites_evaluation": outcome.sites_evaluation,
            "timing": {"aggregate_seconds": outcome.aggregate_seconds, "evaluate_seconds": now - started},
            "sites": outcome.sites,
            "events": outcome.events,
            # each site's bytes of arrays received and sent this round, in training and in evaluation
            "bytes": outcome.traffic,
        }
        if self.swa is not None:
            line["swa"] = self._average(server_round, state)
        dp = self.settings.dp
        if dp.site_level and server_round and dp.site_noise_multiplier > 0:
            # each round a Gaussian mechanism on the mean of the sites' clipped updates, no
            # sampling amplification claimed: an upper bound for a site, at dp.delta
            line["site_epsilon"] = epsilon([{"noise-multiplier": dp.site_noise_multiplier, "sample-rate": 1.0,
                                             "steps": server_round}], dp.delta)
        self.last = now
        self.lines.append(line)
        improved = self.task.better(value, self.best)
        if improved:
            self.best, self.best_state = value, state
        # the checkpoint first: a line in metrics.jsonl always has its checkpoint
        save_checkpoint(
            self.results.path,
            Checkpoint(
                round=server_round,
                model=state,
                best_model=self.best_state,
                best_value=self.best,
                metrics=self.lines,
                identity=run_identity(self.settings, self.task),
                server_arrays=outcome.server_arrays,
                screen_state=outcome.screen_state,
                swa_total=self.swa.total if self.swa is not None else {},
                swa_rounds=self.swa.rounds if self.swa is not None else [],
            ),
            keep=self.settings.checkpoints_keep,
        )
        self.results.append_round(line)
        self.trackers.log_round(line)
        self.results.save_model("global-final", state)
        if improved:
            self.results.save_model("global-best", state)
        self.results.plot(self.metric)
        swa = (line.get("swa") or {}).get(self.metric)
        log(
            INFO,
            "fedcycle round %d/%d  %s %.4f (%s)  loss %.4f%s  %.1f s  [%d sites, %d left out]",
            server_round, self.settings.num_server_rounds, self.metric, value if value is not None else float("nan"),
            source, loss if loss is not None else float("nan"), "" if swa is None else f"  cycle-end mean {swa:.4f}",
            line["seconds"], len(line["sites"]), len(line["events"]),
        )

    def _average(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """Take this round's model into the mean of cycle ends if it ends a cycle; the mean's
        line in metrics.jsonl (evaluated on the test split), None before it has a model."""
        if not self.swa.add(server_round, state) and not self.swa.rounds:
            return None
        average = self.swa.model(state)
        self.results.save_model("global-swa", average)
        entry: dict[str, Any] = {
            "rounds": list(self.swa.rounds),
            "batchnorm": "averaged, not recomputed" if has_batchnorm(self.model) else "none in the model",
            self.metric: None, "loss": None, "metrics": None,
        }
        if self.test is not None:
            self.model.load_state_dict(average)
            loss, metrics = evaluate(self.task, self.model, self.test, self.device, self.settings.batch_size)
            entry.update({self.metric: metrics[self.metric], "loss": loss, "metrics": metrics})
            self.model.load_state_dict(state)
        return entry

    def record_failed_round(self, outcome: RoundOutcome, reason: str) -> None:
        """A line for the round that failed, with what went wrong at each site, and the plot
        marking it (a resumed run replaces the line with the rounds of its checkpoint)."""
        line = {
            "round": outcome.server_round, "primary_metric": self.metric, self.metric: None, "loss": None,
            "metrics": None, "metrics_source": None, "seconds": round(time.perf_counter() - self.last, 3),
            "failed": reason, "train_config": outcome.train_config, "sites": outcome.sites, "events": outcome.events,
            "bytes": outcome.traffic,
        }
        self.results.append_round(line)
        self.trackers.log_round(line)
        self.results.plot(self.metric)

    def finish(self, status: str) -> None:
        """Tell the trackers the run ended (`finished` or `failed`), with its final and best
        values and its models."""
        final = self.lines[-1].get(self.metric) if self.lines else None
        values = {f"final-{self.metric}": final, f"best-{self.metric}": self.best}
        models = [self.results.path / f"global-{name}.safetensors" for name in ("final", "best", "swa")]
        self.trackers.finish(status, {k: float(v) for k, v in values.items() if v is not None}, models)

    def _evaluate(self, outcome: RoundOutcome) -> tuple[float | None, dict | None, str]:
        """The loaded model on the test split, or (no test split) the sites' weighted evaluation."""
        if self.test is not None:
            loss, metrics = evaluate(self.task, self.model, self.test, self.device, self.settings.batch_size)
            return loss, metrics, "server-test"
        sites = outcome.sites_evaluation
        if sites is None:
            return None, None, "sites-weighted"
        return sites["loss"], {k: sites[k] for k in self.metric_names}, "sites-weighted"
