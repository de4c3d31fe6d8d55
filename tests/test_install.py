"""An installed fedcycle, not the checkout: the wheel's packages, run from a folder of their own,
prepare the data and complete a simulation whose results land in the folder it runs from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e  # builds a wheel and runs the `fedcycle` command as processes


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The wheel's two packages unpacked in a folder of their own, first on the path: what
    `pip install fedcycle-*.whl` puts in site-packages (the dependencies are this venv's)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(REPO)],
                   check=True, timeout=600)
    (wheel,) = out.glob("fedcycle-*.whl")
    site = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return {**os.environ, "PYTHONPATH": str(site)}


def fedcycle(env: dict[str, str], cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcycle_tools.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_the_apps_manifest_and_runs_from_its_own_packages(installed, tmp_path):
    where = subprocess.run(
        [sys.executable, "-c", "import fedcycle, fedcycle_tools.launcher as l; "
                               "print(fedcycle.__file__); print(l.project_file('pyproject.toml'))"],
        env=installed, cwd=tmp_path, capture_output=True, text=True, check=True)
    package, manifest = map(Path, where.stdout.split())
    site = Path(installed["PYTHONPATH"])
    assert package.is_relative_to(site) and manifest == site / "fedcycle_tools" / "project" / "pyproject.toml"
    assert not (site / "tests").exists() and (site / "fedcycle_tools" / "project" / "deploy").is_dir()


def test_an_installed_fedcycle_prepares_the_data_and_completes_a_simulation_from_another_folder(
        installed, tmp_path, data_root):
    work = tmp_path / "experiments"
    work.mkdir()
    prepared = fedcycle(installed, work, "prepare-data")
    assert prepared.returncode == 0 and "fashion-mnist train: 60000 images" in prepared.stdout, prepared.stderr
    out = fedcycle(installed, work, "simulate", "--sites", "2", "--run-config",
                   f"num-server-rounds=1 train-subset=200 test-subset=200 local-epochs=1 data-root='{data_root}' "
                   "run-name='installed' tracking='off'")
    assert out.returncode == 0 and "status: finished:completed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    run = work / "results" / "installed"  # under the folder it ran from, not the checkout's results/
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1] and (work / ".flwr-home").is_dir()
