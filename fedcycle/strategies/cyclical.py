"""The cyclical learning-rate mechanism and the reply checks, for any Flower strategy.

`CyclicalMixin` goes in front of a Flower strategy class (`make_cyclical(FedAdam)`): every
round's train config then carries the server's learning-rate schedule and local epochs,
replies that must not be averaged are left out (and recorded) before the strategy sees
them, and the aggregate keeps the global model's dtypes (integer buffers such as
BatchNorm's `num_batches_tracked` are not averaged).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcycle.config import RunSettings
from fedcycle.schedules import LRSchedule
from fedcycle.strategies import peers
from fedcycle.privacy import site_noise
from fedcycle.wire import EvaluateConfig, EvaluateReply, RoundConfig, TrainReply

if TYPE_CHECKING:
    import torch


@dataclass
class Candidate:
    """A reply that passed the checks on its own, with its update (reply minus global model, per
    float array) and the update's norm, computed once and used by the checks against peers."""

    msg: Message
    update: dict[str, np.ndarray] | None
    norm: float | None
    measured: dict[str, Any]


class CyclicalMixin:
    """Server-set cyclical LR and local epochs, reply screening and dtype keeping."""

    def __init__(self, *args: Any, settings: RunSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flower_attributes = frozenset(vars(self))  # the wrapped strategy's own state
        self.settings = settings
        self.expect_metrics(["accuracy"])
        self.declared_examples: dict[int, int] = {}  # node id -> train examples, from pre-flight
        self.declared_val: dict[int, int] = {}  # node id -> held-out examples, from pre-flight
        self.site_names: dict[int, str] = {}  # node id -> the site's name, from pre-flight
        self.late_nodes: set[int] = set()  # connected after the pre-flight round: never sent work
        self.reply_digests: dict[str, tuple[int, int]] = {}  # a reply's weights -> (round, node) that first sent them
        self.events: dict[int, list[dict]] = defaultdict(list)  # round -> replies left out, sites missing
        self.site_metrics: dict[int, list[dict]] = defaultdict(list)  # round -> accepted replies' metrics
        self.sent_config: dict[int, dict] = {}  # round -> the train config the sites received
        self.evaluate_metrics: dict[int, MetricRecord | None] = {}
        self.sampled: dict[int, list[int]] = {}
        self.aggregate_seconds: dict[int, float] = {}
        self.global_arrays: ArrayRecord | None = None  # the model sent out this round
        self.global_floats: dict[str, np.ndarray] = {}  # its float arrays, to measure updates against
        self.global_norm = 0.0
        self.task_statistics: dict[str, list[float]] | None = None  # the sites' summed task statistics
        self.privacy_run = ""  # the run's first id: what the sites' DP ledgers file its rounds under
        self.evaluates_on_sites = False  # set by make_strategy: whether each round ends with an evaluate message

    def expect_metrics(self, names: Iterable[str]) -> None:
        """The task's metric names (agreed in the pre-flight round): what every reply must hold."""
        self.metric_names = list(names)
        self.expected_metrics = TrainReply.keys(self.metric_names, self.evaluates_received, self.settings.dp.enabled)
        self.expected_evaluate = EvaluateReply.keys(self.metric_names)

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
        )

    def round_train_config(self, server_round: int) -> dict[str, Any]:
        """The round's config as it travels (`RoundConfig.to_record`)."""
        return self.round_config(server_round).to_record()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.remember_global(arrays)
        self.site_metrics[server_round] = []  # a retried round keeps only its last attempt's replies
        config = ConfigRecord({**dict(config), **self.round_train_config(server_round)})
        messages = self.preflighted(server_round, super().configure_train(server_round, arrays, config, grid))
        # what the round's line in metrics.jsonl shows: as sent, FedProx's proximal-mu included,
        # less the task's statistics (the sites' totals, which config.json does not keep either)
        self.sent_config[server_round] = {k: v for k, v in config.items() if k != "task-statistics"}
        self.sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), **EvaluateConfig(server_round, self.settings.batch_size,
                                                                 self.task_statistics).to_record()})
        return self.preflighted(server_round, super().configure_evaluate(server_round, arrays, config, grid))

    def preflighted(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """The messages to sites that passed the pre-flight round. A site that connected after
        the pre-flight round is not sent work (its data, model and classes were never checked)
        and does not count against the round; it is named once, and takes part in the next run."""
        messages = list(messages)
        if not self.declared_examples:
            return messages
        for node in sorted({m.metadata.dst_node_id for m in messages} - set(self.declared_examples) - self.late_nodes):
            self.late_nodes.add(node)
            self.events[server_round].append({"node_id": node, "site": None, "event": "not-sampled",
                                              "reason": "it connected after the pre-flight round, which never checked it"})
            log(WARNING, "Round %d: node %d connected after the pre-flight round; it is not sent work in this run",
                server_round, node)
        return [m for m in messages if m.metadata.dst_node_id in self.declared_examples]

    def remember_global(self, arrays: ArrayRecord) -> None:
        """The model sent out this round: replies are checked and measured against it."""
        self.global_arrays = arrays
        self.global_floats = {
            k: _values(a) for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating)
        }
        self.global_norm = math.sqrt(sum(_squared_distance(v, None) for v in self.global_floats.values()))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.aggregate_accepted(server_round, self.screen_round(server_round, list(replies)))

    def screen_round(self, server_round: int, replies: list[Message],
                     unreachable: dict[int, str] | None = None) -> list[Message]:
        """The round's replies fit to average; the others, and every sampled site that did
        not reply, are recorded with the reason (`unreachable`: the SuperLink's, where it gave one)."""
        accepted = self.screen_replies(server_round, replies)
        replied = {m.metadata.src_node_id for m in replies}
        for node in self.sampled.get(server_round, []):
            if node not in replied:
                self.record_missing(server_round, node, "missing", unreachable)
        return accepted

    def record_missing(self, server_round: int, node: int, event: str, unreachable: dict[int, str] | None) -> None:
        reason = (unreachable or {}).get(node, f"no reply within round-timeout={self.settings.round_timeout}s")
        self._record(server_round, node, event, reason)

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's aggregate of replies that passed the checks, in the global model's dtypes."""
        if not accepted:
            log(WARNING, "Round %d: no reply could be averaged; the global model stays as it was", server_round)
            return None, None
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
        accepted = sorted(accepted, key=lambda m: (label[id(m)], peers.digest(m.content["arrays"]) if tied else ""))
        dp = self.settings.dp
        if dp.site_level:  # the unweighted mean: each site's clipped update moves it by at most clip / n
            for m in accepted:
                m.content["metrics"]["num-examples"] = 1
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.global_arrays is not None:
            arrays = keep_dtypes(arrays, self.global_arrays, counters)
        if arrays is not None and dp.site_level and dp.site_noise_multiplier > 0:
            std = dp.site_noise_multiplier * dp.site_clip_norm / len(accepted)
            arrays = ArrayRecord({k: Array((_values(a) + site_noise(a.shape, std)).astype(a.dtype))
                                  if k in self.global_floats else a for k, a in arrays.items()})
        self.aggregate_seconds[server_round] = time.perf_counter() - started
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = []
        for msg in replies:
            problem = self._evaluate_problem(msg)
            if problem:
                self._record(server_round, msg.metadata.src_node_id, "rejected-evaluation", problem)
            else:
                usable.append(msg)
        result = super().aggregate_evaluate(server_round, usable) if usable else None
        self.evaluate_metrics[server_round] = result
        return result

    # -- checks ----------------------------------------------------------------------

    def screen_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies fit to average; each other one is logged and recorded with its reason.
        Each reply is first checked on its own (form, finite values, the server's schedule,
        its change to the global model), then against the round's other replies. Each reply's
        arrays are decoded once, here."""
        candidates = []
        for msg in replies:
            problem, values = self._read_reply(msg)
            problem = problem or self._schedule_problem(server_round, msg.content["metrics"]) or _non_finite(values)
            update = norm = ratio = None
            if not problem and self.global_floats:
                update = {k: values[k] - ref for k, ref in self.global_floats.items()}
                norm = math.sqrt(sum(_squared_distance(u, None) for u in update.values()))
                ratio = norm / self.global_norm if self.global_norm else None
                bound = self.settings.max_update_ratio
                if not math.isfinite(norm):
                    problem = "its change to the global model overflows float32"
                elif ratio is not None and bound and not ratio <= bound:
                    problem = (
                        f"its change to the global model has {ratio:.3g} times the model's norm, "
                        f"above max-update-ratio={bound}"
                    )
                elif self.settings.dp.site_level and norm > self.settings.dp.site_clip_norm * (1 + 1e-5):
                    problem = (f"its update's norm {norm:.4g} is above dp.site-clip-norm={self.settings.dp.site_clip_norm}: "
                               "a site that does not clip its update")
            if problem:
                self._record(server_round, msg.metadata.src_node_id, "rejected", problem)
            else:
                candidates.append(Candidate(msg, update, norm, {"update-ratio": ratio}))
        accepted = self._screen_against_peers(server_round, candidates)
        for c in accepted:
            node = c.msg.metadata.src_node_id
            self.site_metrics[server_round].append(
                {"node_id": node, "site": self.site_names.get(node), **dict(c.msg.content["metrics"]), **c.measured}
            )
        return [c.msg for c in accepted]

    def _screen_against_peers(self, server_round: int, candidates: list["Candidate"]) -> list["Candidate"]:
        """The candidates that are not a replay and, with 3 or more, whose update does not pull
        the model back against the round's coordinate-wise median update by more than
        peer-pullback-ratio times the round's median update norm (its length times minus its
        cosine with that update: honest sites under label skew point slightly away, cosines down
        to -0.2 measured, while a sign-flipped update pulls back by most of its length). An
        update far longer than the round's median (peer-norm-ratio) is scaled down to that bound,
        not left out: under strong label skew an honest site's update can be several times its
        peers' (measured: 5.8 times at Dirichlet 0.1, README); a claimed example count above max-weight-ratio times the round's
        lower median is capped there. Each site so treated is named."""
        s = self.settings
        fresh = []
        for c in candidates:
            node, seen = c.msg.metadata.src_node_id, peers.digest(c.msg.content["arrays"])
            earlier = self.reply_digests.setdefault(seen, (server_round, node))
            if earlier != (server_round, node):  # a retried round may bring back a site's own reply
                self._record(server_round, node, "rejected",
                             f"its weights are identical to node {earlier[1]}'s reply in round {earlier[0]} (a replay)")
            else:
                fresh.append(c)
        if len(fresh) < 3 or not self.global_floats:
            return fresh
        norms = [c.norm for c in fresh]
        cosines = peers.cosines_to_median([c.update for c in fresh], norms)
        median_norm = statistics.median(norms)
        cap = peers.weight_cap([float(c.msg.content["metrics"]["num-examples"]) for c in fresh], s.max_weight_ratio)
        kept = []
        for c, norm, cosine in zip(fresh, norms, cosines):
            node = c.msg.metadata.src_node_id
            relative = norm / median_norm if median_norm else 1.0
            pullback = max(0.0, -cosine * relative)
            c.measured.update({"update-norm-to-median": relative, "peer-cosine": cosine, "peer-pullback": pullback})
            if s.peer_pullback_ratio and pullback > s.peer_pullback_ratio:
                self._record(server_round, node, "rejected",
                             f"its update pulls the model back against the round's median update by {pullback:.3g} "
                             f"times the round's median update norm, above peer-pullback-ratio={s.peer_pullback_ratio} (cosine "
                             f"{cosine:.3f}, norm {relative:.3g} times the round's median)")
                continue
            if s.peer_norm_ratio and median_norm and norm > s.peer_norm_ratio * median_norm:
                self._clip(c, s.peer_norm_ratio * median_norm / norm)
                self._record(server_round, node, "clipped",
                             f"its update's norm is {norm / median_norm:.3g} times the round's median; it is averaged "
                             f"scaled down to peer-norm-ratio={s.peer_norm_ratio} times the median")
            kept.append(c)
        for c in kept:
            n = float(c.msg.content["metrics"]["num-examples"])
            if cap is not None and n > cap:
                c.msg.content["metrics"]["num-examples"] = cap
                self._record(server_round, c.msg.metadata.src_node_id, "weight-capped",
                             f"num-examples={n:g} is above max-weight-ratio={s.max_weight_ratio} times the round's "
                             f"lower median; it is averaged with weight {cap:g}")
        return kept

    def _read_reply(self, msg: Message) -> tuple[str | None, dict[str, np.ndarray]]:
        """What is wrong with the reply's form, else None and its arrays' values."""
        problem, values = self._form_problem(msg), {}
        if problem is None:
            for key, array in msg.content["arrays"].items():
                try:
                    values[key] = _values(array)
                except (ValueError, TypeError, OSError) as err:
                    return f"array {key!r} cannot be read: {err}", {}
                if values[key].dtype != np.dtype(array.dtype) or values[key].shape != tuple(array.shape):
                    return (f"array {key!r} holds {values[key].dtype}{list(values[key].shape)} "
                            f"but declares {array.dtype}{list(array.shape)}"), {}
        return problem, values

    def _clip(self, c: Candidate, factor: float) -> None:
        """Scale a reply's update by `factor` (< 1): the reply becomes global + factor x update."""
        arrays = c.msg.content["arrays"]
        c.msg.content["arrays"] = ArrayRecord({
            k: Array((self.global_floats[k] + factor * c.update[k]).astype(self.global_floats[k].dtype))
            if k in self.global_floats else a for k, a in arrays.items()
        })

    def _form_problem(self, msg: Message) -> str | None:
        if msg.has_error():
            return f"failed: {msg.error.reason}"
        node = msg.metadata.src_node_id
        if self.declared_examples and node not in self.declared_examples:
            return "the site did not take part in the pre-flight round"
        content = msg.content
        if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
            return (
                f"reply must hold one ArrayRecord 'arrays' and one MetricRecord 'metrics', "
                f"not {sorted(content.array_records)} and {sorted(content.metric_records)}"
            )
        arrays, metrics = content["arrays"], content["metrics"]
        if self.global_arrays is not None:
            if list(arrays.keys()) != list(self.global_arrays.keys()):
                diff = sorted(set(self.global_arrays.keys()) ^ set(arrays.keys()))
                return f"array names differ from the global model's ({diff[:3]}{' ...' if len(diff) > 3 else ''})"
            for key, ref in self.global_arrays.items():
                got = arrays[key]
                if list(got.shape) != list(ref.shape) or got.dtype != ref.dtype:
                    return (
                        f"array {key!r} is {got.dtype}{list(got.shape)}, "
                        f"the global model's is {ref.dtype}{list(ref.shape)}"
                    )
        if set(metrics.keys()) != self.expected_metrics:
            got = set(metrics.keys())
            return f"metric keys differ: missing {sorted(self.expected_metrics - got)}, unexpected {sorted(got - self.expected_metrics)}"
        n = metrics["num-examples"]
        if not _positive_finite(n):
            return f"num-examples={n!r} must be a positive finite number"
        declared = self.declared_examples.get(node)
        if declared is not None and n > declared:
            return f"num-examples={n} is larger than the {declared} the site declared in the pre-flight round"
        if "val-examples" in metrics and (problem := self._more_held_out_than_declared(node, "val-examples", metrics["val-examples"])):
            return problem
        for key, value in metrics.items():
            if not _finite_number(value):
                return f"metric {key}={value!r} is not a finite number"
        return None

    def _schedule_problem(self, server_round: int, metrics: MetricRecord) -> str | None:
        """Why the learning rates a site reports are not those of the server's schedule, if they are not
        (after `_form_problem`: the metrics are finite numbers)."""
        config = self.sent_config.get(server_round)
        if config is None:
            return None
        sent = RoundConfig.from_record(config)
        n, steps = metrics["num-examples"], metrics["steps"]
        batch, epochs = sent.batch_size, sent.local_epochs
        per_epoch = math.ceil(n / batch)
        if steps != per_epoch * epochs:
            return (
                f"steps={steps}, but the server's schedule has {per_epoch * epochs} optimizer steps "
                f"({epochs} local epochs of {per_epoch} batches of {batch} for num-examples={n})"
            )
        want = schedule_summary(
            tuple(sorted(sent.schedule.to_config().items())), per_epoch, epochs, server_round, sent.epochs_before,
        )
        for key, expected in zip(("lr-first", "lr-peak", "lr-last"), want):
            got = metrics[key]
            if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-12):
                return f"{key}={got:.6g}, but the server's schedule gives {expected:.6g} for round {server_round}"
        return None

    # -- checkpoints -------------------------------------------------------------------

    def state_arrays(self) -> dict[str, "torch.Tensor"]:
        """The wrapped strategy's array state (server optimizer moments, momentum), flat, for
        a checkpoint: every attribute that holds an ArrayRecord, or a dict or list of arrays."""
        import torch  # lazily: the server's strategy needs torch only for a checkpoint

        out = {}
        for name in sorted(self.flower_attributes):
            value = getattr(self, name, None)
            if isinstance(value, ArrayRecord):
                kind, items = "record", [(k, a.numpy()) for k, a in value.items()]
            elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
                kind, items = "dict", list(value.items())
            elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
                kind, items = "list", [(str(i), v) for i, v in enumerate(value)]
            else:
                continue
            out.update({f"{name}/{kind}/{key}": torch.from_numpy(np.array(v, copy=True)) for key, v in items})
        return out

    def restore_state_arrays(self, flat: dict[str, "torch.Tensor"]) -> None:
        """Put back what `state_arrays` took out."""
        grouped: dict[tuple[str, str], dict[str, np.ndarray]] = defaultdict(dict)
        for path, tensor in flat.items():
            name, kind, key = path.split("/", 2)
            grouped[(name, kind)][key] = tensor.numpy()
        for (name, kind), values in grouped.items():
            if kind == "record":
                setattr(self, name, ArrayRecord({k: Array(v) for k, v in values.items()}))
            elif kind == "dict":
                setattr(self, name, values)
            else:
                setattr(self, name, [values[str(i)] for i in range(len(values))])

    def _evaluate_problem(self, msg: Message) -> str | None:
        if msg.has_error():
            return f"failed: {msg.error.reason}"
        if set(msg.content.metric_records) != {"metrics"}:
            return "evaluate reply must hold one MetricRecord 'metrics'"
        metrics = msg.content["metrics"]
        if set(metrics.keys()) != self.expected_evaluate:
            return f"evaluate metric keys are {sorted(metrics.keys())}, not {sorted(self.expected_evaluate)}"
        if not all(_finite_number(metrics[k]) for k in ("loss", *self.metric_names)):
            return f"the loss or a metric of {self.metric_names} is not a finite number"
        if not _positive_finite(metrics["num-examples"]):
            return f"num-examples={metrics['num-examples']!r} must be a positive finite number"
        return self._more_held_out_than_declared(msg.metadata.src_node_id, "num-examples", metrics["num-examples"])

    def _more_held_out_than_declared(self, node: int, key: str, count: float) -> str | None:
        """A reply that counts more held-out examples than the site declared in the pre-flight round."""
        declared = self.declared_val.get(node)
        if declared is not None and count > declared:
            return f"{key}={count!r} is more than the {declared} held-out examples the site declared in the pre-flight round"
        return None

    def _record(self, server_round: int, node: int, event: str, reason: str) -> None:
        site = self.site_names.get(node)
        log(WARNING, "Round %d: node %d (%s) %s: %s", server_round, node, site or "site unknown", event, reason)
        self.events[server_round].append({"node_id": node, "site": site, "event": event, "reason": reason})


