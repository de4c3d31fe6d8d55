"""What travels between the ServerApp and the ClientApps, besides the model's arrays: one schema
that both apps import.

- `RoundConfig`: what a site needs to train a round exactly as the server means (the schedule,
  local epochs, batch size, optimizer, mixed precision, whether to evaluate the received model);
- `EvaluateConfig`: what a site needs to evaluate the global model (and, in the pre-flight
  round, to pass one batch through it);
- `TrainReply` and `EvaluateReply`: the numbers a site sends back;
- `SiteReport`: a site's answer to the pre-flight round;
- `EVENTS`: the kinds of event the server records in a round (what the screen left out, who
  was missing);
- `TASK_FAILED` / `SITE_FAILED`: the codes of a site's failed reply.

Each has `to_record()` and `from_record()` (Flower's ConfigRecord / MetricRecord values); a
round trip through them is exact (tests/test_wire.py). A task's metrics (accuracy by default, or
what the task's `metrics` returns) travel under `train-<name>` (measured while training),
`received-<name>` (the received global model on the site's held-out split) and `<name>` (an
evaluate reply).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fedcycle.schedules import LRSchedule

# The kinds of event in a round's `events` (metrics.jsonl, the trackers): a reply the screen
# left out, scaled down or capped, a site that did not reply, and the round's own troubles.
EVENTS = {
    "rejected": "a reply the screen left out of the average",
    "clipped": "a reply whose update was far longer than its peers' (peer-norm-ratio), averaged scaled down",
    "weight-capped": "a reply whose example count was capped",
    "failed": "a site whose ClientApp failed; the reason is its one line, as its policy lets it go",
    "missing": "a sampled site that sent no train reply",
    "rejected-evaluation": "an evaluate reply left out of the sites' evaluation",
    "missing-evaluation": "a site that sent no evaluate reply",
    "not-sampled": "a site that connected after the pre-flight round",
    "round-attempt-failed": "an attempt of the round that got too few usable replies",
    "evaluation-skipped": "the sites' evaluation, skipped because the round's time was spent",
}
# The events that concern one site's reply (counted as "left out" in a round's summary).
SCREEN_EVENTS = ("rejected", "clipped", "weight-capped", "failed", "missing")


@dataclass(frozen=True)
class RoundConfig:
    """A train message's config: set by the server's strategy, followed by the site."""

    server_round: int
    schedule: LRSchedule
    local_epochs: int
    epochs_before: int  # local epochs this site's schedule ran in earlier rounds
    batch_size: int
    optimizer: str
    momentum: float
    weight_decay: float
    mixed_precision: bool = False
    evaluate_received: bool = True  # evaluate the received model on the held-out split first
    proximal_mu: float = 0.0  # FedProx's term, which Flower's FedProx adds to the config itself
    task_statistics: dict[str, list[float]] | None = None  # the sites' summed task statistics
    privacy_run: str = ""  # the run a site's DP ledger files this round under (a resumed run keeps it)
    train_metrics: tuple[str, ...] | None = None  # what the sites' training loops declared in pre-flight (None: all)

    def to_record(self) -> dict[str, Any]:
        record = {
            "server-round": self.server_round,
            **self.schedule.to_config(),
            "local-epochs": self.local_epochs,
            "epochs-before": self.epochs_before,
            "batch-size": self.batch_size,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight-decay": self.weight_decay,
            "mixed-precision": self.mixed_precision,
            "evaluate-received": self.evaluate_received,
            "proximal-mu": self.proximal_mu,
            "privacy-run": self.privacy_run,
        }
        if self.task_statistics is not None:
            record["task-statistics"] = json.dumps(self.task_statistics)
        if self.train_metrics is not None:  # JSON: a ConfigRecord cannot hold an empty list
            record["train-metrics"] = json.dumps(list(self.train_metrics))
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RoundConfig":
        return cls(
            server_round=int(record["server-round"]),
            schedule=LRSchedule.from_config(dict(record)),
            local_epochs=int(record["local-epochs"]),
            epochs_before=int(record["epochs-before"]),
            batch_size=int(record["batch-size"]),
            optimizer=str(record["optimizer"]),
            momentum=float(record["momentum"]),
            weight_decay=float(record["weight-decay"]),
            mixed_precision=bool(record["mixed-precision"]),
            evaluate_received=bool(record["evaluate-received"]),
            proximal_mu=float(record.get("proximal-mu", 0.0)),
            task_statistics=_statistics(record),
            privacy_run=str(record.get("privacy-run", "")),
            train_metrics=tuple(json.loads(str(record["train-metrics"]))) if "train-metrics" in record else None,
        )


@dataclass(frozen=True)
class EvaluateConfig:
    """An evaluate message's config, and the pre-flight query's (round 0): the batch size the
    site evaluates with, or passes one batch of through the model."""

    server_round: int
    batch_size: int
    task_statistics: dict[str, list[float]] | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"server-round": self.server_round, "batch-size": self.batch_size}
        if self.task_statistics is not None:
            record["task-statistics"] = json.dumps(self.task_statistics)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "EvaluateConfig":
        return cls(int(record["server-round"]), int(record["batch-size"]), _statistics(record))


def _statistics(record: Mapping[str, Any]) -> dict[str, list[float]] | None:
    return json.loads(str(record["task-statistics"])) if "task-statistics" in record else None


@dataclass(frozen=True)
class TrainReply:
    """A train reply's metrics: what the site trained, and how the received model fared."""

    num_examples: int
    train_loss: float
    train_metrics: dict[str, float]
    train_seconds: float
    setup_seconds: float  # data, model, weights, device: before the first step
    local_epochs: int
    steps: int
    lr_first: float
    lr_peak: float
    lr_last: float
    received: "EvaluateReply | None" = None  # the received model on the held-out split
    epsilon: float | None = None  # under DP-SGD: the epsilon the site has spent in this run so far
    processes: int = 1  # the processes it trained on (`nproc-per-site`)

    SCALARS = ("num-examples", "train-loss", "train-seconds", "setup-seconds", "local-epochs", "steps",
               "lr-first", "lr-peak", "lr-last", "processes")

    def to_record(self) -> dict[str, float | int]:
        record: dict[str, float | int] = {
            "num-examples": self.num_examples, "train-loss": self.train_loss, "train-seconds": self.train_seconds,
            "setup-seconds": self.setup_seconds, "local-epochs": self.local_epochs, "steps": self.steps,
            "lr-first": self.lr_first, "lr-peak": self.lr_peak, "lr-last": self.lr_last, "processes": self.processes,
            **{f"train-{k}": v for k, v in self.train_metrics.items()},
        }
        if self.epsilon is not None:
            record["epsilon"] = self.epsilon
        if self.received is not None:
            record.update({"received-loss": self.received.loss, "val-examples": self.received.num_examples,
                           **{f"received-{k}": v for k, v in self.received.metrics.items()}})
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], metric_names: Iterable[str],
                    train_metric_names: Iterable[str] | None = None) -> "TrainReply":
        names = list(metric_names)
        trained = names if train_metric_names is None else list(train_metric_names)
        received = None
        if "received-loss" in record:
            received = EvaluateReply(record["received-loss"], {n: record[f"received-{n}"] for n in names},
                                     record["val-examples"])
        return cls(
            num_examples=record["num-examples"], train_loss=record["train-loss"],
            train_metrics={n: record[f"train-{n}"] for n in trained}, train_seconds=record["train-seconds"],
            setup_seconds=record["setup-seconds"], local_epochs=record["local-epochs"], steps=record["steps"],
            lr_first=record["lr-first"], lr_peak=record["lr-peak"], lr_last=record["lr-last"], received=received,
            epsilon=record.get("epsilon"), processes=int(record["processes"]),
        )

    @staticmethod
    def keys(metric_names: Iterable[str], evaluate_received: bool, private: bool = False,
             train_metric_names: Iterable[str] | None = None) -> frozenset[str]:
        """Every key a train reply holds: what the server checks a reply against (`private`:
        the sites train with DP-SGD and report their epsilon; `train_metric_names`: the metrics
        the sites' training loop reports, by default all the task's)."""
        names = tuple(metric_names)
        trained = names if train_metric_names is None else tuple(train_metric_names)
        keys = set(TrainReply.SCALARS) | {f"train-{m}" for m in trained} | ({"epsilon"} if private else set())
        if evaluate_received:
            keys |= {"received-loss", "val-examples"} | {f"received-{m}" for m in names}
        return frozenset(keys)


