"""The centralized baseline: the same task and trainer on the pooled data of all sites.

What federated training is judged against (the study, and `python -m fedcycle_tools.launcher centralize`
for any task): one model, one optimizer and one scheduler for the whole run, as a plain PyTorch
loop has them (momentum survives every epoch boundary; federated sites start a new one every
round), the task's statistics from the pooled data (what the sites' sums add up to), and the
task's primary metric on the test data and the pooled validation data after every epoch.
Nothing here knows Flower.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch

from fedcycle.batches import join
from fedcycle.config import RunSettings
from fedcycle.errors import TaskError
from fedcycle.site import with_given
from fedcycle.tasks import add_up, load_task
from fedcycle.trainer import TrainConfig, evaluate, pick_device, train


def pooled_site_data(config: dict, sites: int, node_config: Mapping[str, Any] | None = None):
    """The task of a run config, and all its sites' train and validation data, pooled
    (`node_config`: what every simulated site's node config holds, `{partition-id}` filled in)."""

    task = load_task(config)
    parts = [task.site_data(with_given({"partition-id": i, "num-partitions": sites}, node_config or {}))
             for i in range(sites)]
    sums = [task.statistics(train) for train, _ in parts]
    if sums[0] is not None:
        task.use_statistics(add_up(sums))
    return task, join([s[0] for s in parts]), join([s[1] for s in parts])


def primary_value(task, model, data, batch_size: int) -> float | None:
    """The task's primary metric of `model` on `data` (None without data)."""

    if data is None or not len(data):
        return None
    return evaluate(task, model, data, pick_device("auto"), batch_size)[1][task.primary_metric]


def train_centralized(config: dict[str, Any], sites: int, epochs: int,
                      progress: Callable[[int, float | None, float | None], None] | None = None,
                      node_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train on the pooled data of `sites` simulated sites for `epochs` epochs, by the task's
    own loop if it has one, else fedcycle's; the primary metric on the test and validation data
    before training and after each epoch, and each epoch's seconds. `progress(epoch, test,
    validation)` is called after each epoch."""

    settings = RunSettings.from_run_config(config)
    task, train_data, val_data = pooled_site_data(config, sites, node_config)
    test = task.test_data()
    torch.manual_seed(settings.seed)
    model = task.build_model()

    def measure(data) -> float | None:
        return primary_value(task, model, data, settings.batch_size)

    test_values, val_values, seconds = [measure(test)], [measure(val_data)], [0.0]
    started = last = time.perf_counter()

    def epoch_end(epoch: int) -> None:
        nonlocal last
        test_values.append(measure(test))
        val_values.append(measure(val_data))
        seconds.append(time.perf_counter() - last)
        last = time.perf_counter()
        if progress is not None:
            progress(epoch + 1, test_values[-1], val_values[-1])

    cfg = TrainConfig(settings.schedule, epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer,
                      momentum=settings.momentum, weight_decay=settings.weight_decay, seed=settings.seed)
    trained = train(task, model, train_data, cfg, pick_device("auto"), epoch_end=epoch_end)
    if not trained.steps:
        raise TaskError(f"task={task.name!r}: {epochs} epoch(s) over {len(train_data)} pooled examples took no "
                        "optimizer step; nothing was trained")
    return {"task": task.label, "metric": task.primary_metric, "test": test_values, "validation": val_values,
            "seconds": seconds, "wall_seconds": time.perf_counter() - started}
