"""fedcycle's ServerApp: check everything, ask the sites, then run the strategy's rounds.

1. Read and check the run config (a bad value fails the run before any training); with
   `resume-from`, load the run's newest readable checkpoint and check that it fits.
2. Pre-flight: ask every connected site for its data, classes, image shape, device and
   versions; stop with each site's reason if one cannot take part.
3. Run the strategy (CyclicalFedAvg by default) in fedcycle's round loop up to
   `num-server-rounds`, evaluating the global model on the test split before training and
   after every round, and write the results (`fedcycle.results`) and a checkpoint
   (`fedcycle.checkpoint`) round by round.
"""

from __future__ import annotations

import random
import time
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedcycle.checkpoint import Checkpoint, check_identity, latest_checkpoint, save_checkpoint
from fedcycle.config import ConfigError, RunSettings
from fedcycle.datasets import DATASETS, test_split
from fedcycle.models import build_model
from fedcycle.results import RunResults, resolve_run_dir
from fedcycle.round_loop import RoundFailed, run_rounds
from fedcycle.strategies import make_strategy
from fedcycle.strategies.cyclical import CyclicalMixin
from fedcycle.trainer import evaluate, pick_device

app = ServerApp()


class PreflightError(RuntimeError):
    """A site cannot take part; the message names each site and its reason."""


def preflight(grid: Grid, settings: RunSettings) -> dict[int, dict[str, Any]]:
    """Ask every connected site for its report; raise PreflightError unless all can train."""
    deadline = time.monotonic() + settings.round_timeout
    while len(nodes := list(grid.get_node_ids())) < settings.min_sites:
        if time.monotonic() > deadline:
            raise PreflightError(
                f"only {len(nodes)} site(s) connected within round-timeout={settings.round_timeout}s; "
                f"min-sites={settings.min_sites}"
            )
        log(INFO, "Waiting for sites: %d connected, min-sites=%d", len(nodes), settings.min_sites)
        time.sleep(1)
    messages = [
        Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), message_type=MessageType.QUERY, dst_node_id=n)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    spec = DATASETS[settings.dataset]
    want_classes, want_shape = list(spec.classes(settings)), list(spec.shape(settings))
    reports, problems = {}, []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {node}: {reply.error.reason}")
            continue
        report = dict(reply.content["report"])
        if not report.get("ok"):
            problems.append(f"node {node} ({report.get('node-config')}): {report.get('error')}")
        elif list(report["classes"]) != want_classes:
            problems.append(f"node {node} ({report['site']}): classes {list(report['classes'])} differ from the run's {want_classes}")
        elif list(report["image-shape"]) != want_shape:
            problems.append(f"node {node} ({report['site']}): image shape {list(report['image-shape'])} differs from {want_shape}")
        else:
            reports[node] = report
            log(
                INFO,
                "Site %s (node %d): %d train / %d val examples on %s, torch %s, flwr %s",
                report["site"], node, report["num-train"], report["num-val"], report["device"], report["torch"], report["flwr"],
            )
    missing = set(nodes) - {r.metadata.src_node_id for r in replies}
    problems += [f"node {n}: no pre-flight reply within round-timeout={settings.round_timeout}s" for n in sorted(missing)]
    if problems:
        raise PreflightError("pre-flight failed, no training started:\n  " + "\n  ".join(problems))
    return reports


def run_identity(settings: RunSettings) -> dict[str, Any]:
    """What a run trains; a run resumes only from a checkpoint of the same."""
    spec = DATASETS[settings.dataset]
    return {
        "dataset": settings.dataset,
        "model": settings.model,
        "strategy": settings.strategy,
        "classes": list(spec.classes(settings)),
        "image-shape": list(spec.shape(settings)),
    }


