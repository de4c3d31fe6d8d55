"""fedcycle's own round loop, in place of Flower's `Strategy.start()`.

`Strategy.start()` always counts rounds from 1, waits forever for `min_available_nodes`, and
ends a round with whatever came back. fedcycle's loop starts at any round (a resumed run) and
gives each round one deadline, `round-timeout` seconds from its start, that covers waiting for
sites, training, every retry and the sites' evaluation: a round with fewer usable replies than
`min-replies` / `min-reply-fraction` is tried again, up to `round-retries` times, while its
deadline allows, and then the run stops with a clear message. A site whose task's own code
failed stops the run at once (a retry would fail alike). Every message lives only until
the deadline (a late site does not go on to work on a round the server has given up on). The
coordinator (`fedcycle.coordinator`: the strategy, the schedule, the screen) does the rest.

Each round's result is a value, `RoundOutcome`: the global model after the round and what
happened on the way (the config sent, the accepted replies, the events, the sites' evaluation).
The loop hands it back; the recorder writes it and sends nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Iterator

import torch

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedcycle.config import RunSettings
from fedcycle.coordinator import Coordinator
from fedcycle.wire import add_traffic, superlink_errors, task_failed, traffic


@dataclass
class RoundOutcome:
    """What one round produced: the global model after it, and what happened on the way."""

    server_round: int
    arrays: ArrayRecord
    train_config: dict[str, Any] | None = None  # as the sites received it
    sites: list[dict] = field(default_factory=list)  # the accepted replies' metrics
    events: list[dict] = field(default_factory=list)  # replies left out, sites missing, failed attempts
    sites_evaluation: dict[str, float] | None = None  # the sites' weighted evaluation of `arrays`
    aggregate_seconds: float | None = None
    server_arrays: dict[str, torch.Tensor] = field(default_factory=dict)  # for the checkpoint: the strategy's and the screen's
    screen_state: dict[str, Any] = field(default_factory=dict)  # for the checkpoint: the screen memory's plain data
    traffic: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # "train"/"evaluate" -> site -> bytes


def stop_if_task_failed(server_round: int, replies: list[Message], names: dict[int, str],
                        attempts: list[dict] = ()) -> None:
    """TaskFailed when a site says the task's own code failed: it would fail the same way on
    every retry, so the run stops now, with the site's one line (`attempts`: the round's
    failed attempts before this one, kept with it)."""
    failed = [r for r in replies if task_failed(r)]
    if failed:
        node = failed[0].metadata.src_node_id
        more = f" (and {len(failed) - 1} more site(s))" if len(failed) > 1 else ""
        raise TaskFailed(server_round, f"site {names.get(node, '?')} (node {node}): {failed[0].error.reason}{more}",
                         attempts)


class RoundFailed(RuntimeError):
    """A round got too few usable replies, also after its retries: `attempts` are the events of
    its failed attempts; out of `run_rounds`, `outcome` holds all the round got."""

    def __init__(self, server_round: int, message: str, attempts: list[dict] = (),
                 outcome: RoundOutcome | None = None, traffic: dict[str, dict[str, int]] | None = None) -> None:
        super().__init__(message)
        self.server_round, self.attempts, self.outcome = server_round, list(attempts), outcome
        self.traffic = traffic or {}  # the failed attempts' bytes, site by site


class TaskFailed(RoundFailed):
    """Not too few replies: the task's own code failed at a site (its loop, loss or metrics), so
    the run stops at once, with no retry, and the message is the site's one line."""


# Replies are pulled every tenth of the time waited so far, at least every POLL_MAX_SECONDS (as
# Flower's own send_and_receive does): a simulated round whose sites reply within 2 s is not held
# up by a 3-s poll, and a round of hours asks the SuperLink once every 3 s.
POLL_MIN_SECONDS, POLL_MAX_SECONDS, POLL_FRACTION = 0.05, 3.0, 0.1
PROGRESS_SECONDS = 60.0  # a longer exchange says, once a minute, which sites have replied


def outcome_of(coordinator: Coordinator, server_round: int, arrays: ArrayRecord,
               events: list[dict] = (), traffic: dict[str, dict[str, dict[str, int]]] | None = None) -> RoundOutcome:
    """The round's outcome: `arrays`, and what the coordinator recorded of the round (taken out of
    it), with the loop's own `events`."""
    evaluation = coordinator.evaluate_metrics.pop(server_round, None)
    server_arrays, screen_state = coordinator.state()
    return RoundOutcome(
        server_round=server_round,
        arrays=arrays,
        train_config=coordinator.sent_config.pop(server_round, None),
        sites=coordinator.site_metrics.pop(server_round, []),
        events=[*coordinator.events.pop(server_round, []), *events],
        sites_evaluation=None if evaluation is None else {k: float(v) for k, v in evaluation.items()},
        aggregate_seconds=coordinator.aggregate_seconds.pop(server_round, None),
        server_arrays=server_arrays,
        screen_state=screen_state,
        traffic=traffic or {},
    )


