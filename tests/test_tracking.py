"""The server's trackers, read back with their own readers: TensorBoard's event reader and
MLflow's client (here on its SQLite store; tests/test_failures.py runs a real `mlflow server`)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedcycle.config import RunSettings
from fedcycle.errors import ConfigError
from fedcycle.results import RunResults
from fedcycle.schedules import LRSchedule
from fedcycle.tracking import Trackers, round_lrs, series
from fedcycle.wire import RoundConfig
from fedcycle_tools.launcher import free_port


def line(server_round: int, accuracy: float, **extra) -> dict:
    sites = [{"node_id": 7, "site": "partition 0/2", "train-loss": 1.0 / (server_round + 1), "lr-peak": 0.05,
              "update-ratio": 0.1}] if server_round else []
    return {"round": server_round, "primary_metric": "accuracy", "accuracy": accuracy, "loss": 2.0 - accuracy,
            "metrics": {"accuracy": accuracy}, "seconds": 1.5, "sites": sites, "events": [], **extra}


def test_a_round_becomes_named_series_of_finite_numbers():
    got = series(line(2, 0.5, events=[{"site": "partition 1/2", "event": "rejected", "reason": "NaN"}],
                      swa={"metrics": {"accuracy": float("nan")}, "loss": 1.25}))
    assert got == {"global/accuracy": 0.5, "global/loss": 1.5, "swa/loss": 1.25,
                   "site/partition 0 of 2/train-loss": pytest.approx(1 / 3), "site/partition 0 of 2/lr-peak": 0.05,
                   "site/partition 0 of 2/update-ratio": 0.1, "round/seconds": 1.5, "round/left-out": 1.0}


def test_the_training_loss_series_is_the_sites_example_weighted_mean():
    sites = [{"site": "a", "num-examples": 300, "train-loss": 1.0}, {"site": "b", "num-examples": 100, "train-loss": 2.0},
             {"site": "c", "num-examples": 50, "train-loss": None}]  # a diverged loss is written as null
    got = series({"round": 1, "sites": sites, "events": None})
    assert got["train/loss"] == pytest.approx(1.25) and got["site/a/train-loss"] == 1.0
    assert not any("test" in name for name in got)  # the global model's values are `global/...`, whatever they were measured on


# 2 rounds of 2 local epochs of 5 batches: cycles across the rounds, cycles that end inside one
STEPS_PER_EPOCH, EPOCHS = 5, 2
CYCLICAL = [
    LRSchedule("triangular2", 0.01, 0.11, cycle_unit="round", cycle_length=2),
    LRSchedule("exp_range", 0.01, 0.11, cycle_unit="epochs", cycle_length=1.5, gamma=0.9),
    LRSchedule("cosine", 0.01, 0.11, cycle_unit="steps", cycle_length=7),
]


def trained_line(server_round: int, schedule: LRSchedule, steps_per_epoch: tuple[int, ...] = (STEPS_PER_EPOCH,),
                 epochs: int = EPOCHS, epochs_before: int | None = None) -> dict:
    """A metrics.jsonl line of a round the sites trained, its train config as they received it."""
    before = EPOCHS * (server_round - 1) if epochs_before is None else epochs_before
    sent = RoundConfig(server_round, schedule, local_epochs=epochs, epochs_before=before,
                       batch_size=32, optimizer="sgd", momentum=0.9, weight_decay=0.0)
    sites = [{"node_id": i, "site": f"partition {i}/{len(steps_per_epoch)}", "num-examples": 32 * n, "train-loss": 1.0,
              "local-epochs": epochs, "steps": n * epochs} for i, n in enumerate(steps_per_epoch)]
    return {**line(server_round, 0.5), "train_config": sent.to_record(), "sites": sites}


def stepped(schedule: LRSchedule, steps: int, cycle_steps: int | None = None) -> list[float]:
    """The rate of each optimizer step of one PyTorch scheduler from LRSchedule.build, stepped
    after each step as a site's loop steps it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.build(optimizer, cycle_steps or schedule.cycle_steps(STEPS_PER_EPOCH, EPOCHS))
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule", CYCLICAL, ids=lambda s: f"{s.name}-{s.cycle_unit}")
def test_every_steps_learning_rate_is_the_schedule_the_sites_ran(schedule):
    rounds = [round_lrs(trained_line(r, schedule)) for r in (1, 2)]
    steps = STEPS_PER_EPOCH * EPOCHS
    assert rounds[0].lrs + rounds[1].lrs == pytest.approx(stepped(schedule, 2 * steps), rel=1e-12)
    assert rounds[0].global_steps() + rounds[1].global_steps() == list(range(2 * steps))
    # on the plot's round axis, round r's steps lie between r - 1 and r
    assert rounds[1].rounds() == pytest.approx([1 + j / steps for j in range(steps)])
    # a plot's fewer points: evenly spread, the first and the last step among them, the same rates
    coarse = round_lrs(trained_line(2, schedule), points=4)
    assert coarse.at == [0, 3, 6, 9] and coarse.lrs == pytest.approx([rounds[1].lrs[j] for j in coarse.at])