@dataclass(frozen=True)
class EvaluateReply:
    """A model's loss and the task's metrics on a site's held-out split (`num_examples` of it)."""

    loss: float
    metrics: dict[str, float]
    num_examples: int

    def to_record(self) -> dict[str, float | int]:
        return {"loss": self.loss, **self.metrics, "num-examples": self.num_examples}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], metric_names: Iterable[str]) -> "EvaluateReply":
        return cls(record["loss"], {n: record[n] for n in metric_names}, record["num-examples"])

    @staticmethod
    def keys(metric_names: Iterable[str]) -> frozenset[str]:
        return frozenset({"loss", "num-examples", *metric_names})


@dataclass(frozen=True)
class SiteReport:
    """A site's pre-flight answer: what it would train (the server compares it with its own), or
    the error that keeps it out (`ok` false, `error` says why)."""

    ok: bool = True
    error: str = ""
    refused: bool = False  # the site's policy forbids the run: it stays out, the run may go on without it
    site: str = ""
    num_train: int = 0
    num_val: int = 0
    metric_names: list[str] = field(default_factory=list)
    train_metric_names: list[str] = field(default_factory=list)  # those the site's training loop reports
    inputs: str = ""  # one example's structure (fedcycle.batches.describe)
    targets: str = ""
    model: list[str] = field(default_factory=list)  # the model's fingerprint: name, dtype, shape per array
    device: str = ""
    device_name: str = ""
    python: str = ""
    torch: str = ""
    torchvision: str = ""
    flwr: str = ""
    classes: list[str] | None = None  # where the site's data names its classes
    statistics: dict[str, list[float]] | None = None  # the task's sums over the site's train split

    def to_record(self) -> dict[str, Any]:
        """The report's ConfigRecord values (a failed report holds `ok`, `error`, `refused` and
        the site's name only)."""
        if not self.ok:
            return {"ok": False, "error": self.error, "refused": self.refused, "site": self.site}
        record = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)
                  if f.name not in ("error", "refused", "classes", "statistics")}
        if self.classes is not None:
            record["classes"] = list(self.classes)
        if self.statistics is not None:
            record["statistics"] = json.dumps(self.statistics)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SiteReport":
        """The report, its values as sent (the pre-flight checks their kinds); KeyError names a
        key a site's report lacks (another fedcycle version)."""
        if not record.get("ok"):
            return cls(ok=False, error=str(record.get("error", "")), refused=bool(record.get("refused", False)),
                       site=str(record.get("site", "")))
        missing = [k for k in REPORT_KEYS if k not in record]
        if missing:
            raise KeyError(missing)
        values = {f.name: record[f.name.replace("_", "-")] for f in fields(cls)
                  if f.name.replace("_", "-") in record and f.name not in ("statistics", "error")}
        for key in ("metric_names", "train_metric_names", "model", "classes"):
            if isinstance(values.get(key), tuple):
                values[key] = list(values[key])
        if "statistics" in record:
            values["statistics"] = _json_or_raw(record["statistics"])
        return cls(**values)


