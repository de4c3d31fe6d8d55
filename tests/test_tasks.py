"""The task API: a data center's own model, data, metric and training loop, written outside fedcycle.

tests/user_tasks.py is copied into a folder of the test's own as `clinic_tasks.py` and named in
the run config; the same module runs in the trainer on its own, in a real `flwr run` simulation
(the folder on the apps' PYTHONPATH) and on the loopback deployment (each site names the folder
in its node config's `task-path`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fedcycle.errors import ConfigError, TaskError
from fedcycle.results import load_model, read_metrics
from fedcycle.schedules import LRSchedule
from fedcycle.tasks import Task, load_task
from fedcycle.trainer import TrainConfig, evaluate, train
from fedcycle_tools.launcher import LocalSimulation

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A folder outside fedcycle holding the user's module, and nothing else of fedcycle's."""
    folder = tmp_path_factory.mktemp("clinic")
    shutil.copy(Path(__file__).with_name("user_tasks.py"), folder / "clinic_tasks.py")
    return folder


@pytest.fixture
def on_path(task_dir, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(task_dir))
    return task_dir


# -- the API on its own ----------------------------------------------------------------------


def test_a_users_task_is_checked_and_described_before_training(on_path):
    task = load_task({"task": "clinic_tasks:BloodPressure"})
    assert (task.primary_metric, task.direction) == ("mae", "min") and task.own_train is None
    train_data, val = task.site_data({"partition-id": 1})
    checked = task.dry_run(task.build_model(), train_data, CPU, batch_size=64)
    assert checked["metric-names"] == ["mae", "mse"]
    assert checked["inputs"] == "float32[8]" and checked["targets"] == "float32[1]"
    assert task.better(0.3, 0.5) and not task.better(0.6, 0.5) and task.better(0.9, None)


def test_fedcycles_loop_trains_a_users_regression(on_path):
    task = load_task({"task": "clinic_tasks:BloodPressure"})
    torch.manual_seed(0)
    model = task.build_model()
    test = task.test_data()
    before = evaluate(task, model, test, CPU)[1]["mae"]
    result = train(task, model, task.site_data({"partition-id": 0})[0], TrainConfig(LRSchedule(), epochs=5), CPU)
    after = evaluate(task, model, test, CPU)[1]["mae"]
    assert after < 0.6 * before
    assert set(result.metrics) == {"mae", "mse"} and result.steps == 5 * 8 and result.num_examples == 500


def schedule_for(cfg: TrainConfig, per_epoch: int) -> list[float]:
    s = cfg.schedule
    start = s.start_step(per_epoch, cfg.epochs, cfg.server_round, cfg.epochs_before)
    return s.lrs(start, per_epoch * cfg.epochs, s.cycle_steps(per_epoch, cfg.epochs), steps_before=cfg.epochs_before * per_epoch)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_sites_own_loop_runs_every_step_at_the_servers_rate(on_path, optimizer):
    for old in on_path.glob("lrs-*.json"):
        old.unlink()
    task = load_task({"task": "clinic_tasks:BloodPressureOwnLoop"})
    assert task.own_train is not None
    cfg = TrainConfig(LRSchedule(name="cosine", lr_min=0.001, lr_max=0.08, cycle_unit="epochs", cycle_length=3.0),
                      epochs=2, server_round=3, epochs_before=4, optimizer=optimizer)
    model = task.build_model()
    result = train(task, model, task.site_data({"partition-id": 0})[0], cfg, CPU)
    (log,) = on_path.glob("lrs-*.json")
    used = json.loads(log.read_text())
    assert used == result.lrs == pytest.approx(schedule_for(cfg, per_epoch=8), rel=1e-12)
    assert len(set(np.round(used, 9))) > 5  # the rate moved, step by step
    assert result.metrics["mae"] > 0 and result.steps == 16


class IgnoresTheScheduler:
    """A loop that never calls scheduler.step(): its rate stays where the schedule put it at the start."""

    primary_metric = ("mae", "min")

    def __init__(self, run_config):
        self.inner = load_task({"task": "clinic_tasks:BloodPressure"}).impl

    def build_model(self):
        return self.inner.build_model()

    def site_data(self, node_config):
        return self.inner.site_data(node_config)

    def loss(self, outputs, targets):
        return self.inner.loss(outputs, targets)

    def metrics(self, outputs, targets):
        return self.inner.metrics(outputs, targets)

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        for _ in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                self.loss(model(x), y).backward()
                optimizer.step()
        return {"loss": 0.0, "mae": 0.0, "mse": 0.0}


