"""The wire schema: every value round-trips exactly through Flower's own records, and what the
ClientApp really sends is what the server's schema reads."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedcycle.config import RunSettings
from fedcycle.schedules import LRSchedule
from fedcycle.site import load_site
from fedcycle.strategies import make_coordinator
from fedcycle.wire import (
    EVENTS,
    SCREEN_EVENTS,
    EvaluateConfig,
    EvaluateReply,
    RoundConfig,
    SiteReport,
    TrainReply,
)
from tests.fakes import Sites

STATISTICS = {"sum": [1.5, -2.0], "count": [3.0]}


@pytest.mark.parametrize("statistics, train_metrics", [(None, None), (STATISTICS, ()), (None, ("mae",))])
def test_a_round_config_round_trips_through_a_config_record(statistics, train_metrics):
    config = RoundConfig(
        server_round=3, schedule=LRSchedule("exp_range", 0.001, 0.07, "epochs", 1.5, 0.99), local_epochs=4,
        epochs_before=8, batch_size=32, optimizer="adamw", momentum=0.8, weight_decay=1e-4, mixed_precision=True,
        evaluate_received=False, proximal_mu=0.01, task_statistics=statistics, train_metrics=train_metrics,
    )
    assert RoundConfig.from_record(ConfigRecord(config.to_record())) == config


@pytest.mark.parametrize("statistics", [None, STATISTICS])
def test_an_evaluate_config_round_trips(statistics):
    config = EvaluateConfig(server_round=7, batch_size=256, task_statistics=statistics)
    assert EvaluateConfig.from_record(ConfigRecord(config.to_record())) == config


@pytest.mark.parametrize("received", [None, EvaluateReply(0.25, {"accuracy": 0.75, "f1": 0.5}, 120)])
def test_a_train_reply_round_trips_through_a_metric_record(received):
    reply = TrainReply(num_examples=1080, train_loss=0.4321, train_metrics={"accuracy": 0.875, "f1": 0.625},
                       train_seconds=12.5, setup_seconds=0.75, local_epochs=2, steps=34, lr_first=0.005,
                       lr_peak=0.05, lr_last=0.0063, received=received)
    record = MetricRecord(reply.to_record())
    assert set(record) == TrainReply.keys(["accuracy", "f1"], evaluate_received=received is not None)
    assert TrainReply.from_record(record, ["accuracy", "f1"]) == reply


def test_an_evaluate_reply_round_trips():
    reply = EvaluateReply(0.3125, {"mae": 1.25}, 64)
    record = MetricRecord(reply.to_record())
    assert set(record) == EvaluateReply.keys(["mae"])
    assert EvaluateReply.from_record(record, ["mae"]) == reply


def test_a_site_report_round_trips_and_a_failed_one_carries_only_its_error():
    report = SiteReport(site="partition 0/2", num_train=900, num_val=100, metric_names=["accuracy"],
                        inputs="float32[1, 28, 28]", targets="int64[]", model=["conv.weight float32 [8, 1, 3, 3]"],
                        device="cpu", device_name="x86_64", python="3.11.7", torch="2.14.1", torchvision="0.29.1",
                        flwr="1.42.0", classes=["a", "b"], statistics=STATISTICS)
    assert SiteReport.from_record(ConfigRecord(report.to_record())) == report
    failed = SiteReport(ok=False, error="data-file='/srv/x.csv' does not exist")
    assert failed.to_record() == {"ok": False, "error": "data-file='/srv/x.csv' does not exist", "refused": False,
                                  "site": ""}
    assert SiteReport.from_record(ConfigRecord(failed.to_record())) == failed
    refused = SiteReport(ok=False, error="its policy refuses the run (min-records): ...", refused=True, site="clinic-a")
    assert refused.to_record() == {"ok": False, "error": "its policy refuses the run (min-records): ...", "refused": True,
                                   "site": "clinic-a"}
    assert SiteReport.from_record(ConfigRecord(refused.to_record())) == refused
    # a report from a fedcycle without site policies (no `refused`, no `site`) reads as an ordinary failure
    assert SiteReport.from_record({"ok": False, "error": "x"}) == SiteReport(ok=False, error="x")
    with pytest.raises(KeyError):
        SiteReport.from_record({"ok": True, "site": "s"})


def test_the_strategy_sends_what_a_site_reads_and_expects_the_keys_a_site_replies(data_root, task_identity):
    """The real strategy's round config as it travels, and its expected reply keys for the real
    site's metric names (tests/test_strategy.py passes the real ClientApp's replies through it)."""
    run_config = {"data-root": data_root, "train-subset": 64, "val-fraction": 0.2, "batch-size": 16, "lr-envelope": "exponential",
                  "lr-decay": 0.5, "mixed-precision": True}
    settings = RunSettings.from_run_config(run_config)
    coordinator = make_coordinator(settings, num_sites=2)
    site = load_site(run_config, {"partition-id": 0, "num-partitions": 2})
    sent = coordinator.round_config(2)
    message, *_ = coordinator.configure_train(2, ArrayRecord(site.new_model().state_dict()), Sites([1, 2]))
    assert RoundConfig.from_record(message.content["config"]) == sent
    assert sent.schedule == settings.schedule_for_round(2) and sent.local_epochs == settings.epochs_for_round(2)
    assert sent.schedule.lr_max < settings.lr_max  # the envelope moved the peak, and the round carries it
    assert sent.mixed_precision and sent.evaluate_received
    assert coordinator.screen.metric_keys == TrainReply.keys(site.metric_names(sent.batch_size), sent.evaluate_received)


def test_every_event_the_server_records_is_a_kind_the_schema_names():
    import pathlib
    import re

    import fedcycle

    written = set()
    for path in pathlib.Path(fedcycle.__file__).parent.rglob("*.py"):
        written |= set(re.findall(r'"event": "([a-z-]+)"', path.read_text()))
        written |= set(re.findall(r'(?:_record|record_missing)\(\w+, [\w.]+, "([a-z-]+)"', path.read_text()))
        written |= set(re.findall(r'events\.append\(\("([a-z-]+)"', path.read_text()))  # the screen's verdicts
    assert written and written <= set(EVENTS), written - set(EVENTS)
    assert set(SCREEN_EVENTS) <= set(EVENTS)
