"""A site that trains on several processes (`nproc-per-site`, fedcycle.distributed): gloo on
this machine's CPU, the same schedule as one process, one line when a rank fails."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedcycle.distributed import GlobalBatches, _write_result, train_on_processes
from fedcycle.errors import ConfigError, TaskError
from fedcycle.privacy import RankPoisson
from fedcycle.results import read_metrics
from fedcycle.schedules import LRSchedule
from fedcycle.site import load_site, processes_of
from fedcycle.trainer import TrainConfig, TrainResult, train
from fedcycle_tools.launcher import LocalSimulation


@pytest.mark.parametrize("n, world", [(100, 2), (101, 2), (97, 4), (33, 3), (65, 2)])
def test_the_ranks_share_out_the_batches_one_process_would_take(n, world):
    one = GlobalBatches(n, 16, 0, 1, seed=5)
    ranks = [GlobalBatches(n, 16, rank, world, seed=5) for rank in range(world)]
    orders = []
    for _ in range(2):  # each pass a new order, the same on every rank
        batches, shares = list(one), [list(r) for r in ranks]
        assert all(len(share) == len(batches) == -(-n // 16) for share in shares)  # one process's steps
        for i, batch in enumerate(batches):
            slices = [share[i] for share in shares]
            if len(batch) >= world:
                assert sorted(x for part in slices for x in part) == sorted(batch)
            else:  # a last batch too small to go round is lent again: no rank steps on nothing
                assert all(len(part) == 1 and part[0] in batch for part in slices)
        assert [r.examples() for r in ranks] == [sum(len(b) for b in share) for share in shares]
        orders.append(batches)
    assert orders[0] != orders[1]


def test_rank_zero_refuses_ranks_that_stepped_other_learning_rates(tmp_path):
    model = torch.nn.Linear(2, 1)
    result = TrainResult(loss=1.0, metrics={}, num_examples=4, seconds=1.0, steps=2, lr_first=0.1, lr_peak=0.1,
                         lr_last=0.05, lrs=[0.1, 0.05])
    def share(lrs, loss, metrics, examples):
        return {"lrs": lrs, "loss": loss, "metrics": metrics, "examples": examples}

    with pytest.raises(RuntimeError, match="rank 1 stepped other learning rates than rank 0"):
        _write_result(tmp_path, model, result, [share([0.1, 0.05], 1.0, {}, 2), share([0.1, 0.06], 1.0, {}, 2)])
    _write_result(tmp_path, model, result, [share([0.1, 0.05], 1.0, {"mae": 1.0}, 3),
                                            share([0.1, 0.05], 3.0, {"mae": 2.0}, 1)])
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["loss"] == pytest.approx(1.5) and written["lrs"] == [0.1, 0.05]  # weighted by examples


def test_a_site_says_which_process_counts_it_cannot_run():
    cpu = torch.device("cpu")
    assert processes_of({}, cpu) == 1 and processes_of({"nproc-per-site": 4}, cpu) == 4
    for bad in (0, "2", 1.5, True):
        with pytest.raises(ConfigError, match=f"nproc-per-site={bad!r} in the node config must be an integer"):
            processes_of({"nproc-per-site": bad}, cpu)


def test_dp_sgd_ranks_draw_their_own_share_at_one_process_rate_and_keep_in_step():
    """Every example belongs to one rank; each step each joins with one process's sample rate;
    an empty draw is a step too, so the ranks never wait on each other."""
    ranks = [RankPoisson(101, 32, rank, 3) for rank in range(3)]
    assert sorted(i for r in ranks for i in r.owned.tolist()) == list(range(101))
    assert {len(r) for r in ranks} == {4} and {r.sample_rate for r in ranks} == {0.25}
    tiny = RankPoisson(10, 2, 1, 4)  # about one in 5 draws of its 3 examples is empty
    draws = [batch for _ in range(200) for batch in tiny]
    assert len(draws) == 200 * 5 and any(b == [] for b in draws)
    assert 0.15 < sum(len(b) for b in draws) / (3 * len(draws)) < 0.25  # each example at rate 1/5


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """tests/user_tasks.py as a site's module, under a name of its own: a module is imported once
    per process, and tests/test_tasks.py's `ranks_tasks` must be its own folder's."""
    folder = tmp_path_factory.mktemp("ranks")
    shutil.copy(Path(__file__).with_name("user_tasks.py"), folder / "ranks_tasks.py")
    return folder


def children() -> set[int]:
    """This process's living child processes (from /proc), but multiprocessing's resource
    tracker: one per process that ever spawned, by design, not one per round. A test compares
    them before and after: other test modules' servers may be running beside it."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"resource_tracker" not in command:
            found.add(int(stat.parent.name))
    return found


CONFIG = TrainConfig(LRSchedule(lr_min=0.005, lr_max=0.05), epochs=2, batch_size=32, seed=3)


