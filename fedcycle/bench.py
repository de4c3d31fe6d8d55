"""Where every second of a round goes: `make bench` (a benchmark, not a test).

Writes results/bench/bench.json and results/bench/bench.md. Every figure is the median of
several runs, with its spread (min to max).

1. round anatomy: the standard job (4 sites, Fashion-MNIST, small CNN, 1 local epoch) through
   fedcycle in Flower's simulation, against the same job as one plain PyTorch loop;
2. aggregation: 8 replies of ResNet-18 size, fedcycle's strategy against Flower's FedAvg, and
   the machine's memory bandwidth (a large copy) measured in the same run;
3. the site trainer's throughput against a minimal hand-written loop;
4. a site's set-up before its first training step, and a ClientApp process's start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedcycle.local import REPO, exit_on_termination

OUT = REPO / "results" / "bench"


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


# -- 2. aggregation ----------------------------------------------------------------------


def bench_aggregation(repeat: int) -> dict:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fedcycle.client_app import train_metric_keys
    from fedcycle.config import RunSettings
    from fedcycle.models import build_model
    from fedcycle.strategies import make_strategy
    from fedcycle.strategies.cyclical import FastFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    logging.getLogger("flwr").setLevel(logging.ERROR)
    state = {k: v.numpy() for k, v in build_model("resnet18", (3, 32, 32), 10).state_dict().items()}
    rng = np.random.default_rng(0)
    replies = []
    for node in range(1, 9):
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
        arrays = ArrayRecord({k: Array(v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype) if v.dtype == np.float32 else v)
                              for k, v in state.items()})
        metrics = MetricRecord({**{key: 1.0 for key in train_metric_keys("train-reply")}, "num-examples": 100 + node})
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=instruction))
    size = sum(v.nbytes for v in state.values())

    strategy = make_strategy(RunSettings(), num_sites=8)
    strategy.remember_global(ArrayRecord({k: Array(v) for k, v in state.items()}))

    def fedcycle_round() -> None:  # the production path: reply checks, the mean, dtypes kept
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None and not strategy.events[1]

    stock = timed(lambda: FedAvg().aggregate_train(1, replies), repeat)
    fast = timed(fedcycle_round, repeat)
    mean_only = timed(lambda: FastFedAvg().aggregate_train(1, replies), repeat)
    big = np.ones(50_000_000)  # 400 MB
    dst = np.zeros_like(big)
    copy = timed(lambda: np.copyto(dst, big), repeat)
    bandwidth = 2 * big.nbytes / statistics.median(copy)  # read + write
    traffic = (len(replies) + 1) * size  # every reply read once, the mean written once
    return {
        "parameters": int(sum(v.size for v in state.values())), "replies": len(replies),
        "stock_seconds": spread(stock), "fedcycle_seconds": spread(fast),
        "fedcycle_includes": "CyclicalFedAvg.aggregate_train: screening every reply (shapes, dtypes, NaN/Inf, the norm of its change), the mean, dtypes kept",
        "mean_only_seconds": spread(mean_only),
        "mean_only_speedup": statistics.median(stock) / statistics.median(mean_only),
        "speedup": statistics.median(stock) / statistics.median(fast),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "fedcycle_bandwidth_gb_s": traffic / statistics.median(fast) / 1e9,
        "bandwidth_fraction": traffic / statistics.median(fast) / bandwidth,
    }


# -- 3. trainer throughput ---------------------------------------------------------------


def minimal_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, lr: float) -> None:
    """The least a PyTorch training epoch can do: the yardstick for fedcycle's trainer."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for i in range(0, len(y), batch):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
        opt.step()


def bench_trainer(repeat: int) -> dict:
    from fedcycle.datasets import ImageData
    from fedcycle.models import build_model
    from fedcycle.schedules import LRSchedule
    from fedcycle.trainer import TrainConfig, train

    results = {}
    for name, shape, n, batch in (("small-cnn", (1, 28, 28), 4096, 64), ("resnet18", (3, 32, 32), 256, 64)):
        rng = np.random.default_rng(0)
        data = ImageData(rng.integers(0, 255, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64), tuple("0123456789"))
        x = (torch.from_numpy(data.images).float() - 127.5) / 64
        y = torch.from_numpy(data.labels)
        cfg = TrainConfig(LRSchedule(), epochs=1, batch_size=batch)
        mean, std = (0.5,) * shape[0], (0.25,) * shape[0]
        ours = timed(lambda: train(build_model(name, shape, 10), data, cfg, torch.device("cpu"), mean, std), repeat)
        plain = timed(lambda: minimal_loop(build_model(name, shape, 10), x, y, batch, 0.05), repeat)
        results[name] = {
            "device": "cpu", "samples": n, "batch_size": batch,
            "fedcycle_samples_per_s": spread([n / t for t in ours]),
            "minimal_loop_samples_per_s": spread([n / t for t in plain]),
            "ratio": statistics.median(plain) / statistics.median(ours),
        }
    results["cuda"] = (
        "not measured: no CUDA device on this machine" if not torch.cuda.is_available()
        else "not measured yet: the CUDA path (mixed precision, channels_last) has no benchmark"
    )
    return results


