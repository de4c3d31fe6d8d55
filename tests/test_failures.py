"""Runs that survive failure, on real processes: a SuperLink with TLS and node authentication,
the fleet proxy and SuperNodes on loopback, as in tests/test_deploy.py.

The sites run fedcycle's ClientApp through tests/faults/fault_client_app.py, which adds the
fault a site's node config names (NaN, scaled or flipped weights, a lie about its data, a replay,
a stall the test releases); the ServerApp, strategy, trainer and data are fedcycle's own. Where a
test needs a site mid-round, the site says so (a file) and waits for the test: no sleep races a
timeout.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import MLflowServer
from faults.fault_client_app import build_app
from faults.rogues import start_sites, stop_sites
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedcycle.checkpoint import load_checkpoint
from fedcycle.config import RunSettings
from fedcycle.results import load_model, read_metrics
from fedcycle.strategies import make_coordinator
from fedcycle_tools.deploy.loopback import LoopbackDeployment
from fedcycle_tools.launcher import RunOutcome

# every test runs on a LoopbackDeployment with faulty SuperNodes, some with an `mlflow server`
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fault_app(tmp_path_factory) -> Path:
    """fedcycle's app with tests/faults/fault_client_app.py as its ClientApp."""
    return build_app(tmp_path_factory.mktemp("fault-app"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, fault_app):
    d = LoopbackDeployment(tmp_path_factory.mktemp("failures"), app_dir=fault_app)
    try:
        d.start_superlink()
        d.start_proxy()
        yield d
    finally:
        pids = d.processes.pids()
        d.stop()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)


def config(data_root: str, results: Path, extra: str) -> str:
    return (
        f"local-epochs=1 train-subset=400 test-subset=1000 batch-size=32 "
        f"data-root='{data_root}' results-dir='{results}' {extra}"
    )


class Background:
    """`flwr run` in a thread, so the test can act while the run goes."""

    def __init__(self, deployment: LoopbackDeployment, run_config: str) -> None:
        self.outcome: RunOutcome | None = None
        self.thread = threading.Thread(target=self._run, args=(deployment, run_config), daemon=True)
        self.thread.start()

    def _run(self, deployment: LoopbackDeployment, run_config: str) -> None:
        self.outcome = deployment.run(run_config, stream=False)

    def join(self, timeout: float = 600) -> RunOutcome:
        self.thread.join(timeout)
        assert self.outcome is not None, "flwr run did not return"
        return self.outcome


