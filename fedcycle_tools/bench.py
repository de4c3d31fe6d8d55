"""Where every second of a round goes: `make bench` (a benchmark, not a test).

Writes results/bench/bench.json and results/bench/bench.md. Every figure is the median of
several runs, with its spread (min to max).

1. round anatomy: the standard job (4 sites, Fashion-MNIST, small CNN, 1 local epoch) through
   fedcycle in Flower's simulation, against the same job as one plain PyTorch loop;
2. aggregation: 8 replies of ResNet-18 size, fedcycle's coordinator (the reply screen around
   Flower's FedAvg) against Flower's FedAvg alone, and
   the machine's memory bandwidth (a large copy) measured in the same run;
3. the site trainer's throughput against a minimal hand-written loop;
4. a site's set-up before its first training step, and a ClientApp process's start-up;
5. the trainer's two input paths on real data: the in-memory fast path against the DataLoader
   path (a plain torch Dataset) and a minimal hand-written loop;
6. a site whose data set is several times a memory cap: a memory-mapped synthetic set trained
   through the DataLoader path in a child process, the child's peak resident memory against the cap;
7. one site on 1 process against all its processes (`nproc-per-site`, fedcycle.distributed): gloo
   on this machine's CPU cores (2 processes), NCCL on all GPUs where there are several; and
   (`processes_accuracy`) the accuracy of the same simulation both ways, over 3 seeds.

`--only loaders,memmap` runs some sections alone (written to bench-<sections>.{json,md}, so a
full run's bench.json is kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import mmap
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import DataLoader

from fedcycle.batches import batches
from fedcycle.distributed import GlobalBatches, train_on_processes
from fedcycle.config import RunSettings
from fedcycle.results import machine, read_metrics, versions
from fedcycle.schedules import LRSchedule
from fedcycle.strategies import make_coordinator
from fedcycle.tasks import Task, load_task
from fedcycle.tasks.image.datasets import DATASETS, load
from fedcycle.tasks.image.in_memory import DeviceBatches, InMemoryImages
from fedcycle.tasks.image.models import build_model
from fedcycle.tasks.image.settings import ImageSettings
from fedcycle.site import load_site
from fedcycle.trainer import TrainConfig, evaluate, train
from fedcycle.wire import TrainReply
from fedcycle_tools.launcher import LocalSimulation, exit_on_termination

OUT = Path("results") / "bench"  # under the folder it runs from


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
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    logging.getLogger("flwr").setLevel(logging.ERROR)
    state = {k: v.numpy() for k, v in build_model("resnet18", (3, 32, 32), 10).state_dict().items()}
    rng = np.random.default_rng(0)
    replies = []
    for node in range(1, 9):
        instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
        arrays = ArrayRecord({k: Array(v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype) if v.dtype == np.float32 else v)
                              for k, v in state.items()})
        metrics = MetricRecord({**{key: 1.0 for key in TrainReply.keys(["accuracy"], evaluate_received=True)}, "num-examples": 100 + node})
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=instruction))
    size = sum(v.nbytes for v in state.values())

    sent = ArrayRecord({k: Array(v) for k, v in state.items()})

    def coordinator():
        c = make_coordinator(RunSettings(), num_sites=8)
        c.global_arrays = sent  # as configure_train sets it
        return c

    # one coordinator a repeat, made before the clock starts: the same round screened again by one
    # coordinator would count each site's drift once per repeat
    coordinators = [coordinator() for _ in range(repeat)]

    def fedcycle_round() -> None:  # the production path: the reply screen, the mean, dtypes kept
        c = coordinators.pop()
        arrays = c.aggregate(1, c.screen_round(1, replies))
        assert arrays is not None and not c.events[1], c.events[1]

    stock = timed(lambda: FedAvg().aggregate_train(1, replies), repeat)
    fast = timed(fedcycle_round, repeat)
    big = np.ones(50_000_000)  # 400 MB
    dst = np.zeros_like(big)
    copy = timed(lambda: np.copyto(dst, big), repeat)
    bandwidth = 2 * big.nbytes / statistics.median(copy)  # read + write
    traffic = (len(replies) + 1) * size  # every reply read once, the mean written once
    return {
        "parameters": int(sum(v.size for v in state.values())), "replies": len(replies),
        "stock_seconds": spread(stock), "fedcycle_seconds": spread(fast),
        "fedcycle_includes": ("Coordinator(FedAvg).screen_round + aggregate: screening every reply (shapes, dtypes, metrics, "
                              "NaN/Inf, the norm of its change, replays and near-duplicates by sketch, the peers' median: "
                              "pull-back, centered clipping, weight cap, drift), FedAvg's mean, dtypes kept"),
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
    task = Task("image-classification", {})  # cross-entropy and accuracy; the models are built here
    results = {}
    for name, shape, n, batch in (("small-cnn", (1, 28, 28), 4096, 64), ("resnet18", (3, 32, 32), 256, 64)):
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 255, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)
        data = InMemoryImages(images, labels, tuple("0123456789"), (0.5,) * shape[0], (0.25,) * shape[0])
        x = (torch.from_numpy(images).float() - 127.5) / 63.75
        y = torch.from_numpy(labels)
        cfg = TrainConfig(LRSchedule(), epochs=1, batch_size=batch)
        ours = timed(lambda: train(task, build_model(name, shape, 10), data, cfg, torch.device("cpu")), repeat)
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
    load(ImageSettings(data_root=data_root), "train")  # the .npy cache exists, as after a site's first round
    cold = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", SETUP_SNIPPET.format(root=data_root)], capture_output=True,
                             text=True, check=True)
        cold.append((time.perf_counter() - started, *map(float, out.stdout.split())))
    return {
        "process_seconds": spread([c[0] for c in cold]),
        "import_torch_torchvision_flwr_seconds": spread([c[1] for c in cold]),
        "import_fedcycle_seconds": spread([c[2] for c in cold]),
        "site_setup_cold_seconds": spread([c[3] for c in cold]),
        "note": "deployment starts a new ClientApp process per message and pays all of it; simulation reuses "
                "Ray workers, so a site pays the set-up once (see setup-seconds in the round anatomy)",
    }


# -- 5. the DataLoader path against the in-memory fast path ------------------------------


class PlainImages(torch.utils.data.Dataset):
    """What a task's own Dataset typically is: one normalized float image per item, batched by
    torch's DataLoader. Not an `InMemoryImages`, so the trainer takes the DataLoader path."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(-1, 1, 1) * 255
        self.std = torch.tensor(std).view(-1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[index].float() - self.mean) / self.std, self.labels[index]


