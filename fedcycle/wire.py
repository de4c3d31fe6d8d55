"""What travels between the ServerApp and the ClientApps, besides the model's arrays.

The server checks every reply against this schema (it imports nothing of the apps'); the
ClientApp writes these keys, and tests/test_strategy.py passes its real replies through the
server's check. A task's metrics (accuracy by default, or what
the task's `metrics` returns) travel under `train-<name>` (measured while training),
`received-<name>` (the received global model on the site's held-out split) and `<name>` (an
evaluate reply).
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

# What every train reply's MetricRecord holds, whatever the task.
TRAIN_KEYS = frozenset(
    {"num-examples", "train-loss", "train-seconds", "setup-seconds", "local-epochs", "steps",
     "lr-first", "lr-peak", "lr-last"}
)
# Added when the site evaluates the received model inside the train reply (site-eval = "train-reply").
RECEIVED_KEYS = frozenset({"received-loss", "val-examples"})
EVALUATE_KEYS = frozenset({"loss", "num-examples"})


def train_reply_keys(metric_names: Iterable[str], site_eval: str) -> frozenset[str]:
    names = tuple(metric_names)
    keys = TRAIN_KEYS | {f"train-{m}" for m in names}
    if site_eval == "train-reply":
        keys |= RECEIVED_KEYS | {f"received-{m}" for m in names}
    return frozenset(keys)


def evaluate_reply_keys(metric_names: Iterable[str]) -> frozenset[str]:
    return EVALUATE_KEYS | frozenset(metric_names)


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
