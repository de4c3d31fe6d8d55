"""fedcycle's ServerApp: check everything, ask the sites, then run the strategy's rounds.

1. Read and check the run config (a bad value fails the run before any training).
2. Pre-flight: ask every connected site for its data, classes, image shape, device and
   versions; stop with each site's reason if one cannot take part.
3. Run the strategy (CyclicalFedAvg by default) for `num-server-rounds`, evaluating the
   global model on the test split before training and after every round, and write the
   results (`fedcycle.results`) round by round.
"""

from __future__ import annotations

import random
import time
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedcycle.config import RunSettings
from fedcycle.datasets import DATASETS, test_split
from fedcycle.models import build_model
from fedcycle.results import RunResults, resolve_run_dir
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


class RoundRecorder:
    """Strategy.start's evaluate_fn: evaluates the global model, writes the round's line."""

    def __init__(self, settings: RunSettings, strategy: CyclicalMixin, results: RunResults, grid: Grid) -> None:
        spec = DATASETS[settings.dataset]
        self.settings, self.strategy, self.results, self.grid = settings, strategy, results, grid
        self.test = test_split(settings)
        self.norm = (spec.mean, spec.std)
        self.model = build_model(settings.model, spec.shape(settings), len(spec.classes(settings)))
        self.device = pick_device("auto")
        self.best = -1.0
        self.started = self.last = time.perf_counter()

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
        self.results.append_round(line)
        self.results.save_model("global-final", state)
        if accuracy is not None and accuracy > self.best:
            self.best = accuracy
            self.results.save_model("global-best", state)
        self.results.plot()
        log(
            INFO,
            "fedcycle round %d/%d  accuracy %.4f (%s)  loss %.4f  %.1f s  [%d sites, %d left out]",
            server_round, self.settings.num_server_rounds, accuracy if accuracy is not None else float("nan"),
            source, loss if loss is not None else float("nan"), line["seconds"], len(line["sites"]), len(line["events"]),
        )
        return MetricRecord({"accuracy": accuracy or 0.0, "loss": loss or 0.0})

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

    results = RunResults(resolve_run_dir(settings, context.run_id))
    log(INFO, "fedcycle run %s: results go to %s", context.run_id, results.path)
    results.write_config(settings, dict(context.run_config), run_id=context.run_id)

    reports = preflight(grid, settings)
    strategy = make_strategy(settings, num_sites=len(reports))
    strategy.declared_examples = {node: int(r["num-train"]) for node, r in reports.items()}
    results.write_config(settings, dict(context.run_config), run_id=context.run_id, sites=reports)

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord(),
        evaluate_fn=RoundRecorder(settings, strategy, results, grid),
    )
    final = result.evaluate_metrics_serverapp.get(settings.num_server_rounds)
    log(INFO, "fedcycle run %s finished: final accuracy %s; results in %s", context.run_id,
        None if final is None else round(float(final["accuracy"]), 4), results.path)

