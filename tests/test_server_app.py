"""fedcycle's ServerApp (fedcycle.server_app): its own errors logged as one line, not Flower's
traceback; a run config or task that cannot work stops the run before any site is asked; and the
whole app, pre-flight, rounds and resume, on real Fashion-MNIST subsets with the sites' real
ClientApp handlers answering in this process through a stand-in for the SuperLink's grid."""

from __future__ import annotations

import io
import json
import logging
from logging import ERROR, INFO

import pytest
from flwr.app import Context, RecordDict
from flwr.common.logger import FLOWER_LOGGER, log

from fedcycle import client_app, server_app
from fedcycle.checkpoint import CheckpointError, checkpoint_files
from fedcycle.errors import ConfigError, TaskError
from fedcycle.preflight import PreflightError
from fedcycle.results import read_metrics
from fedcycle.round_loop import RoundFailed
from tests.fakes import AnsweringSites, Sites, context


@pytest.fixture
def flower_log():
    """What Flower's logger writes, formatted as a plain handler formats it (a record's exc_info
    becomes its traceback)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    FLOWER_LOGGER.addHandler(handler)
    yield out
    FLOWER_LOGGER.removeHandler(handler)


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as err:  # noqa: BLE001 - the error with its traceback, as Flower catches it
        return err


@pytest.mark.parametrize("error", [
    ConfigError("lr-min=0.5 must be between 0 and lr-max=0.1"),
    TaskError("task='clinic:Task': build_model() returned str, not a torch.nn.Module"),
    PreflightError("pre-flight failed, no training started: node 2 cannot take part"),
    CheckpointError("no checkpoint in results/run/checkpoints"),
    RoundFailed(3, "round 3 failed 2 time(s): 0 usable replies of 2 sampled site(s)"),
])
def test_fedcycles_own_error_out_of_the_server_app_is_logged_as_one_line(flower_log, error):
    log(ERROR, "%s raised an exception", "ServerApp", exc_info=raised(error))  # as Flower logs it
    assert flower_log.getvalue() == f"ERROR fedcycle: {error}\n"


def test_any_other_error_keeps_its_traceback(flower_log):
    log(ERROR, "%s raised an exception", "ServerApp", exc_info=raised(KeyError("num-train")))
    text = flower_log.getvalue()
    assert text.startswith("ERROR ServerApp raised an exception\nTraceback (most recent call last):\n")
    assert text.rstrip().endswith("KeyError: 'num-train'")
    flower_log.truncate(0), flower_log.seek(0)
    log(INFO, "fedcycle round %d/%d", 1, 3)  # no exception: as it was
    assert flower_log.getvalue() == "INFO fedcycle round 1/3\n"


def server_context(run_config: dict, run_id: int = 1) -> Context:
    """The Context Flower gives the ServerApp: the run's id and config."""
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


@pytest.mark.parametrize("run_config, message", [
    ({"lr-min": 0.5, "lr-max": 0.1}, "lr-min=0.5 must be between 0 and lr-max=0.1"),
    ({"strategy": "fedprox", "fedprox.proximal-mu": -1.0}, "fedprox.proximal-mu=-1.0 must be a number in [0, inf)"),
    ({"task": "tests.user_tasks:BloodPressureOwnLoop", "strategy": "fedprox", "fedprox.proximal-mu": 0.1},
     "strategy='fedprox' needs FedProx's proximal term, which fedcycle's own loop adds, but "
     "task='tests.user_tasks:BloodPressureOwnLoop' brings its own train()"),
    ({"image.dataset": "no-such-set"}, "image.dataset='no-such-set' is unknown"),
    ({"model-weights": "/no/such/start.safetensors"}, "model-weights='/no/such/start.safetensors'"),
])
def test_a_run_that_cannot_work_stops_before_any_site_is_asked(tmp_path, run_config, message):
    # a grid that fails if the app sends anything: the error must come first
    with pytest.raises(ConfigError) as failed:
        server_app.main(Sites([1, 2]), server_context({**run_config, "results-dir": str(tmp_path)}))
    assert message in str(failed.value)
    assert list(tmp_path.iterdir()) == []  # no run folder, no config.json


def fedcycle_sites(run_config: dict, nodes: dict[int, dict]) -> AnsweringSites:
    """Each node a site running fedcycle's ClientApp handlers on its own node config."""
    handlers = {"query": client_app.preflight, "train": client_app.train_round, "evaluate": client_app.evaluate_round}
    return AnsweringSites(nodes, lambda m: handlers[m.metadata.message_type](m, context(run_config, nodes[m.metadata.dst_node_id])))


def test_the_server_app_runs_checks_records_and_resumes_a_run_with_its_sites(data_root, tmp_path, task_identity):
    run_config = {"data-root": data_root, "train-subset": 96, "test-subset": 300, "batch-size": 32, "local-epochs": 1,
                  "num-server-rounds": 1, "results-dir": str(tmp_path), "run-name": "in-process", "tracking": "off"}
    nodes = {5: {"partition-id": 0, "num-partitions": 2}, 6: {"partition-id": 1, "num-partitions": 2}}
    grid = fedcycle_sites(run_config, nodes)
    server_app.main(grid, server_context(run_config, run_id=11))
    assert [m.metadata.message_type for m in grid.sent] == ["query", "query", "train", "train"]
    run_dir = tmp_path / "in-process"
    rounds = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and all(r["metrics_source"] == "server-test" for r in rounds)
    assert sorted(s["node_id"] for s in rounds[1]["sites"]) == [5, 6] and rounds[1]["events"] == []
    assert {s["site"] for s in rounds[1]["sites"]} == {"partition 0/2", "partition 1/2"}
    assert all(s["num-examples"] == 96 and s["local-epochs"] == 1 for s in rounds[1]["sites"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_id"] == 11 and config["run_config"] == run_config
    assert sorted(config["sites"]) == ["5", "6"] and config["sites"]["5"]["num-train"] == 96
    assert [p.name for p in checkpoint_files(run_dir)] == ["round-0000.safetensors", "round-0001.safetensors"]
    assert (run_dir / "global-final.safetensors").exists() and (run_dir / "global-best.safetensors").exists()

    # the run is extended by a round: it continues from its checkpoint, in its own folder
    resumed = {**run_config, "num-server-rounds": 2, "resume-from": str(run_dir)}
    grid = fedcycle_sites(resumed, nodes)
    server_app.main(grid, server_context(resumed, run_id=12))
    assert [m.metadata.message_type for m in grid.sent] == ["query", "query", "train", "train"]
    again = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in again] == [0, 1, 2] and again[:2] == rounds
    assert again[2]["train_config"]["server-round"] == 2 and again[2]["train_config"]["epochs-before"] == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_id"] == 12 and config["resumed_from_round"] == 1 and config["earlier_run_ids"] == [11]
    assert config["resumed_value"] == pytest.approx(rounds[1]["accuracy"], abs=1e-12)
    assert not (tmp_path / "in-process-2").exists()

    # and once it has all its rounds, resuming it again does nothing
    before = (run_dir / "metrics.jsonl").read_bytes()
    server_app.main(Sites([5, 6]), server_context(resumed, run_id=13))
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert json.loads((run_dir / "config.json").read_text())["run_id"] == 12