def initial_round(grid: Grid, coordinator: Coordinator, settings: RunSettings, arrays: ArrayRecord,
                  sites_evaluate: bool) -> RoundOutcome:
    """Round 0, the initial model: evaluated by the sites when they are the only evaluation there
    is (no test split on the server); TaskFailed, with round 0's outcome, if their task fails."""
    if not sites_evaluate:
        return outcome_of(coordinator, 0, arrays)
    try:
        _, exchanged = evaluate_on_sites(grid, coordinator, 0, arrays, settings.round_timeout)
    except RoundFailed as err:
        err.outcome = outcome_of(coordinator, 0, arrays)
        raise
    return outcome_of(coordinator, 0, arrays, traffic={"evaluate": exchanged})


def run_rounds(
    grid: Grid,
    coordinator: Coordinator,
    settings: RunSettings,
    arrays: ArrayRecord,
    first_round: int,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[RoundOutcome]:
    """Rounds `first_round`..`num-server-rounds`, each one's outcome as it ends; RoundFailed,
    with the failed round's outcome, when a round gets too few usable replies (TaskFailed, at
    once, when a site says the task's own code failed)."""
    log(INFO, "Starting %s, rounds %d to %d:", type(coordinator.strategy).__name__, first_round, settings.num_server_rounds)
    coordinator.strategy.summary()
    for server_round in range(first_round, settings.num_server_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %d/%d]", server_round, settings.num_server_rounds)
        deadline = clock() + settings.round_timeout
        try:
            arrays, events, exchanged = one_round(grid, coordinator, settings, server_round, arrays, deadline, clock, sleep)
        except RoundFailed as err:
            err.outcome = outcome_of(coordinator, server_round, arrays, err.attempts,
                                     {"train": err.traffic} if err.traffic else None)
            raise
        yield outcome_of(coordinator, server_round, arrays, events, exchanged)


def one_round(grid: Grid, coordinator: Coordinator, settings: RunSettings, server_round: int, arrays: ArrayRecord,
              deadline: float, clock: Callable[[], float], sleep: Callable[[float], None],
              ) -> tuple[ArrayRecord, list[dict], dict[str, dict[str, dict[str, int]]]]:
    """A round's training, aggregation and (where the sites evaluate) evaluation: the global
    model after it, the loop's events, and each site's bytes received and sent, by exchange."""
    accepted, events, trained = train_round(grid, coordinator, settings, server_round, arrays, deadline, clock, sleep)
    aggregated = coordinator.aggregate(server_round, accepted)
    if aggregated is not None:
        arrays = aggregated
    exchanged = {"train": trained}
    if coordinator.evaluates_on_sites:
        left = deadline - clock()
        if left > 0:
            metrics, exchanged["evaluate"] = evaluate_on_sites(grid, coordinator, server_round, arrays, left, clock,
                                                               sleep)
        else:
            events.append(
                {"event": "evaluation-skipped", "reason": f"round-timeout={settings.round_timeout}s spent on training"})
            metrics = coordinator.aggregate_evaluate(server_round, [])
        log(INFO, "Round %d: the sites' evaluation of the global model: %s", server_round, metrics)
    return arrays, events, exchanged


def exchange(grid: Grid, messages: list[Message], timeout: float, what: str, names: dict[int, str],
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> list[Message]:
    """Flower's send_and_receive (push the messages, pull the replies until all are in or
    `timeout` has passed), saying once a minute which sites have replied and which are awaited:
    a round of a real federation can take hours."""
    pending = {message_id: m.metadata.dst_node_id for message_id, m in zip(grid.push_messages(messages), messages)}
    total, started, replies = len(pending), clock(), []
    next_report = started + PROGRESS_SECONDS
    while pending:
        got = list(grid.pull_messages(list(pending)))
        replies += got
        for reply in got:
            pending.pop(reply.metadata.reply_to_message_id, None)
        now = clock()
        if not pending or now - started >= timeout:
            break
        if now >= next_report:
            next_report += PROGRESS_SECONDS
            log(INFO, "%s: %d of %d sites replied; waiting for %s (%.0f min of %.0f)", what, total - len(pending), total,
                ", ".join(sorted(names.get(n, f"node {n}") for n in pending.values())), (now - started) / 60, timeout / 60)
        poll = min(POLL_MAX_SECONDS, max(POLL_MIN_SECONDS, POLL_FRACTION * (now - started)))
        sleep(min(poll, started + timeout - now))
    return replies


def evaluate_on_sites(grid: Grid, coordinator: Coordinator, server_round: int, arrays: ArrayRecord, seconds: float,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep,
                      ) -> tuple[MetricRecord | None, dict[str, dict[str, int]]]:
    """The sites' evaluation of `arrays`, aggregated by the coordinator, and its traffic; a site
    the SuperLink answered for is recorded as missing with its reason."""
    messages = _with_lifetime(coordinator.configure_evaluate(server_round, arrays, grid), seconds)
    replies, unreachable = superlink_errors(messages, exchange(grid, messages, seconds, f"Round {server_round} evaluation",
                                                               coordinator.site_names, clock, sleep))
    exchanged = traffic(messages, replies, coordinator.site_names)
    for node in sorted(unreachable):
        coordinator.record_missing(server_round, node, "missing-evaluation", unreachable)
    metrics = coordinator.aggregate_evaluate(server_round, replies)
    stop_if_task_failed(server_round, replies, coordinator.site_names)
    return metrics, exchanged


def train_round(
    grid: Grid, coordinator: Coordinator, settings: RunSettings, server_round: int, arrays: ArrayRecord,
    deadline: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[Message], list[dict], dict[str, dict[str, int]]]:
    """The round's usable train replies, retried while too few and the deadline allows, an
    event for each attempt that failed, and every attempt's traffic; RoundFailed (its
    `attempts`: those events) in the end."""
    attempts, failed, exchanged = settings.round_retries + 1, [], {}
    for attempt in range(1, attempts + 1):
        connected = wait_for_sites(grid, settings.min_replies, deadline, clock, sleep)
        left = deadline - clock()
        if connected < settings.min_replies:
            shortfall = f"only {connected} site(s) connected, min-replies={settings.min_replies}"
        elif left <= 0:
            shortfall = f"the round's deadline (round-timeout={settings.round_timeout}s) passed"
        else:
            coordinator.limit_sampling(connected)
            messages = _with_lifetime(coordinator.configure_train(server_round, arrays, grid), left)
            replies, unreachable = superlink_errors(messages, exchange(grid, messages, left, f"Round {server_round}",
                                                                       coordinator.site_names, clock, sleep))
            exchanged = add_traffic(exchanged, traffic(messages, replies, coordinator.site_names))
            accepted = coordinator.screen_round(server_round, replies, unreachable)
            stop_if_task_failed(server_round, replies, coordinator.site_names, failed)
            needed = max(settings.min_replies, math.ceil(settings.min_reply_fraction * len(messages)))
            if len(accepted) >= needed:
                return accepted, failed, exchanged
            shortfall = (
                f"{len(accepted)} usable repl{'y' if len(accepted) == 1 else 'ies'} of {len(messages)} sampled site(s), "
                f"at least {needed} needed (min-replies={settings.min_replies}, "
                f"min-reply-fraction={settings.min_reply_fraction})"
            )
        failed.append({"event": "round-attempt-failed", "attempt": attempt, "reason": shortfall})
        log(WARNING, "Round %d, attempt %d of %d: %s", server_round, attempt, attempts, shortfall)
        if clock() >= deadline:
            break
    raise RoundFailed(
        server_round,
        f"round {server_round} failed {attempt} time(s) (round-retries={settings.round_retries}, "
        f"round-timeout={settings.round_timeout}s for the whole round): {shortfall}. "
        "The checkpoints of the finished rounds are kept: bring the sites back and resume the run with "
        "resume-from, or lower min-replies / min-reply-fraction",
        failed,
        traffic=exchanged,
    )


def wait_for_sites(grid: Grid, wanted: int, deadline: float, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> int:
    """How many sites are connected, once `wanted` are or the deadline has passed."""
    while (connected := len(list(grid.get_node_ids()))) < wanted and clock() < deadline:
        log(INFO, "Waiting for sites: %d connected, %d needed", connected, wanted)
        sleep(min(5.0, max(0.0, deadline - clock())))
    return connected


def _with_lifetime(messages, seconds: float) -> list[Message]:
    """The messages, each to expire at the round's deadline: a site that comes back late does
    not start work on a round the server has given up on."""
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = seconds
    return messages