@pytest.mark.e2e  # starts processes (torch.multiprocessing, gloo over a file rendezvous)
def test_two_processes_take_one_process_steps_at_its_rates_on_the_whole_site(task_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(task_dir))
    before = children()
    run_config = {"task": "ranks_tasks:BloodPressure", "batch-size": 32}
    node = {"partition-id": 0, "num-partitions": 2, "device": "cpu"}
    site = load_site(run_config, node)
    torch.manual_seed(0)
    model = site.new_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    one = train(site.task, model, site.train, CONFIG, site.device)
    two, trained = train_on_processes(run_config, {**node, "nproc-per-site": 2}, start, CONFIG, None, 2)
    assert two.steps == one.steps == 2 * 16 and two.lrs == one.lrs  # 500 examples, batches of 32
    assert two.num_examples == len(site.train) == 500
    assert set(trained) == set(start) and any(not torch.equal(trained[k], start[k]) for k in start)
    assert two.loss < 1.5 * one.loss and children() <= before


@pytest.mark.e2e  # starts processes (torch.multiprocessing, gloo over a file rendezvous)
def test_dp_sgd_on_two_processes_takes_one_process_steps_at_its_sample_rate(task_dir, monkeypatch):
    """Opacus's own DDP: each rank clips its examples, the noise is added once; the site spends
    what one process would (same sample rate, same steps, so the same epsilon). A batch size of 2
    on 500 examples makes empty draws common: the ranks must still keep in step."""
    monkeypatch.syspath_prepend(str(task_dir))
    run_config = {"task": "ranks_tasks:BloodPressure", "batch-size": 2, "dp.noise-multiplier": 1.0,
                  "dp.max-grad-norm": 1.0}
    node = {"partition-id": 0, "num-partitions": 2, "device": "cpu"}
    site = load_site(run_config, node)
    before = children()
    private = replace(CONFIG, dp=site.settings.dp, batch_size=2, epochs=1)
    start = site.new_model().state_dict()
    one = train(site.task, site.new_model(), site.train, private, site.device)
    two, trained = train_on_processes(run_config, {**node, "nproc-per-site": 2}, start, private, None, 2)
    assert one.sample_rate == two.sample_rate == 1 / 250 and two.steps == one.steps == 250 and two.lrs == one.lrs
    assert any(not torch.equal(trained[k], start[k]) for k in start) and children() <= before


@pytest.mark.e2e  # starts processes (torch.multiprocessing, gloo over a file rendezvous)
@pytest.mark.parametrize("task, error, line", [
    ("FailsOnRankOne", TaskError, "rank 1 of 2 (nproc-per-site): task='ranks_tasks:FailsOnRankOne': train() raised "
                                  "ValueError: rank one has no data"),
    ("DiesOnRankOne", RuntimeError, "rank 1 of 2 (nproc-per-site) died with exit code 3; the others were stopped"),
])
def test_a_rank_that_fails_fails_the_round_in_one_line_and_leaves_no_process(task_dir, monkeypatch, task, error, line):
    monkeypatch.syspath_prepend(str(task_dir))
    run_config = {"task": f"ranks_tasks:{task}", "batch-size": 32}
    node = {"partition-id": 0, "num-partitions": 2, "device": "cpu", "nproc-per-site": 2}
    state = load_site(run_config, node).new_model().state_dict()
    before = children()
    with pytest.raises(error) as failed:
        train_on_processes(run_config, node, state, CONFIG, None, 2)
    assert str(failed.value) == line
    if error is TaskError:  # what a site whose policy keeps its values home sends instead
        assert failed.value.without_values.startswith("rank 1 of 2 (nproc-per-site): task='ranks_tasks:FailsOnRankOne'")
        assert "rank one has no data" not in failed.value.without_values
    assert children() <= before
    again, _ = train_on_processes({**run_config, "task": "ranks_tasks:BloodPressure"}, node, state, CONFIG, None, 2)
    assert again.steps == 32  # the next round starts clean


@pytest.mark.e2e  # `flwr run` through a LocalSimulation SuperLink, each site on 2 processes
def test_a_simulated_site_on_two_processes_follows_the_servers_schedule_and_learns(task_dir, tmp_path):
    for old in task_dir.glob("lrs-*.json"):
        old.unlink()
    with LocalSimulation(tmp_path / "flwr-home", task_path=str(task_dir), node_config={"nproc-per-site": 2}) as link:
        out = link.run(2, f"results-dir='{tmp_path}' task='ranks_tasks:BloodPressureOwnLoop' batch-size=50 "
                          "num-server-rounds=2 local-epochs=2 lr-max=0.1 run-name='ranks'", stream=False)
    assert out.completed, out.log[-3000:]
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert all(r["events"] == [] for r in rounds[1:])  # the reply screen's schedule check passed every reply
    sites = [s for r in rounds[1:] for s in r["sites"]]
    assert len(sites) == 4 and {s["processes"] for s in sites} == {2}
    assert {s["steps"] for s in sites} == {2 * 10} and {s["num-examples"] for s in sites} == {500}
    assert rounds[-1]["mae"] < 0.6 * rounds[0]["mae"]
    logs = [json.loads(p.read_text()) for p in task_dir.glob("lrs-*.json")]
    trained = [used for used in logs if len(used) == 2 * 10]  # pre-flight's rehearsal takes 2 steps on one process
    assert len(trained) == 2 * 2 * 2  # 2 rounds x 2 sites x 2 ranks, each its own log
    assert len({json.dumps(used) for used in trained}) == 2  # one list per round: every rank and site alike