def bench_loaders(repeat: int, data_root: str, samples: int = 8192, batch: int = 64) -> dict:
    """fedcycle's trainer on Fashion-MNIST through the in-memory fast path and through the
    DataLoader path (0 and 1 workers), and the minimal hand loop, on the same images."""

    cpu = torch.device("cpu")
    config = {"data-root": data_root}
    settings, image = RunSettings.from_run_config(config), ImageSettings.from_run_config(config)
    spec = DATASETS[image.dataset]
    task = load_task(config)
    full = load(image, "train")
    images = torch.from_numpy(np.ascontiguousarray(full.images[:samples]))
    labels = torch.from_numpy(np.ascontiguousarray(full.labels[:samples]))
    n = len(labels)
    in_memory = InMemoryImages(images, labels, task.classes, spec.mean, spec.std)
    plain = PlainImages(images, labels, spec.mean, spec.std)
    assert isinstance(batches(in_memory, batch, cpu, shuffle=True), DeviceBatches)
    assert isinstance(batches(plain, batch, cpu, shuffle=True), DataLoader)
    x = torch.stack([plain[i][0] for i in range(n)])  # the hand loop gets the set normalized beforehand

    def trainer(data, workers: int) -> float:
        torch.manual_seed(0)
        model = task.build_model()
        cfg = TrainConfig(settings.schedule, epochs=1, batch_size=batch, num_workers=workers)
        started = time.perf_counter()
        train(task, model, data, cfg, cpu)
        return time.perf_counter() - started

    def hand() -> float:
        torch.manual_seed(0)
        model = task.build_model()
        started = time.perf_counter()
        minimal_loop(model, x, labels, batch, settings.schedule.lr_max)
        return time.perf_counter() - started

    variants = {
        "in_memory": lambda: trainer(in_memory, 0),
        "dataloader_workers_0": lambda: trainer(plain, 0),
        "dataloader_workers_1": lambda: trainer(plain, 1),
        "minimal_loop": hand,
    }
    load_before = os.getloadavg()
    for fn in variants.values():  # warm-up: one-off costs (allocator, first kernels) hit no variant's figures
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):  # interleaved, so other work on the machine falls on every variant alike
        for name, fn in variants.items():
            seconds[name].append(fn())
    median = {k: statistics.median(v) for k, v in seconds.items()}

    def input_only(data) -> float:  # one pass over the batches, no model: CPU seconds (all threads)
        started = time.process_time()
        for _inputs, _targets in batches(data, batch, cpu, shuffle=True, generator=torch.Generator().manual_seed(0)):
            pass
        return time.process_time() - started

    input_cpu = {k: [input_only(d) for _ in range(repeat)] for k, d in (("in_memory", in_memory), ("dataloader_workers_0", plain))}
    return {
        "job": f"fashion-mnist, {n} train images, {image.model}, batch {batch}, 1 epoch, cpu, "
               f"{torch.get_num_threads()} torch threads",
        "samples": n, "batch_size": batch, "model": image.model, "torch_threads": torch.get_num_threads(),
        "dataset": "PlainImages: a torch Dataset returning one normalized float32 image per item, "
                   "batched by torch's DataLoader (default collate)",
        **{f"{k}_samples_per_s": spread([n / t for t in v]) for k, v in seconds.items()},
        "ratio_dataloader_workers_0": median["in_memory"] / median["dataloader_workers_0"],
        "ratio_dataloader_workers_1": median["in_memory"] / median["dataloader_workers_1"],
        "ratio_in_memory_to_minimal_loop": median["minimal_loop"] / median["in_memory"],
        "input_only_cpu_us_per_sample": {k: 1e6 * statistics.median(v) / n for k, v in input_cpu.items()},
        "input_only_note": "one pass over the batches without the model, CPU time of this process (less sensitive "
                           "to other work on the machine than wall time): what each path costs per sample to feed",
        "target": "DataLoader path >= 0.9 x the in-memory fast path's samples/s, on 2 CPU cores",
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }


