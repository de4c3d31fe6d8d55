"""Running a study's planned runs: federated through fedcycle's own ServerApp and ClientApp in
Flower's simulation, centralized with the same trainer on the pooled data; each leaves a summary.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from fedcycle import tracking
from fedcycle.files import atomic_write
from fedcycle.results import load_model, machine, read_metrics, versions
from fedcycle.tracking import log_finished_run
from fedcycle.wire import SCREEN_EVENTS
from fedcycle_tools.centralized import (
    pooled_site_data,
    primary_value,
    train_centralized,
)
from fedcycle_tools.launcher import LocalSimulation, toml_value
from fedcycle_tools.study.plan import (
    GRID_OF,
    PlannedRun,
    Study,
    check_same_config,
    choose,
    comparison_plan,
    load_done,
    missing_runs,
    model_bytes,
    run_config_for,
    tuning_plan,
)


def mlflow_store(study: Study) -> tuple[str, str | None]:
    """The study's MLflow store and artifact location: its own server, or SQLite in its output folder."""

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
    outcome = sim.run(run.sites, " ".join(f"{k}={toml_value(v)}" for k, v in config.items()), stream=False)
    wall = time.perf_counter() - started
    if not outcome.completed:
        raise RuntimeError(f"{run.key}: run {outcome.run_id} ended {outcome.status}:\n{outcome.log[-2000:]}")

    rounds = read_metrics(outcome.results_dir / "metrics.jsonl")
    measured = {
        "accuracy": [r["accuracy"] for r in rounds],
        "val_accuracy": [(r.get("sites_evaluation") or {}).get("accuracy") for r in rounds],
        "seconds": [r["seconds"] for r in rounds],
        "wall_seconds": wall,
        "run_config": config,
        # every site is honest here: what the reply screen left out or capped is a false alarm
        "screened": {kind: sum(1 for r in rounds for e in r.get("events", []) if e["event"] == kind)
                     for kind in SCREEN_EVENTS},
        "replies": sum(len(r.get("sites", [])) for r in rounds) + sum(
            1 for r in rounds for e in r.get("events", []) if e["event"] == "rejected"),
        # every site's bytes of arrays, received and sent, per round (round 0: the initial evaluation)
        "bytes": [{exchange: sum(n for site in sites.values() for n in site.values())
                   for exchange, sites in (r.get("bytes") or {}).items()} for r in rounds],
    }
    if config.get("swa-start"):
        # The server's mean of cycle ends is the model this recipe delivers; its validation
        # accuracy (for tuning) on the sites' held-out data, pooled: what the sites' own
        # example-weighted evaluation gives, measured here from the saved model.

        measured["swa_accuracy"] = [(r.get("swa") or {}).get("accuracy") for r in rounds]

        task, _, val_data = pooled_site_data(config, run.sites)
        model = task.build_model()
        model.load_state_dict(load_model(outcome.results_dir / "global-swa.safetensors"))
        measured["swa_val_accuracy"] = accuracy_of(task, model, val_data, config)
    return measured


def accuracy_of(task, model, data, config: dict) -> float:
    return primary_value(task, model, data, config.get("batch-size", 64))


def run_centralized(study: Study, run: PlannedRun, data_root: str) -> dict:
    """fedcycle_tools.centralized's baseline on the run's pooled data, evaluated after every epoch."""

    config = run_config_for(study, run, data_root)
    result = train_centralized(config, run.sites, study.rounds_of(run))
    if study.tracking == "mlflow":

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
    from mlflow.tracking import MlflowClient  # noqa: I001 - lazily: MLflow is the optional `mlflow` extra


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
    atomic_write(path, json.dumps(summary, indent=1).encode())


def summarize(study: Study, run: PlannedRun, measured: dict, bytes_per_model: int) -> dict:
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
        "seed": run.seed, "lr": run.lr, "rounds": study.rounds_of(run),
        "epochs": study.rounds_of(run) * run.local_epochs if run.federated else study.epoch_budget,
        "accuracy": accuracy, "val_accuracy": measured["val_accuracy"], "seconds": measured["seconds"],
        **averaged,
        **{k: measured[k] for k in ("screened", "replies") if k in measured},
        "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
        "final_val_accuracy": val[-1] if val else None,
        "wall_seconds": measured["wall_seconds"],
        # training traffic: each round a site receives the global model and sends its own back
        # (the study's per-round evaluation message adds one more download, not counted here)
        "bytes_per_site_per_round": 2 * bytes_per_model if run.federated else 0,
        **({} if "bytes" not in measured else {
            "bytes": measured["bytes"],
            # all sites' training traffic in a round, as measured: what a round costs the federation
            "bytes_per_round": statistics.fmean(b.get("train", 0) for b in measured["bytes"][1:]),
        }),
        # how the centralized baseline was trained (summaries made before had a new optimizer every epoch)
        **({} if run.federated else {"optimizer": "one for the whole run"}),
        "run_config": measured["run_config"], "versions": versions(), "machine": machine(),
    }


def planned(study: Study, phase: str, done: dict[str, dict]) -> list[PlannedRun]:
    return tuning_plan(study) if phase == "tuning" else comparison_plan(study, choose(study, done), done)


def run_study(study: Study, data_root: str = "", max_runs: int | None = None, log=print) -> int:
    """Run what is not done yet, the study's then its parts'; return how many runs are still missing."""
    budget, missing = max_runs if max_runs is not None else sys.maxsize, 0
    for part in (study, *study.parts):
        before = len(load_done(part.output_dir() / "runs"))
        if budget <= 0:
            missing += missing_runs(part, load_done(part.output_dir() / "runs"))
            continue
        missing += run_one_study(part, data_root, budget, log)
        budget -= len(load_done(part.output_dir() / "runs")) - before
    return missing


def run_one_study(study: Study, data_root: str, budget: int, log) -> int:
    out = study.output_dir()
    runs_dir = out / "runs"
    done = load_done(runs_dir)
    log_missing_to_mlflow(study, done)
    bytes_per_model = model_bytes(study)
    study.make_demo_data(data_root)
    with tempfile.TemporaryDirectory(prefix="fedcycle-study-") as scratch, \
            LocalSimulation(Path(scratch) / "flwr-home") as sim, \
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        for phase in ("tuning", "comparison"):
            task = bar.add_task(f"{study.profile} {phase}")
            for run in planned(study, phase, done):
                if run.key in done:
                    check_same_config(study, run, done[run.key], data_root)
            # planned again after every run: the comparison grows where its finished runs are too close to call
            while True:
                plan = planned(study, phase, done)
                bar.update(task, total=len(plan), completed=sum(r.key in done for r in plan))
                run = next((r for r in plan if r.key not in done), None)
                if run is None:
                    break
                if budget <= 0:
                    return missing_runs(study, done)
                bar.update(task, description=f"{study.profile} {phase}: {run.key}")
                measured = (run_federated(study, run, sim, data_root, Path(scratch)) if run.federated
                            else run_centralized(study, run, data_root))
                done[run.key] = summarize(study, run, measured, bytes_per_model)
                write_summary(runs_dir / f"{run.key}.json", done[run.key])
                budget -= 1
                log(f"{run.key}: final accuracy {done[run.key]['final_accuracy']:.4f} in {measured['wall_seconds']:.0f} s")
    return missing_runs(study, done)


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
