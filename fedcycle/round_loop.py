"""fedcycle's own round loop, in place of Flower's `Strategy.start()`.

`Strategy.start()` always counts rounds from 1, waits forever for `min_available_nodes`, and
ends a round with whatever came back. fedcycle's loop starts at any round (a resumed run),
never waits longer than `round-timeout` for sites, gives every message that lifetime (a late
site does not go on to work on stale rounds), and retries a round with fewer usable replies
than `min-replies` / `min-reply-fraction` up to `round-retries` times before it stops the run
with a clear message. The strategy's own methods (configure, aggregate) do the rest.
"""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedcycle.config import RunSettings
from fedcycle.strategies.cyclical import CyclicalMixin


class RoundFailed(RuntimeError):
    """A round got too few usable replies, also after its retries."""

    def __init__(self, server_round: int, message: str) -> None:
        super().__init__(message)
        self.server_round = server_round


def run_rounds(
    grid: Grid,
    strategy: CyclicalMixin,
    settings: RunSettings,
    arrays: ArrayRecord,
    first_round: int,
    round_done: Callable[[int, ArrayRecord], None],
) -> ArrayRecord:
    """Rounds `first_round`..`num-server-rounds`; `round_done(round, arrays)` after each."""
    log(INFO, "Starting %s, rounds %d to %d:", type(strategy).__name__, first_round, settings.num_server_rounds)
    strategy.summary()
    for server_round in range(first_round, settings.num_server_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %d/%d]", server_round, settings.num_server_rounds)
        accepted = train_round(grid, strategy, settings, server_round, arrays)
        aggregated, _ = strategy.aggregate_accepted(server_round, accepted)
        if aggregated is not None:
            arrays = aggregated
        if strategy.evaluates_on_sites:
            messages = _with_lifetime(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), settings)
            metrics = strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=settings.round_timeout))
            log(INFO, "Round %d: the sites' evaluation of the global model: %s", server_round, metrics)
        round_done(server_round, arrays)
    return arrays


def train_round(
    grid: Grid, strategy: CyclicalMixin, settings: RunSettings, server_round: int, arrays: ArrayRecord
) -> list[Message]:
    """The round's usable train replies; retried while too few, RoundFailed in the end."""
    attempts = settings.round_retries + 1
    for attempt in range(1, attempts + 1):
        connected = wait_for_sites(grid, settings.min_replies, settings.round_timeout)
        if connected < settings.min_replies:
            shortfall = f"only {connected} site(s) connected, min-replies={settings.min_replies}"
        else:
            limit_sampling(strategy, connected)
            messages = _with_lifetime(strategy.configure_train(server_round, arrays, ConfigRecord(), grid), settings)
            replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
            accepted = strategy.screen_round(server_round, replies)
            needed = max(settings.min_replies, math.ceil(settings.min_reply_fraction * len(messages)))
            if len(accepted) >= needed:
                return accepted
            shortfall = (
                f"{len(accepted)} usable repl{'y' if len(accepted) == 1 else 'ies'} of {len(messages)} sampled site(s), "
                f"at least {needed} needed (min-replies={settings.min_replies}, "
                f"min-reply-fraction={settings.min_reply_fraction})"
            )
        strategy.events[server_round].append({"event": "round-attempt-failed", "attempt": attempt, "reason": shortfall})
        log(WARNING, "Round %d, attempt %d of %d: %s", server_round, attempt, attempts, shortfall)
    raise RoundFailed(
        server_round,
        f"round {server_round} failed {attempts} time(s) (round-retries={settings.round_retries}): {shortfall}. "
        "The checkpoints of the finished rounds are kept: bring the sites back and resume the run with "
        "resume-from, or lower min-replies / min-reply-fraction"
    )


def wait_for_sites(grid: Grid, wanted: int, timeout: float) -> int:
    """How many sites are connected, once `wanted` are or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        log(INFO, "Waiting for sites: %d connected, %d needed", connected, wanted)
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    return connected


def limit_sampling(strategy: CyclicalMixin, connected: int) -> None:
    """Let the strategy sample from the sites connected now: Flower's sampling waits, with no
    end, until `min_available_nodes` are connected, and a lost site may never come back."""
    cap = min(strategy.settings.min_sites, connected)
    for name in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
        if getattr(strategy, name, 0):  # 0: the strategy does not sample for that
            setattr(strategy, name, cap)


def _with_lifetime(messages, settings: RunSettings) -> list[Message]:
    """The messages, each to expire after round-timeout: a site that comes back late does not
    start work on a round the server has given up on."""
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = settings.round_timeout
    return messages
