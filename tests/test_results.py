"""A run's files (fedcycle.results): where a run's folder goes and that no run overwrites
another's, metrics.jsonl read back as written, models saved as safetensors that load back equal,
config.json with what a reader needs to repeat the run, and the plot of the primary metric."""

from __future__ import annotations

import re

import flwr
import numpy as np
import torch
from safetensors import safe_open

from fedcycle.config import RunSettings
from fedcycle.results import RunResults, load_model, read_metrics, resolve_run_dir
from fedcycle.tasks.image.models import build_model


def settings(results_dir, **extra) -> RunSettings:
    return RunSettings.from_run_config({"results-dir": str(results_dir), **extra})


def test_a_run_folder_is_never_overwritten_a_second_run_of_the_name_gets_a_suffix(tmp_path):
    first = resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=1, what="x")
    assert first == tmp_path / "baseline" and first.is_dir()
    RunResults(first).append_round({"round": 0, "accuracy": 0.1})
    second = resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=2, what="x")
    assert second == tmp_path / "baseline-2" and second.is_dir()
    RunResults(second).append_round({"round": 0, "accuracy": 0.2})
    third = resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=3, what="x")
    assert third == tmp_path / "baseline-3"
    # the earlier runs' lines are where they were
    assert read_metrics(first / "metrics.jsonl") == [{"round": 0, "accuracy": 0.1}]
    assert read_metrics(second / "metrics.jsonl") == [{"round": 0, "accuracy": 0.2}]
    # a folder without a round in it (a run that stopped before its first round) is taken again
    assert resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=4, what="x") == third


def test_a_folder_another_run_holds_is_neither_shared_nor_resumed(tmp_path):
    import fcntl

    import pytest

    from fedcycle.errors import ConfigError
    from fedcycle.results import take_for_resume

    held = tmp_path / "busy"
    held.mkdir()
    other = open(held / "run.lock", "a+")  # another ServerApp's lock (flock: per open file, as between processes)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write("pid 4242 on coordinator\n")
    other.flush()
    # before its first round there is no metrics.jsonl: only the lock says the folder is in use
    assert resolve_run_dir(settings(tmp_path, **{"run-name": "busy"}), run_id=2, what="x") == tmp_path / "busy-2"
    with pytest.raises(ConfigError) as refused:
        take_for_resume(held)
    assert f"resume-from={str(held)!r} is in use by another run (run.lock is held: pid 4242 on coordinator)" in str(
        refused.value)
    other.close()  # that run ended (however it ended: the OS drops its lock)
    assert take_for_resume(held) == held


def test_an_unnamed_run_is_named_after_what_it_trains_and_relative_paths_follow_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_run_dir(RunSettings.from_run_config({"results-dir": "out", "strategy": "flwr.serverapp.strategy:FedMedian",
                                                        "lr-schedule": "cosine"}), run_id=17, what="fashion-mnist")
    assert path.parent == tmp_path / "out"
    assert re.fullmatch(r"fashion-mnist-flwr\.serverapp\.strategy\.FedMedian-cosine-\d{8}-\d{6}-run17", path.name), path.name


def test_metrics_lines_round_trip_through_read_metrics(tmp_path):
    results = RunResults(tmp_path)
    lines = [
        {"round": 0, "primary_metric": "accuracy", "accuracy": 0.1, "loss": 2.3, "sites": [], "events": [],
         "train_config": None},
        {"round": 1, "primary_metric": "accuracy", "accuracy": 0.5, "loss": 1.2,
         "metrics": {"accuracy": 0.5}, "swa": {"rounds": [1], "accuracy": 0.5},
         "sites": [{"node_id": 7, "site": "partition 0/2", "lr-peak": 0.05, "num-examples": 500}],
         "events": [{"node_id": 8, "event": "rejected", "reason": "array 'conv.bias' holds NaN or Inf"}]},
    ]
    for line in lines:
        results.append_round(line)
    assert read_metrics(results.metrics_path) == lines
    # NumPy and torch scalars (what metrics come as) are written as plain numbers
    results.append_round({"round": 2, "accuracy": np.float32(0.75), "loss": torch.tensor(0.5), "steps": np.int64(8)})
    assert read_metrics(results.metrics_path)[-1] == {"round": 2, "accuracy": 0.75, "loss": 0.5, "steps": 8}
    # a resumed run's rounds replace the file's, whatever it held
    results.rewrite_rounds(lines[:1])
    assert read_metrics(results.metrics_path) == lines[:1]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left beside it


def test_a_saved_model_loads_back_equal_as_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 28, 28), 10)
    state = dict(model.state_dict())
    state["features.0.weight"] = state["features.0.weight"].transpose(2, 3)  # not contiguous
    state["counter"] = torch.tensor(3, dtype=torch.int64)  # a BatchNorm's num_batches_tracked, say
    results = RunResults(tmp_path)
    path = results.save_model("global-best", state)
    assert path == tmp_path / "global-best.safetensors"
    loaded = load_model(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: any reader opens it
        assert set(f.keys()) == set(state)
    # saved again under the same name, the file holds the new model, whole
    results.save_model("global-best", {k: torch.zeros_like(v) for k, v in state.items()})
    assert all(not v.any() for v in load_model(path).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-best.safetensors"]


def test_config_json_holds_the_run_config_seed_versions_and_machine(tmp_path):
    results = RunResults(tmp_path)
    assert results.read_config() == {}  # none yet
    run_config = {"num-server-rounds": 3, "seed": 7, "lr-max": 0.05}
    results.write_config(RunSettings.from_run_config(run_config), run_config, run_id=42, sites={"1": {"site": "a"}})
    config = results.read_config()
    assert config["run_config"] == run_config and config["seed"] == 7 and config["run_id"] == 42
    assert config["settings"]["num_server_rounds"] == 3 and config["sites"] == {"1": {"site": "a"}}
    assert config["versions"]["flwr"] == flwr.__version__ and config["versions"]["torch"] == torch.__version__.split("+")[0]
    assert {"hostname", "platform", "python", "cpu_count", "cuda"} <= set(config["machine"])
    (tmp_path / "config.json").write_text('{"run_config": ')  # cut short
    assert results.read_config() == {}


def test_the_plot_shows_the_primary_metric_per_round(tmp_path):
    results = RunResults(tmp_path)
    for r, mae in enumerate([0.9, 0.5, None, 0.3]):  # a failed round has no value
        results.append_round({"round": r, "mae": mae, **({"swa": {"mae": 0.4}} if r == 3 else {})})
    path = results.plot("mae")
    assert path == tmp_path / "mae.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