def test_with_local_epochs_growing_each_round_still_runs_its_whole_cycle():
    """Round 2 trains 3 epochs after 2: its cycle of rounds spans its own 15 steps, from the
    cycle's start (the steps before it, 10, only count for the run's step axis)."""
    schedule = LRSchedule("triangular", 0.01, 0.11)  # a cycle per round
    lrs = round_lrs(trained_line(2, schedule, epochs=3, epochs_before=2))
    assert lrs.lrs == pytest.approx(stepped(schedule, 15, cycle_steps=15), rel=1e-12)
    assert lrs.global_steps() == list(range(10, 25))


def test_a_round_that_trained_nothing_has_no_learning_rates():
    assert round_lrs(line(0, 0.1, train_config=None)) is None
    assert round_lrs({**trained_line(1, CYCLICAL[0]), "sites": []}) is None  # a failed round: no site finished
    assert round_lrs({**trained_line(1, CYCLICAL[0]), "train_config": {"server-round": 1}}) is None  # no schedule in it
    # sites of other sizes: the one with the most steps stands for the round
    assert round_lrs(trained_line(1, CYCLICAL[0], steps_per_epoch=(3, 5, 4))).steps == 10


def test_both_trackers_have_the_learning_rate_of_every_step_also_after_a_resume(tmp_path):
    schedule, steps = CYCLICAL[0], STEPS_PER_EPOCH * EPOCHS
    lines = [line(0, 0.1, train_config=None)] + [trained_line(r, schedule) for r in (1, 2, 3)]
    settings = RunSettings(tracking="both")
    run_dir = tmp_path / "results" / "run"
    run_dir.mkdir(parents=True)
    first = Trackers(settings, run_dir, {}, first_round=0)
    results = RunResults(run_dir)
    for done in lines[:3]:
        results.append_round(done)
        first.log_round(done)
    # stopped after round 2; its newest checkpoint is round 1's: the run goes on from round 2, again
    again = Trackers(settings, run_dir, {}, first_round=2)
    for done in lines[2:]:
        again.log_round(done)
    again.finish("finished", {}, [])
    expected = stepped(schedule, 3 * steps)
    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    rates = board.Scalars("lr/step")
    assert [e.step for e in rates] == list(range(3 * steps))  # every step once, none lost to the resume's purge
    assert [e.value for e in rates] == pytest.approx(expected, rel=1e-6)  # float32 in the file
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3]
    state = json.loads((run_dir / "tracking.json").read_text())
    history = MlflowClient(tracking_uri=state["mlflow_tracking_uri"]).get_metric_history(state["mlflow_run_id"], "lr/step")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == list(range(3 * steps)) and [m.value for m in history] == pytest.approx(expected)


