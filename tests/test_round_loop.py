"""fedcycle's round loop against a clock the test sets: one deadline covers a round's waiting,
training, retries and evaluation. The sites are stand-ins that answer at once or stay silent."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedcycle.config import RunSettings
from fedcycle.round_loop import RoundFailed, run_rounds, train_round
from fedcycle.strategies import make_strategy
from tests.test_strategy import Sites, arrays, honest_schedule, reply


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SilentSites(Sites):
    """Connected sites that never reply: each send_and_receive waits out its timeout."""

    def __init__(self, nodes, clock: Clock) -> None:
        super().__init__(nodes)
        self.clock, self.timeouts = clock, []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        assert all(m.metadata.ttl == timeout for m in messages)  # every message expires at the deadline
        self.timeouts.append(timeout)
        self.clock.now += timeout
        return []


class BrokenSites(SilentSites):
    """Sites that reply after 10 s, every reply with NaN weights."""

    def send_and_receive(self, messages, timeout=None):
        self.timeouts.append(timeout)
        self.clock.now += 10
        rng = np.random.default_rng(0)
        bad = {k: v * np.nan for k, v in arrays(rng).items()}
        return [reply(m.metadata.dst_node_id, bad, 10) for m in messages]


def start(settings: RunSettings):
    strategy = make_strategy(settings, num_sites=2)
    return strategy, ArrayRecord({k: Array(v) for k, v in arrays(np.random.default_rng(1)).items()})


def test_silent_sites_use_up_one_deadline_not_one_per_retry(task_identity):
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=3)
    strategy, model = start(settings)
    grid = SilentSites([1, 2], clock)
    with pytest.raises(RoundFailed, match=r"round 1 failed 1 time\(s\) \(round-retries=3, round-timeout=100.0s for the whole round\)"):
        train_round(grid, strategy, settings, 1, model, deadline=clock() + 100, clock=clock)
    assert grid.timeouts == [100.0] and clock.now == 100.0  # not (retries + 1) x 100 s


def test_fast_failures_are_retried_within_the_deadline(task_identity):
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=2)
    strategy, model = start(settings)
    grid = BrokenSites([1, 2], clock)
    with pytest.raises(RoundFailed, match=r"round 1 failed 3 time\(s\)"):
        train_round(grid, strategy, settings, 1, model, deadline=clock() + 100, clock=clock)
    assert grid.timeouts == [100.0, 90.0, 80.0] and clock.now == 30.0  # each attempt gets what is left


def test_the_sites_evaluation_gets_what_is_left_of_the_round(task_identity):
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=0, min_replies=1, min_reply_fraction=0.0,
                           num_server_rounds=1)
    strategy, model = start(settings)
    strategy.evaluates_on_sites, strategy.fraction_evaluate, strategy.min_evaluate_nodes = True, 1.0, 1

    class SlowTraining(SilentSites):
        """Training takes 70 s and one site replies; the evaluation waits out its timeout."""

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            self.timeouts.append(timeout)
            if messages and messages[0].metadata.message_type == "train":
                self.clock.now += 70
                weights = {k: a.numpy() * 1.01 for k, a in model.items()}
                return [reply(1, weights, 10, **honest_schedule(strategy, 1))]
            self.clock.now += timeout
            return []

    grid = SlowTraining([1, 2], clock)
    run_rounds(grid, strategy, settings, model, 1, lambda r, a: None, clock=clock)
    assert grid.timeouts == [100.0, 30.0] and clock.now == 100.0


def test_a_site_the_superlink_answers_for_is_named_missing_with_the_superlinks_reason(task_identity):
    # Flower's SuperLink answers for a site whose node stopped sending heartbeats, from its own node
    # id (1): the round names the site the message went to, not node 1.
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=0, min_replies=1, min_reply_fraction=0.0)
    strategy, model = start(settings)
    strategy.min_available_nodes = strategy.min_train_nodes = 3
    strategy.site_names = {2: "site a", 3: "site b", 4: "site c"}

    class OneNodeGone(SilentSites):
        def send_and_receive(self, messages, timeout=None):
            replies = []
            for m in messages:
                m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's grids do when they push
                if m.metadata.dst_node_id == 4:
                    replies.append(create_message_error_unavailable_res_message(m.metadata, "node_unavail"))
                else:
                    node = m.metadata.dst_node_id
                    weights = {k: a.numpy() * (1 + 0.01 * node) for k, a in model.items()}
                    replies.append(reply(node, weights, 10, **honest_schedule(strategy, 1)))
            return replies

    accepted = train_round(OneNodeGone([2, 3, 4], clock), strategy, settings, 1, model, deadline=100, clock=clock)
    assert sorted(m.metadata.src_node_id for m in accepted) == [2, 3]
    assert [(e["node_id"], e["site"], e["event"]) for e in strategy.events[1]] == [(4, "site c", "missing")]
    assert strategy.events[1][0]["reason"].startswith("the SuperLink answered in its place: Error: Node Unavailable")
