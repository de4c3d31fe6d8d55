"""The `fedcycle` command that `pip install` puts beside the venv's Python: every verb answers
--help with its own options, and an unknown verb is one line naming the verbs there are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