# -- 4. set-up and process start-up ------------------------------------------------------


SETUP_SNIPPET = """
import time, sys
t0 = time.perf_counter()
import torch, torchvision, flwr
t1 = time.perf_counter()
from fedcycle.site import load_site
t2 = time.perf_counter()
site = load_site({{"data-root": "{root}"}}, {{"partition-id": 0, "num-partitions": 4}})
model = site.new_model()
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def bench_startup(repeat: int, data_root: str) -> dict:
    from fedcycle.config import RunSettings
    from fedcycle.datasets import load

    load(RunSettings(data_root=data_root), "train")  # the .npy cache exists, as after a site's first round
    cold = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", SETUP_SNIPPET.format(root=data_root)], capture_output=True,
                             text=True, check=True, cwd=REPO)
        cold.append((time.perf_counter() - started, *map(float, out.stdout.split())))
    return {
        "process_seconds": spread([c[0] for c in cold]),
        "import_torch_torchvision_flwr_seconds": spread([c[1] for c in cold]),
        "import_fedcycle_seconds": spread([c[2] for c in cold]),
        "site_setup_cold_seconds": spread([c[3] for c in cold]),
        "note": "deployment starts a new ClientApp process per message and pays all of it; simulation reuses "
                "Ray workers, so a site pays the set-up once (see setup-seconds in the round anatomy)",
    }


# -- 1. round anatomy --------------------------------------------------------------------


def plain_rounds(rounds: int, sites: int, data_root: str) -> list[float]:
    """The standard job as one process: each site's training in turn, the average, the test."""
    from fedcycle.config import RunSettings
    from fedcycle.datasets import DATASETS, site_split, test_split
    from fedcycle.models import build_model
    from fedcycle.trainer import TrainConfig, evaluate, train

    settings = RunSettings(data_root=data_root, local_epochs=1)
    spec = DATASETS[settings.dataset]
    data = [site_split(settings, {"partition-id": i, "num-partitions": sites})[0] for i in range(sites)]
    test = test_split(settings)
    model = build_model(settings.model, spec.shape(settings), 10)
    times = []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        states, weights = [], []
        for part in data:
            local = build_model(settings.model, spec.shape(settings), 10)
            local.load_state_dict(model.state_dict())
            train(local, part, TrainConfig(settings.schedule, epochs=1, server_round=r), torch.device("cpu"), spec.mean, spec.std)
            states.append(local.state_dict())
            weights.append(len(part))
        model.load_state_dict({k: sum(s[k] * (w / sum(weights)) for s, w in zip(states, weights)) for k in states[0]})
        evaluate(model, test, torch.device("cpu"), spec.mean, spec.std)
        times.append(time.perf_counter() - started)
    return times


def bench_round(rounds: int, data_root: str) -> dict:
    from fedcycle.local import LocalSimulation
    from fedcycle.results import read_metrics

    sites = 4
    with tempfile.TemporaryDirectory(prefix="fedcycle-bench-") as scratch:
        started = time.perf_counter()
        with LocalSimulation(Path(scratch) / "flwr-home") as sim:
            link_up = time.perf_counter() - started
            outcome = sim.run(sites, f"num-server-rounds={rounds} local-epochs=1 data-root='{data_root}' "
                                     f"results-dir='{scratch}' run-name='bench'", stream=False)
            total = time.perf_counter() - started  # before shutting down; includes reading the status
        if not outcome.completed:
            raise RuntimeError(f"bench run ended {outcome.status}:\n{outcome.log[-2000:]}")
        lines = read_metrics(outcome.results_dir / "metrics.jsonl")
    trained = lines[1:]
    steady = trained[1:] or trained  # round 1 pays the ClientApps' first set-up
    cores = max(1, min(sites, (__import__("os").cpu_count() or 1)))
    anatomy = []
    for line in trained:
        train_sum = sum(s["train-seconds"] for s in line["sites"])
        training = train_sum / cores  # the sites share the cores: their training's wall time
        rest = line["seconds"] - training - line["timing"]["aggregate_seconds"] - line["timing"]["evaluate_seconds"]
        anatomy.append({"round": line["round"], "wall": line["seconds"], "training": training,
                        "aggregation": line["timing"]["aggregate_seconds"], "evaluation": line["timing"]["evaluate_seconds"],
                        "rest": rest, "setup_max": max(s["setup-seconds"] for s in line["sites"])})
    plain = plain_rounds(len(steady) + 1, sites, data_root)[1:]
    steady_wall = statistics.median(line["seconds"] for line in steady)
    return {
        "job": f"{sites} sites, fashion-mnist iid, small-cnn, 1 local epoch, {rounds} rounds",
        "rounds": anatomy,
        "steady_round_seconds": spread([line["seconds"] for line in steady]),
        "plain_loop_round_seconds": spread(plain),
        "ratio": steady_wall / statistics.median(plain),
        "overhead_seconds_per_round": steady_wall - statistics.median(plain),
        "startup_seconds": {"superlink": link_up, "until_round_1": total - sum(line["seconds"] for line in lines)},
    }


