"""The cyclical learning-rate mechanism and the reply checks, for any Flower strategy.

`CyclicalMixin` goes in front of a Flower strategy class (`make_cyclical(FedAdam)`): every
round's train config then carries the server's learning-rate schedule and local epochs,
replies that must not be averaged are left out (and recorded) before the strategy sees
them, and the aggregate keeps the global model's dtypes (integer buffers such as
BatchNorm's `num_batches_tracked` are not averaged).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from logging import WARNING
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcycle.config import RunSettings


class CyclicalMixin:
    """Server-set cyclical LR and local epochs, reply screening and dtype keeping."""

    def __init__(self, *args: Any, settings: RunSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.declared_examples: dict[int, int] = {}  # node id -> train examples from pre-flight
        self.events: dict[int, list[dict]] = defaultdict(list)  # round -> rejected/missing sites
        self.site_metrics: dict[int, list[dict]] = defaultdict(list)  # round -> accepted replies
        self.evaluate_metrics: dict[int, MetricRecord | None] = {}
        self.sampled: dict[int, list[int]] = {}
        self.global_arrays: ArrayRecord | None = None  # the model sent out this round

    def round_train_config(self, server_round: int) -> dict[str, Any]:
        """What every site needs to train round `server_round` exactly as the server means."""
        s = self.settings
        return {
            **s.schedule.to_config(),
            "local-epochs": s.epochs_for_round(server_round),
            "epochs-before": sum(s.epochs_for_round(r) for r in range(1, server_round)),
            "batch-size": s.batch_size,
            "momentum": s.momentum,
            "weight-decay": s.weight_decay,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        config = ConfigRecord({**dict(config), **self.round_train_config(server_round)})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted = self.screen_replies(server_round, replies)
        replied = {m.metadata.src_node_id for m in replies}
        for node in self.sampled.get(server_round, []):
            if node not in replied:
                self._reject(server_round, node, "missing: no reply within the round timeout")
        if not accepted:
            log(WARNING, "Round %d: no reply could be averaged; the global model stays as it was", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.global_arrays is not None:
            arrays = keep_dtypes(arrays, self.global_arrays, accepted)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = [m for m in replies if not m.has_error()]
        keys = Counter(frozenset(_metrics(m).keys()) for m in replies)
        if keys:
            common = keys.most_common(1)[0][0]
            replies = [m for m in replies if frozenset(_metrics(m).keys()) == common]
        result = super().aggregate_evaluate(server_round, replies) if replies else None
        self.evaluate_metrics[server_round] = result
        return result

    # -- checks ----------------------------------------------------------------------

    def screen_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies fit to average; each other one is logged and recorded with its reason."""
        candidates = []
        for msg in replies:
            node = msg.metadata.src_node_id
            reason = self._reply_problem(msg)
            if reason:
                self._reject(server_round, node, reason)
            else:
                candidates.append(msg)
        # Flower's FedAvg ends the run on metric keys that differ; keep the common set.
        keys = Counter(frozenset(_metrics(m).keys()) for m in candidates)
        common = keys.most_common(1)[0][0] if keys else frozenset()
        accepted = []
        for msg in candidates:
            got = frozenset(_metrics(msg).keys())
            if got != common:
                diff = sorted(got ^ common)
                self._reject(server_round, msg.metadata.src_node_id, f"metric keys differ from the other sites' ({diff})")
            else:
                accepted.append(msg)
                self.site_metrics[server_round].append({"node_id": msg.metadata.src_node_id, **dict(_metrics(msg))})
        return accepted

    def _reply_problem(self, msg: Message) -> str | None:
        if msg.has_error():
            return f"failed: {msg.error.reason}"
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "reply must hold exactly one ArrayRecord and one MetricRecord"
        arrays = next(iter(content.array_records.values()))
        if self.global_arrays is not None:
            if list(arrays.keys()) != list(self.global_arrays.keys()):
                missing = sorted(set(self.global_arrays.keys()) ^ set(arrays.keys()))
                return f"arrays do not match the global model's ({missing[:3]} ...)"
            for key, ref in self.global_arrays.items():
                got = arrays[key]
                if list(got.shape) != list(ref.shape) or got.dtype != ref.dtype:
                    return (
                        f"array {key!r} is {got.dtype}{list(got.shape)}, "
                        f"the global model's is {ref.dtype}{list(ref.shape)}"
                    )
        for key, array in arrays.items():
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                return f"array {key!r} holds NaN or Inf"
        n = _metrics(msg).get("num-examples")
        declared = self.declared_examples.get(msg.metadata.src_node_id)
        if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
            return f"num-examples={n!r} must be a positive finite number"
        if declared is not None and n > declared:
            return f"num-examples={n} is larger than the {declared} the site declared in the pre-flight round"
        return None

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        log(WARNING, "Round %d: reply of node %d left out of the average: %s", server_round, node, reason)
        self.events[server_round].append({"node_id": node, "event": "rejected", "reason": reason})


def _metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


def keep_dtypes(aggregate: ArrayRecord, reference: ArrayRecord, replies: list[Message]) -> ArrayRecord:
    """Cast the aggregate back to `reference`'s dtypes; integer arrays (counters such as
    `num_batches_tracked`) take the largest value any site sent rather than an average."""
    out = {}
    for key, ref in reference.items():
        dtype = np.dtype(ref.dtype)
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            sent = [next(iter(m.content.array_records.values()))[key].numpy() for m in replies]
            out[key] = Array(np.asarray(np.max(np.stack(sent), axis=0), dtype=dtype))
        else:
            value = aggregate[key]
            out[key] = value if value.dtype == ref.dtype else Array(np.asarray(value.numpy(), dtype=dtype))
    return ArrayRecord(out)


def make_cyclical(strategy_class: type) -> type:
    """`strategy_class` with the cyclical schedule, reply checks and dtype keeping in front."""
    if issubclass(strategy_class, CyclicalMixin):
        return strategy_class
    return type(f"Cyclical{strategy_class.__name__}", (CyclicalMixin, strategy_class), {})


class CyclicalFedAvg(CyclicalMixin, FedAvg):
    """Weighted FedAvg whose every round's train config carries the cyclical LR and epochs."""