@functools.lru_cache(maxsize=256)
def schedule_summary(schedule: tuple, per_epoch: int, epochs: int, server_round: int,
                     epochs_before: int) -> tuple[float, float, float]:
    """(first, peak, last) learning rate of a site's round under the server's schedule."""
    s = LRSchedule.from_config(dict(schedule))
    steps = per_epoch * epochs
    lrs = s.lrs(s.start_step(per_epoch, epochs, server_round, epochs_before), steps, s.cycle_steps(per_epoch, epochs),
                steps_before=epochs_before * per_epoch)
    return lrs[0], max(lrs), lrs[-1]


def _values(array: Array) -> np.ndarray:
    """A Flower Array's values, through Flower's own reader (a copy; never pickle)."""
    return array.numpy()


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_finite(value: Any) -> bool:
    return _finite_number(value) and value > 0


def _non_finite(values: dict[str, np.ndarray]) -> str | None:
    """NaN or Inf in a float array, or a negative BatchNorm running variance (averaged in, it
    turns every later evaluation into NaN)."""
    for key, v in values.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            return f"array {key!r} holds NaN or Inf"
        if key.endswith("running_var") and (v < 0).any():
            return f"array {key!r} holds a negative variance ({float(v.min()):.3g})"
    return None


def _squared_distance(a: np.ndarray, b: np.ndarray | None) -> float:
    """||a - b||^2 (||a||^2 without b), in float64; NaN or Inf in either makes it non-finite."""
    difference = a.astype(np.float64).ravel() - (0.0 if b is None else b.ravel())
    return float(np.dot(difference, difference))


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


def make_cyclical(strategy_class: type) -> type:
    """`strategy_class` with the cyclical schedule, reply checks and dtype keeping in front."""
    if issubclass(strategy_class, CyclicalMixin):
        return strategy_class
    return type(f"Cyclical{strategy_class.__name__}", (CyclicalMixin, strategy_class), {})


class CyclicalFedAvg(CyclicalMixin, FedAvg):
    """Weighted FedAvg whose every round's train config carries the cyclical LR and epochs."""