# What every report that says ok must hold.
REPORT_KEYS = ("site", "num-train", "num-val", "metric-names", "train-metric-names", "inputs", "targets", "model", "device", "torch", "flwr")


def _json_or_raw(value: Any) -> Any:
    """JSON text as its value; anything else as it came (the pre-flight names what is wrong)."""
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


# A site's failed reply is Flower's Error with one line its policy lets go. Its code says which:
# the task's own code (a TaskError: its loop, loss or metrics) fails the same way every try, so
# the server stops the run at once; anything else is Flower's code for a ClientApp that raised.
TASK_FAILED = 4220
SITE_FAILED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def task_failed(reply: Message) -> bool:
    """Whether a reply says the task's own code failed at the site."""
    return reply.has_error() and reply.error.code == TASK_FAILED


def superlink_errors(sent: Iterable[Message], replies: Iterable[Message]) -> tuple[list[Message], dict[int, str]]:
    """The sites' own replies, and {node: reason} for each error the SuperLink returned in a
    site's place (its node stopped sending heartbeats, or the message expired unanswered).
    Flower sends those from the SuperLink's node id; only the message they answer names the
    site."""
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    own, unreachable = [], {}
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id)
        if reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error() and node is not None:
            unreachable[node] = f"the SuperLink answered in its place: {reply.error.reason}"
        else:
            own.append(reply)
    return own, unreachable


def array_bytes(message: Message) -> int:
    """The bytes of the arrays a message carries, as they travel (the serialized tensors; its
    config and metrics, a few hundred bytes, not counted). A failed reply carries none."""
    if not message.has_content():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values() for array in record.values())


def traffic(sent: Iterable[Message], replies: Iterable[Message], names: Mapping[int, str]) -> dict[str, dict[str, int]]:
    """Each site's bytes in one exchange, from the site's side: `received` (what the server sent
    it) and `sent` (its reply)."""
    out: dict[str, dict[str, int]] = {}
    for kind, node_of, messages in (("received", lambda m: m.metadata.dst_node_id, sent),
                                    ("sent", lambda m: m.metadata.src_node_id, replies)):
        for message in messages:
            node = node_of(message)
            site = out.setdefault(str(names.get(node, f"node {node}")), {"received": 0, "sent": 0})
            site[kind] += array_bytes(message)
    return out


def add_traffic(*exchanges: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """The sum of several exchanges' traffic, site by site."""
    total: dict[str, dict[str, int]] = {}
    for exchange in exchanges:
        for site, counts in exchange.items():
            into = total.setdefault(site, {"received": 0, "sent": 0})
            for kind, n in counts.items():
                into[kind] += n
    return total