# -- 6. a data set larger than a memory cap ----------------------------------------------


def memory_status() -> dict[str, int]:
    """This process's resident memory from /proc/self/status, in bytes: VmRSS (now), VmHWM
    (its peak), and the anonymous and file-backed (mapped files) parts of VmRSS."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                found[key] = int(value.split()[0]) * 1024
    return found


class MemmapImages(torch.utils.data.Dataset):
    """A task's Dataset over a uint8 .npy too large for memory: `np.load(mmap_mode="r")`; per
    item one image is copied out, shrunk to 32x32 (an area resize, as a Resize transform would)
    and normalized. With `release_every` (items), the mapping's pages are dropped from the
    process each time that many items have been read (madvise MADV_DONTNEED: the kernel's page
    cache keeps them, the process's resident set does not). Counting items, not bytes: a fault
    on a file whose page cache holds large folios maps the whole folio (up to 2 MiB here), so
    the resident set grows many times faster than the bytes read."""

    def __init__(self, path: str, labels: np.ndarray, mean, std, release_every: int = 0) -> None:
        self.images = np.load(path, mmap_mode="r")
        self.labels = torch.from_numpy(labels)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.shrink = self.images.shape[-1] // 32
        self.release_every, self.items = release_every, 0
        self.peak = {"RssAnon": 0, "RssFile": 0}

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self) -> None:
        status = memory_status()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], status.get(key, 0))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.images[index]))
        self.items += 1
        if self.release_every and self.items % self.release_every == 0:
            self.sample()
            self.images._mmap.madvise(mmap.MADV_DONTNEED)
        elif self.items % 64 == 0:
            self.sample()
        small = torch.nn.functional.avg_pool2d(image.float()[None], self.shrink)[0] / 255
        return (small - self.mean) / self.std, self.labels[index]


def memmap_child(path: str, labels_path: str, release_every: int, batch: int, threads: int) -> None:
    """A site's process: fedcycle's trainer over the memory-mapped set, one epoch; prints its
    memory (the baseline after imports and set-up, the peak after training) as one JSON line."""
    if threads:
        torch.set_num_threads(threads)

    task = Task("image-classification", {"image.dataset": "cifar10"})  # small-cnn for 3x32x32; cross-entropy, accuracy
    data = MemmapImages(path, np.load(labels_path), (0.5,) * 3, (0.25,) * 3, release_every)
    torch.manual_seed(0)
    model = task.build_model()
    baseline = memory_status()
    started = time.perf_counter()
    result = train(task, model, data, TrainConfig(LRSchedule(), epochs=1, batch_size=batch), torch.device("cpu"))
    seconds = time.perf_counter() - started
    data.sample()
    end = memory_status()
    print(json.dumps({
        "baseline_rss_bytes": baseline["VmRSS"], "baseline_hwm_bytes": baseline["VmHWM"],
        "baseline_rss_anon_bytes": baseline["RssAnon"], "baseline_rss_file_bytes": baseline["RssFile"],
        "peak_rss_bytes": end["VmHWM"], "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_anon_sampled_bytes": data.peak["RssAnon"], "peak_rss_file_sampled_bytes": data.peak["RssFile"],
        "end_rss_bytes": end["VmRSS"], "seconds": seconds, "samples": len(data),
        "samples_per_s": len(data) / seconds, "steps": result.steps, "loss": result.loss,
    }))


def bench_memmap(data_gib: float, cap_gib: float, shape: tuple[int, int, int] = (3, 224, 224), batch: int = 64,
                 threads: int = 1) -> dict:
    """A synthetic uint8 set of `data_gib` GiB written to a temporary .npy, trained for one epoch
    through the DataLoader path in a child process per variant; the child's peak RSS against the cap."""
    per_image = math.prod(shape)
    n = math.ceil(data_gib * 2**30 / per_image)
    cap = int(cap_gib * 2**30)
    rng = np.random.default_rng(0)
    result: dict = {
        "job": f"{n} synthetic uint8 images {list(shape)} in a .npy, np.load(mmap_mode='r'); "
               f"each item area-resized to 32x32 in the Dataset, small-cnn, batch {batch}, 1 epoch, "
               f"DataLoader path, 0 workers, cpu, {threads or torch.get_num_threads()} torch thread(s)",
        "images": n, "torch_threads": threads, "image_shape": list(shape), "cap_bytes": cap,
    }
    with tempfile.TemporaryDirectory(prefix="fedcycle-bench-memmap-") as scratch:
        path, labels_path = Path(scratch) / "images.npy", Path(scratch) / "labels.npy"
        started = time.perf_counter()
        block = rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})
            left = n * per_image
            while left:
                written = f.write(block[: min(left, len(block))])
                left -= written
        np.save(labels_path, rng.integers(0, 10, n).astype(np.int64))
        result["dataset_bytes"] = path.stat().st_size
        result["write_seconds"] = time.perf_counter() - started
        for name, release in (("np_memmap", 0), ("np_memmap_released", batch)):
            code = (f"from fedcycle_tools.bench import memmap_child; "
                    f"memmap_child({str(path)!r}, {str(labels_path)!r}, {release}, {batch}, {threads})")
            out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                                 timeout=1800)
            if out.returncode:
                raise RuntimeError(f"memmap child {name} exited {out.returncode}:\n{out.stderr[-2000:]}")
            child = json.loads(out.stdout.strip().splitlines()[-1])
            child["release_every_items"] = release
            child["load_average_after"] = os.getloadavg()
            child["under_cap"] = child["peak_rss_bytes"] < cap
            result[name] = child
    return result