def wait_for_round(metrics: Path, server_round: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(r["round"] >= server_round for r in read_metrics(metrics)):
            return
        time.sleep(0.2)
    raise AssertionError(f"round {server_round} did not finish within {timeout}s")


def wait_for_file(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.2)


def kill(deployment: LoopbackDeployment, name: str) -> None:
    """SIGKILL a process's whole session: no goodbye to anyone."""
    proc = deployment.processes.procs[name]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deployment.processes.stop(name)


def events(line: dict, site: str, event: str) -> list[dict]:
    return [e for e in line["events"] if e.get("site") == site and e["event"] == event]


def test_a_killed_site_is_dropped_and_a_stalled_one_takes_part_again(deployment, data_root, tmp_path):
    # Sites 1 and 2 stall in round 1 until the test acts: site 2 is killed there (it never comes
    # back), site 1 goes on only after the server has given up on it (round 1 is in metrics.jsonl),
    # never in a race with the timeout. The run's MLflow server is stopped after it has round 1 and
    # before round 2 can end: site 0 waits in round 2 until then.
    never, release, go = tmp_path / "never", tmp_path / "release", tmp_path / "go"
    tracker = MLflowServer(tmp_path / "mlflow").start()
    names = start_sites(deployment, "faulty", [f"stall:2:{go}", f"stall:1:{release}", f"stall:1:{never}"], data_root)
    metrics = tmp_path / "faulty" / "metrics.jsonl"
    try:
        # round 1 goes on with 1 usable reply of 3 (the default asks for half the sampled sites)
        run = Background(deployment, config(data_root, tmp_path, "num-server-rounds=2 round-timeout=45 "
                                            f"min-reply-fraction=0.3 tracking='mlflow' mlflow-tracking-uri='{tracker.uri}' "
                                            "run-name='faulty'"))
        wait_for_file(Path(f"{never}.stalled"))  # round 1 is under way at site 2
        kill(deployment, "supernode-faulty-2")
        kill(deployment, "superexec-faulty-2")
        wait_for_round(metrics, 1)
        release.touch()
        run_id = json.loads((tmp_path / "faulty" / "tracking.json").read_text())["mlflow_run_id"]
        deadline = time.monotonic() + 120  # the server has round 1 (it is logged after metrics.jsonl)
        while 1 not in {m.step for m in tracker.client().get_metric_history(run_id, "round/seconds")}:
            assert time.monotonic() < deadline, "round 1 did not reach the MLflow server"
            time.sleep(0.2)
        tracker.stop()
        go.touch()
        outcome = run.join()
    finally:
        release.touch()
        go.touch()
        tracker.stop()
        stop_sites(deployment, names[:2])
    assert outcome.completed, outcome.log[-4000:]
    # the stopped tracker: said once, the run went on; what it got before is in its store
    assert outcome.log.count("mlflow tracking stopped") == 1, outcome.log[-4000:]
    stored = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert [m.step for m in stored.get_metric_history(run_id, "global/accuracy")] == [0, 1]
    rounds = read_metrics(metrics)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    slow, dead = "partition 1/3", "partition 2/3"
    assert [s["site"] for s in rounds[1]["sites"]] == ["partition 0/3"]
    assert events(rounds[1], slow, "missing"), rounds[1]["events"]
    assert [e["event"] for e in rounds[1]["events"] if e.get("site") == dead] in (["missing"], ["rejected"])
    assert f"({slow}) missing" in outcome.log
    # every event names its site, also where the SuperLink answered for the dead one ("Node Unavailable")
    assert all(e["site"] in (slow, dead) for r in rounds[1:] for e in r["events"]), [r["events"] for r in rounds]
    # the stalled site is back, the killed one stays out
    assert sorted(s["site"] for s in rounds[2]["sites"]) == ["partition 0/3", slow], rounds[2]["events"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert rounds[-1]["accuracy"] >= rounds[1]["accuracy"]


def test_nan_and_scaled_updates_are_rejected_and_a_robust_strategy_survives_them(deployment, data_root, tmp_path):
    names = start_sites(deployment, "hostile", ["", "", "nan", "scale:1000"], data_root)
    try:
        default = deployment.run(
            config(data_root, tmp_path, "num-server-rounds=2 round-timeout=120 run-name='hostile'"), stream=False
        )
        # without the norm bounds the scaled site is averaged in, unless the strategy is robust
        robust = deployment.run(
            config(data_root, tmp_path, "num-server-rounds=1 round-timeout=120 max-update-ratio=0 peer-clip-ratio=0 peer-norm-ratio=0 "
                   "strategy='fedmedian' run-name='robust'"),
            stream=False,
        )
    finally:
        stop_sites(deployment, names)
    assert default.completed, default.log[-4000:]
    rounds = read_metrics(tmp_path / "hostile" / "metrics.jsonl")
    for r in rounds[1:]:
        assert sorted(s["site"] for s in r["sites"]) == ["partition 0/4", "partition 1/4"]
        assert "NaN or Inf" in events(r, "partition 2/4", "rejected")[0]["reason"]
        assert "max-update-ratio=10.0" in events(r, "partition 3/4", "rejected")[0]["reason"]
        assert all(s["update-ratio"] < 10 for s in r["sites"])
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2

    assert robust.completed, robust.log[-4000:]
    rounds = read_metrics(tmp_path / "robust" / "metrics.jsonl")
    for r in rounds[1:]:
        assert "partition 3/4" in [s["site"] for s in r["sites"]]  # averaged in: the median shrugs it off
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2


def test_a_flipped_a_lying_and_a_replaying_site_are_named_every_round_and_the_run_learns(deployment, data_root, tmp_path):
    names = start_sites(deployment, "rogue", ["", "", "flip:3", "lie:1000000", "replay"], data_root)
    try:
        outcome = deployment.run(config(data_root, tmp_path, "num-server-rounds=2 round-timeout=300 run-name='rogues'"),
                                 stream=False)
    finally:
        stop_sites(deployment, names)
    assert outcome.completed, outcome.log[-4000:]
    rounds = read_metrics(tmp_path / "rogues" / "metrics.jsonl")
    flipped, liar, replayer = "partition 2/5", "partition 3/5", "partition 4/5"
    for r in rounds[1:]:
        accepted = {s["site"] for s in r["sites"]}
        assert {"partition 0/5", "partition 1/5", liar} <= accepted and flipped not in accepted
        assert not [e for e in r["events"] if e.get("site") in ("partition 0/5", "partition 1/5")]  # no honest reply rejected
        reason = events(r, flipped, "rejected")[0]["reason"]
        assert "pulls the model back against the round's median update by" in reason
        assert "num-examples=1e+06 is above max-weight-ratio=4.0" in events(r, liar, "weight-capped")[0]["reason"]
    assert replayer in {s["site"] for s in rounds[1]["sites"]}  # round 1: its weights are new
    assert f"identical to {replayer}'s reply in round 1 (a replay)" in events(rounds[2], replayer, "rejected")[0]["reason"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2


def test_a_round_with_too_few_usable_replies_is_retried_then_the_run_stops(deployment, data_root, tmp_path):
    names = start_sites(deployment, "short", ["", "nan"], data_root)
    try:
        outcome = deployment.run(
            config(data_root, tmp_path, "num-server-rounds=2 min-replies=2 round-retries=1 round-timeout=120 run-name='short'"),
            stream=False,
        )
    finally:
        stop_sites(deployment, names)
    assert outcome.status == "finished:failed"
    assert ("round 1 failed 2 time(s) (round-retries=1, round-timeout=120.0s for the whole round): 1 usable reply of 2 "
            "sampled site(s), at least 2 needed") in outcome.log
    rounds = read_metrics(tmp_path / "short" / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["accuracy"] is None
    assert rounds[1]["failed"].startswith("round 1 failed 2 time(s)")
    assert [e["attempt"] for e in rounds[1]["events"] if e["event"] == "round-attempt-failed"] == [1, 2]
    assert len(events(rounds[1], "partition 1/2", "rejected")) == 2  # NaN, at each attempt
    assert (tmp_path / "short" / "checkpoints" / "round-0000.safetensors").exists()


def test_a_run_stopped_with_its_superlink_resumes_where_it_stopped(deployment, data_root, tmp_path, mlflow_server):
    names = start_sites(deployment, "resume", ["", ""], data_root)
    # Cycles of 1.5 rounds (round 3, the one after the resume, starts a third into one: its own rates),
    # the peak halved per cycle, and the server's mean of cycle ends (cycles end in rounds 2 and 3).
    schedule = ("lr-cycle-length=1.5 lr-envelope='exponential' lr-decay=0.5 swa-start=2 checkpoints-keep=10 "
                f"round-timeout=120 seed=7 tracking='both' mlflow-tracking-uri='{mlflow_server.uri}'")
    try:
        job = config(data_root, tmp_path, f"num-server-rounds=3 {schedule} run-name='resumable'")
        run = Background(deployment, job)
        metrics = tmp_path / "resumable" / "metrics.jsonl"
        wait_for_round(metrics, 2)
        kill(deployment, "superlink")  # the ServerApp's SuperExec and the ServerApp go with it
        deployment.processes.stop("superexec-serverapp")
        deployment.start_superlink()  # the same --database
        stopped = run.join()
        deployment.wait_for_sites(2)
        assert deployment.flwr.status(stopped.run_id) == "finished:failed"
        tracked = json.loads((tmp_path / "resumable" / "tracking.json").read_text())
        resumed = deployment.run(f"{job} resume-from='{tmp_path / 'resumable'}'", stream=False)
    finally:
        stop_sites(deployment, names)
    assert resumed.completed, resumed.log[-4000:]
    assert resumed.results_dir == tmp_path / "resumable"
    rounds = read_metrics(metrics)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    recorded = json.loads((tmp_path / "resumable" / "config.json").read_text())
    assert recorded["resumed_from_round"] == 2 and recorded["earlier_run_ids"] == [stopped.run_id]
    assert recorded["resumed_value"] == pytest.approx(rounds[2]["accuracy"], abs=1e-12)
    # round 3, the first after the resume, is the round an uninterrupted run has: the server's train
    # config for round 3 (epochs before it, the schedule's place), and both sites' learning rates
    # are what that schedule gives (the server leaves out a reply whose rates differ)
    settings = RunSettings(lr_cycle_length=1.5, lr_envelope="exponential", lr_decay=0.5, num_server_rounds=3,
                           local_epochs=1, batch_size=32)
    # the sites' DP ledgers file the resumed run under its first id; the sites' loop (fedcycle's)
    # reports every metric of the task while training
    coordinator = make_coordinator(settings, num_sites=2, privacy_run=str(stopped.run_id),
                                   train_metric_names=["accuracy"])
    assert rounds[3]["train_config"] == {**coordinator.round_config(3).to_record(), "server-round": 3}
    assert {r["train_config"]["privacy-run"] for r in rounds[1:]} == {str(stopped.run_id)}
    assert rounds[3]["train_config"]["epochs-before"] == 2
    assert len(rounds[3]["sites"]) == 2 and rounds[3]["events"] == []
    # the envelope across the resume: cycle index 1 in round 3 (lr-min 0.005, lr-max 0.05)
    assert [r["train_config"]["lr-max"] for r in rounds[1:]] == pytest.approx([0.05, 0.05, 0.005 + 0.045 * 0.5])
    # the mean of cycle ends continued from the checkpoint: rounds 2 and 3, not 3 alone
    assert [r["swa"]["rounds"] for r in rounds[2:]] == [[2], [2, 3]]
    saved = [load_checkpoint(tmp_path / "resumable" / "checkpoints" / f"round-{r:04d}.safetensors").model for r in (2, 3)]
    averaged = load_model(tmp_path / "resumable" / "global-swa.safetensors")
    for key, value in averaged.items():
        if value.is_floating_point():
            assert torch.equal(value, ((saved[0][key].double() + saved[1][key].double()) / 2).to(value.dtype)), key
    assert rounds[3]["accuracy"] > rounds[0]["accuracy"] + 0.2
    # TensorBoard and the MLflow server have every round once, across the resume, in one run each
    board = EventAccumulator(str(tmp_path / "resumable" / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("global/accuracy")] == [0, 1, 2, 3]
    assert [e.value for e in board.Scalars("global/accuracy")] == pytest.approx([r["accuracy"] for r in rounds])
    assert json.loads((tmp_path / "resumable" / "tracking.json").read_text()) == tracked
    client = mlflow_server.client()
    run_id = tracked["mlflow_run_id"]
    history = client.get_metric_history(run_id, "global/accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx([r["accuracy"] for r in rounds])
    for site in ("partition 0 of 2", "partition 1 of 2"):
        assert [e.step for e in board.Scalars(f"site/{site}/train-loss")] == [1, 2, 3]
        assert [m.step for m in client.get_metric_history(run_id, f"site/{site}/train-loss")] == [1, 2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "7"
    assert {a.path for a in client.list_artifacts(run_id, "models")} == {
        "models/global-final.safetensors", "models/global-best.safetensors", "models/global-swa.safetensors"}
