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

from fedcycle.study import Study, StudyError, comparison_plan, tuning_plan

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
run_config:
  train-pool: 600
  test-subset: 300
  batch-size: 32
output: {output}
"""


def study_command(path: Path, data_root: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedcycle.study", str(path), "--data-root", data_root, *extra]


def summaries(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}


def test_an_interrupted_study_continues_without_redoing_finished_runs(tmp_path, data_root):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(output=tmp_path / "out"))
    study = Study.load(path)
    out = study.output_dir()
    assert len(tuning_plan(study)) == 4
    # The whole comparison is the tuning cell here, so it reuses the 4 tuning runs.
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
    assert 2 <= len(after_interrupt) <= 4
    assert not list((out / "runs").glob(".*.tmp")), "a half-written summary was left behind"
    for name in after_interrupt:
        json.loads((out / "runs" / name).read_text())  # every summary is whole

    # 3. Continue: only the missing runs are done, the finished ones stay as they were.
    rest = subprocess.run(study_command(path, data_root), capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0, rest.stderr
    final = summaries(out)
    assert len(final) == 4
    assert all(final[name] == stamp for name, stamp in after_interrupt.items())
    assert "runs still to do" not in rest.stdout
    report = (out / "REPORT.md").read_text()
    assert "4 of 4 tuning runs done" in report and "## iid" in report
    assert len(json.loads((out / "summary.json").read_text())) == 4


def test_bad_study_files_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(output=tmp_path).replace("epoch_budget: 1", "epoch_budget: 3").replace("local_epochs: [1]", "local_epochs: [2]"))
    with pytest.raises(StudyError, match="local_epochs 2 must be a positive divisor of epoch_budget=3"):
        Study.load(bad)
    bad.write_text("profile: x\n")
    with pytest.raises(StudyError, match="'splits' is missing"):
        Study.load(bad)


def test_a_finished_run_made_with_another_study_file_is_not_reused(tmp_path):
    from fedcycle.study import check_same_config, run_config_for

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(output=tmp_path / "out"))
    study = Study.load(path)
    run = tuning_plan(study)[0]
    saved = {"run_config": {**run_config_for(study, run, "/data"), "results-dir": "/elsewhere"}}
    check_same_config(study, run, saved, "/other-data")  # where it ran does not matter
    saved["run_config"]["train-pool"] = 60000
    with pytest.raises(StudyError, match=r"differs in \['train-pool'\]"):
        check_same_config(study, run, saved, "/data")
