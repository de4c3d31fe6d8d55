"""The coordinator around a Flower strategy: its aggregate, its reply checks and dtype keeping,
on real Flower Messages."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedcycle import client_app
from fedcycle.config import ConfigError, RunSettings
from fedcycle.coordinator import Coordinator
from fedcycle.screen import Declared
from fedcycle.strategies import STRATEGIES, make_coordinator, resolve_strategy
from tests.fakes import (
    SHAPES,
    Sites,
    arrays,
    context,
    preflight_query,
    reply,
    screen_and_average,
    start_round,
)


def at_zeros(settings: RunSettings | None = None, **known) -> Coordinator:
    """The default strategy's coordinator holding a global model of zeros (norm 0: no update
    ratio can be measured), set as a round sets it."""
    c = make_coordinator(settings or RunSettings(), num_sites=4, **known)
    c.global_arrays = ArrayRecord({k: Array(np.zeros(v, np.float32)) for k, v in SHAPES.items()})
    return c


@pytest.fixture
def strategy(task_identity) -> Coordinator:
    return at_zeros()


def weighted_mean(sent: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64)
    return {k: np.tensordot(w / w.sum(), np.stack([s[k].astype(np.float64) for s in sent]), axes=1) for k in SHAPES}


def test_aggregate_is_the_example_weighted_mean(task_identity):
    strategy = at_zeros(RunSettings(peer_clip_ratio=0))  # no centered clipping: the plain mean
    rng = np.random.default_rng(0)
    sent = [arrays(rng) for _ in range(3)]
    weights = [10, 30, 60]
    agg = screen_and_average(strategy, 1, [reply(i + 1, a, n) for i, (a, n) in enumerate(zip(sent, weights))])
    expected = weighted_mean(sent, weights)
    for key in SHAPES:
        assert agg[key].dtype == "float32"
        np.testing.assert_allclose(agg[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)
    assert [m["train-loss"] for m in strategy.site_metrics[1]] == pytest.approx([1.0] * 3)
    assert not strategy.events[1]


def test_nan_and_wrong_shape_replies_are_left_out_and_recorded(strategy):
    rng = np.random.default_rng(1)
    good = [arrays(rng), arrays(rng)]
    nan = arrays(rng)
    nan["conv.bias"][2] = np.nan
    inf = arrays(rng)
    inf["conv.weight"][0, 0] = np.inf
    wrong = arrays(rng, shapes={"conv.weight": (4, 2), "conv.bias": (4,)})
    replies = [reply(1, good[0], 20), reply(2, nan, 20), reply(3, wrong, 20), reply(4, good[1], 60), reply(5, inf, 5),
               reply(6, arrays(rng), 20, **{"train-loss": math.nan})]
    agg = screen_and_average(strategy, 2, replies)
    expected = weighted_mean(good, [20, 60])
    for key in SHAPES:
        np.testing.assert_allclose(agg[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)
    reasons = {e["node_id"]: e["reason"] for e in strategy.events[2]}
    assert set(reasons) == {2, 3, 5, 6}
    assert reasons[6] == "metric train-loss=nan is not a finite number"
    assert "'conv.bias' holds NaN or Inf" in reasons[2]
    assert "'conv.weight' holds NaN or Inf" in reasons[5]
    assert "float32[4, 2], the global model's is float32[4, 3]" in reasons[3]
    assert [m["node_id"] for m in strategy.site_metrics[2]] == [1, 4]


@pytest.mark.parametrize("n", [0, -3, math.nan, math.inf, 1e9])
def test_bad_num_examples_are_left_out(task_identity, n):
    strategy = at_zeros(sites={node: Declared(num_train=100, num_val=10) for node in (1, 2, 3)})
    rng = np.random.default_rng(2)
    agg = screen_and_average(strategy, 1, [reply(1, arrays(rng), 50), reply(2, arrays(rng), n), reply(3, arrays(rng), 100)])
    assert agg is not None
    (event,) = strategy.events[1]
    assert event["node_id"] == 2 and "num-examples" in event["reason"]


def test_replies_with_other_metric_keys_are_left_out_not_fatal(strategy):
    rng = np.random.default_rng(3)
    # The odd one arrives first and there are only two: no vote decides, the ClientApp's schema does.
    replies = [reply(3, arrays(rng), 10, extra=1.0), reply(1, arrays(rng), 10)]
    with pytest.raises(Exception):  # Flower's own FedAvg ends the run here
        FedAvg().aggregate_train(1, replies)
    agg = screen_and_average(strategy, 1, replies)
    assert agg is not None
    (event,) = strategy.events[1]
    assert event["node_id"] == 3 and "metric keys differ" in event["reason"] and "extra" in event["reason"]


def test_replies_under_other_record_names_or_from_unknown_sites_are_left_out(task_identity):
    rng = np.random.default_rng(5)
    renamed = reply(2, arrays(rng), 10)
    renamed.content["m"] = renamed.content["metrics"]
    del renamed.content["metrics"]
    strategy = at_zeros(sites={node: Declared(num_train=100, num_val=10) for node in (1, 2)})
    agg = screen_and_average(strategy, 1, [reply(1, arrays(rng), 10), renamed, reply(9, arrays(rng), 10)])
    assert agg is not None
    reasons = {e["node_id"]: e["reason"] for e in strategy.events[1]}
    assert "MetricRecord 'metrics'" in reasons[2]
    assert "did not take part in the pre-flight round" in reasons[9]


def test_all_replies_bad_keeps_the_model(strategy):
    rng = np.random.default_rng(4)
    bad = arrays(rng)
    bad["conv.bias"][:] = np.nan
    assert screen_and_average(strategy, 1, [reply(1, bad, 10)]) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_registered_strategy_runs_under_the_server_schedule(task_identity, name):
    settings = RunSettings(strategy=name, options={"fedprox": {"proximal-mu": 0.5}, "fedtrimmedavg": {"beta": 0.1}})
    c = make_coordinator(settings, num_sites=4)
    assert isinstance(c.strategy, STRATEGIES[name]) and type(c.strategy) is STRATEGIES[name]  # as Flower has it
    config = c.round_config(3).to_record()
    assert config["lr-schedule"] == settings.lr_schedule and config["local-epochs"] == settings.local_epochs
    assert config["epochs-before"] == 2 * settings.local_epochs
    # the schedule reaches the sites through the strategy's own train messages
    model = ArrayRecord({k: Array(np.zeros(v, np.float32)) for k, v in SHAPES.items()})
    messages = c.configure_train(3, model, Sites([1, 2, 3, 4]))
    assert messages and all(m.content["config"]["lr-schedule"] == settings.lr_schedule
                            and m.content["config"]["epochs-before"] == 2 * settings.local_epochs for m in messages)
    if name == "fedprox":
        assert c.strategy.proximal_mu == 0.5
    if name == "fedtrimmedavg":
        assert c.strategy.beta == 0.1


def test_user_strategy_by_dotted_path():
    c = make_coordinator(RunSettings(strategy="flwr.serverapp.strategy:FedMedian"), num_sites=2)
    assert type(c.strategy) is FedMedian  # wrapped as it is: no class built at run time
    with pytest.raises(ConfigError, match="is not a subclass of flwr.serverapp.strategy.Strategy"):
        resolve_strategy("os.path:join")
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_strategy("no_such_module.sub:Thing")


def train_message(settings: RunSettings, weights: ArrayRecord, server_round: int) -> Message:
    coordinator = make_coordinator(settings, num_sites=2)
    config = ConfigRecord({**coordinator.round_config(server_round).to_record(), "server-round": server_round})
    return Message(RecordDict({"arrays": weights, "config": config}), dst_node_id=1, message_type="train")


def test_round_schedule_and_epochs_reach_the_trainer_unchanged(task_identity, data_root):
    run_config = {
        "data-root": data_root, "train-subset": 96, "batch-size": 16, "local-epochs": 2,
        "lr-schedule": "cosine", "lr-min": 0.001, "lr-max": 0.08, "lr-cycle-unit": "epochs", "lr-cycle-length": 3.0,
    }
    settings = RunSettings.from_run_config(run_config)
    from fedcycle.site import load_site

    node = {"partition-id": 1, "num-partitions": 2}
    model = load_site(run_config, node).new_model()
    out = client_app.train_round(train_message(settings, ArrayRecord(model.state_dict()), 2), context(run_config, node))
    m = out.content["metrics"]
    spe = 96 // 16
    assert m["local-epochs"] == 2 and m["steps"] == 2 * spe and m["num-examples"] == 96
    schedule, cycle = settings.schedule, 3 * spe
    start = 2 * spe  # round 2 begins after round 1's two epochs
    assert m["lr-first"] == pytest.approx(schedule.lr_at(start, cycle))
    assert m["lr-last"] == pytest.approx(schedule.lr_at(start + 2 * spe - 1, cycle))
    assert m["lr-peak"] == pytest.approx(0.08)  # the warm restart at step 18 is inside this round
    assert 0 <= m["received-accuracy"] <= 1 and m["val-examples"] > 0


def test_resnet18_integer_buffers_keep_their_dtype_across_a_round(task_identity, data_root):
    run_config = {"data-root": data_root, "image.model": "resnet18", "train-subset": 12, "val-fraction": 0.0, "batch-size": 6,
                  "local-epochs": 1}
    settings = RunSettings.from_run_config(run_config)
    from fedcycle.site import load_site

    model = load_site(run_config, {"partition-id": 0, "num-partitions": 2}).new_model()
    start = ArrayRecord(model.state_dict())
    replies = [
        client_app.train_round(train_message(settings, start, 1), context(run_config, {"partition-id": p, "num-partitions": 2}))
        for p in (0, 1)
    ]
    strategy = make_coordinator(settings, num_sites=2)
    strategy.global_arrays = start
    agg = screen_and_average(strategy, 1, replies)
    assert not strategy.events[1]
    counters = [k for k in start.keys() if k.endswith("num_batches_tracked")]
    assert counters
    for key in start.keys():
        assert agg[key].dtype == start[key].dtype, key
    assert all(int(agg[k].numpy()) == 2 for k in counters)  # two steps, not averaged to a float
    stock, _ = FedAvg().aggregate_train(1, replies)
    assert stock[counters[0]].dtype == "float64"  # why fedcycle keeps the dtypes itself


def test_preflight_reports_a_bad_node_config(task_identity, data_root):
    query = preflight_query()
    out = client_app.preflight(query, context({"data-root": data_root}, {"partition-id": 5, "num-partitions": 2}))
    report = out.content["report"]
    assert report["ok"] is False and "partition-id=5 must be in 0..1" in report["error"]
    good = client_app.preflight(query, context({"data-root": data_root}, {"partition-id": 1, "num-partitions": 2}))
    report = good.content["report"]
    assert report["ok"] is True and report["num-train"] == 27000 and report["inputs"] == "float32[1, 28, 28]"
    assert report["targets"] == "int64[]" and list(report["metric-names"]) == ["accuracy"]
    assert report["model"][0] == "features.0.weight:float32[32, 1, 3, 3]" and len(report["model"]) == 8
    assert report["device"] == "cpu" and report["flwr"] == "1.42.0"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_integer_buffers_survive_every_aggregation_rule_and_no_site_sets_them(task_identity, name):
    # FedMedian and FedTrimmedAvg empty the replies' records while aggregating; one site sends a
    # counter of 2**62, which a maximum over replies would take.
    shapes = {**SHAPES, "bn.num_batches_tracked": ()}
    s = make_coordinator(RunSettings(strategy=name, batch_size=4), num_sites=5)
    start = ArrayRecord(
        {**{k: Array(np.ones(v, np.float32)) for k, v in SHAPES.items()}, "bn.num_batches_tracked": Array(np.asarray(3, np.int64))}
    )
    honest = start_round(s, 1, start, range(1, 6))  # 2 local epochs of 3 batches: 6 steps
    rng = np.random.default_rng(6)
    replies = []
    for node, count in enumerate([9, 2**62, 9, 8, 9], start=1):
        weights = {k: (1 + 0.1 * rng.standard_normal(v)).astype(np.float32) for k, v in SHAPES.items()}
        weights["bn.num_batches_tracked"] = np.asarray(count, np.int64)
        replies.append(reply(node, weights, 10, **honest))
    agg = screen_and_average(s, 1, replies)
    assert agg is not None and set(agg.keys()) == set(shapes) and not s.events[1]
    # the global model's 3 plus the round's 6 steps, whatever the sites sent
    assert agg["bn.num_batches_tracked"].dtype == "int64" and int(agg["bn.num_batches_tracked"].numpy()) == 9
    assert agg["conv.weight"].dtype == "float32"


def test_a_reply_whose_bytes_lie_about_their_dtype_is_left_out(strategy):
    """The declared dtype says float32; the .npy bytes hold int32 NaN bit patterns."""
    rng = np.random.default_rng(7)
    good = arrays(rng)
    liar = reply(2, arrays(rng), 10)
    fake = Array(np.full((4,), 0x7FC00000, dtype=np.int32))  # float32 NaN bits, as int32
    liar.content["arrays"]["conv.bias"] = Array(dtype="float32", shape=(4,), stype=fake.stype, data=fake.data)
    truncated = reply(3, arrays(rng), 10)
    whole = truncated.content["arrays"]["conv.weight"]
    truncated.content["arrays"]["conv.weight"] = Array(dtype=whole.dtype, shape=tuple(whole.shape), stype=whole.stype, data=whole.data[:-8])
    agg = screen_and_average(strategy, 1, [reply(1, good, 10), liar, truncated])
    assert agg is not None and np.isfinite(agg["conv.bias"].numpy()).all()
    reasons = {e["node_id"]: e["reason"] for e in strategy.events[1]}
    assert "holds int32[4] but declares float32[4]" in reasons[2]
    assert "'conv.weight' cannot be read" in reasons[3]


@pytest.mark.parametrize("config, message", [
    ({"strategy": "fedprox", "fedprox.proximal-mu": -1.0}, "fedprox.proximal-mu=-1.0 must be a number in [0, inf)"),
    ({"strategy": "fedavgm", "fedavgm.server-momentum": 1.0}, "fedavgm.server-momentum=1.0 must be a number in [0, 1)"),
    ({"strategy": "fedadam", "fedadam.tau": 0.0}, "fedadam.tau=0.0 must be a number in (0, inf)"),
    ({"strategy": "fedprox", "fedprox.proximal-muu": 0.1}, "fedprox.proximal-muu is not an option of strategy='fedprox'"),
    ({"strategy": "cyclical-fedavg", "cyclical-fedavg.momentum": 0.9}, "cyclical-fedavg.momentum is not an option"),
])
def test_strategy_options_are_checked_before_the_run_starts(config, message):
    from fedcycle.strategies import check_strategy

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_strategy(RunSettings.from_run_config(config))


def test_good_strategy_options_pass():
    from fedcycle.strategies import check_strategy

    for config in ({"strategy": "fedprox", "fedprox.proximal-mu": 0.0}, {"strategy": "krum", "krum.num-malicious-nodes": 1},
                   {"strategy": "fedtrimmedavg", "fedtrimmedavg.beta": 0.2}, {}):
        check_strategy(RunSettings.from_run_config(config))


def test_a_site_that_joins_after_the_preflight_round_is_not_sent_work(task_identity):
    s = make_coordinator(RunSettings(batch_size=4, min_reply_fraction=1.0), num_sites=2,
                         sites={1: Declared(num_train=10, num_val=5), 2: Declared(num_train=10, num_val=5)})
    model = ArrayRecord({k: Array(np.ones(v, np.float32)) for k, v in SHAPES.items()})
    honest = start_round(s, 1, model, [1, 2, 9])  # node 9 connected after the pre-flight round
    assert sorted(s.sampled[1]) == [1, 2]
    assert [(e["node_id"], e["event"]) for e in s.events[1]] == [(9, "not-sampled")]
    rng = np.random.default_rng(8)
    replies = [reply(n, {k: (1 + 0.01 * rng.standard_normal(v)).astype(np.float32) for k, v in SHAPES.items()}, 10, **honest)
               for n in (1, 2)]
    assert len(s.screen_round(1, replies)) == 2 and len(s.events[1]) == 1  # nobody missing: 9 was never asked
    start_round(s, 2, model, [1, 2, 9])
    assert sorted(s.sampled[2]) == [1, 2] and not s.events[2]  # named once


def honest_updates(rng, model: dict[str, np.ndarray], sites: int) -> list[dict[str, np.ndarray]]:
    """Sites whose updates share a direction (they learn the same task) plus their own noise."""
    shared = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}
    return [{k: model[k] + 0.05 * (shared[k] + 0.5 * rng.standard_normal(v.shape).astype(np.float32))
             for k, v in model.items()} for _ in range(sites)]


def peer_setup(settings: RunSettings | None = None):
    s = make_coordinator(settings or RunSettings(), num_sites=5)
    rng = np.random.default_rng(11)
    model = {k: rng.standard_normal(v).astype(np.float32) for k, v in SHAPES.items()}
    s.global_arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    return s, rng, model


@pytest.fixture
def peer_round(task_identity):
    return peer_setup()


def test_a_sign_flipped_update_of_ordinary_size_is_left_out_and_named(peer_round):
    s, rng, model = peer_round
    sent = honest_updates(rng, model, 4)
    flipped = {k: model[k] - (v - model[k]) for k, v in sent[3].items()}  # its own update, reversed: same length
    update = np.concatenate([(flipped[k] - model[k]).ravel() for k in model])
    assert np.linalg.norm(update) / np.linalg.norm(np.concatenate([v.ravel() for v in model.values()])) < s.settings.max_update_ratio
    accepted = s.screen_round(1, [reply(n, w, 10) for n, w in enumerate([*sent[:3], flipped], start=1)])
    assert [m.metadata.src_node_id for m in accepted] == [1, 2, 3]
    (event,) = s.events[1]
    assert event["node_id"] == 4 and "pulls the model back against the round's median update" in event["reason"]
    assert all(m["peer-cosine"] > 0.5 for m in s.site_metrics[1])


def test_an_update_that_points_slightly_away_is_averaged_in(peer_round):
    # an honest site under label skew: its own direction, a little against its peers' (cosine
    # about -0.2 measured at 8 sites, Dirichlet 0.3), of ordinary length
    s, rng, model = peer_round
    sent = honest_updates(rng, model, 4)
    own = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}
    shared = {k: sum(w[k] - model[k] for w in sent[:3]) / 3 for k in model}
    skewed = {k: model[k] + 0.05 * own[k] - 0.3 * shared[k] for k in model}
    accepted = s.screen_round(1, [reply(n, w, 10) for n, w in enumerate([*sent[:3], skewed], start=1)])
    assert [m.metadata.src_node_id for m in accepted] == [1, 2, 3, 4] and not s.events[1]
    measured = s.site_metrics[1][3]
    assert measured["peer-cosine"] < -0.05 and 0 < measured["peer-pullback"] < s.settings.peer_pullback_ratio


def test_an_update_far_longer_than_its_peers_is_scaled_down_to_the_bound(peer_round):
    s, rng, model = peer_round
    sent = honest_updates(rng, model, 4)
    sent[0] = {k: model[k] + 5 * (v - model[k]) for k, v in sent[0].items()}
    agg = screen_and_average(s, 1, [reply(n, w, 10) for n, w in enumerate(sent, start=1)])
    assert [m["node_id"] for m in s.site_metrics[1]] == [1, 2, 3, 4]
    (event,) = s.events[1]  # named: above peer-norm-ratio (2.0) times the median
    assert event["node_id"] == 1 and event["event"] == "clipped"
    assert ("times the round's median, above peer-norm-ratio=2.0; it is averaged scaled down to 1 times the median"
            in event["reason"])
    norms = [math.sqrt(sum(float(np.sum((w[k] - model[k]) ** 2)) for k in SHAPES)) for w in sent]
    bound = s.settings.peer_clip_ratio * sorted(norms)[1]  # the lower median of the 4 norms, the long one among them
    # centered clipping: every update longer than the bound is scaled down to it, the long one most
    clipped = [{k: model[k] + min(1.0, bound / n) * (w[k] - model[k]) for k in SHAPES} for w, n in zip(sent, norms)]
    assert bound / norms[0] < 0.25
    expected = weighted_mean(clipped, [10, 10, 10, 10])
    for key in SHAPES:
        np.testing.assert_allclose(agg[key].numpy(), expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("names", ["unnamed", "one name each", "one name for all"])
def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(peer_round, names):
    """The same sites registered again (new node ids), their replies arriving in another order."""
    s, rng, model = peer_round
    sent = honest_updates(rng, model, 4)

    def sites(first_id: int) -> dict[int, Declared]:
        if names == "unnamed":
            return {}
        return {first_id + i: Declared(num_train=100, num_val=10, site="site" if names == "one name for all" else f"site-{i}")
                for i in range(4)}

    if names != "unnamed":
        s = make_coordinator(RunSettings(), num_sites=5, sites=sites(1))
        s.global_arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    later = make_coordinator(RunSettings(), num_sites=5, sites=sites(11))
    later.global_arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    first = screen_and_average(s, 1, [reply(n, sent[n - 1], 10 + 7 * n) for n in (1, 2, 3, 4)])
    again = screen_and_average(later, 1, [reply(10 + n, sent[n - 1], 10 + 7 * n) for n in (4, 2, 1, 3)])
    assert len(s.site_metrics[1]) == len(later.site_metrics[1]) == 4
    for key in SHAPES:
        assert first[key].numpy().tobytes() == again[key].numpy().tobytes(), key


def test_a_site_cannot_inflate_its_weight(task_identity):
    s, rng, model = peer_setup(RunSettings(peer_clip_ratio=0))  # no centered clipping: the plain weighted mean
    sent = honest_updates(rng, model, 4)
    agg = screen_and_average(s, 1, [reply(1, sent[0], 10), reply(2, sent[1], 12), reply(3, sent[2], 11), reply(4, sent[3], 1e9)])
    (event,) = s.events[1]
    assert event["node_id"] == 4 and event["event"] == "weight-capped" and "averaged with weight 44" in event["reason"]
    expected = weighted_mean(sent, [10, 12, 11, 44])  # 4 x the lower median of (10, 12, 11, 1e9)
    for key in SHAPES:
        np.testing.assert_allclose(agg[key].numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_a_replayed_reply_is_left_out_but_a_retried_round_may_repeat_itself(peer_round):
    s, rng, model = peer_round
    first = honest_updates(rng, model, 3)
    assert len(s.screen_round(1, [reply(n, w, 10) for n, w in enumerate(first, start=1)])) == 3
    assert len(s.screen_round(1, [reply(1, first[0], 10)])) == 1  # round 1 tried again: the same training
    later = honest_updates(rng, model, 3)
    accepted = s.screen_round(2, [reply(1, later[0], 10), reply(2, later[1], 10), reply(3, first[2], 10)])
    assert [m.metadata.src_node_id for m in accepted] == [1, 2]
    assert s.events[2][0]["reason"] == "its weights are identical to node 3's reply in round 1 (a replay)"


def test_a_malformed_preflight_report_stops_the_run_naming_the_site_and_the_key(task_identity, data_root):
    from fedcycle.preflight import PreflightError, preflight

    run_config = {"data-root": data_root, "train-subset": 100}
    query = preflight_query()
    good = dict(client_app.preflight(query, context(run_config, {"partition-id": 0, "num-partitions": 2})).content["report"])
    reports = {
        1: good,
        2: {k: v for k, v in good.items() if k != "classes"},
        3: {**good, "num-train": "many"},
        4: {k: v for k, v in good.items() if k != "model"},
        5: {**good, "metric-names": "accuracy"},
    }

    class Reporting(Sites):
        def send_and_receive(self, messages, timeout=None):
            return [Message(RecordDict({"report": ConfigRecord(reports[m.metadata.dst_node_id])}), reply_to=m)
                    for m in messages]

    expected = {"model": good["model"], "classes": good["classes"], "metric-names": None, "inputs": None, "targets": None}
    with pytest.raises(PreflightError) as failed:
        preflight(Reporting(reports), RunSettings.from_run_config(run_config), expected)
    lines = sorted(str(failed.value).splitlines()[1:])  # one line per site that cannot take part
    assert [line.split(":")[0].strip() for line in lines] == ["node 2 (partition 0/2)", "node 3", "node 4", "node 5"]
    assert "classes None differ from the run's" in lines[0]
    assert "num-train='many'; expected a whole number of examples" in lines[1]
    assert "lacks ['model']" in lines[2] and "metric-names='accuracy'; expected a list of strings" in lines[3]


def test_bad_evaluate_replies_are_left_out_and_named(strategy):
    def evaluation(node: int, **metrics) -> Message:
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="evaluate")
        values = {"loss": 0.5, "accuracy": 0.8, "num-examples": 100, **metrics}
        return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=instruction)

    replies = [evaluation(1), evaluation(2, accuracy=0.6, **{"num-examples": 300}), evaluation(3, loss=math.nan),
               evaluation(4, **{"num-examples": 0}), evaluation(5, extra=1.0)]
    result = strategy.aggregate_evaluate(3, replies)
    assert result["accuracy"] == pytest.approx((0.8 * 100 + 0.6 * 300) / 400)  # sites 1 and 2, by examples
    reasons = {e["node_id"]: e["reason"] for e in strategy.events[3] if e["event"] == "rejected-evaluation"}
    assert sorted(reasons) == [3, 4, 5]
    assert "not a finite number" in reasons[3] and "num-examples=0" in reasons[4] and "extra" in reasons[5]
