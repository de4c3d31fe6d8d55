"""The reproduction study: centralized vs FedAvg vs FedAvg + cyclical LR + more local epochs.

    python -m fedcycle.study studies/default.yaml          # or: make reproduce PROFILE=quick

A study file (YAML) names the data, the epoch budget, the grid of data centers, splits and
local epochs, the seeds and a small learning-rate grid. The study runs in two phases:

1. tuning: every method tries the same grid at the tuning cell (4 sites, iid, one seed) and
   keeps the setting with the best final accuracy on the sites' held-out validation data
   (never the test set);
2. the comparison: every method in every cell with its chosen setting, the same number of
   epochs over the data for all (the federated ones in budget / local-epochs rounds).

Federated runs go through fedcycle's own ServerApp, strategy, ClientApp and trainer in
Flower's simulation (one SuperLink for the whole study); centralized runs are the same
trainer on the pooled data of all sites. Each finished run leaves a small JSON summary in
`runs/`; a run whose summary exists is not run again, so an interrupted study continues
where it stopped, on this machine or another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedcycle.local import REPO, exit_on_termination

METHODS = ("centralized-constant", "centralized-cyclical", "fedavg-constant", "fedavg-cyclical")


class StudyError(ValueError):
    """A study file that cannot work; the message names the key."""


@dataclass(frozen=True)
class Split:
    name: str
    partitioner: str
    alpha: float | None = None


@dataclass(frozen=True)
class Study:
    profile: str
    dataset: str
    model: str
    epoch_budget: int
    sites: tuple[int, ...]
    local_epochs: tuple[int, ...]
    splits: tuple[Split, ...]
    seeds: tuple[int, ...]
    repeat_seeds: tuple[int, ...]  # seeds for the tuning cell (4 sites, iid) in the comparison
    grid: dict[str, tuple[dict, ...]]  # "constant" / "cyclical" -> lr settings to try
    tuning_sites: int = 4
    run_config: dict[str, Any] = field(default_factory=dict)  # shared run-config keys (subsets, batch size)
    output: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "Study":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise StudyError(f"{path}: cannot read the study file: {err}") from None
        if not isinstance(raw, dict):
            raise StudyError(f"{path}: a study file is a YAML mapping")

        def need(key: str, kind: type) -> Any:
            if key not in raw:
                raise StudyError(f"{path}: '{key}' is missing")
            if not isinstance(raw[key], kind):
                raise StudyError(f"{path}: '{key}' must be a {kind.__name__}, not {raw[key]!r}")
            return raw[key]

        splits = []
        for item in need("splits", list):
            if not isinstance(item, dict) or "name" not in item or "partitioner" not in item:
                raise StudyError(f"{path}: each of 'splits' needs 'name' and 'partitioner', got {item!r}")
            splits.append(Split(item["name"], item["partitioner"], item.get("alpha")))
        grid = need("lr_grid", dict)
        if set(grid) != {"constant", "cyclical"}:
            raise StudyError(f"{path}: 'lr_grid' needs exactly 'constant' and 'cyclical', got {sorted(grid)}")
        study = cls(
            profile=need("profile", str),
            dataset=need("dataset", str),
            model=need("model", str),
            epoch_budget=need("epoch_budget", int),
            sites=tuple(need("sites", list)),
            local_epochs=tuple(need("local_epochs", list)),
            splits=tuple(splits),
            seeds=tuple(need("seeds", list)),
            repeat_seeds=tuple(raw.get("repeat_seeds", raw["seeds"])),
            grid={k: tuple(v) for k, v in grid.items()},
            tuning_sites=raw.get("tuning_sites", 4),
            run_config=dict(raw.get("run_config", {})),
            output=raw.get("output", ""),
        )
        for le in study.local_epochs:
            if not isinstance(le, int) or le < 1 or study.epoch_budget % le:
                raise StudyError(f"{path}: local_epochs {le} must be a positive divisor of epoch_budget={study.epoch_budget}")
        if study.tuning_sites not in study.sites or "iid" not in {s.name for s in study.splits}:
            raise StudyError(f"{path}: the tuning cell (tuning_sites={study.tuning_sites}, split 'iid') must be in the grid")
        return study

    def output_dir(self) -> Path:
        """`docs/results` for the default profile; `results/reproduce/<profile>` for the others."""
        if self.output:
            return (REPO / self.output).resolve()
        return REPO / "docs" / "results" if self.profile == "default" else REPO / "results" / "reproduce" / self.profile


@dataclass(frozen=True)
class PlannedRun:
    """One run of the study. Its key names what it computes, not the phase that asked for it,
    so the comparison reuses a tuning run with the same method, cell, seed and setting."""

    method: str
    split: Split
    sites: int
    local_epochs: int
    seed: int
    lr: dict  # the lr settings tried or chosen

    @property
    def federated(self) -> bool:
        return self.method.startswith("fedavg")

    @property
    def schedule(self) -> str:
        return self.method.split("-", 1)[1]

    @property
    def key(self) -> str:
        lr = "-".join(f"{k}{v}" for k, v in sorted(self.lr.items()))
        where = f"{self.split.name}-s{self.sites}-le{self.local_epochs}" if self.federated else "pooled"
        return f"{self.method}-{where}-seed{self.seed}-{lr}"

    def rounds(self, budget: int) -> int:
        return budget // self.local_epochs if self.federated else budget


def tuning_plan(study: Study) -> list[PlannedRun]:
    iid = next(s for s in study.splits if s.name == "iid")
    runs = []
    for method in METHODS:
        grid = study.grid["cyclical" if method.endswith("cyclical") else "constant"]
        le = min(study.local_epochs)
        for lr in grid:
            runs.append(PlannedRun(method, iid, study.tuning_sites, le, study.seeds[0], dict(lr)))
    return runs


def comparison_plan(study: Study, chosen: dict[str, dict]) -> list[PlannedRun]:
    runs = []
    iid = next(s for s in study.splits if s.name == "iid")
    for method in METHODS[:2]:  # centralized: the pooled data of the tuning cell's sites, whatever the split
        for seed in sorted(set(study.seeds) | set(study.repeat_seeds)):
            runs.append(PlannedRun(method, iid, study.tuning_sites, 1, seed, chosen[method]))
    for split in study.splits:
        for sites in study.sites:
            seeds = study.repeat_seeds if (split.name == "iid" and sites == study.tuning_sites) else study.seeds
            for le in study.local_epochs:
                for method in METHODS[2:]:
                    for seed in seeds:
                        runs.append(PlannedRun(method, split, sites, le, seed, chosen[method]))
    return runs


def choose(study: Study, summaries: dict[str, dict]) -> dict[str, dict]:
    """Per method, the lr setting with the best final validation accuracy in tuning."""
    chosen = {}
    for method in METHODS:
        tried = [(summaries[r.key]["final_val_accuracy"], i, r.lr) for i, r in enumerate(tuning_plan(study))
                 if r.method == method and r.key in summaries]
        if tried:
            chosen[method] = max(tried, key=lambda t: (t[0], -t[1]))[2]
    return chosen


def lr_run_config(run: PlannedRun) -> dict[str, Any]:
    """The run-config keys for a run's learning-rate setting.

    A cyclical setting gives its cycle as `cycle-rounds` (federated: rounds of local
    training) and `cycle-epochs` (centralized: epochs over the pooled data)."""
    if run.schedule == "constant":
        return {"lr-schedule": "constant", "lr-max": run.lr["lr-max"], "lr-min": 0.0}
    unit, length = ("round", run.lr.get("cycle-rounds", 1)) if run.federated else ("epochs", run.lr.get("cycle-epochs", 1))
    return {
        "lr-schedule": run.lr.get("schedule", "triangular"),
        "lr-min": run.lr["lr-min"],
        "lr-max": run.lr["lr-max"],
        "lr-cycle-unit": unit,
        "lr-cycle-length": float(length),
    }


def run_config_for(study: Study, run: PlannedRun, data_root: str) -> dict[str, Any]:
    config = {
        "dataset": study.dataset,
        "model": study.model,
        "partitioner": run.split.partitioner,
        "seed": run.seed,
        "local-epochs": run.local_epochs,
        "num-server-rounds": run.rounds(study.epoch_budget),
        "site-eval": "evaluate-round",  # the validation accuracy that tuning reads
        **({"data-root": data_root} if data_root else {}),
        **study.run_config,
        **lr_run_config(run),
    }
    if run.split.alpha is not None:
        config[f"{run.split.partitioner}.alpha"] = float(run.split.alpha)
    return config


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def model_bytes(study: Study) -> int:
    from fedcycle.tasks import load_task

    model = load_task({"dataset": study.dataset, "model": study.model}).build_model()
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run_federated(study: Study, run: PlannedRun, sim, data_root: str, scratch: Path) -> dict:
    config = {**run_config_for(study, run, data_root), "results-dir": str(scratch), "run-name": run.key}
    started = time.perf_counter()
    outcome = sim.run(run.sites, " ".join(f"{k}={_toml(v)}" for k, v in config.items()), stream=False)
    wall = time.perf_counter() - started
    if not outcome.completed:
        raise RuntimeError(f"{run.key}: run {outcome.run_id} ended {outcome.status}:\n{outcome.log[-2000:]}")
    from fedcycle.results import read_metrics

    rounds = read_metrics(outcome.results_dir / "metrics.jsonl")
    return {
        "accuracy": [r["accuracy"] for r in rounds],
        "val_accuracy": [(r.get("sites_evaluation") or {}).get("accuracy") for r in rounds],
        "seconds": [r["seconds"] for r in rounds],
        "wall_seconds": wall,
        "run_config": config,
    }


def run_centralized(study: Study, run: PlannedRun, data_root: str) -> dict:
    """The same task and trainer on the pooled data of all sites, evaluated after every epoch."""
    import torch

    from fedcycle.batches import join
    from fedcycle.config import RunSettings
    from fedcycle.tasks import load_task
    from fedcycle.trainer import TrainConfig, evaluate, pick_device, train

    config = run_config_for(study, run, data_root)
    settings = RunSettings.from_run_config(config)
    task = load_task(config)
    sites = [task.site_data({"partition-id": i, "num-partitions": run.sites}) for i in range(run.sites)]
    train_data, val_data = join([s[0] for s in sites]), join([s[1] for s in sites])
    test = task.test_data()
    torch.manual_seed(settings.seed)
    model = task.build_model()
    device = pick_device("auto")

    def accuracy_on(data) -> float:
        return evaluate(task, model, data, device, settings.batch_size)[1]["accuracy"]

    accuracy, val_accuracy, seconds = [accuracy_on(test)], [accuracy_on(val_data)], [0.0]
    started = time.perf_counter()
    for epoch in range(run.rounds(study.epoch_budget)):
        t = time.perf_counter()
        cfg = TrainConfig(settings.schedule, epochs=1, server_round=epoch + 1, epochs_before=epoch,
                          batch_size=settings.batch_size, optimizer=settings.optimizer, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, seed=settings.seed * 1_000 + epoch)
        train(task, model, train_data, cfg, device)
        accuracy.append(accuracy_on(test))
        val_accuracy.append(accuracy_on(val_data))
        seconds.append(time.perf_counter() - t)
    return {"accuracy": accuracy, "val_accuracy": val_accuracy, "seconds": seconds,
            "wall_seconds": time.perf_counter() - started, "run_config": config}


def write_summary(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)


def summarize(study: Study, run: PlannedRun, measured: dict, bytes_per_model: int) -> dict:
    from fedcycle.results import machine, versions

    val = [v for v in measured["val_accuracy"] if v is not None]
    return {
        "key": run.key, "profile": study.profile, "method": run.method, "split": run.split.name,
        "sites": run.sites if run.federated else None, "local_epochs": run.local_epochs if run.federated else None,
        "seed": run.seed, "lr": run.lr, "rounds": run.rounds(study.epoch_budget), "epochs": study.epoch_budget,
        "accuracy": measured["accuracy"], "val_accuracy": measured["val_accuracy"], "seconds": measured["seconds"],
        "final_accuracy": measured["accuracy"][-1], "best_accuracy": max(measured["accuracy"]),
        "final_val_accuracy": val[-1] if val else None,
        "wall_seconds": measured["wall_seconds"],
        # training traffic: each round a site receives the global model and sends its own back
        # (the study's per-round evaluation message adds one more download, not counted here)
        "bytes_per_site_per_round": 2 * bytes_per_model if run.federated else 0,
        "run_config": measured["run_config"], "versions": versions(), "machine": machine(),
    }


def run_study(study: Study, data_root: str = "", max_runs: int | None = None, log=print) -> int:
    """Run what is not done yet; return how many runs are still missing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcycle.local import LocalSimulation

    out = study.output_dir()
    runs_dir = out / "runs"
    done = load_done(runs_dir)
    bytes_per_model = model_bytes(study)
    budget = max_runs if max_runs is not None else sys.maxsize
    with tempfile.TemporaryDirectory(prefix="fedcycle-study-") as scratch, \
            LocalSimulation(Path(scratch) / "flwr-home") as sim, \
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        for phase in ("tuning", "comparison"):
            plan = tuning_plan(study) if phase == "tuning" else comparison_plan(study, choose(study, done))
            task = bar.add_task(f"{study.profile} {phase}", total=len(plan), completed=sum(r.key in done for r in plan))
            for run in plan:
                if run.key in done:
                    check_same_config(study, run, done[run.key], data_root)
                    continue
                if budget <= 0:
                    return _missing(study, done)
                bar.update(task, description=f"{study.profile} {phase}: {run.key}")
                measured = (run_federated(study, run, sim, data_root, Path(scratch)) if run.federated
                            else run_centralized(study, run, data_root))
                done[run.key] = summarize(study, run, measured, bytes_per_model)
                write_summary(runs_dir / f"{run.key}.json", done[run.key])
                budget -= 1
                bar.advance(task)
                log(f"{run.key}: final accuracy {done[run.key]['final_accuracy']:.4f} in {measured['wall_seconds']:.0f} s")
    return _missing(study, done)


