"""The server's trackers, read back with their own readers: TensorBoard's event reader and
MLflow's client (here on its SQLite store; tests/test_failures.py runs a real `mlflow server`)."""

from __future__ import annotations

import json
import logging

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedcycle.config import RunSettings
from fedcycle.errors import ConfigError
from fedcycle.tracking import Trackers, series
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
