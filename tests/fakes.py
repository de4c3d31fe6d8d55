"""Stand-ins and helpers the test files share. Nothing of Flower is mocked: a fake stands in for
what only a running federation has (the SuperLink's grid, the sites at the other end of it); the
messages, records, strategies and apps they carry are the real ones.

Each fake's docstring says what real thing it stands for.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedcycle.config import RunSettings
from fedcycle.coordinator import Coordinator
from fedcycle.site import load_site
from fedcycle.strategies import make_coordinator
from fedcycle.wire import EvaluateConfig, RoundConfig, TrainReply

# The arrays of a tiny model: what the strategy tests aggregate.
SHAPES = {"conv.weight": (4, 3), "conv.bias": (4,)}


def arrays(rng, scale=1.0, shapes=SHAPES) -> dict[str, np.ndarray]:
    """A model's weights as a site would send them: float32 arrays of `shapes`, normal noise
    times `scale`."""
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def reply(node: int, weights: dict[str, np.ndarray], n: float, to: Message | None = None, **metrics: float) -> Message:
    """A train reply as fedcycle's ClientApp sends it (every metric 1.0 unless given), to the
    message `to` if given: stands for a site's reply to a train message, as the SuperLink hands
    it to the ServerApp."""
    instruction = to or Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    values = {key: 1.0 for key in TrainReply.keys(["accuracy"], evaluate_received=True)}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "metrics": MetricRecord({**values, "num-examples": n, **metrics}),
        }
    )
    return Message(content, reply_to=instruction)


class Sites(Grid):
    """The connected sites as a strategy's sampling sees them: node ids, nothing sent. Stands for
    Flower's Grid (the ServerApp's line to the SuperLink) where a test sends no message; any
    attempt to send one fails. A subclass answers the messages a test expects."""

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def pull_messages(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, *args, **kwargs):
        raise NotImplementedError

    def send_and_receive(self, *args, **kwargs):
        raise NotImplementedError

    def set_run(self, *args, **kwargs):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError


class AnsweringSites(Sites):
    """Flower's Grid with a site behind each node id that answers at once: stands for the
    SuperLink delivering each message to its site's ClientApp and handing back the reply.
    `answer(message)` makes the reply (e.g. fedcycle's own ClientApp handler with the site's
    Context), in the process of the test, or returns None for a site that never replies; `sent`
    keeps every message, in order."""

    def __init__(self, nodes, answer: Callable[[Message], Message]) -> None:
        super().__init__(nodes)
        self.answer, self.sent, self.waiting = answer, [], []

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's grids do when they push
        self.sent += messages
        self.waiting += [r for r in map(self.answer, messages) if r is not None]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids) -> list[Message]:
        ready = [r for r in self.waiting if r.metadata.reply_to_message_id in message_ids]
        self.waiting = [r for r in self.waiting if r not in ready]
        return ready


def context(run_config: dict, node_config: dict) -> Context:
    """The Context Flower gives a ClientApp handler: the run config and this site's node config."""
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def train_message(run_config: dict, node_config: dict | None = None, server_round: int = 1, **known) -> Message:
    """A round's train message to one site, as the server's coordinator makes it (`known`: what
    pre-flight told it, see Coordinator): the round's config and the model the site builds."""
    known.setdefault("privacy_run", "run-a")
    coordinator = make_coordinator(RunSettings.from_run_config(run_config), num_sites=1, **known)
    config = ConfigRecord(coordinator.round_config(server_round).to_record())
    model = load_site(run_config, node_config or {"partition-id": 0}).new_model()
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}), dst_node_id=1,
                   message_type="train")


def start_round(coordinator: Coordinator, server_round: int, arrays: ArrayRecord, nodes) -> dict[str, float]:
    """Open a round as the round loop does (configure_train); the schedule metrics an honest
    site with 10 examples reports for it."""
    coordinator.configure_train(server_round, arrays, Sites(nodes))
    return honest_schedule(coordinator, server_round)


def honest_schedule(coordinator: Coordinator, server_round: int, n: int = 10) -> dict[str, float]:
    """The steps and learning rates an honest site with `n` examples reports for an open round:
    its scheduler's rates, step by step."""
    sent = RoundConfig.from_record(coordinator.sent_config[server_round])
    per_epoch, epochs, s = math.ceil(n / sent.batch_size), sent.local_epochs, sent.schedule
    start, cycle, before = s.site_clock(per_epoch, epochs, server_round, sent.epochs_before)
    lrs = s.lrs(start, per_epoch * epochs, cycle, steps_before=before)
    return {"steps": float(per_epoch * epochs), "lr-first": lrs[0], "lr-peak": max(lrs), "lr-last": lrs[-1]}


def screen_and_average(coordinator: Coordinator, server_round: int, replies: list[Message]) -> ArrayRecord | None:
    """A round's replies through the screen and the strategy's average, as the round loop passes them."""
    return coordinator.aggregate(server_round, coordinator.screen_round(server_round, replies))


def preflight_query(batch_size: int = 64, node: int = 1) -> Message:
    """The pre-flight round's query as fedcycle's server sends it (`fedcycle.preflight`)."""
    config = ConfigRecord(EvaluateConfig(0, batch_size).to_record())
    return Message(RecordDict({"config": config}), dst_node_id=node, message_type="query")
