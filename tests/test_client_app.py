"""fedcycle's ClientApp handlers (fedcycle.client_app) on real data, as a site runs them: the
evaluate reply is the received model on the site's held-out split; a task's own training loop
must report the task's metrics. (The train reply's schedule: tests/test_strategy.py; the
pre-flight report: tests/test_site.py and tests/test_preflight.py.)"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch.nn import functional as F

from fedcycle import client_app
from fedcycle.config import RunSettings
from fedcycle.site import load_site
from fedcycle.strategies import make_coordinator
from fedcycle.trainer import evaluate
from tests.fakes import Sites, context, train_message
from fedcycle.wire import TASK_FAILED
from tests.user_tasks import BloodPressure


def test_the_evaluate_reply_is_the_received_model_on_the_sites_held_out_split(data_root, task_identity):
    run_config = {"data-root": data_root, "train-subset": 200, "val-fraction": 0.2, "batch-size": 32}
    node = {"partition-id": 1, "num-partitions": 2}
    site = load_site(run_config, node)
    torch.manual_seed(3)
    model = site.new_model()
    coordinator = make_coordinator(RunSettings.from_run_config(run_config), num_sites=2, has_test_data=False)
    config = ConfigRecord(dict(next(iter(coordinator.configure_evaluate(4, ArrayRecord(model.state_dict()),
                                                                        Sites([1, 2])))).content["config"]))
    message = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}), dst_node_id=2,
                      message_type="evaluate")
    metrics = client_app.evaluate_round(message, context(run_config, node)).content["metrics"]
    loss, expected = evaluate(site.task, model, site.val, torch.device("cpu"), 32)
    assert metrics["num-examples"] == len(site.val) > 0
    assert metrics["loss"] == pytest.approx(loss, rel=1e-12) and metrics["accuracy"] == pytest.approx(expected["accuracy"])


class TracksOneMetric(BloodPressure):
    """A site's own loop that follows the schedule and tracks one of the task's two metrics."""

    key = "mae"

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        for _ in range(epochs):
            for x, y in loader:
                loss = F.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        return {"loss": loss.item(), self.key: 0.5}


class MisspellsAMetric(TracksOneMetric):
    key = "MAE"


def test_a_sites_own_loop_reports_the_metrics_it_tracks_and_a_key_not_the_tasks_fails_the_run(task_identity):
    node = {"partition-id": 0}
    tracks_one = {"task": f"{TracksOneMetric.__module__}:TracksOneMetric", "batch-size": 100, "local-epochs": 1}
    metrics = client_app.train_round(train_message(tracks_one, node), context(tracks_one, node)).content["metrics"]
    assert metrics["train-mae"] == 0.5 and "train-mse" not in metrics  # 'mse' it does not track: not reported

    name = f"{MisspellsAMetric.__module__}:MisspellsAMetric"
    misspells = {**tracks_one, "task": name}
    reply = client_app.train_round(train_message(misspells, node), context(misspells, node))
    # a failed reply, not an exception: coded as the task's own failure (the server stops the run),
    # its reason the TaskError's one line, as the default policy lets it go
    assert reply.has_error() and reply.error.code == TASK_FAILED
    assert reply.error.reason == (f"task={name!r}: train() returned ['MAE'] besides the loss, which are not the "
                                  "task's metrics ['mae', 'mse']; return 'loss' and any of those")