# -- 1. round anatomy --------------------------------------------------------------------


def plain_rounds(rounds: int, sites: int, data_root: str) -> list[float]:
    """The standard job as one process: each site's training in turn, the average, the test."""

    config = {"data-root": data_root, "local-epochs": 1}
    settings = RunSettings.from_run_config(config)
    task = load_task(config)
    cpu = torch.device("cpu")
    data = [task.site_data({"partition-id": i, "num-partitions": sites})[0] for i in range(sites)]
    test = task.test_data()
    model = task.build_model()
    times = []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        states, weights = [], []
        for part in data:
            local = task.build_model()
            local.load_state_dict(model.state_dict())
            train(task, local, part, TrainConfig(settings.schedule, epochs=1, server_round=r), cpu)
            states.append(local.state_dict())
            weights.append(len(part))
        model.load_state_dict({k: sum(s[k] * (w / sum(weights)) for s, w in zip(states, weights)) for k in states[0]})
        evaluate(task, model, test, cpu)
        times.append(time.perf_counter() - started)
    return times


def bench_round(rounds: int, data_root: str) -> dict:
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


# -- 7. one site on several processes -----------------------------------------------------


def bench_processes(repeat: int, data_root: str, samples: int = 6000, epochs: int = 2) -> dict:
    """Samples per second of one site's training (Fashion-MNIST, small CNN): on 1 process by its
    fast path and by the batches the ranks take, and on N processes (2 on a CPU, every GPU where
    there are several), training alone (rank 0's clock) and the whole call with the processes'
    start, each round's cost in a deployment."""
    cuda = torch.cuda.device_count() > 1
    processes = torch.cuda.device_count() if cuda else 2
    run_config = {"data-root": data_root, "train-subset": samples, "val-fraction": 0.0}
    node = {"partition-id": 0, "num-partitions": 1, "device": "cuda" if cuda else "cpu"}
    site = load_site(run_config, node)
    cfg = TrainConfig(LRSchedule(), epochs=epochs, batch_size=64)
    n = len(site.train) * epochs
    start = site.new_model().state_dict()

    def one(loader=None) -> float:
        return train(site.task, site.new_model(), site.train, cfg, site.device, loader=loader).seconds

    def ranks_share():  # what one rank of one takes: the DataLoader path the processes use
        return DataLoader(site.train, batch_sampler=GlobalBatches(len(site.train), 64, 0, 1, cfg.seed))

    fast = [one() for _ in range(repeat)]
    loader = [one(ranks_share()) for _ in range(repeat)]
    training, whole = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        result, _ = train_on_processes(run_config, {**node, "nproc-per-site": processes}, start, cfg, None, processes)
        whole.append(time.perf_counter() - started)
        training.append(result.seconds)
    return {
        "job": f"fashion-mnist {len(site.train)} x {epochs} epochs, small-cnn, batch 64",
        "backend": "nccl" if cuda else "gloo", "processes": processes,
        "one_process_fast_path_samples_per_s": spread([n / t for t in fast]),
        "one_process_dataloader_samples_per_s": spread([n / t for t in loader]),
        "processes_training_samples_per_s": spread([n / t for t in training]),
        "processes_whole_call_samples_per_s": spread([n / t for t in whole]),
        "start_seconds": spread([w - t for w, t in zip(whole, training)]),
        "cuda": "not measured: fewer than 2 CUDA devices on this machine" if not cuda else "",
    }


