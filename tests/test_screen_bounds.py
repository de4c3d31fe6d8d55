"""What the reply screen bounds by meaning, not by outlier (issue 21's first pieces): a colluding
half of the sites cannot move the weight cap; a negative BatchNorm running variance is not
averaged in; a site's evaluation cannot count more held-out examples than it declared."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcycle.config import RunSettings
from fedcycle.screen import Declared, weight_cap
from fedcycle.strategies import make_coordinator
from tests.fakes import arrays, reply, start_round


def test_half_the_sites_claiming_huge_sizes_do_not_move_the_weight_cap():
    honest, colluders = [100.0] * 4, [1e7] * 4
    assert weight_cap(honest + colluders, 4.0) == 400.0  # the lower median: an honest size
    assert weight_cap([100.0, 120.0, 1e7], 4.0) == 480.0


@pytest.fixture
def strategy(task_identity):
    return make_coordinator(RunSettings.from_run_config({"min-sites": 3}), num_sites=3, metric_names=["accuracy"],
                            sites={node: Declared(num_train=10, num_val=5) for node in (1, 2, 3)})


def test_a_negative_running_variance_is_rejected(strategy):
    rng = np.random.default_rng(0)
    shapes = {"bn.weight": (4,), "bn.running_var": (4,)}
    start = {k: np.abs(v) for k, v in arrays(rng, shapes=shapes).items()}
    schedule = start_round(strategy, 1, ArrayRecord({k: Array(v) for k, v in start.items()}), [1, 2, 3])
    honest = [{k: v + np.float32(0.01 * i) for k, v in start.items()} for i in (1, 2)]  # each its own update
    poisoned = {**start, "bn.running_var": start["bn.running_var"].copy()}
    poisoned["bn.running_var"][2] = -3.5  # inside any norm bound, a NaN model once averaged in
    replies = [reply(1, honest[0], 10, **schedule), reply(2, honest[1], 10, **schedule), reply(3, poisoned, 10, **schedule)]
    for node, r in zip((1, 2, 3), replies):
        r.metadata.__dict__["_src_node_id"] = node
    accepted = strategy.screen_round(1, replies)
    assert [m.metadata.src_node_id for m in accepted] == [1, 2]
    assert "array 'bn.running_var' holds a negative variance (-3.5)" in strategy.events[1][0]["reason"]


def test_an_evaluation_counting_more_held_out_examples_than_declared_is_left_out(strategy):
    def evaluation(node: int, **metrics) -> Message:
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="evaluate")
        values = {"loss": 0.5, "accuracy": 0.8, "num-examples": 5, **metrics}
        msg = Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=instruction)
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    result = strategy.aggregate_evaluate(2, [evaluation(1), evaluation(2, accuracy=0.6),
                                             evaluation(3, accuracy=1.0, **{"num-examples": 10**9})])
    assert result["accuracy"] == pytest.approx(0.7)  # sites 1 and 2; the liar's billion is not counted
    [event] = strategy.events[2]
    assert event["node_id"] == 3 and "more than the 5 held-out examples the site declared" in event["reason"]
