"""The study runner: real runs (centralized in-process, federated through `flwr run`), stopped and
continued without redoing what finished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedcycle_tools.study.plan import Study, StudyError, comparison_plan, tuning_plan

TINY = """
profile: tiny
dataset: fashion-mnist
model: small-cnn
epoch_budget: 1
sites: [2]
tuning_sites: 2
local_epochs: [1]
splits:
  - {{name: iid, partitioner: iid}}
seeds: [0]
lr_grid:
  constant: [{{lr-max: 0.05}}]
  cyclical: [{{lr-min: 0.005, lr-max: 0.1, cycle-rounds: 1, cycle-epochs: 1}}]
  fedcycle: [{{lr-min: 0.005, lr-max: 0.1, lr-envelope: exponential, lr-decay: 0.5, swa-start-fraction: 0.5}}]
run_config:
  train-pool: 600
  test-subset: 300
  batch-size: 32
output: {output}
"""


def study_command(path: Path, data_root: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedcycle_tools.study", str(path), "--data-root", data_root, *extra]


def summaries(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}


@pytest.mark.e2e  # runs `python -m fedcycle_tools.study` (and `flwr run`) as processes
def test_an_interrupted_study_continues_without_redoing_finished_runs(tmp_path, data_root):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(output=tmp_path / "out"))
    study = Study.load(path)
    out = study.output_dir()
    assert len(tuning_plan(study)) == 5
    # The whole comparison is the tuning cell here, so it reuses the 5 tuning runs.
    chosen = {r.method: r.lr for r in tuning_plan(study)}
    assert {r.key for r in comparison_plan(study, chosen)} == {r.key for r in tuning_plan(study)}

    # 1. Stop after one new run (running a study in parts).
    part = subprocess.run(study_command(path, data_root, "--max-runs", "1"), capture_output=True, text=True, timeout=600)
    assert part.returncode == 0, part.stderr
    first = summaries(out)
    assert len(first) == 1 and "runs still to do" in part.stdout

    # 2. Interrupt it for real while a federated run is going: SIGTERM, as a CI timeout or `kill`
    #    sends (SIGINT is ignored by jobs a non-interactive shell starts in the background).
    proc = subprocess.Popen(study_command(path, data_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(summaries(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)  # into the next run, a federated one
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    after_interrupt = summaries(out)
    assert 2 <= len(after_interrupt) <= 5
    assert not list((out / "runs").glob(".*.tmp")), "a half-written summary was left behind"
    for name in after_interrupt:
        json.loads((out / "runs" / name).read_text())  # every summary is whole

    # 3. Continue, as on a fresh clone (the summaries are committed, the MLflow store is not):
    #    only the missing runs are done, the finished ones stay as they were.
    (out / "mlflow.db").unlink()
    rest = subprocess.run(study_command(path, data_root), capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0, rest.stderr
    final = summaries(out)
    assert len(final) == 5
    assert all(final[name] == stamp for name, stamp in after_interrupt.items())
    assert "runs still to do" not in rest.stdout
    report = (out / "REPORT.md").read_text()
    assert "5 of 5 tuning runs done" in report and "## iid" in report
    assert len(json.loads((out / "summary.json").read_text())) == 5
    # fedcycle's recipe: the envelope and the server's mean of cycle ends, from half the run on
    ours = json.loads(next((out / "runs").glob("fedcycle-*.json")).read_text())
    assert ours["run_config"]["swa-start"] == 1 and ours["run_config"]["lr-envelope"] == "exponential"
    assert ours["swa_accuracy"][0] is None and ours["swa_accuracy"][1] == ours["final_accuracy"]
    assert 0 < ours["final_val_accuracy"] == ours["swa_val_accuracy"] <= 1
    assert "## fedcycle's recipe, cell by cell" in report
    assert ours["screened"] == {"rejected": 0, "clipped": 0, "weight-capped": 0, "failed": 0,
                                "missing": 0} and ours["replies"] == 2  # 2 sites, 1 round
    assert "## The reply screen on honest runs" in report
    # every run is also in the study's MLflow experiment, once, by its key: the centralized ones
    # per epoch, the federated ones per round; those finished before the store was deleted,
    # logged again from their summaries
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedcycle-study-tiny")
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FINISHED")
    assert names == sorted(name.removesuffix(".json") for name in final)
    finished = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FINISHED"}
    for key, run in finished.items():
        history = client.get_metric_history(run.info.run_id, "global/accuracy")
        summary = json.loads((out / "runs" / f"{key}.json").read_text())
        assert [m.value for m in history] == pytest.approx(summary.get("global_accuracy", summary["accuracy"]))


def test_bad_study_files_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(output=tmp_path).replace("epoch_budget: 1", "epoch_budget: 3").replace("local_epochs: [1]", "local_epochs: [2]"))
    with pytest.raises(StudyError, match="local_epochs 2 must be a positive divisor of epoch_budget=3"):
        Study.load(bad)
    bad.write_text("profile: x\n")
    with pytest.raises(StudyError, match="'splits' is missing"):
        Study.load(bad)


def test_a_finished_run_made_with_another_study_file_is_not_reused(tmp_path):
    from fedcycle_tools.study.plan import check_same_config, run_config_for

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(output=tmp_path / "out"))
    study = Study.load(path)
    run = tuning_plan(study)[0]
    saved = {"run_config": {**run_config_for(study, run, "/data"), "results-dir": "/elsewhere"}}
    check_same_config(study, run, saved, "/other-data")  # where it ran does not matter
    saved["run_config"]["train-pool"] = 60000
    with pytest.raises(StudyError, match=r"differs in \['train-pool'\]"):
        check_same_config(study, run, saved, "/data")


def test_the_centralized_baseline_keeps_one_optimizer_and_its_momentum_across_epochs(tmp_path, data_root):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fedcycle_tools.study.runs import run_centralized

    path = tmp_path / "two-epochs.yaml"
    path.write_text(TINY.format(output=tmp_path / "out").replace("epoch_budget: 1", "epoch_budget: 2"))
    study = Study.load(path)
    run = next(r for r in tuning_plan(study) if r.method == "centralized-constant")
    steps = []  # (optimizer, its first parameter's momentum buffer before the step)

    def before_step(optimizer, args, kwargs):
        first = optimizer.param_groups[0]["params"][0]
        buffer = optimizer.state.get(first, {}).get("momentum_buffer")
        steps.append((id(optimizer), None if buffer is None else buffer.clone()))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        measured = run_centralized(study, run, data_root)
    finally:
        handle.remove()
    per_epoch = -(-540 // 32)  # 600 pooled images, 10% held out, batches of 32
    assert len(steps) == 2 * per_epoch and len(measured["accuracy"]) == 3  # before training, after each epoch
    assert len({opt for opt, _ in steps}) == 1  # one optimizer for the whole run
    carried = steps[per_epoch][1]  # the second epoch's first step finds the first epoch's momentum
    assert carried is not None and carried.abs().sum() > 0