def test_a_loop_that_ignores_the_scheduler_is_refused(on_path):
    name = f"{IgnoresTheScheduler.__module__}:IgnoresTheScheduler"
    task = Task(name, {})
    with pytest.raises(TaskError, match=re.escape(
        f"task='{name}': train() stepped the optimizer 8 times and the scheduler 0 times"
    )):
        train(task, task.build_model(), task.site_data({"partition-id": 0})[0], TrainConfig(LRSchedule(), epochs=1), CPU)
    with pytest.raises(TaskError, match="cannot add FedProx's proximal term"):
        train(task, task.build_model(), task.site_data({"partition-id": 0})[0],
              TrainConfig(LRSchedule(), epochs=1, proximal_mu=0.1), CPU)


def test_the_server_leaves_out_a_reply_whose_rates_are_not_its_schedule(task_identity):
    from fedcycle.config import RunSettings
    from fedcycle.strategies import make_coordinator
    from tests.fakes import SHAPES, arrays, reply

    settings = RunSettings(local_epochs=2, batch_size=50)
    strategy = make_coordinator(settings, num_sites=3)
    global_arrays = ArrayRecord({k: Array(np.zeros(v, np.float32)) for k, v in SHAPES.items()})
    strategy.global_arrays = global_arrays
    strategy.sent_config[2] = {**strategy.round_config(2).to_record(), "server-round": 2}
    lrs = schedule_for(TrainConfig(settings.schedule, epochs=2, server_round=2, epochs_before=2), per_epoch=4)
    honest = {"steps": 8, "lr-first": lrs[0], "lr-peak": max(lrs), "lr-last": lrs[-1]}
    rng = np.random.default_rng(0)
    replies = [
        reply(1, arrays(rng, 0.1), 200, **honest),
        reply(2, arrays(rng, 0.1), 200, **{**honest, "lr-first": 0.01}),
        reply(3, arrays(rng, 0.1), 200, **{**honest, "steps": 6}),
        reply(4, arrays(rng, 0.1), 200, **{**honest, "lr-peak": [0.05, 0.05]}),  # a MetricRecord may hold lists
    ]
    accepted = strategy.screen_round(2, replies)
    assert [m.metadata.src_node_id for m in accepted] == [1]
    reasons = {e["node_id"]: e["reason"] for e in strategy.events[2]}
    assert reasons[2] == "lr-first=0.01, but the server's schedule gives 0.005 for round 2"
    assert reasons[3].startswith("steps=6, but the server's schedule has 8 optimizer steps (2 local epochs of 4 batches")
    assert reasons[4] == "metric lr-peak=[0.05, 0.05] is not a finite number"


# -- bad input: one line naming the task, the method and what was expected ---------------------


class Broken:
    """A task whose every part can be made wrong by `how`."""

    how = ""
    primary_metric = ("top1", "max")

    def __init__(self, run_config):
        pass

    def build_model(self):
        return "a model" if self.how == "not-a-module" else nn.Linear(4, 3)

    def site_data(self, node_config):
        x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        if self.how == "yields-one-tensor":
            return TensorDataset(x), TensorDataset(x)
        if self.how == "wrong-targets":
            return TensorDataset(x, torch.randn(20, 5)), TensorDataset(x, y)
        if self.how == "wrong-inputs":
            return TensorDataset(torch.randn(20, 7), y), TensorDataset(x, y)
        if self.how == "empty":
            return Subset(TensorDataset(x, y), []), TensorDataset(x, y)
        return TensorDataset(x, y), TensorDataset(x, y)

    def metrics(self, outputs, targets):
        top1 = (outputs.argmax(1) == targets).float().mean()
        return {"top1": top1, "loss": top1} if self.how == "reserved" else {"top1": top1}


@pytest.mark.parametrize("how, message", [
    ("not-a-module", "build_model() returned str, not a torch.nn.Module"),
    ("yields-one-tensor", "the Dataset yields [float32[4]] per example, not (inputs, targets)"),
    ("wrong-targets", "the model's outputs float32[3] do not fit loss() with targets float32[5]"),
    ("wrong-inputs", "the model cannot take the Dataset's inputs float32[7] (batched)"),
    ("empty", "site_data() gave this site an empty train set"),
    ("primary", "primary_metric 'accuracy' is not among metrics()'s keys ['top1']"),
    ("reserved", "metrics() names ['loss'], which fedcycle's records use; rename them"),
])
def test_a_broken_task_is_one_line_naming_what_is_wrong(monkeypatch, how, message):
    monkeypatch.setattr(Broken, "how", how)
    if how == "primary":
        monkeypatch.setattr(Broken, "primary_metric", ("accuracy", "max"))
    task = Task(f"{Broken.__module__}:Broken", {})
    with pytest.raises(TaskError) as err:
        train_data, _ = task.site_data({})
        task.dry_run(task.build_model(), train_data, CPU, batch_size=8)
    assert message in str(err.value) and str(err.value).startswith(f"task='{Broken.__module__}:Broken'")
    assert "\n" not in str(err.value)


