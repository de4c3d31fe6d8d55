"""A newcomer's mistakes in a task of their own, each refused before round 1 in one line naming
the site's task and the method: a loop that forgets scheduler.step(), a train() that names its
loss as it likes, a classifier with more outputs than classes, regression targets that broadcast
against the outputs. In the pre-flight report (what a site answers before any training); the same
through `fedcycle simulate` in tests/test_tasks.py. The tasks are tests/user_tasks.py's."""

from __future__ import annotations

import pytest
import torch

from fedcycle import client_app, site
from fedcycle.errors import ConfigError, TaskError
from fedcycle.site import load_site
from fedcycle.trainer import task_fault
from fedcycle.wire import TASK_FAILED
from fedcycle_tools.centralized import train_centralized
from tests.fakes import context, train_message


@pytest.fixture(autouse=True)
def fresh_sites():
    site._load_site.cache_clear()
    yield
    site._load_site.cache_clear()


def report_of(task: str, batch_size: int = 32):
    return load_site({"task": f"tests.user_tasks:{task}", "batch-size": batch_size},
                     {"partition-id": 0, "num-partitions": 2}).report(batch_size)


@pytest.mark.parametrize("task, message", [
    ("ForgetsTheScheduler", "train() stepped the optimizer 2 times and the scheduler 0 times; the server's schedule "
                            "governs every step: call scheduler.step() once after each optimizer.step()"),
    ("ReturnsItsOwnKey", "train() returned a dict with keys ['mse_loss']; it returns a dict with 'loss' (the mean "
                         "training loss), and, if the loop tracks them, any of the task's metrics"),
    ("TwelveOutputs", "the model gives 12 outputs per example for 10 classes ['0', '1', '2', '3', ...]; a classifier "
                      "gives one logit per class: make its last layer's out_features 10"),
    ("FlatTargets", "loss() or metrics() of outputs float32[32, 1] against targets float32[32] (a batch) broadcasts "
                    "them: Using a target size (torch.Size([32])) that is different to the input size"),
])
def test_a_newcomers_mistake_is_one_line_in_the_preflight_report(task, message):
    with pytest.raises(TaskError) as refused:
        report_of(task)
    assert str(refused.value).startswith(f"task='tests.user_tasks:{task}': {message}")
    assert "\n" not in str(refused.value)


def test_a_loop_that_tracks_only_its_loss_reports_no_training_metrics():
    assert report_of("BloodPressure").train_metric_names == ["mae", "mse"]  # fedcycle's loop: all of them
    assert report_of("DigitsOwnLoop").train_metric_names == []  # its own loop: the loss alone
    assert report_of("Digits").train_metric_names == ["accuracy"]



def test_the_centralized_baseline_trains_a_task_with_its_own_loop_epoch_by_epoch():
    config = {"task": "tests.user_tasks:DigitsOwnLoop", "batch-size": 32, "local-epochs": 1, "num-server-rounds": 3}
    seen = []
    result = train_centralized(config, sites=2, epochs=3, progress=lambda epoch, test, val: seen.append((epoch, val)))
    assert [epoch for epoch, _ in seen] == [1, 2, 3]  # evaluated after every epoch, not once at the end
    validation = result["validation"]
    assert len(validation) == 4 and result["test"] == [None] * 4  # the task has no test set
    assert validation[0] < 0.3 and validation[-1] > 0.8  # 10 classes: it learned


def test_a_loop_whose_metrics_change_after_the_rehearsal_fails_as_the_tasks_fault(task_identity):
    run_config = {"task": "tests.user_tasks:ChangesItsKeys", "batch-size": 50, "local-epochs": 2}
    node = {"partition-id": 0}
    declared = load_site(run_config, node).report(50).train_metric_names
    assert declared == []  # the rehearsal's one epoch: the loss alone
    reply = client_app.train_round(train_message(run_config, node, train_metric_names=declared),
                                   context(run_config, node))
    assert reply.has_error() and reply.error.code == TASK_FAILED
    assert reply.error.reason == ("task='tests.user_tasks:ChangesItsKeys': train() returned the metrics ['mae'] in "
                                  "this round and [] in pre-flight's rehearsal; return the same keys every time")


def test_a_task_that_runs_out_of_memory_or_loses_a_file_is_not_the_tasks_fault():
    def raised_in_task(cause: BaseException) -> TaskError:
        try:
            raise TaskError("task='t': train() raised ...") from cause
        except TaskError as err:
            return err

    assert task_fault(raised_in_task(ValueError("a bug")))
    assert not task_fault(raised_in_task(torch.OutOfMemoryError("CUDA out of memory")))
    assert not task_fault(raised_in_task(FileNotFoundError("/data/site-0.pt")))
    assert not task_fault(ConfigError("device='cuda:3' is not available"))


def test_a_node_config_variable_that_is_not_a_json_object_is_one_line(monkeypatch):
    for text in ("{not json", "[1, 2]"):
        monkeypatch.setenv(site.NODE_CONFIG_VARIABLE, text)
        with pytest.raises(ConfigError, match="is not a JSON object of node-config keys"):
            site.simulated_node_config({"partition-id": 0})
    monkeypatch.setenv(site.NODE_CONFIG_VARIABLE, '{"data-file": "/d/site-{partition-id}.csv", "partition-id": 9}')
    assert site.simulated_node_config({"partition-id": 1}) == {"data-file": "/d/site-1.csv", "partition-id": 1}


def test_a_binary_classifier_may_give_one_logit():
    assert report_of("OneLogitTriage").train_metric_names == ["accuracy"]
