"""What the server keeps of every round (fedcycle.recorder): a real RoundRecorder writing a real
RunResults in a test folder, for real tasks (Fashion-MNIST subsets; the regression of
tests/user_tasks.py, whose best is the lowest error), from the rounds' outcomes. The recorder
sends nothing: a task without a test split has the round loop ask the sites (a stand-in grid)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from fedcycle import client_app
from fedcycle.checkpoint import checkpoint_files, load_checkpoint
from fedcycle.config import RunSettings
from fedcycle.recorder import RoundRecorder, load_resume_point
from fedcycle.results import RunResults, load_model, read_metrics, resolve_run_dir
from fedcycle.round_loop import RoundOutcome, initial_round
from fedcycle.schedules import LRSchedule
from fedcycle.site import load_site
from fedcycle.strategies import make_coordinator
from fedcycle.tasks import load_task
from fedcycle.tracking import Trackers
from fedcycle.trainer import TrainConfig, evaluate, train
from tests.fakes import AnsweringSites, context
from tests.user_tasks import BloodPressure

CPU = torch.device("cpu")


def recorder_for(run_config: dict, metric_names=("accuracy",), run_dir=None) -> RoundRecorder:
    """The recorder as fedcycle's ServerApp builds it (`metric_names`: what the sites' pre-flight
    reports named; `run_dir`: a resumed run's folder)."""
    settings = RunSettings.from_run_config({"tracking": "off", **run_config})
    task = load_task(run_config)
    results = RunResults(run_dir or resolve_run_dir(settings, run_id=1, what=task.label))
    trackers = Trackers(settings, results.path, run_config, first_round=0)
    return RoundRecorder(settings, task, task.test_data(), results, trackers, list(metric_names))


def ended(server_round: int, state: dict[str, torch.Tensor]) -> RoundOutcome:
    """A round that ended with `state` as the global model."""
    return RoundOutcome(server_round, ArrayRecord(state))


def trained(task, epochs: int) -> dict[str, torch.Tensor]:
    """A model trained by fedcycle's trainer on a site's real data: better than an untrained one."""
    torch.manual_seed(0)
    model = task.build_model()
    train(task, model, task.site_data({"partition-id": 0, "num-partitions": 1})[0], TrainConfig(LRSchedule(), epochs=epochs), CPU)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def untrained(task) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return dict(task.build_model().state_dict())


def metric_of(task, data, state, metric: str, batch_size: int = 50) -> float:
    """`state`'s metric on `data`, evaluated by fedcycle's trainer in batches of the run's size."""
    model = task.build_model()
    model.load_state_dict(state)
    return evaluate(task, model, data, CPU, batch_size)[1][metric]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def image_config(data_root, tmp_path) -> dict:
    return {"data-root": data_root, "train-subset": 600, "test-subset": 500, "batch-size": 64,
            "results-dir": str(tmp_path), "run-name": "image", "checkpoints-keep": 2}


@pytest.fixture
def regression_config(tmp_path) -> dict:
    return {"task": f"{BloodPressure.__module__}:BloodPressure", "batch-size": 50, "results-dir": str(tmp_path),
            "run-name": "regression"}