def test_model_weights_come_from_a_local_safetensors_file_that_fits(tmp_path):
    task = load_task({"image.dataset": "cifar10", "image.model": "torchvision:mobilenet_v3_small"})
    model = task.build_model()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    weights = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(weights, str(tmp_path / "start.safetensors"))
    loaded = task.initial_model(str(tmp_path / "start.safetensors"))
    assert torch.equal(loaded.state_dict()["classifier.3.weight"], weights["classifier.3.weight"])
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"model-weights='.*other.safetensors' does not fit the task's model: missing \["):
        task.initial_model(str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="no such file"):
        task.initial_model(str(tmp_path / "nope.safetensors"))


def test_image_augmentation_goes_through_the_dataloader_and_still_learns(data_root):
    from fedcycle.batches import batches
    from fedcycle.tasks.image.in_memory import DeviceBatches

    plain = load_task({"data-root": data_root, "train-subset": 600})
    augmented = load_task({"data-root": data_root, "train-subset": 600, "image.augment": "crop,flip"})
    node = {"partition-id": 0, "num-partitions": 4}
    assert isinstance(batches(plain.site_data(node)[0], 64, CPU, shuffle=True), DeviceBatches)
    train_data = augmented.site_data(node)[0]
    assert not isinstance(batches(train_data, 64, CPU, shuffle=True), DeviceBatches)
    torch.manual_seed(0)
    model = augmented.build_model()
    test = augmented.test_data()
    before = evaluate(augmented, model, test, CPU)[1]["accuracy"]
    result = train(augmented, model, train_data, TrainConfig(LRSchedule(), epochs=3), CPU)
    assert result.steps == 3 * 10 and evaluate(augmented, model, test, CPU)[1]["accuracy"] > before + 0.2


# -- the same module in a real simulation and on the loopback deployment ------------------------


@pytest.fixture(scope="module")
def superlink(tmp_path_factory, task_dir):
    link = LocalSimulation(tmp_path_factory.mktemp("flwr-home"), task_path=str(task_dir))
    link.start()
    yield link
    link.stop()