def bench_processes_accuracy(data_root: str, seeds: tuple[int, ...] = (0, 1, 2), rounds: int = 3) -> dict:
    """Test accuracy after `rounds` rounds of 2 simulated sites on 1 process each and on 2 each
    (every GPU each, where there are several), per seed: the same training, so it should agree
    within the seeds' spread."""
    processes = torch.cuda.device_count() if torch.cuda.device_count() > 1 else 2
    finals: dict[str, list[float]] = {}
    for n in (1, processes):
        with tempfile.TemporaryDirectory(prefix="fedcycle-bench-") as scratch, \
                LocalSimulation(Path(scratch) / "flwr-home", node_config={"nproc-per-site": n}) as sim:
            for seed in seeds:
                outcome = sim.run(2, f"num-server-rounds={rounds} train-subset=1500 test-subset=2000 seed={seed} "
                                     f"data-root='{data_root}' results-dir='{scratch}' run-name='p{n}-s{seed}'",
                                  stream=False)
                if not outcome.completed:
                    raise RuntimeError(f"bench run ended {outcome.status}:\n{outcome.log[-2000:]}")
                finals.setdefault(str(n), []).append(read_metrics(outcome.results_dir / "metrics.jsonl")[-1]["accuracy"])
    return {"job": f"2 sites x 1,500 fashion-mnist images, {rounds} rounds, 2,000 test images", "seeds": list(seeds),
            "processes": processes, "final_accuracy": finals}