def test_a_resumed_run_continues_both_trackers_without_a_round_twice(tmp_path):
    settings = RunSettings(tracking="both")
    run_dir = tmp_path / "results" / "run"
    run_dir.mkdir(parents=True)
    first = Trackers(settings, run_dir, {"seed": 7, "lr-max": 0.05}, first_round=0)
    for r, acc in enumerate([0.1, 0.5, 0.6]):
        first.log_round(line(r, acc))
    # stopped here, without finishing; the newest checkpoint is round 1: round 2 is done again
    again = Trackers(settings, run_dir, {"seed": 7, "lr-max": 0.05}, first_round=2)
    for r, acc in [(2, 0.6), (3, 0.7)]:
        again.log_round(line(r, acc))
    (run_dir / "global-final.safetensors").write_bytes(b"model")
    again.finish("finished", {"final-accuracy": 0.7}, [run_dir / "global-final.safetensors", run_dir / "global-swa.safetensors"])

    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    scalars = board.Scalars("global/accuracy")
    assert [e.step for e in scalars] == [0, 1, 2, 3] and [e.value for e in scalars] == pytest.approx([0.1, 0.5, 0.6, 0.7])
    assert [e.step for e in board.Scalars("site/partition 0 of 2/train-loss")] == [1, 2, 3]
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
    history = client.get_metric_history(state["mlflow_run_id"], "global/accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3] and [m.value for m in history] == pytest.approx([0.1, 0.5, 0.6, 0.7])
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run" and run.data.params == {"seed": "7", "lr-max": "0.05"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "models")] == ["models/global-final.safetensors"]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_resumed_run_gives_mlflow_the_rounds_it_missed_when_the_run_stopped(tmp_path):
    """A run stopped after writing round 2's line but before MLflow had it: the resume logs it."""
    settings = RunSettings(tracking="mlflow")
    run_dir = tmp_path / "results" / "run"
    results = RunResults(run_dir)
    first = Trackers(settings, run_dir, {}, first_round=0)
    for r, acc in enumerate([0.1, 0.5, 0.6]):
        results.append_round(line(r, acc))
        if r < 2:
            first.log_round(line(r, acc))
    again = Trackers(settings, run_dir, {}, first_round=3)
    again.log_round(line(3, 0.7))
    state = json.loads((run_dir / "tracking.json").read_text())
    history = MlflowClient(tracking_uri=state["mlflow_tracking_uri"]).get_metric_history(state["mlflow_run_id"],
                                                                                        "global/accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3] and [m.value for m in history] == pytest.approx([0.1, 0.5, 0.6, 0.7])


def test_a_sqlite_store_named_in_the_run_config_keeps_the_models_beside_it(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever folder the ServerApp runs in (a study's first federated run
    creates the experiment; its models went to the checkout's root)."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "study" / "mlflow.db"
    store.parent.mkdir()
    run_dir = tmp_path / "results" / "run"
    run_dir.mkdir(parents=True)
    trackers = Trackers(RunSettings(tracking="mlflow", mlflow_tracking_uri=f"sqlite:///{store}"), run_dir, {}, first_round=0)
    trackers.log_round(line(0, 0.1))
    (run_dir / "global-final.safetensors").write_bytes(b"model")
    trackers.finish("finished", {}, [run_dir / "global-final.safetensors"])
    assert (store.parent / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert list((store.parent / "mlartifacts").rglob("global-final.safetensors"))


@pytest.mark.e2e  # MLflow's client connects to a loopback port nobody listens on
def test_a_tracker_that_fails_is_logged_once_and_the_others_go_on(tmp_path, caplog):
    settings = RunSettings(tracking="both", mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")  # nobody there
    with caplog.at_level(logging.WARNING):
        trackers = Trackers(settings, tmp_path, {}, first_round=0)
        for r in range(3):
            trackers.log_round(line(r, 0.1 * r))
        trackers.finish("finished", {}, [])
    assert sum("mlflow tracking stopped" in m for m in caplog.messages) == 1, caplog.messages
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("global/accuracy")] == [0, 1, 2]


def test_an_unknown_tracker_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"tracking='wandb' is unknown; choose one of \['both', 'mlflow', 'off', 'tensorboard'\]"):
        RunSettings(tracking="wandb").validate()
