"""The server's side of a round, around any Flower strategy.

A `Coordinator` holds a Flower strategy (FedAvg, FedAdam, a user's own) and does what fedcycle
adds to it, without changing it: every round's train config carries the server's learning-rate
schedule and local epochs; only sites that passed the pre-flight round are sent work; each reply
goes through the screen (`fedcycle.screen`) before the strategy sees it, and is averaged with the
screen's weight and scale; the aggregate keeps the global model's dtypes (integer buffers such as
BatchNorm's `num_batches_tracked` are not averaged). What each round produced is taken out by the
round loop (`fedcycle.round_loop.outcome_of`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcycle.config import RunSettings
from fedcycle.privacy import site_noise
from fedcycle.screen import (
    METRIC_RANGES,
    Declared,
    Reply,
    Screen,
    ScreenMemory,
    Verdict,
    digest,
    evaluation_problem,
    weight_cap,
)
from fedcycle.wire import EvaluateConfig, EvaluateReply, RoundConfig, TrainReply

if TYPE_CHECKING:
    import torch


class Coordinator:
    """A Flower strategy under the server's schedule, with every reply screened."""

    def __init__(self, strategy: Strategy, settings: RunSettings, evaluates_on_sites: bool = False,
                 sites: dict[int, Declared] | None = None, metric_names: Iterable[str] = ("accuracy",),
                 ranges: dict[str, tuple[float, float]] | None = None, task_statistics: dict | None = None,
                 privacy_run: str = "", late_nodes: Iterable[int] = (),
                 train_metric_names: Iterable[str] | None = None) -> None:
        self.strategy, self.settings, self.evaluates_on_sites = strategy, settings, evaluates_on_sites
        self.sites = dict(sites or {})  # node id -> what it declared in the pre-flight round
        self.site_names = {node: d.site for node, d in self.sites.items()}
        self.metric_names = list(metric_names)
        self.task_statistics = task_statistics  # the sites' summed task statistics
        self.privacy_run = privacy_run  # the run's first id: what the sites' DP ledgers file its rounds under
        self.late_nodes = set(late_nodes)  # never sent work: connected late, or refused by their policy
        self.expected_evaluate = EvaluateReply.keys(self.metric_names)
        self.train_metric_names = None if train_metric_names is None else tuple(train_metric_names)
        keys = TrainReply.keys(self.metric_names, self.evaluates_received, settings.dp.enabled, train_metric_names)
        self.screen = Screen(settings, self.sites, keys, {**METRIC_RANGES, **(ranges or {})})
        self.events: dict[int, list[dict]] = defaultdict(list)  # round -> replies left out, sites missing
        self.site_metrics: dict[int, list[dict]] = defaultdict(list)  # round -> accepted replies' metrics
        self.sent_config: dict[int, dict] = {}  # round -> the train config the sites received
        self.evaluate_metrics: dict[int, MetricRecord | None] = {}
        self.sampled: dict[int, list[int]] = {}
        self.aggregate_seconds: dict[int, float] = {}
        self.global_arrays: ArrayRecord | None = None  # the model sent out this round

    @property
    def evaluates_received(self) -> bool:
        """Whether each site evaluates the received model inside its train reply."""
        return self.settings.site_eval == "train-reply"

    def round_config(self, server_round: int) -> RoundConfig:
        """What every site needs to train round `server_round` exactly as the server means."""
        s = self.settings
        return RoundConfig(
            server_round=server_round,
            schedule=s.schedule_for_round(server_round),
            local_epochs=s.epochs_for_round(server_round),
            epochs_before=sum(s.epochs_for_round(r) for r in range(1, server_round)),
            batch_size=s.batch_size,
            optimizer=s.optimizer,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            mixed_precision=s.mixed_precision,
            evaluate_received=self.evaluates_received,
            task_statistics=self.task_statistics,
            privacy_run=self.privacy_run,
            train_metrics=self.train_metric_names,
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """The strategy's train messages, to pre-flighted sites, with the round's config."""
        self.global_arrays = arrays
        self.site_metrics[server_round] = []  # a retried round keeps only its last attempt's replies
        config = ConfigRecord(self.round_config(server_round).to_record())
        messages = self.preflighted(server_round, self.strategy.configure_train(server_round, arrays, config, grid))
        # what the round's line in metrics.jsonl shows: as sent, FedProx's proximal-mu included,
        # less the task's statistics (the sites' totals, which config.json does not keep either)
        sent = dict(messages[0].content["config"]) if messages else dict(config)
        self.sent_config[server_round] = {k: v for k, v in sent.items() if k != "task-statistics"}
        self.sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        config = ConfigRecord(EvaluateConfig(server_round, self.settings.batch_size, self.task_statistics).to_record())
        return self.preflighted(server_round, self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def preflighted(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """The messages to sites that passed the pre-flight round. A site that connected after
        the pre-flight round is not sent work (its data, model and classes were never checked)
        and does not count against the round; it is named once, and takes part in the next run."""
        messages = list(messages)
        if not self.sites:
            return messages
        for node in sorted({m.metadata.dst_node_id for m in messages} - set(self.sites) - self.late_nodes):
            self.late_nodes.add(node)
            self.events[server_round].append({"node_id": node, "site": None, "event": "not-sampled",
                                              "reason": "it connected after the pre-flight round, which never checked it"})
            log(WARNING, "Round %d: node %d connected after the pre-flight round; it is not sent work in this run",
                server_round, node)
        return [m for m in messages if m.metadata.dst_node_id in self.sites]

    def screen_round(self, server_round: int, replies: list[Message],
                     unreachable: dict[int, str] | None = None) -> list[Message]:
        """The round's replies fit to average, each with the screen's weight and scale; the
        others, and every sampled site that did not reply, are recorded with the reason
        (`unreachable`: the SuperLink's, where it gave one)."""
        reference = {k: a.numpy() for k, a in self.global_arrays.items()} if self.global_arrays is not None else {}
        readable, accepted = [], []
        for msg in replies:
            if msg.has_error():
                self._record(server_round, msg.metadata.src_node_id, "failed", msg.error.reason)
                continue
            problem, values = read_reply(msg)
            if problem:
                self._record(server_round, msg.metadata.src_node_id, "rejected", problem)
            else:
                readable.append((msg, Reply(msg.metadata.src_node_id, values, dict(msg.content["metrics"]))))
        sent = self.sent_config.get(server_round)
        verdicts = self.screen.screen(server_round, [r for _, r in readable], reference,
                                      RoundConfig.from_record(sent) if sent is not None else None)
        for (msg, reply), verdict in zip(readable, verdicts):
            for event, reason in verdict.events:
                self._record(server_round, reply.node, event, reason)
            if verdict.accepted:
                self._apply(msg, reply, verdict, reference)
                self.site_metrics[server_round].append(
                    {"node_id": reply.node, "site": self.site_names.get(reply.node), **reply.metrics, **verdict.measured})
                accepted.append(msg)
        replied = {m.metadata.src_node_id for m in replies}
        for node in self.sampled.get(server_round, []):
            if node not in replied:
                self.record_missing(server_round, node, "missing", unreachable)
        return accepted

    def _apply(self, msg: Message, reply: Reply, verdict: Verdict, reference: dict[str, np.ndarray]) -> None:
        """The reply as the strategy averages it: its update times the verdict's scale, its
        example count the verdict's weight."""
        msg.content["metrics"]["num-examples"] = verdict.weight
        if verdict.scale < 1.0:
            msg.content["arrays"] = ArrayRecord({
                k: Array((reference[k] + verdict.scale * (v.astype(np.float64) - reference[k])).astype(v.dtype))
                if np.issubdtype(v.dtype, np.floating) else Array(v) for k, v in reply.arrays.items()
            })

    def record_missing(self, server_round: int, node: int, event: str, unreachable: dict[int, str] | None) -> None:
        reason = (unreachable or {}).get(node, f"no reply within round-timeout={self.settings.round_timeout}s")
        self._record(server_round, node, event, reason)

    def aggregate(self, server_round: int, accepted: list[Message]) -> ArrayRecord | None:
        """The strategy's aggregate of the screened replies, in the global model's dtypes (None:
        nothing to average; the global model stays)."""
        if not accepted:
            log(WARNING, "Round %d: no reply could be averaged; the global model stays as it was", server_round)
            return None
        started = time.perf_counter()
        # Some strategies (FedMedian, FedTrimmedAvg) empty the replies' records while
        # aggregating: take the integer counters out first.
        counters = integer_arrays(self.global_arrays, accepted) if self.global_arrays is not None else {}
        # in a fixed order, not the replies' arrival order: float sums depend on their order, and the
        # same sites with the same seed must give the same model (node ids change with every
        # registration; sites may share a label, and only then is the weights' digest computed to
        # break the tie)
        label = {id(m): str(self.site_names.get(m.metadata.src_node_id, "")) for m in accepted}
        tied = len(set(label.values())) < len(accepted)
        key = {id(m): (label[id(m)], digest({k: a.numpy() for k, a in m.content["arrays"].items()}) if tied else "")
               for m in accepted}
        accepted = sorted(accepted, key=lambda m: key[id(m)])
        dp = self.settings.dp
        if dp.site_level:  # the unweighted mean: each site's clipped update moves it by at most clip / n
            for m in accepted:
                m.content["metrics"]["num-examples"] = 1
        arrays, _ = self.strategy.aggregate_train(server_round, accepted)
        if arrays is not None and self.global_arrays is not None:
            arrays = keep_dtypes(arrays, self.global_arrays, counters)
        if arrays is not None and dp.site_level and dp.site_noise_multiplier > 0:
            std = dp.site_noise_multiplier * dp.site_clip_norm / len(accepted)
            arrays = ArrayRecord({k: Array((a.numpy() + site_noise(a.shape, std)).astype(a.dtype))
                                  if np.issubdtype(np.dtype(a.dtype), np.floating) else a for k, a in arrays.items()})
        self.aggregate_seconds[server_round] = time.perf_counter() - started
        return arrays

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The strategy's aggregate of the sites' evaluations that are within their meaning,
        each weighted by at most max-weight-ratio times the lower median example count."""
        usable = []
        for msg in replies:
            problem = _evaluate_form(msg) or evaluation_problem(
                msg.metadata.src_node_id, dict(msg.content["metrics"]), self.expected_evaluate, self.screen.ranges, self.sites)
            if problem:
                self._record(server_round, msg.metadata.src_node_id, "rejected-evaluation", problem)
            else:
                usable.append(msg)
        counts = [float(m.content["metrics"]["num-examples"]) for m in usable]
        cap = weight_cap(counts, self.settings.max_weight_ratio)
        for m, n in zip(usable, counts):
            if cap is not None and n > cap:
                m.content["metrics"]["num-examples"] = cap
                self._record(server_round, m.metadata.src_node_id, "weight-capped",
                             f"its evaluation's num-examples={n:g} is above max-weight-ratio="
                             f"{self.settings.max_weight_ratio} times the lower median; it weighs {cap:g}")
        result = self.strategy.aggregate_evaluate(server_round, usable) if usable else None
        self.evaluate_metrics[server_round] = result
        return result

    def limit_sampling(self, connected: int) -> None:
        """Let the strategy sample from the sites connected now: Flower's sampling waits, with no
        end, until `min_available_nodes` are connected, and a lost site may never come back."""
        cap = min(self.settings.min_sites, connected)
        for name in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
            if getattr(self.strategy, name, 0):  # 0: the strategy does not sample for that
                setattr(self.strategy, name, cap)

    # -- checkpoints -------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a checkpoint keeps of the server's state: flat tensors (the strategy's arrays,
        server optimizer moments and momentum, under `flower/<attribute>/`: every attribute that
        holds an ArrayRecord, or a dict or list of arrays; the screen's memory under `screen/`),
        and the screen memory's plain data."""
        import torch  # lazily: the server's strategy needs torch only for a checkpoint

        out = {}
        for name, value in sorted(vars(self.strategy).items()):
            # records and dicts keep their order (a checkpoint's keys come back sorted): FedAvgM pairs
            # its current_arrays with the aggregate by position
            if isinstance(value, ArrayRecord):
                kind, items = "record", [(f"{i}/{k}", a.numpy()) for i, (k, a) in enumerate(value.items())]
            elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
                kind, items = "dict", [(f"{i}/{k}", v) for i, (k, v) in enumerate(value.items())]
            elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
                kind, items = "list", [(str(i), v) for i, v in enumerate(value)]
            else:
                continue
            out.update({f"flower/{name}/{kind}/{key}": torch.from_numpy(np.array(v, copy=True)) for key, v in items})
        arrays, plain = self.screen.memory.to_state()
        out.update({f"screen/{k}": torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()})
        return out, plain

    def restore(self, flat: dict[str, torch.Tensor], screen_state: dict[str, Any]) -> None:
        """Put back what `state` took out."""
        grouped: dict[tuple[str, str], dict[str, np.ndarray]] = defaultdict(dict)
        screen = {}
        for path, tensor in flat.items():
            part, _, rest = path.partition("/")
            if part == "screen":
                screen[rest] = tensor.numpy()
            else:
                name, kind, key = rest.split("/", 2)
                grouped[(name, kind)][key] = tensor.numpy()
        for (name, kind), values in grouped.items():
            if kind in ("record", "dict"):
                ordered = {k.split("/", 1)[1]: v for k, v in sorted(values.items(), key=lambda kv: int(kv[0].split("/", 1)[0]))}
                setattr(self.strategy, name, ArrayRecord({k: Array(v) for k, v in ordered.items()}) if kind == "record" else ordered)
            else:
                setattr(self.strategy, name, [values[str(i)] for i in range(len(values))])
        self.screen.memory = ScreenMemory.from_state(screen, screen_state)

    def _record(self, server_round: int, node: int, event: str, reason: str) -> None:
        site = self.site_names.get(node)
        log(WARNING, "Round %d: node %d (%s) %s: %s", server_round, node, site or "site unknown", event, reason)
        self.events[server_round].append({"node_id": node, "site": site, "event": event, "reason": reason})


def read_reply(msg: Message) -> tuple[str | None, dict[str, np.ndarray]]:
    """What is wrong with a reply's form as Flower carries it, else None and its arrays' values
    (read through Flower's own reader: a copy, never pickle)."""
    content = msg.content
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
        return (f"reply must hold one ArrayRecord 'arrays' and one MetricRecord 'metrics', "
                f"not {sorted(content.array_records)} and {sorted(content.metric_records)}"), {}
    values = {}
    for key, array in content["arrays"].items():
        try:
            values[key] = array.numpy()
        except (ValueError, TypeError, OSError) as err:
            return f"array {key!r} cannot be read: {err}", {}
        if values[key].dtype != np.dtype(array.dtype) or values[key].shape != tuple(array.shape):
            return (f"array {key!r} holds {values[key].dtype}{list(values[key].shape)} "
                    f"but declares {array.dtype}{list(array.shape)}"), {}
    return None, values


def _evaluate_form(msg: Message) -> str | None:
    if msg.has_error():
        return f"failed: {msg.error.reason}"
    if set(msg.content.metric_records) != {"metrics"}:
        return "evaluate reply must hold one MetricRecord 'metrics'"
    return None


def integer_arrays(reference: ArrayRecord, replies: list[Message]) -> dict[str, np.ndarray]:
    """The model's integer arrays after the round, never taken from what one site sent: a batch
    counter (BatchNorm's `num_batches_tracked`) moves on by the round's optimizer steps (the most
    any accepted site took: each site's steps are checked against the server's schedule); any
    other integer array stays the global model's. Integer arrays are not averaged."""
    steps = max((int(m.content["metrics"]["steps"]) for m in replies), default=0)
    out = {}
    for key, ref in reference.items():
        dtype = np.dtype(ref.dtype)
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            value = ref.numpy()
            out[key] = np.asarray(value + steps, dtype=dtype) if key.endswith("num_batches_tracked") else value
    return out


def keep_dtypes(aggregate: ArrayRecord, reference: ArrayRecord, counters: dict[str, np.ndarray]) -> ArrayRecord:
    """The aggregate in `reference`'s dtypes, with the integer arrays taken from `counters`."""
    out = {}
    for key, ref in reference.items():
        if key in counters:
            out[key] = Array(counters[key])
        else:
            value = aggregate[key]
            out[key] = value if value.dtype == ref.dtype else Array(np.asarray(value.numpy(), dtype=ref.dtype))
    return ArrayRecord(out)