def load_resume_point(settings: RunSettings, model: torch.nn.Module) -> tuple[Path, Checkpoint]:
    """The run folder named by resume-from and its newest checkpoint that loads and fits."""
    run_dir = Path(settings.resume_from).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"resume-from={settings.resume_from!r}: {run_dir} is not a folder; give <results-dir>/<run-name>")
    ckpt = latest_checkpoint(run_dir)
    order = model.state_dict()
    check_identity(ckpt, run_identity(settings), order)
    # in the model's own order: replies are checked against the global model's array names in order
    ckpt.model = {k: ckpt.model[k] for k in order}
    ckpt.best_model = {k: ckpt.best_model[k] for k in order} if ckpt.best_model else {}
    return run_dir, ckpt


class RoundRecorder:
    """Called after every round: evaluates the global model, writes the round's line, the
    models and a checkpoint."""

    def __init__(self, settings: RunSettings, strategy: CyclicalMixin, results: RunResults, grid: Grid) -> None:
        spec = DATASETS[settings.dataset]
        self.settings, self.strategy, self.results, self.grid = settings, strategy, results, grid
        self.test = test_split(settings)
        self.norm = (spec.mean, spec.std)
        self.model = build_model(settings.model, spec.shape(settings), len(spec.classes(settings)))
        self.device = pick_device("auto")
        self.best = -1.0
        self.best_state: dict[str, torch.Tensor] = {}
        self.lines: list[dict[str, Any]] = []
        self.started = self.last = time.perf_counter()

    def resume(self, ckpt: Checkpoint) -> float | None:
        """Continue from a checkpoint: its metrics lines replace metrics.jsonl (a round that
        was under way when the run stopped is dropped); returns the loaded model's accuracy,
        evaluated again."""
        self.lines = list(ckpt.metrics)
        self.best, self.best_state = ckpt.best_accuracy, ckpt.best_model
        self.results.rewrite_rounds(self.lines)
        self.last = time.perf_counter()
        self.started = self.last - float(self.lines[-1].get("elapsed", 0.0) if self.lines else 0.0)
        if self.test is None:
            return None
        self.model.load_state_dict(ckpt.model)
        return evaluate(self.model, self.test, self.device, *self.norm)[1]

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        state = arrays.to_torch_state_dict()
        self.model.load_state_dict(state)
        loss, accuracy, source = self._evaluate(server_round, arrays)
        now = time.perf_counter()
        s = self.strategy
        line = {
            "round": server_round,
            "accuracy": accuracy,
            "accuracy_source": source,
            "loss": loss,
            "seconds": round(now - self.last, 3),
            "elapsed": round(now - self.started, 3),
            "train_config": s.sent_config.get(server_round),
            "sites_evaluation": _plain(s.evaluate_metrics.get(server_round)),
            "timing": {"aggregate_seconds": s.aggregate_seconds.get(server_round), "evaluate_seconds": now - started},
            "sites": s.site_metrics.get(server_round, []),
            "events": s.events.get(server_round, []),
        }
        self.last = now
        self.lines.append(line)
        improved = accuracy is not None and accuracy > self.best
        if improved:
            self.best, self.best_state = accuracy, state
        # the checkpoint first: a line in metrics.jsonl always has its checkpoint
        save_checkpoint(
            self.results.path,
            Checkpoint(
                round=server_round,
                model=state,
                best_model=self.best_state,
                best_accuracy=self.best,
                metrics=self.lines,
                identity=run_identity(self.settings),
                strategy_arrays=self.strategy.state_arrays(),
            ),
            keep=self.settings.checkpoints_keep,
        )
        self.results.append_round(line)
        self.results.save_model("global-final", state)
        if improved:
            self.results.save_model("global-best", state)
        self.results.plot()
        log(
            INFO,
            "fedcycle round %d/%d  accuracy %.4f (%s)  loss %.4f  %.1f s  [%d sites, %d left out]",
            server_round, self.settings.num_server_rounds, accuracy if accuracy is not None else float("nan"),
            source, loss if loss is not None else float("nan"), line["seconds"], len(line["sites"]), len(line["events"]),
        )
        return MetricRecord({"accuracy": accuracy or 0.0, "loss": loss or 0.0})

    def record_failed_round(self, server_round: int, reason: str) -> None:
        """A line for the round that failed, with what went wrong at each site (a resumed run
        replaces it with the rounds of its checkpoint)."""
        s = self.strategy
        self.results.append_round({
            "round": server_round, "accuracy": None, "accuracy_source": None, "loss": None,
            "seconds": round(time.perf_counter() - self.last, 3), "failed": reason,
            "train_config": s.sent_config.get(server_round), "sites": s.site_metrics.get(server_round, []),
            "events": s.events.get(server_round, []),
        })

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> tuple[float | None, float | None, str]:
        if self.test is not None:
            loss, accuracy = evaluate(self.model, self.test, self.device, *self.norm)
            return loss, accuracy, "server-test"
        if server_round == 0:  # no test split: ask the sites about the initial model too
            replies = self.grid.send_and_receive(
                self.strategy.configure_evaluate(0, arrays, ConfigRecord(), self.grid), timeout=self.settings.round_timeout
            )
            self.strategy.aggregate_evaluate(0, replies)
        metrics = self.strategy.evaluate_metrics.get(server_round)
        if metrics is None:
            return None, None, "sites-weighted"
        return float(metrics["loss"]), float(metrics["accuracy"]), "sites-weighted"


