"""The reproduction study: centralized vs FedAvg vs FedAvg + cyclical LR + more local epochs.

    python -m fedcycle.study studies/default.yaml          # or: make reproduce PROFILE=quick

A study file (YAML) names the data, the epoch budget, the grid of data centers, splits and
local epochs, the seeds and a small learning-rate grid. The study runs in two phases:

1. tuning: every method tries its grid at the tuning cell (4 sites, iid, one seed) and
   keeps the setting with the best final accuracy on the sites' held-out validation data
   (never the test set);
2. the comparison: every method in every cell with its chosen setting, the same number of
   epochs over the data for all (the federated ones in budget / local-epochs rounds).

Methods: `centralized-constant` and `centralized-cyclical` (fedcycle's trainer on the pooled
data of all sites, one optimizer for the whole run), `fedavg-constant`, `fedavg-cyclical` (the
paper's: a cycle per round) and, where the study file has a `fedcycle` grid, `fedcycle`: a
server-side recipe (an envelope on the peak, cycles across rounds, server momentum, the
server's mean of cycle ends). `--pilot EPOCHS` runs only centralized training, to choose the
epoch budget from where validation accuracy flattens.

Federated runs go through fedcycle's own ServerApp, strategy, ClientApp and trainer in
Flower's simulation (one SuperLink for the whole study); centralized runs are the same
trainer on the pooled data of all sites. Each finished run leaves a small JSON summary in
`runs/`; a run whose summary exists is not run again, so an interrupted study continues
where it stopped, on this machine or another.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fedcycle.local import REPO, exit_on_termination

METHODS = ("centralized-constant", "centralized-cyclical", "fedavg-constant", "fedavg-cyclical", "fedcycle")
# method -> the lr_grid entry it is tuned on; `fedcycle` (a server-side recipe: schedule
# envelope, cycles across rounds, server momentum, averaging of cycle ends) only where a
# study file has a `fedcycle` grid
GRID_OF = {"centralized-constant": "constant", "centralized-cyclical": "cyclical", "fedavg-constant": "constant",
           "fedavg-cyclical": "cyclical", "fedcycle": "fedcycle"}
# the keys a `fedcycle` recipe may set, besides lr-min/lr-max/cycle-rounds: run-config keys,
# `strategy` and its `<strategy>.<option>` keys, and when the server starts averaging cycle
# ends as a fraction of the run's rounds
RECIPE_KEYS = ("schedule", "lr-min", "lr-max", "cycle-rounds", "lr-envelope", "lr-decay", "lr-warmup-rounds",
               "swa-start-fraction", "strategy")


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
    repeat_seeds: tuple[int, ...]  # seeds for the repeat cells (tuning_sites sites, repeat_splits) in the comparison
    grid: dict[str, tuple[dict, ...]]  # "constant" / "cyclical" / "fedcycle" -> settings to try
    tuning_sites: int = 4
    repeat_splits: tuple[str, ...] = ("iid",)
    run_config: dict[str, Any] = field(default_factory=dict)  # shared run-config keys (subsets, batch size)
    output: str = ""
    tracking: str = "mlflow"  # every run into one MLflow experiment per profile, or "off"
    mlflow_tracking_uri: str = ""  # default: a SQLite store in the study's output folder

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
        if not {"constant", "cyclical"} <= set(grid) <= {"constant", "cyclical", "fedcycle"}:
            raise StudyError(
                f"{path}: 'lr_grid' needs 'constant' and 'cyclical', and may have 'fedcycle'; got {sorted(grid)}"
            )
        for recipe in grid.get("fedcycle", []):
            unknown = [k for k in recipe if k not in RECIPE_KEYS and "." not in k]
            if unknown:
                raise StudyError(f"{path}: lr_grid.fedcycle: {unknown} unknown; a recipe may set {list(RECIPE_KEYS)} "
                                 "and '<strategy>.<option>'")
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
            repeat_splits=tuple(raw.get("repeat_splits", ["iid"])),
            run_config=dict(raw.get("run_config", {})),
            output=raw.get("output", ""),
            tracking=raw.get("tracking", "mlflow"),
            mlflow_tracking_uri=raw.get("mlflow_tracking_uri", ""),
        )
        if study.tracking not in ("mlflow", "off"):
            raise StudyError(f"{path}: 'tracking' is {study.tracking!r}; choose 'mlflow' or 'off'")
        for le in study.local_epochs:
            if not isinstance(le, int) or le < 1 or study.epoch_budget % le:
                raise StudyError(f"{path}: local_epochs {le} must be a positive divisor of epoch_budget={study.epoch_budget}")
        unknown = set(study.repeat_splits) - {s.name for s in study.splits}
        if unknown:
            raise StudyError(f"{path}: repeat_splits {sorted(unknown)} are not among the splits")
        if study.tuning_sites not in study.sites or "iid" not in {s.name for s in study.splits}:
            raise StudyError(f"{path}: the tuning cell (tuning_sites={study.tuning_sites}, split 'iid') must be in the grid")
        return study

    @property
    def mlflow_experiment(self) -> str:
        return f"fedcycle-study-{self.profile}"

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHODS if GRID_OF[m] in self.grid)

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
        return not self.method.startswith("centralized")

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
    for method in study.methods:
        grid = study.grid[GRID_OF[method]]
        le = min(study.local_epochs)
        for lr in grid:
            runs.append(PlannedRun(method, iid, study.tuning_sites, le, study.seeds[0], dict(lr)))
    return runs


def comparison_plan(study: Study, chosen: dict[str, dict]) -> list[PlannedRun]:
    runs = []
    iid = next(s for s in study.splits if s.name == "iid")
    for method in study.methods[:2]:  # centralized: the pooled data of the tuning cell's sites, whatever the split
        for seed in sorted(set(study.seeds) | set(study.repeat_seeds)):
            runs.append(PlannedRun(method, iid, study.tuning_sites, 1, seed, chosen[method]))
    for split in study.splits:
        for sites in study.sites:
            repeat = split.name in study.repeat_splits and sites == study.tuning_sites
            seeds = study.repeat_seeds if repeat else study.seeds
            for le in study.local_epochs:
                for method in study.methods[2:]:
                    for seed in seeds:
                        runs.append(PlannedRun(method, split, sites, le, seed, chosen[method]))
    return runs


def choose(study: Study, summaries: dict[str, dict]) -> dict[str, dict]:
    """Per method, the lr setting with the best final validation accuracy in tuning."""
    chosen = {}
    for method in study.methods:
        tried = [(summaries[r.key]["final_val_accuracy"], i, r.lr) for i, r in enumerate(tuning_plan(study))
                 if r.method == method and r.key in summaries]
        if tried:
            chosen[method] = max(tried, key=lambda t: (t[0], -t[1]))[2]
    return chosen


def lr_run_config(run: PlannedRun, rounds: int) -> dict[str, Any]:
    """The run-config keys for a run's learning-rate setting.

    A cyclical setting gives its cycle as `cycle-rounds` (federated: rounds of local
    training) and `cycle-epochs` (centralized: epochs over the pooled data). A `fedcycle`
    recipe adds its envelope, strategy and, as `swa-start-fraction`, the point of the run
    (a fraction of its rounds) from which the server averages the cycle ends."""
    if run.method == "fedcycle":
        recipe = {k: v for k, v in run.lr.items() if k not in ("schedule", "cycle-rounds", "swa-start-fraction")}
        return {
            "lr-schedule": run.lr.get("schedule", "triangular"),
            "lr-cycle-unit": "round",
            "lr-cycle-length": float(run.lr.get("cycle-rounds", 1)),
            **recipe,
            **({"swa-start": max(1, math.ceil(run.lr["swa-start-fraction"] * rounds))} if "swa-start-fraction" in run.lr else {}),
        }
    if GRID_OF[run.method] == "constant":
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
        **lr_run_config(run, run.rounds(study.epoch_budget)),
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


def mlflow_store(study: Study) -> tuple[str, str | None]:
    """The study's MLflow store and artifact location: its own server, or SQLite in its output folder."""
    from fedcycle import tracking

    return tracking.mlflow_store(study.mlflow_tracking_uri, study.output_dir())


