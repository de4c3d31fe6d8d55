"""fedcycle's round loop against a clock the test sets: one deadline covers a round's waiting,
training, retries and evaluation. The sites are stand-ins that answer at once or stay silent."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_res_message,
)

from fedcycle.config import RunSettings
from fedcycle.round_loop import RoundFailed, run_rounds, train_round
from fedcycle.screen import Declared
from fedcycle.strategies import make_coordinator
from tests.fakes import Sites, arrays, honest_schedule, reply


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SilentSites(Sites):
    """Connected sites on the test's clock that never reply. A subclass's `answer` returns
    the seconds the sites take and their replies; pulled once that time has passed."""

    def __init__(self, nodes, clock: Clock) -> None:
        super().__init__(nodes)
        self.clock, self.timeouts, self.waiting, self.pushed_at = clock, [], [], []

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's grids do when they push
        self.timeouts.append(messages[0].metadata.ttl)  # every message expires at the deadline
        self.pushed_at.append(self.clock.now)
        assert all(m.metadata.ttl == messages[0].metadata.ttl for m in messages)
        seconds, replies = self.answer(messages)
        self.waiting += [(self.clock.now + seconds, r) for r in replies]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        ready = [(t, r) for t, r in self.waiting if t <= self.clock.now and r.metadata.reply_to_message_id in message_ids]
        self.waiting = [w for w in self.waiting if w not in ready]
        return [r for _, r in ready]

    def answer(self, messages) -> tuple[float, list]:
        return 0.0, []


class BrokenSites(SilentSites):
    """Sites that reply after 9 s, every reply with NaN weights."""

    def answer(self, messages):
        bad = {k: v * np.nan for k, v in arrays(np.random.default_rng(0)).items()}
        return 9.0, [reply(m.metadata.dst_node_id, bad, 10, to=m) for m in messages]


def start(settings: RunSettings, **known):
    strategy = make_coordinator(settings, num_sites=2, **known)
    return strategy, ArrayRecord({k: Array(v) for k, v in arrays(np.random.default_rng(1)).items()})


def test_silent_sites_use_up_one_deadline_not_one_per_retry(task_identity):
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=3)
    strategy, model = start(settings)
    grid = SilentSites([1, 2], clock)
    with pytest.raises(RoundFailed, match=r"round 1 failed 1 time\(s\) \(round-retries=3, round-timeout=100.0s for the whole round\)"):
        train_round(grid, strategy, settings, 1, model, deadline=clock() + 100, clock=clock, sleep=clock.sleep)
    assert grid.timeouts == [100.0] and clock.now == 100.0  # not (retries + 1) x 100 s


def test_fast_failures_are_retried_within_the_deadline(task_identity):
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=2)
    strategy, model = start(settings)
    grid = BrokenSites([1, 2], clock)
    with pytest.raises(RoundFailed, match=r"round 1 failed 3 time\(s\)") as failed:
        train_round(grid, strategy, settings, 1, model, deadline=clock() + 100, clock=clock, sleep=clock.sleep)
    assert [(e["event"], e["attempt"]) for e in failed.value.attempts] == [("round-attempt-failed", a) for a in (1, 2, 3)]
    # each attempt gets what is left: pushed once the previous attempt's replies (9 s) are pulled
    assert grid.timeouts == [pytest.approx(100.0 - t) for t in grid.pushed_at]
    assert grid.pushed_at == [0.0, pytest.approx(9.0, abs=1.0), pytest.approx(18.0, abs=2.0)]
    assert clock.now == pytest.approx(27.0, abs=3.0)


def test_the_sites_evaluation_gets_what_is_left_of_the_round(task_identity):
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=0, min_replies=1, min_reply_fraction=0.0,
                           num_server_rounds=1)
    strategy, model = start(settings)
    strategy.evaluates_on_sites = True
    strategy.strategy.fraction_evaluate, strategy.strategy.min_evaluate_nodes = 1.0, 1

    class SlowTraining(SilentSites):
        """Training takes 69 s at both sites; the evaluation waits out its timeout."""

        def answer(self, messages):
            if messages[0].metadata.message_type != "train":
                return 0.0, []
            return 69.0, [reply(m.metadata.dst_node_id, {k: a.numpy() * (1 + 0.01 * m.metadata.dst_node_id)
                                                         for k, a in model.items()}, 10, to=m,
                                **honest_schedule(strategy, 1)) for m in messages]

    grid = SlowTraining([1, 2], clock)
    (outcome,) = run_rounds(grid, strategy, settings, model, 1, clock=clock, sleep=clock.sleep)
    assert outcome.server_round == 1 and len(outcome.sites) == 2 and outcome.sites_evaluation is None
    assert grid.timeouts == [100.0, pytest.approx(100.0 - grid.pushed_at[1])] and clock.now == 100.0
    assert grid.pushed_at[1] == pytest.approx(69.0, abs=3.0)  # once the training replies are pulled
    # each site received the model to train and sent it back, and received it to evaluate
    size = sum(len(a.data) for a in model.values())
    assert outcome.traffic == {"train": {f"node {n}": {"received": size, "sent": size} for n in (1, 2)},
                               "evaluate": {f"node {n}": {"received": size, "sent": 0} for n in (1, 2)}}


def test_a_site_the_superlink_answers_for_is_named_missing_with_the_superlinks_reason(task_identity):
    # Flower's SuperLink answers for a site whose node stopped sending heartbeats, from its own node
    # id (1): the round names the site the message went to, not node 1.
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=0, min_replies=1, min_reply_fraction=0.0)
    strategy, model = start(settings, sites={node: Declared(num_train=10, num_val=5, site=name)
                                             for node, name in ((2, "site a"), (3, "site b"), (4, "site c"))})
    strategy.strategy.min_available_nodes = strategy.strategy.min_train_nodes = 3

    class OneNodeGone(SilentSites):
        def answer(self, messages):
            replies = []
            for m in messages:
                if m.metadata.dst_node_id == 4:
                    replies.append(create_message_error_unavailable_res_message(m.metadata, "node_unavail"))
                else:
                    node = m.metadata.dst_node_id
                    weights = {k: a.numpy() * (1 + 0.01 * node) for k, a in model.items()}
                    replies.append(reply(node, weights, 10, to=m, **honest_schedule(strategy, 1)))
            return 0.0, replies

    accepted, *_ = train_round(OneNodeGone([2, 3, 4], clock), strategy, settings, 1, model, deadline=100, clock=clock,
                           sleep=clock.sleep)
    assert sorted(m.metadata.src_node_id for m in accepted) == [2, 3]
    assert [(e["node_id"], e["site"], e["event"]) for e in strategy.events[1]] == [(4, "site c", "missing")]
    assert strategy.events[1][0]["reason"].startswith("the SuperLink answered in its place: Error: Node Unavailable")


def test_a_long_round_says_once_a_minute_which_sites_have_replied(task_identity, caplog):
    clock = Clock()
    settings = RunSettings(round_timeout=1000.0, round_retries=0, min_replies=1, min_reply_fraction=0.0)
    strategy, model = start(settings, sites={1: Declared(num_train=10, num_val=5, site="site a"),
                                             2: Declared(num_train=10, num_val=5, site="site b")})

    class OneSlowSite(SilentSites):
        """Site a replies after 20 s, site b after 150 s."""

        def answer(self, messages):
            return 0.0, []

        def push_messages(self, messages):
            ids = super().push_messages(messages)
            for m in messages:
                node = m.metadata.dst_node_id
                weights = {k: a.numpy() * (1 + 0.01 * node) for k, a in model.items()}
                self.waiting.append((20.0 if node == 1 else 150.0, reply(node, weights, 10, to=m, **honest_schedule(strategy, 1))))
            return ids

    with caplog.at_level(logging.INFO):
        accepted, *_ = train_round(OneSlowSite([1, 2], clock), strategy, settings, 1, model, deadline=1000, clock=clock,
                               sleep=clock.sleep)
    assert len(accepted) == 2 and 150.0 <= clock.now <= 153.0  # pulled at least every 3 s
    progress = [m for m in caplog.messages if "sites replied" in m]
    assert progress == ["Round 1: 1 of 2 sites replied; waiting for site b (1 min of 17)",
                        "Round 1: 1 of 2 sites replied; waiting for site b (2 min of 17)"]


def test_replies_that_come_quickly_are_pulled_quickly(task_identity):
    """A simulated round's sites reply within seconds: the loop must not wait out a 3-s poll."""
    clock = Clock()
    settings = RunSettings(round_timeout=1000.0, round_retries=0, min_replies=1, min_reply_fraction=0.0)
    strategy, model = start(settings)

    class QuickSites(SilentSites):
        def answer(self, messages):
            replies = []
            for m in messages:
                node = m.metadata.dst_node_id
                weights = {k: a.numpy() * (1 + 0.01 * node) for k, a in model.items()}
                replies.append(reply(node, weights, 10, to=m, **honest_schedule(strategy, 1)))
            return 1.0, replies

    accepted, *_ = train_round(QuickSites([1, 2], clock), strategy, settings, 1, model, deadline=1000, clock=clock,
                           sleep=clock.sleep)
    assert len(accepted) == 2 and 1.0 <= clock.now <= 1.1  # pulled within a tenth of the time waited


def test_a_round_is_one_value_and_a_failed_round_carries_all_it_got(task_identity):
    """run_rounds hands back each round's outcome; the strategy keeps nothing of a round once it
    is handed back; a failed round's outcome holds its rejected replies and its failed attempts."""
    clock = Clock()
    settings = RunSettings(round_timeout=100.0, round_retries=1, num_server_rounds=3)
    strategy, model = start(settings)
    with pytest.raises(RoundFailed) as failed:
        list(run_rounds(BrokenSites([1, 2], clock), strategy, settings, model, 1, clock=clock, sleep=clock.sleep))
    outcome = failed.value.outcome
    assert outcome.server_round == 1 and outcome.arrays is model and outcome.sites == []
    assert sorted(e["event"] for e in outcome.events) == ["rejected"] * 4 + ["round-attempt-failed"] * 2
    assert outcome.train_config["server-round"] == 1 and outcome.train_config["local-epochs"] == settings.local_epochs
    assert 1 not in strategy.events and 1 not in strategy.sent_config
    size = sum(len(a.data) for a in model.values())  # both attempts' bytes are kept
    assert outcome.traffic == {"train": {f"node {n}": {"received": 2 * size, "sent": 2 * size} for n in (1, 2)}}
