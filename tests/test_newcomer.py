"""A newcomer's mistakes in a task of their own, each refused before round 1 in one line naming
the site's task and the method: a loop that forgets scheduler.step(), a train() that names its
loss as it likes, a classifier with more outputs than classes, regression targets that broadcast
against the outputs. In the pre-flight report (what a site answers before any training); the same
through `fedcycle simulate` in tests/test_tasks.py. The tasks are tests/user_tasks.py's."""

from __future__ import annotations

import pytest

from fedcycle import site
from fedcycle.errors import TaskError
from fedcycle.site import load_site
from fedcycle_tools.centralized import train_centralized
from tests import user_tasks


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
    assert report_of("FailsInTraining").train_metric_names == []  # its own loop: the loss alone
    assert report_of("Digits").train_metric_names == ["accuracy"]



def test_the_centralized_baseline_trains_a_task_with_its_own_loop_epoch_by_epoch():
    config = {"task": "tests.user_tasks:DigitsOwnLoop", "batch-size": 32, "local-epochs": 1, "num-server-rounds": 3}
    seen = []
    result = train_centralized(config, sites=2, epochs=3, progress=lambda epoch, test, val: seen.append((epoch, val)))
    assert [epoch for epoch, _ in seen] == [1, 2, 3]  # evaluated after every epoch, not once at the end
    validation = result["validation"]
    assert len(validation) == 4 and result["test"] == [None] * 4  # the task has no test set
    assert validation[0] < 0.3 and validation[-1] > 0.8  # 10 classes: it learned