def _plain(metrics: MetricRecord | None) -> dict | None:
    return None if metrics is None else {k: float(v) for k, v in metrics.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    spec = DATASETS[settings.dataset]
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)  # Flower samples the round's sites with the random module
    model = build_model(settings.model, spec.shape(settings), len(spec.classes(settings)))  # checks the fit
    resume_dir, ckpt = load_resume_point(settings, model) if settings.resume_from else (None, None)
    if ckpt is not None and ckpt.round >= settings.num_server_rounds:
        log(INFO, "fedcycle: %s has finished round %d of num-server-rounds=%d; nothing to do (raise "
            "num-server-rounds to extend it)", resume_dir, ckpt.round, settings.num_server_rounds)
        return

    results = RunResults(resume_dir or resolve_run_dir(settings, context.run_id))
    log(INFO, "fedcycle run %s: results go to %s", context.run_id, results.path)
    extra: dict[str, Any] = {"run_id": context.run_id}
    if ckpt is not None:
        earlier = results.read_config()
        extra.update(
            resumed_from_round=ckpt.round,
            resumed_from_checkpoint=str(ckpt.path),
            earlier_run_ids=[*earlier.get("earlier_run_ids", []), earlier.get("run_id")],
        )
        log(INFO, "fedcycle: resuming from %s (round %d)", ckpt.path, ckpt.round)
    results.write_config(settings, dict(context.run_config), **extra)

    reports = preflight(grid, settings)
    strategy = make_strategy(settings, num_sites=len(reports))
    strategy.declared_examples = {node: int(r["num-train"]) for node, r in reports.items()}
    strategy.site_names = {node: str(r["site"]) for node, r in reports.items()}
    recorder = RoundRecorder(settings, strategy, results, grid)
    if ckpt is None:
        arrays, first_round = ArrayRecord(model.state_dict()), 1
        recorder(0, arrays)
    else:
        arrays, first_round = ArrayRecord(ckpt.model), ckpt.round + 1
        strategy.restore_state_arrays(ckpt.strategy_arrays)
        random.setstate(ckpt.python_rng)
        torch.set_rng_state(ckpt.torch_rng)
        extra["resumed_accuracy"] = recorder.resume(ckpt)
        log(INFO, "fedcycle: the resumed model's accuracy, evaluated again: %s", extra["resumed_accuracy"])
    results.write_config(settings, dict(context.run_config), **extra, sites=reports)

    try:
        run_rounds(grid, strategy, settings, arrays, first_round, recorder)
    except RoundFailed as err:
        log(ERROR, "fedcycle run %s stopped: %s", context.run_id, err)
        recorder.record_failed_round(err.server_round, str(err))
        raise
    final = recorder.lines[-1]["accuracy"]
    log(INFO, "fedcycle run %s finished: final accuracy %s; results in %s", context.run_id,
        None if final is None else round(float(final), 4), results.path)