def tracking_config(study: Study) -> dict[str, Any]:
    """The run-config keys that send a federated run's rounds to the study's MLflow experiment."""
    if study.tracking == "off":
        return {"tracking": "off"}
    return {"tracking": "mlflow", "mlflow-tracking-uri": mlflow_store(study)[0],
            "mlflow-experiment": study.mlflow_experiment}


def run_federated(study: Study, run: PlannedRun, sim, data_root: str, scratch: Path) -> dict:
    config = {**run_config_for(study, run, data_root), **tracking_config(study), "results-dir": str(scratch),
              "run-name": run.key}
    started = time.perf_counter()
    outcome = sim.run(run.sites, " ".join(f"{k}={_toml(v)}" for k, v in config.items()), stream=False)
    wall = time.perf_counter() - started
    if not outcome.completed:
        raise RuntimeError(f"{run.key}: run {outcome.run_id} ended {outcome.status}:\n{outcome.log[-2000:]}")
    from fedcycle.results import read_metrics

    rounds = read_metrics(outcome.results_dir / "metrics.jsonl")
    measured = {
        "accuracy": [r["accuracy"] for r in rounds],
        "val_accuracy": [(r.get("sites_evaluation") or {}).get("accuracy") for r in rounds],
        "seconds": [r["seconds"] for r in rounds],
        "wall_seconds": wall,
        "run_config": config,
        # every site is honest here: what the reply screen left out or capped is a false alarm
        "screened": {kind: sum(1 for r in rounds for e in r.get("events", []) if e["event"] == kind)
                     for kind in ("rejected", "clipped", "weight-capped", "missing")},
        "replies": sum(len(r.get("sites", [])) for r in rounds) + sum(
            1 for r in rounds for e in r.get("events", []) if e["event"] == "rejected"),
    }
    if config.get("swa-start"):
        # The server's mean of cycle ends is the model this recipe delivers; its validation
        # accuracy (for tuning) on the sites' held-out data, pooled: what the sites' own
        # example-weighted evaluation gives, measured here from the saved model.
        from fedcycle.results import load_model

        measured["swa_accuracy"] = [(r.get("swa") or {}).get("accuracy") for r in rounds]
        from fedcycle.centralized import pooled_site_data

        task, _, val_data = pooled_site_data(config, run.sites)
        model = task.build_model()
        model.load_state_dict(load_model(outcome.results_dir / "global-swa.safetensors"))
        measured["swa_val_accuracy"] = accuracy_of(task, model, val_data, config)
    return measured


