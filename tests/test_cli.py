"""The `fedcycle` command that `pip install` puts beside the venv's Python: every verb answers
--help with its own options, and an unknown verb is one line naming the verbs there are."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedcycle_tools import launcher  # imports torch, which runs ldconfig once: here, not in a unit test
from fedcycle_tools.cli import VERBS, main

FEDCYCLE = Path(sys.executable).parent / "fedcycle"


@pytest.mark.e2e  # runs the `fedcycle` command as a process
def test_the_command_lists_its_verbs():
    out = subprocess.run([str(FEDCYCLE), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for verb in VERBS:
        assert f"\n  {verb} " in out.stdout


@pytest.mark.parametrize("verb, option", [
    ("simulate", "--sites"), ("centralize", "--epochs"), ("prepare-data", "-h"), ("deploy", "{certs,register,site,demo}"),
    ("study", "--max-runs"), ("report", "study"), ("bench", "--only"), ("demo-data", "{tabular,text,audio}"),
])
def test_each_verb_has_its_own_help(verb, option, capsys):
    with pytest.raises(SystemExit) as done:
        main([verb, "--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: fedcycle {verb}") and option in printed


@pytest.mark.e2e  # runs the `fedcycle` command as a process
def test_a_deploy_step_has_its_own_help():
    out = subprocess.run([str(FEDCYCLE), "deploy", "site", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: fedcycle deploy site") and "--node-config" in out.stdout


def test_an_unknown_verb_names_the_verbs(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedcycle: unknown verb 'train'; choose one of {', '.join(VERBS)}"


# -- simulate and centralize: what they read and refuse before anything starts, what they print --

CLINIC = '''
from torch import nn

class Clinic:
    primary_metric = ("mae", "min")
    run_config_defaults = {"clinic.hidden": 32, "clinic.note": "it's", "clinic.scale": 1e-05, "clinic.deep": False}

    def __init__(self, run_config):
        self.hidden = run_config["clinic.hidden"]

    def build_model(self):
        return nn.Linear(3, self.hidden)

    def site_data(self, node_config):
        return [], []

class Colliding(Clinic):
    run_config_defaults = {"image.model": "mine"}

class Nesting(Clinic):
    run_config_defaults = {"lr-max.peak": 0.1}
'''


@pytest.fixture
def clinic(tmp_path, monkeypatch, request):
    """A task module of the user's own in a folder of its own (the test's name: no module is reused)."""
    name = re.sub(r"\W", "_", f"clinic_{request.node.name}")
    (tmp_path / f"{name}.py").write_text(CLINIC)
    monkeypatch.syspath_prepend(str(tmp_path))  # restores sys.path after, also what --task-path added
    return name


def one_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


def test_the_node_config_reads_as_flower_reads_a_run_config():
    from fedcycle_tools.launcher import sites_node_config

    given = "train-file='/data/site-{partition-id}/train.pt' val-file=\"/data/v {num-partitions}.pt\" workers=2"
    assert sites_node_config(given) == {"train-file": "/data/site-{partition-id}/train.pt",
                                        "val-file": "/data/v {num-partitions}.pt", "workers": 2}
    assert sites_node_config("") == {}


@pytest.mark.parametrize("verb", ["simulate", "centralize"])
@pytest.mark.parametrize("text, message", [
    ("partition-id=1", "--node-config: 'partition-id' is the simulation's, set for each site; write {partition-id} "
                       "inside a value instead, e.g. train-file='/data/site-{partition-id}/train.pt'"),
    ("num-partitions=2 a=1", "--node-config: 'num-partitions' is the simulation's"),
    ("train-file=/data/a.pt", "--node-config: train-file=/data/a.pt does not read as TOML; a value is a number, "
                              "true or false, or text in quotes (train-file='...')"),
    ("train-file = '/data/a.pt'", "--node-config: 'train-file' is not a key=value pair"),
    ("a=1 a=2", "--node-config: 'a=1 a=2' does not read as TOML (a key given twice?)"),
    ("site-name='ward'", "--node-config: site-name='ward' would be every simulated site's, and each site needs its "
                         "own; put {partition-id} in it, e.g. site-name='site-{partition-id}'"),
    ("privacy-ledger='/tmp/l.json'", "--node-config: privacy-ledger='/tmp/l.json' would be every simulated site's"),
])
def test_a_node_config_it_cannot_use_is_one_line_before_anything_starts(verb, text, message, tmp_path, capsys):
    assert main([verb, "--node-config", text, "--flwr-home" if verb == "simulate" else "--epochs",
                 str(tmp_path / "home") if verb == "simulate" else "1"]) == 2
    assert one_error(capsys).startswith(message)
    assert not (tmp_path / "home").exists()


def test_a_run_config_that_does_not_parse_is_one_line(capsys):
    assert main(["simulate", "--run-config", "num-server-rounds=3 run-name=first"]) == 2
    assert one_error(capsys) == ("--run-config: run-name=first does not read as TOML; a value is a number, true or "
                                 "false, or text in quotes (run-name='...')")


def test_an_undeclared_key_is_named_with_its_close_matches_and_where_keys_are_declared(clinic, tmp_path, capsys):
    task = f"task='{clinic}:Clinic'"
    assert main(["simulate", "--task-path", str(tmp_path), "--run-config", f"{task} clinic.hiden=64"]) == 2
    assert one_error(capsys) == (
        "run config key 'clinic.hiden' is unknown (did you mean 'clinic.hidden'?); fedcycle's keys are declared in "
        "its pyproject.toml (docs/configuration.md lists them), a task's own in its class's run_config_defaults "
        f"(task='{clinic}:Clinic' declares ['clinic.hidden', 'clinic.note', 'clinic.scale', 'clinic.deep'])")
    assert main(["centralize", "--run-config", "num-server-round=3"]) == 2  # the default task declares none
    assert one_error(capsys).startswith("run config key 'num-server-round' is unknown (did you mean "
                                        "'num-server-rounds'?); fedcycle's keys are declared")


def test_a_tasks_own_keys_join_the_run_config_and_the_staged_app(clinic, tmp_path):
    import tomllib

    from fedcycle_tools.launcher import app_folder, full_run_config, project_file, task_keys

    config = full_run_config(f"task='{clinic}:Clinic' clinic.hidden=64")
    assert config["clinic.hidden"] == 64 and config["clinic.note"] == "it's" and config["lr-max"] == 0.05
    shipped = tomllib.loads(project_file("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    with app_folder(task_keys=task_keys(f"{clinic}:Clinic")) as staged:
        declared = tomllib.loads((staged / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == {**shipped, "clinic": {"hidden": 32, "note": "it's", "scale": 1e-05, "deep": False}}
    with app_folder() as staged:  # no task keys: fedcycle's file as it is
        assert (staged / "pyproject.toml").read_text() == project_file("pyproject.toml").read_text()


@pytest.mark.parametrize("task, key, theirs", [("Colliding", "image.model", "image.model"),
                                               ("Nesting", "lr-max.peak", "lr-max")])
def test_a_task_key_that_is_fedcycles_is_refused(clinic, tmp_path, capsys, task, key, theirs):
    assert main(["simulate", "--task-path", str(tmp_path), "--run-config", f"task='{clinic}:{task}'"]) == 2
    assert one_error(capsys) == (f"task='{clinic}:{task}': run_config_defaults key {key!r} collides with fedcycle's "
                                 f"run-config key {theirs!r}; give the task's keys a table of its own "
                                 "(e.g. 'clinic.hidden')")


def test_the_simulation_hands_every_site_the_node_config(tmp_path):
    from fedcycle.site import NODE_CONFIG_VARIABLE, simulated_node_config
    from fedcycle_tools.launcher import LocalSimulation

    given = {"train-file": "/data/site-{partition-id}-of-{num-partitions}.pt", "workers": 2}
    sim = LocalSimulation(tmp_path / "home", node_config=given)  # started by `with` or start(): not here
    site = simulated_node_config({"partition-id": 1, "num-partitions": 2}, environ=sim.env)
    assert site == {"train-file": "/data/site-1-of-2.pt", "workers": 2, "partition-id": 1, "num-partitions": 2}
    # none given: none from the shell either
    stale = LocalSimulation(tmp_path / "home", node_config=None)
    assert stale.env[NODE_CONFIG_VARIABLE] == "{}"


def test_centralize_hands_the_pooled_sites_the_node_config(tmp_path, monkeypatch, capsys):
    import json

    seen = {}

    def pooled(config, sites, epochs, progress=None, node_config=None):
        seen.update(sites=sites, node_config=node_config)
        return {"task": "fashion-mnist", "metric": "accuracy", "test": [0.1], "validation": [0.1], "seconds": [0.0],
                "wall_seconds": 0.0}

    monkeypatch.setattr(launcher, "train_centralized", pooled)
    assert main(["centralize", "--sites", "3", "--epochs", "1", "--node-config", "data-dir='/d/{partition-id}'",
                 "--run-config", f"results-dir='{tmp_path}' run-name='pooled'"]) == 0
    assert seen == {"sites": 3, "node_config": {"data-dir": "/d/{partition-id}"}}
    record = json.loads((tmp_path / "pooled" / "centralized.json").read_text())
    assert record["node_config"] == {"data-dir": "/d/{partition-id}"}


@pytest.mark.parametrize("verb", ["simulate", "centralize"])
def test_help_says_where_results_go_and_what_partition_id_is(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "{partition-id} becomes the site's number (0 to --sites minus 1)" in printed
    assert "named after its task, under results-dir: 'results' in the folder you run from" in printed


def write_rounds(folder, *lines) -> None:
    import json

    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def a_round(number: int, source: str | None, mae: float | None, sites=(), **extra) -> dict:
    return {"round": number, "primary_metric": "mae", "mae": mae, "loss": None if mae is None else 2 * mae,
            "metrics_source": source, "seconds": 1.0, "sites": list(sites), "events": [], **extra}


def printed_table(outcome, capsys) -> str:
    from fedcycle_tools.launcher import print_results

    print_results(outcome)
    return capsys.readouterr().out


def test_the_table_says_validation_without_a_test_set_and_the_sites_training_loss(tmp_path, capsys):
    from fedcycle_tools.launcher import RunOutcome

    sites = [{"train-loss": 1.0, "num-examples": 100}, {"train-loss": 4.0, "num-examples": 300}]
    write_rounds(tmp_path / "run", a_round(0, "sites-weighted", 0.9), a_round(1, "sites-weighted", 0.5, sites))
    out = printed_table(RunOutcome(7, "finished:completed", tmp_path / "run", ""), capsys)
    assert "validation mae" in out and "validation loss" in out and "test mae" not in out
    assert "validation: the sites' held-out data, weighted by examples (no test set)" in out
    row = next(line for line in out.splitlines() if line.startswith("│     1 "))
    assert [cell.strip() for cell in row.split("│")[2:5]] == ["0.5000", "1.0000", "3.2500"]  # (100 + 1200) / 400
    assert out.rstrip().endswith("status: finished:completed") and "failed" not in out


def test_a_failed_run_shows_its_failed_round_and_why(tmp_path, capsys):
    from fedcycle_tools.launcher import RunOutcome

    reason = "[code: 15] site partition 1/2: BloodPressure.train() raised KeyError: 'x'"
    write_rounds(tmp_path / "run", a_round(0, "server-test", 0.9), a_round(1, None, None, failed=reason))
    out = printed_table(RunOutcome(7, "finished:failed", tmp_path / "run", "", tmp_path / "run" / "site-errors.log"),
                        capsys)
    assert "test mae" in out and "test loss" in out and "validation" not in out
    assert next(line for line in out.splitlines() if line.startswith("│     1 ")).split("│")[2].strip() == "failed"
    lines = out.splitlines()
    assert lines[lines.index(f"round 1 failed: {reason}") - 1].startswith("└")  # the line after the table
    assert f"sites' tracebacks: {tmp_path / 'run' / 'site-errors.log'}" in lines


def test_the_sites_tracebacks_move_into_the_runs_folder(tmp_path):
    from fedcycle_tools.launcher import LocalSimulation, RunOutcome

    sim = LocalSimulation(tmp_path / "home")
    run = tmp_path / "results" / "run"
    run.mkdir(parents=True)
    assert sim.keep_site_errors(RunOutcome(1, "finished:completed", run, "")).site_errors is None
    sim.site_log.parent.mkdir(parents=True)
    sim.site_log.write_text("Traceback (most recent call last):\n")
    kept = sim.keep_site_errors(RunOutcome(1, "finished:failed", run, "")).site_errors
    assert kept == run / "site-errors.log" and kept.read_text().startswith("Traceback") and not sim.site_log.exists()
    sim.site_log.write_text("Traceback (most recent call last):\n")  # no run folder: it stays where it is
    assert sim.keep_site_errors(RunOutcome(None, "not started", None, "")).site_errors == sim.site_log