VOLATILE_KEYS = ("results-dir", "run-name", "data-root")  # where a run ran, not what it computed


def check_same_config(study: Study, run: PlannedRun, summary: dict, data_root: str) -> None:
    """Refuse to reuse a finished run that was made with another study file (budget, data, model)."""
    planned = {k: v for k, v in run_config_for(study, run, data_root).items() if k not in VOLATILE_KEYS}
    saved = {k: v for k, v in summary.get("run_config", {}).items() if k not in VOLATILE_KEYS}
    if planned != saved:
        differ = sorted(k for k in planned.keys() | saved.keys() if planned.get(k) != saved.get(k))
        raise StudyError(
            f"runs/{run.key}.json was made with another run config (differs in {differ}); the study file changed "
            f"since. Move {study.output_dir() / 'runs'} away to start over, or restore the study file."
        )


def load_done(runs_dir: Path) -> dict[str, dict]:
    """The finished runs' summaries, by key."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*.json"))}


def _missing(study: Study, done: dict) -> int:
    tuning = tuning_plan(study)
    if any(r.key not in done for r in tuning):
        return sum(r.key not in done for r in tuning) + len(comparison_plan(study, {m: {} for m in METHODS}))
    return sum(r.key not in done for r in comparison_plan(study, choose(study, done)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcycle.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study file, e.g. studies/default.yaml")
    parser.add_argument("--data-root", default="", help="where decoded data is cached (default ~/.cache/fedcycle)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (run a study in parts)")
    parser.add_argument("--report-only", action="store_true", help="only write the report from the runs done")
    args = parser.parse_args(argv)
    exit_on_termination()
    try:
        study = Study.load(args.study)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        missing = 0 if args.report_only else run_study(study, args.data_root, args.max_runs)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fedcycle.report import write_report

    report = write_report(study, command=" ".join(["python -m fedcycle.study", *(argv or sys.argv[1:])]))
    print(f"report: {report}" + (f" ({missing} runs still to do; run the same command to continue)" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