def table(result: dict) -> str:
    r, a, t, s = result["round"], result["aggregation"], result["trainer"], result["startup"]
    miss = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    fmt = lambda d, f=".2f": f"{d['median']:{f}} ({d['min']:{f}}-{d['max']:{f}})"  # noqa: E731
    rows = [
        "| measure | fedcycle | reference | ratio | target |", "|---|---|---|---|---|",
        f"| steady round, s ({r['job']}) | {fmt(r['steady_round_seconds'])} | plain loop {fmt(r['plain_loop_round_seconds'])} | "
        f"{r['ratio']:.2f} | <= 1.10: {miss(r['ratio'] <= 1.10)} |",
        f"| overhead per round, s | {r['overhead_seconds_per_round']:.2f} | | | |",
        f"| start-up: SuperLink, s / until round 1, s | {r['startup_seconds']['superlink']:.1f} / {r['startup_seconds']['until_round_1']:.1f} | | | |",
        f"| aggregate 8 x ResNet-18 ({a['parameters'] / 1e6:.1f} M), s | {fmt(a['fedcycle_seconds'], '.3f')} | "
        f"Flower FedAvg {fmt(a['stock_seconds'], '.3f')} | {a['speedup']:.2f}x | >= 3x: {miss(a['speedup'] >= 3)} |",
        f"| of which the mean alone (FastFedAvg), s | {fmt(a['mean_only_seconds'], '.3f')} | | {a['mean_only_speedup']:.2f}x | |",
        f"| aggregation bandwidth, GB/s | {a['fedcycle_bandwidth_gb_s']:.1f} | copy {a['copy_bandwidth_gb_s']:.1f} | "
        f"{a['bandwidth_fraction']:.2f} | >= 0.5: {miss(a['bandwidth_fraction'] >= 0.5)} |",
    ]
    for name in ("small-cnn", "resnet18"):
        m = t[name]
        rows.append(f"| trainer {name}, samples/s (CPU) | {fmt(m['fedcycle_samples_per_s'], '.0f')} | "
                    f"minimal loop {fmt(m['minimal_loop_samples_per_s'], '.0f')} | {m['ratio']:.2f} | >= 0.95: {miss(m['ratio'] >= 0.95)} |")
    setup = [x["setup_max"] for x in r["rounds"]]
    rows += [
        f"| site set-up before first step, simulation (round 1 / later), s | {setup[0]:.2f} / {max(setup[1:] or [0]):.2f} | | | "
        f"< 0.5: {miss(max(setup) < 0.5)} |",
        f"| site set-up, deployment (new process, .npy cache warm), s | {fmt(s['site_setup_cold_seconds'])} | | | < 0.5: {miss(s['site_setup_cold_seconds']['median'] < 0.5)} |",
        f"| ClientApp process: import torch+torchvision+flwr, s | {fmt(s['import_torch_torchvision_flwr_seconds'])} | | | |",
        f"| ClientApp process: whole start-up, s | {fmt(s['process_seconds'])} | | | |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcycle.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data-root", default=str(Path("~/.cache/fedcycle").expanduser()))
    args = parser.parse_args(argv)
    exit_on_termination()
    from fedcycle.results import machine, versions

    result = {"command": "python -m fedcycle.bench " + " ".join(argv or sys.argv[1:]), "versions": versions(), "machine": machine()}
    print("aggregation ...", flush=True)
    result["aggregation"] = bench_aggregation(args.repeat)
    print("trainer throughput ...", flush=True)
    result["trainer"] = bench_trainer(max(3, args.repeat // 2))
    print("start-up ...", flush=True)
    result["startup"] = bench_startup(max(3, args.repeat // 2), args.data_root)
    print("round anatomy ...", flush=True)
    result["round"] = bench_round(args.rounds, args.data_root)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (OUT / "bench.md").write_text(f"`{result['command']}` on {result['machine']['platform']}, "
                                  f"{result['machine']['cpu_count']} CPUs\n\n{text}\n")
    print(text)
    print(f"\nwritten: {OUT / 'bench.json'}, {OUT / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