def table(result: dict) -> str:
    """The markdown table of the sections `result` holds."""
    miss = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    fmt = lambda d, f=".2f": f"{d['median']:{f}} ({d['min']:{f}}-{d['max']:{f}})"  # noqa: E731
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    rows = ["| measure | fedcycle | reference | ratio | target |", "|---|---|---|---|---|"]
    r = result.get("round")
    if r:
        rows += [
            f"| steady round, s ({r['job']}) | {fmt(r['steady_round_seconds'])} | plain loop {fmt(r['plain_loop_round_seconds'])} | "
            f"{r['ratio']:.2f} | <= 1.10: {miss(r['ratio'] <= 1.10)} |",
            f"| overhead per round, s | {r['overhead_seconds_per_round']:.2f} | | | |",
            f"| start-up: SuperLink, s / until round 1, s | {r['startup_seconds']['superlink']:.1f} / {r['startup_seconds']['until_round_1']:.1f} | | | |",
        ]
    a = result.get("aggregation")
    if a:
        rows += [
            # Flower's own FedAvg computes the mean; fedcycle adds its reply checks (issue 10: a
            # hand-built mean saved ~0.09 s on rounds of 17-70 s and was removed)
            f"| aggregate 8 x ResNet-18 ({a['parameters'] / 1e6:.1f} M) with reply checks, s | "
            f"{fmt(a['fedcycle_seconds'], '.3f')} | Flower FedAvg {fmt(a['stock_seconds'], '.3f')} | {a['speedup']:.2f}x | |",
            f"| aggregation bandwidth, GB/s | {a['fedcycle_bandwidth_gb_s']:.1f} | copy {a['copy_bandwidth_gb_s']:.1f} | "
            f"{a['bandwidth_fraction']:.2f} | |",
        ]
    t = result.get("trainer")
    if t:
        for name in ("small-cnn", "resnet18"):
            m = t[name]
            rows.append(f"| trainer {name}, samples/s (CPU) | {fmt(m['fedcycle_samples_per_s'], '.0f')} | "
                        f"minimal loop {fmt(m['minimal_loop_samples_per_s'], '.0f')} | {m['ratio']:.2f} | >= 0.95: {miss(m['ratio'] >= 0.95)} |")
    lo = result.get("loaders")
    if lo:
        job = f"fashion-mnist {lo['samples']}, {lo['model']}, batch {lo['batch_size']}, CPU, {lo['torch_threads']} torch thread(s)"
        for workers in (0, 1):
            ratio = lo[f"ratio_dataloader_workers_{workers}"]
            rows.append(f"| trainer, DataLoader path ({workers} worker{'s' if workers != 1 else ''}), samples/s ({job}) | "
                        f"{fmt(lo[f'dataloader_workers_{workers}_samples_per_s'], '.0f')} | "
                        f"in-memory fast path {fmt(lo['in_memory_samples_per_s'], '.0f')} | {ratio:.2f} | >= 0.9: {miss(ratio >= 0.9)} |")
        cost = lo["input_only_cpu_us_per_sample"]
        rows.append(f"| feeding the batches alone (no model), CPU µs per sample: DataLoader path (0 workers) | "
                    f"{cost['dataloader_workers_0']:.1f} | in-memory fast path {cost['in_memory']:.1f} | | |")
        rows.append(f"| trainer, in-memory fast path, samples/s ({job}) | {fmt(lo['in_memory_samples_per_s'], '.0f')} | "
                    f"minimal loop {fmt(lo['minimal_loop_samples_per_s'], '.0f')} | {lo['ratio_in_memory_to_minimal_loop']:.2f} | |")
    mm = result.get("memmap")
    if mm:
        size = f"{gib(mm['dataset_bytes'])} GiB memory-mapped set, cap {gib(mm['cap_bytes'])} GiB"
        for name, how in (("np_memmap", "np.load(mmap_mode='r')"), ("np_memmap_released", "the same, its pages released every batch (64 items)")):
            c = mm[name]
            rows.append(f"| site's peak RSS, GiB ({size}; {how}) | {gib(c['peak_rss_bytes'])} "
                        f"(anon {gib(c['peak_rss_anon_sampled_bytes'])}, file {gib(c['peak_rss_file_sampled_bytes'])}) | "
                        f"cap {gib(mm['cap_bytes'])} | {c['peak_rss_bytes'] / mm['cap_bytes']:.2f} | < cap: {miss(c['under_cap'])} |")
        c = mm["np_memmap"]
        rows.append(f"| the same site: RSS after imports and set-up, GiB / samples/s | {gib(c['baseline_rss_bytes'])} "
                    f"(anon {gib(c['baseline_rss_anon_bytes'])}, file {gib(c['baseline_rss_file_bytes'])}) / "
                    f"{c['samples_per_s']:.0f} (released: {mm['np_memmap_released']['samples_per_s']:.0f}) | | | |")
    if r:
        setup = [x["setup_max"] for x in r["rounds"]]
        rows.append(f"| site set-up before first step, simulation (round 1 / later), s | {setup[0]:.2f} / {max(setup[1:] or [0]):.2f} | | | "
                    f"< 0.5: {miss(max(setup) < 0.5)} |")
    p = result.get("processes")
    if p:
        how = f"{p['processes']} processes ({p['backend']}), {p['job']}"
        rows += [
            f"| one site on {how}, training, samples/s | {fmt(p['processes_training_samples_per_s'], '.0f')} | "
            f"1 process, same batches {fmt(p['one_process_dataloader_samples_per_s'], '.0f')} | "
            f"{p['processes_training_samples_per_s']['median'] / p['one_process_dataloader_samples_per_s']['median']:.2f} | |",
            f"| the same, with the processes' start (every round in a deployment), samples/s / start, s | "
            f"{fmt(p['processes_whole_call_samples_per_s'], '.0f')} / {fmt(p['start_seconds'])} | "
            f"1 process, in-memory fast path {fmt(p['one_process_fast_path_samples_per_s'], '.0f')} | "
            f"{p['processes_whole_call_samples_per_s']['median'] / p['one_process_fast_path_samples_per_s']['median']:.2f} | |",
        ]
    acc = result.get("processes_accuracy")
    if acc:
        one, many = acc["final_accuracy"]["1"], acc["final_accuracy"][str(acc["processes"])]
        rows.append(f"| test accuracy, sites on {acc['processes']} processes ({acc['job']}; seeds {acc['seeds']}) | "
                    f"{' / '.join(f'{a:.4f}' for a in many)} | 1 process {' / '.join(f'{a:.4f}' for a in one)} | "
                    f"{statistics.fmean(many) - statistics.fmean(one):+.4f} | |")
    s = result.get("startup")
    if s:
        rows += [
            f"| site set-up, deployment (new process, .npy cache warm), s | {fmt(s['site_setup_cold_seconds'])} | | | < 0.5: {miss(s['site_setup_cold_seconds']['median'] < 0.5)} |",
            f"| ClientApp process: import torch+torchvision+flwr, s | {fmt(s['import_torch_torchvision_flwr_seconds'])} | | | |",
            f"| ClientApp process: whole start-up, s | {fmt(s['process_seconds'])} | | | |",
        ]
    return "\n".join(rows)