def simulate(superlink, tmp_path, overrides: str, sites: int = 2):
    return superlink.run(sites, f"results-dir='{tmp_path}' batch-size=50 {overrides}", stream=False)


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_a_users_task_with_its_own_metric_runs_in_simulation(superlink, tmp_path, on_path):
    out = simulate(superlink, tmp_path, "task='clinic_tasks:BloodPressure' num-server-rounds=3 local-epochs=2 "
                                       "lr-max=0.1 run-name='bp'")
    assert out.completed, out.log[-3000:]
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert [r["primary_metric"] for r in rounds] == ["mae"] * 4 and "accuracy" not in rounds[0]
    maes = [r["mae"] for r in rounds]
    assert maes[-1] < 0.6 * maes[0] and set(rounds[1]["metrics"]) == {"mae", "mse"}
    site = rounds[1]["sites"][0]
    assert {"train-mae", "train-mse", "received-mae", "received-mse"} <= set(site)
    # "best" is the lowest MAE, and the best model is that round's
    task = load_task({"task": "clinic_tasks:BloodPressure"})
    best = task.build_model()
    best.load_state_dict(load_model(out.results_dir / "global-best.safetensors"))
    assert evaluate(task, best, task.test_data(), CPU)[1]["mae"] == pytest.approx(min(maes), rel=1e-6)
    assert (out.results_dir / "mae.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"fedcycle round 3/3  mae 0\.\d{4} \(server-test\)", out.log)


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_a_sites_own_loop_follows_the_servers_schedule_in_simulation(superlink, tmp_path, task_dir):
    for old in task_dir.glob("lrs-*.json"):
        old.unlink()
    out = simulate(superlink, tmp_path, "task='clinic_tasks:BloodPressureOwnLoop' num-server-rounds=2 local-epochs=2 "
                                       "lr-schedule='cosine' lr-cycle-unit='epochs' lr-cycle-length=3.0 run-name='own'")
    assert out.completed, out.log[-3000:]
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert all(len(r["sites"]) == 2 and r["events"] == [] for r in rounds[1:])
    schedule = LRSchedule(name="cosine", cycle_unit="epochs", cycle_length=3.0)
    expected = {r: schedule_for(TrainConfig(schedule, epochs=2, server_round=r, epochs_before=2 * (r - 1)), per_epoch=10)
                for r in (1, 2)}
    logs = [json.loads(p.read_text()) for p in task_dir.glob("lrs-*.json")]
    rehearsals = [used for used in logs if used == pytest.approx([1e-5, 1e-4])]  # pre-flight's two batches
    assert len(rehearsals) == 2 and len(logs) == 6  # and 2 sites x 2 rounds, each every step of its round
    matched = sorted(r for used in logs for r, want in expected.items() if used == pytest.approx(want, rel=1e-12))
    assert matched == [1, 1, 2, 2]


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_a_loop_that_forgets_the_scheduler_is_refused_before_round_1_in_one_line(superlink, tmp_path):
    out = simulate(superlink, tmp_path, "task='clinic_tasks:ForgetsTheScheduler' run-name='forgets'")
    assert out.status == "finished:failed"
    assert not (out.results_dir / "metrics.jsonl").exists()  # not even round 0: pre-flight comes first
    refusal = re.findall(r"pre-flight failed, no training started:\n\s+(node \d+ \(partition \d/2\): .*)", out.log)
    assert refusal and refusal[0].endswith(
        "task='clinic_tasks:ForgetsTheScheduler': train() stepped the optimizer 2 times and the scheduler 0 times; "
        "the server's schedule governs every step: call scheduler.step() once after each optimizer.step()")
    assert "Traceback" not in out.log and "[ROUND 1" not in out.log


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_a_task_that_fails_in_a_round_stops_the_run_at_once_with_its_one_line(superlink, tmp_path):
    # pre-flight rehearses one epoch, which works; the round's two epochs raise in the task's code
    out = simulate(superlink, tmp_path, "task='clinic_tasks:FailsInTraining' num-server-rounds=3 local-epochs=2 "
                                       "round-retries=2 run-name='fails'")
    assert out.status == "finished:failed"
    lines = read_metrics(out.results_dir / "metrics.jsonl")
    assert [line["round"] for line in lines] == [0, 1]  # round 1 failed; no round 2
    one_line = ("task='clinic_tasks:FailsInTraining': train() raised ValueError: this loop was written for one "
                "epoch, not 2")
    events = lines[1]["events"]
    assert {e["event"] for e in events} == {"failed"} and len(events) == 2  # both sites, tried once: no retry
    assert all(e["reason"] == one_line for e in events)
    assert one_line in lines[1]["failed"] and "resume" not in lines[1]["failed"]
    assert one_line in out.log and "Traceback" not in out.log and "ClientAppException" not in out.log


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_a_loop_that_keeps_its_own_rate_is_left_out_by_the_server(superlink, tmp_path):
    out = simulate(superlink, tmp_path, "task='clinic_tasks:BloodPressureFixedRate' num-server-rounds=1 local-epochs=1 "
                                       "round-retries=0 run-name='fixed'")
    assert out.status == "finished:failed"
    (line,) = [r for r in read_metrics(out.results_dir / "metrics.jsonl") if r["round"] == 1]
    reasons = [e["reason"] for e in line["events"] if e["event"] == "rejected"]
    assert len(reasons) == 2 and all(r.startswith("lr-first=0.01, but the server's schedule gives 0.005") for r in reasons)


@pytest.mark.e2e  # a LoopbackDeployment (SuperLink, nginx, SuperNodes)
def test_a_users_task_runs_on_the_loopback_deployment(tmp_path_factory, task_dir):
    from fedcycle_tools.deploy.loopback import LoopbackDeployment

    # the sites' policy runs this task, its module from the site's own folder (not the app the server ships)
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    policy.write_text('tasks = ["clinic_tasks:BloodPressure"]\n')
    with LoopbackDeployment(tmp_path_factory.mktemp("deployment"), server_task_path=str(task_dir)) as d:
        d.start_superlink()
        d.start_proxy()
        for i in range(2):  # each site names the folder that holds the task's code in its own node config
            d.add_site(f"site-{i}", f"partition-id={i} num-partitions=2 task-path='{task_dir}' policy-file='{policy}'")
            d.start_site(f"site-{i}")
        d.wait_for_sites(2)
        results = tmp_path_factory.mktemp("results")
        out = d.run(f"task='clinic_tasks:BloodPressure' num-server-rounds=2 local-epochs=2 batch-size=50 lr-max=0.1 "
                    f"results-dir='{results}' run-name='deployed'", stream=False)
    assert out.completed, out.log[-4000:]
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[-1]["mae"] < 0.8 * rounds[0]["mae"]
    assert {s["site"] for s in rounds[1]["sites"]} == {"site-0", "site-1"}  # known by its site-name