def test_each_round_leaves_its_line_the_final_and_best_models_and_a_checkpoint(image_config, task_identity):
    recorder = recorder_for(image_config)
    task, test, results = recorder.task, recorder.test, recorder.results
    bad, good = untrained(task), trained(task, epochs=2)
    accuracy = {name: metric_of(task, test, state, "accuracy", 64) for name, state in (("bad", bad), ("good", good))}
    assert accuracy["good"] > accuracy["bad"] + 0.2

    recorder.record(ended(0, bad))
    (line,) = read_metrics(results.metrics_path)
    assert line["round"] == 0 and line["primary_metric"] == "accuracy" and line["metrics_source"] == "server-test"
    assert line["accuracy"] == pytest.approx(accuracy["bad"], abs=1e-12) and line["metrics"] == {"accuracy": line["accuracy"]}
    assert equal(load_model(results.path / "global-final.safetensors"), bad)
    assert equal(load_model(results.path / "global-best.safetensors"), bad)  # the first model is the best so far
    assert [p.name for p in checkpoint_files(results.path)] == ["round-0000.safetensors"]
    assert (results.path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    recorder.record(ended(1, good))  # higher accuracy: the new best
    assert equal(load_model(results.path / "global-best.safetensors"), good)
    recorder.record(ended(2, bad))  # lower: the final model, not the best
    lines = read_metrics(results.metrics_path)
    assert [r["round"] for r in lines] == [0, 1, 2] and lines[1]["accuracy"] == pytest.approx(accuracy["good"], abs=1e-12)
    assert equal(load_model(results.path / "global-final.safetensors"), bad)
    assert equal(load_model(results.path / "global-best.safetensors"), good)
    # checkpoints-keep=2: the newest two, each with the run so far
    assert [p.name for p in checkpoint_files(results.path)] == ["round-0001.safetensors", "round-0002.safetensors"]
    ckpt = load_checkpoint(checkpoint_files(results.path)[-1])
    assert ckpt.round == 2 and ckpt.metrics == lines and equal(ckpt.model, bad)
    assert ckpt.best_value == lines[1]["accuracy"] and equal(ckpt.best_model, good)


def test_the_best_model_of_a_task_whose_metric_falls_is_the_lowest(regression_config):
    recorder = recorder_for(regression_config)
    task, test, results = recorder.task, recorder.test, recorder.results
    good, bad = trained(task, epochs=5), untrained(task)
    assert metric_of(task, test, good, "mae") < 0.6 * metric_of(task, test, bad, "mae")

    recorder.record(ended(0, good))
    recorder.record(ended(1, bad))  # a higher error: not the best
    lines = read_metrics(results.metrics_path)
    assert [r["primary_metric"] for r in lines] == ["mae", "mae"] and lines[1]["mae"] > lines[0]["mae"]
    assert set(lines[0]["metrics"]) == {"mae", "mse"}
    assert equal(load_model(results.path / "global-best.safetensors"), good)
    assert equal(load_model(results.path / "global-final.safetensors"), bad)
    assert load_checkpoint(checkpoint_files(results.path)[-1]).best_value == lines[0]["mae"]
    assert (results.path / "mae.png").exists() and not (results.path / "accuracy.png").exists()


def test_a_resumed_recorder_replaces_metrics_jsonl_with_the_checkpoints_lines(regression_config):
    first = recorder_for(regression_config)
    task, results = first.task, first.results
    good, bad = trained(task, epochs=5), untrained(task)
    for server_round, state in enumerate([bad, good, bad]):
        first.record(ended(server_round, state))
    # round 3 fails, and the run stops: its line is in metrics.jsonl, no checkpoint is; the plot marks it
    (results.path / "mae.png").unlink()
    first.record_failed_round(RoundOutcome(3, ArrayRecord(bad), events=[{"event": "round-attempt-failed"}]),
                              "round 3 failed 1 time(s)")
    written = read_metrics(results.metrics_path)
    assert [r["round"] for r in written] == [0, 1, 2, 3] and written[3]["failed"]
    assert (results.path / "mae.png").exists()
    assert written[3]["events"] == [{"event": "round-attempt-failed"}]

    resumed_config = {**regression_config, "resume-from": str(results.path), "num-server-rounds": 6}
    run_dir, ckpt = load_resume_point(RunSettings.from_run_config(resumed_config), task, task.build_model())
    assert run_dir == results.path and ckpt.round == 2
    again = recorder_for(resumed_config, run_dir=run_dir)
    value = again.resume(ckpt)
    assert value == pytest.approx(written[2]["mae"], rel=1e-12)  # the checkpoint's model, evaluated again
    assert read_metrics(results.metrics_path) == written[:3]  # the failed round's line is gone
    again.record(ended(3, bad))
    lines = read_metrics(results.metrics_path)
    assert [r["round"] for r in lines] == [0, 1, 2, 3] and "failed" not in lines[3]
    assert lines[3]["elapsed"] >= lines[2]["elapsed"]  # the run's clock goes on from the checkpoint's
    # the best so far came with the checkpoint: round 1's model stays the best
    assert equal(load_model(results.path / "global-best.safetensors"), good)
    assert load_checkpoint(checkpoint_files(results.path)[-1]).best_value == written[1]["mae"]


def test_the_mean_of_cycle_ends_is_kept_evaluated_and_saved_beside_the_global_model(regression_config):
    recorder = recorder_for({**regression_config, "swa-start": 1})  # a cycle per round: every round ends one
    task, test, results = recorder.task, recorder.test, recorder.results
    models = [untrained(task), trained(task, epochs=5), trained(task, epochs=1)]
    for server_round, state in enumerate(models):
        recorder.record(ended(server_round, state))
    lines = read_metrics(results.metrics_path)
    assert lines[0]["swa"] is None and [r["swa"]["rounds"] for r in lines[1:]] == [[1], [1, 2]]
    mean = {k: ((models[1][k].double() + models[2][k].double()) / 2).to(v.dtype) for k, v in models[1].items()}
    saved = load_model(results.path / "global-swa.safetensors")
    assert equal(saved, mean)
    assert lines[2]["swa"]["mae"] == pytest.approx(metric_of(task, test, mean, "mae"), rel=1e-12)
    assert lines[2]["swa"]["batchnorm"] == "none in the model"
    assert load_checkpoint(checkpoint_files(results.path)[-1]).swa_rounds == [1, 2]


class WithoutTestSplit(BloodPressure):
    """The regression with no test split on the server: the sites' held-out data is the evaluation."""

    def test_data(self):
        return None


def test_without_a_test_split_the_sites_evaluate_the_initial_model(tmp_path, task_identity):
    run_config = {"task": f"{WithoutTestSplit.__module__}:WithoutTestSplit", "batch-size": 50, "tracking": "off",
                  "results-dir": str(tmp_path), "run-name": "sites"}
    nodes = {1: {"partition-id": 0}, 2: {"partition-id": 1}}
    grid = AnsweringSites(nodes, lambda m: client_app.evaluate_round(m, context(run_config, nodes[m.metadata.dst_node_id])))
    settings = RunSettings.from_run_config(run_config)
    strategy = make_coordinator(settings, num_sites=2, has_test_data=False, metric_names=["mae", "mse"])
    recorder = recorder_for(run_config, metric_names=["mae", "mse"])
    assert recorder.test is None and strategy.evaluates_on_sites
    state = untrained(recorder.task)
    recorder.record(initial_round(grid, strategy, settings, ArrayRecord(state), sites_evaluate=True))
    assert [m.metadata.message_type for m in grid.sent] == ["evaluate", "evaluate"]
    (line,) = read_metrics(recorder.results.metrics_path)
    assert line["metrics_source"] == "sites-weighted"
    # the example-weighted mean of each site's error on its own held-out split
    sites = [load_site(run_config, node) for node in nodes.values()]
    maes = [metric_of(s.task, s.val, state, "mae") for s in sites]
    sizes = [len(s.val) for s in sites]
    assert line["mae"] == pytest.approx(sum(m * n for m, n in zip(maes, sizes)) / sum(sizes), rel=1e-6)
    assert line["sites_evaluation"]["mae"] == pytest.approx(line["mae"])
    assert equal(load_model(recorder.results.path / "global-best.safetensors"), state)


def test_a_resume_rewrites_the_models_a_crash_left_behind_the_checkpoint(regression_config):
    first = recorder_for(regression_config)
    task, results = first.task, first.results
    good, bad = trained(task, epochs=5), untrained(task)
    first.record(ended(0, bad))
    first.record(ended(1, good))
    # a crash between round 1's checkpoint and its models: the files still hold round 0's
    first.results.save_model("global-best", bad)
    first.results.save_model("global-final", bad)
    resumed_config = {**regression_config, "resume-from": str(results.path), "num-server-rounds": 3}
    run_dir, ckpt = load_resume_point(RunSettings.from_run_config(resumed_config), task, task.build_model())
    recorder_for(resumed_config, run_dir=run_dir).resume(ckpt)
    assert equal(load_model(results.path / "global-best.safetensors"), good)
    assert equal(load_model(results.path / "global-final.safetensors"), good)