SECTIONS = ("aggregation", "trainer", "loaders", "memmap", "startup", "round", "processes", "processes_accuracy")


def main(argv: list[str] | None = None, prog: str = "python -m fedcycle_tools.bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data-root", default=str(Path("~/.cache/fedcycle").expanduser()))
    parser.add_argument("--only", default="", help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--memmap-gib", type=float, default=4.0, help="size of the memory-mapped set (memmap section)")
    parser.add_argument("--cap-gib", type=float, default=1.0, help="the memory cap it is measured against")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for this process's sections (default: torch's own choice); "
                             "the memmap section's child always runs 1")
    args = parser.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    run = set(only or SECTIONS)
    if args.threads:
        torch.set_num_threads(args.threads)
    exit_on_termination()

    result = {"command": " ".join([prog, *(argv if argv is not None else sys.argv[1:])]),
              "versions": versions(), "machine": machine(), "torch_threads": torch.get_num_threads()}
    if "aggregation" in run:
        print("aggregation ...", flush=True)
        result["aggregation"] = bench_aggregation(args.repeat)
    if "trainer" in run:
        print("trainer throughput ...", flush=True)
        result["trainer"] = bench_trainer(max(3, args.repeat // 2))
    if "loaders" in run:
        print("DataLoader path against the in-memory fast path ...", flush=True)
        result["loaders"] = bench_loaders(max(3, args.repeat // 2), args.data_root)
    if "memmap" in run:
        print(f"a {args.memmap_gib:g} GiB memory-mapped set against a {args.cap_gib:g} GiB cap ...", flush=True)
        result["memmap"] = bench_memmap(args.memmap_gib, args.cap_gib)
    if "startup" in run:
        print("start-up ...", flush=True)
        result["startup"] = bench_startup(max(3, args.repeat // 2), args.data_root)
    if "round" in run:
        print("round anatomy ...", flush=True)
        result["round"] = bench_round(args.rounds, args.data_root)
    if "processes" in run:
        print("one site on several processes ...", flush=True)
        result["processes"] = bench_processes(max(3, args.repeat // 2), args.data_root)
    if "processes_accuracy" in run:
        print("the same sites on 1 process and on several: accuracy ...", flush=True)
        result["processes_accuracy"] = bench_processes_accuracy(args.data_root)
    OUT.mkdir(parents=True, exist_ok=True)
    stem = "bench" if run == set(SECTIONS) else "bench-" + "-".join(s for s in SECTIONS if s in run)
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (OUT / f"{stem}.md").write_text(f"`{result['command']}` on {result['machine']['platform']}, "
                                    f"{result['machine']['cpu_count']} CPUs\n\n{text}\n")
    print(text)
    print(f"\nwritten: {OUT / (stem + '.json')}, {OUT / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