def accuracy_of(task, model, data, config: dict) -> float:
    from fedcycle.centralized import primary_value

    return primary_value(task, model, data, config.get("batch-size", 64))


def run_centralized(study: Study, run: PlannedRun, data_root: str) -> dict:
    """fedcycle.centralized's baseline on the run's pooled data, evaluated after every epoch."""
    from fedcycle.centralized import train_centralized

    config = run_config_for(study, run, data_root)
    result = train_centralized(config, run.sites, run.rounds(study.epoch_budget))
    if study.tracking == "mlflow":
        from fedcycle.tracking import log_finished_run

        uri, artifacts = mlflow_store(study)
        log_finished_run(uri, study.mlflow_experiment, run.key, config,
                         {"global/accuracy": result["test"], "val/accuracy": result["validation"],
                          "epoch/seconds": result["seconds"]}, artifact_location=artifacts)
    return {"accuracy": result["test"], "val_accuracy": result["validation"], "seconds": result["seconds"],
            "wall_seconds": result["wall_seconds"], "run_config": config}


def log_missing_to_mlflow(study: Study, done: dict[str, dict]) -> None:
    """Finished runs the study's MLflow experiment lacks, logged from their summaries: the
    summaries are committed, the MLflow store is not, so a study continued on another machine
    (or after its store was deleted) would otherwise show only the runs made there."""
    if study.tracking != "mlflow" or not done:
        return
    from mlflow.tracking import MlflowClient

    from fedcycle.tracking import log_finished_run

    uri, artifacts = mlflow_store(study)
    name, client = study.mlflow_experiment, MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    logged = set() if experiment is None else {
        r.info.run_name for r in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")}
    for key, summary in sorted(done.items()):
        if key in logged:
            continue
        unit = "round" if summary.get("sites") else "epoch"
        steps = {"global/accuracy": summary.get("global_accuracy", summary["accuracy"]),
                 "val/accuracy": summary["val_accuracy"], f"{unit}/seconds": summary["seconds"]}
        if "swa_accuracy" in summary:
            steps["swa/accuracy"] = summary["swa_accuracy"]
        log_finished_run(uri, name, key, summary["run_config"], steps, artifact_location=artifacts)


def write_summary(path: Path, summary: dict) -> None:
    from fedcycle.files import atomic_write

    atomic_write(path, json.dumps(summary, indent=1).encode())


def summarize(study: Study, run: PlannedRun, measured: dict, bytes_per_model: int) -> dict:
    from fedcycle.results import machine, versions

    val = [v for v in measured["val_accuracy"] if v is not None]
    accuracy, averaged = measured["accuracy"], {}
    if "swa_accuracy" in measured:
        # the recipe delivers the server's mean of cycle ends, once it holds a model
        delivered = [g if a is None else a for g, a in zip(accuracy, measured["swa_accuracy"])]
        averaged = {"global_accuracy": accuracy, "swa_accuracy": measured["swa_accuracy"],
                    "swa_val_accuracy": measured["swa_val_accuracy"]}
        accuracy, val = delivered, [measured["swa_val_accuracy"]]
    return {
        "key": run.key, "profile": study.profile, "method": run.method, "split": run.split.name,
        "sites": run.sites if run.federated else None, "local_epochs": run.local_epochs if run.federated else None,
        "seed": run.seed, "lr": run.lr, "rounds": run.rounds(study.epoch_budget), "epochs": study.epoch_budget,
        "accuracy": accuracy, "val_accuracy": measured["val_accuracy"], "seconds": measured["seconds"],
        **averaged,
        **{k: measured[k] for k in ("screened", "replies") if k in measured},
        "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
        "final_val_accuracy": val[-1] if val else None,
        "wall_seconds": measured["wall_seconds"],
        # training traffic: each round a site receives the global model and sends its own back
        # (the study's per-round evaluation message adds one more download, not counted here)
        "bytes_per_site_per_round": 2 * bytes_per_model if run.federated else 0,
        # how the centralized baseline was trained (summaries made before had a new optimizer every epoch)
        **({} if run.federated else {"optimizer": "one for the whole run"}),
        "run_config": measured["run_config"], "versions": versions(), "machine": machine(),
    }


def run_study(study: Study, data_root: str = "", max_runs: int | None = None, log=print) -> int:
    """Run what is not done yet; return how many runs are still missing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcycle.local import LocalSimulation

    out = study.output_dir()
    runs_dir = out / "runs"
    done = load_done(runs_dir)
    log_missing_to_mlflow(study, done)
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


def run_pilot(study: Study, epochs: int, data_root: str = "", log=print) -> Path:
    """Centralized training at `epochs` epochs, with the first setting of each centralized
    method's grid, to choose a study's epoch budget: where validation accuracy has flattened
    (`flattened_epoch`). Summaries go to `<output>/pilot/`; a finished one is not run again."""
    pilot = replace(study, epoch_budget=epochs)
    out = study.output_dir() / "pilot"
    runs = [PlannedRun(m, study.splits[0], study.tuning_sites, 1, study.seeds[0], dict(study.grid[GRID_OF[m]][0]))
            for m in study.methods if m.startswith("centralized")]
    lines = [f"# Pilot: centralized training for {epochs} epochs ({study.profile})", "",
             "Flattened: the first epoch after which the best validation accuracy so far never improves by "
             f"{100 * FLAT:g} points or more. Validation data only; never the test set.", "",
             "| method | lr setting | validation accuracy every 5 epochs | best | flattened at epoch |", "|---|---|---|---|---|"]
    for run in runs:
        path = out / f"{run.key}.json"
        if not path.exists():
            write_summary(path, summarize(pilot, run, run_centralized(pilot, run, data_root), 0))
        summary = json.loads(path.read_text())
        val = summary["val_accuracy"]
        every = ", ".join(f"{v:.4f}" for v in val[5::5])
        lines.append(f"| {run.method} | `{run.lr}` | {every} | {max(val):.4f} | {flattened_epoch(val)} |")
        log(f"pilot {run.key}: best validation accuracy {max(val):.4f}, flattened at epoch {flattened_epoch(val)}")
    report = out / "PILOT.md"
    report.write_text("\n".join(lines) + "\n")
    return report


FLAT = 0.002  # "flattened": later epochs improve the best validation accuracy by less than 0.2 points


def flattened_epoch(val_accuracy: list[float]) -> int:
    """The first epoch e after which no later epoch beats the best so far by FLAT or more."""
    for epoch in range(len(val_accuracy)):
        if max(val_accuracy[epoch:]) - max(val_accuracy[: epoch + 1]) < FLAT:
            return epoch
    return len(val_accuracy) - 1


# where a run ran and where it was watched, not what it computed
VOLATILE_KEYS = ("results-dir", "run-name", "data-root", "tracking", "mlflow-tracking-uri", "mlflow-experiment")


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
        return sum(r.key not in done for r in tuning) + len(comparison_plan(study, {m: {} for m in study.methods}))
    return sum(r.key not in done for r in comparison_plan(study, choose(study, done)))


def main(argv: list[str] | None = None, prog: str = "python -m fedcycle.study") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study file, e.g. studies/default.yaml")
    parser.add_argument("--data-root", default="", help="where decoded data is cached (default ~/.cache/fedcycle)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (run a study in parts)")
    parser.add_argument("--report-only", action="store_true", help="only write the report from the runs done")
    parser.add_argument("--pilot", type=int, metavar="EPOCHS", default=0,
                        help="only run centralized training this many epochs, to choose epoch_budget (writes pilot/PILOT.md)")
    args = parser.parse_args(argv)
    exit_on_termination()
    try:
        study = Study.load(args.study)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.pilot:
        print(f"pilot: {run_pilot(study, args.pilot, args.data_root)}")
        return 0
    try:
        missing = 0 if args.report_only else run_study(study, args.data_root, args.max_runs)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fedcycle.report import write_report

    report = write_report(study, command=" ".join([prog, *(argv if argv is not None else sys.argv[1:])]))
    print(f"report: {report}" + (f" ({missing} runs still to do; run the same command to continue)" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
