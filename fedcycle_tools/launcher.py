"""Run a fedcycle simulation on this machine with a SuperLink this process owns.

`flwr run .` on its own starts a detached local SuperLink that outlives it, shares one
port per machine and installs app dependencies at run time (which fails offline). This
launcher gives each job its own FLWR_HOME and ports, starts that SuperLink itself (so
`flwr run` uses it and it can be stopped by PID), turns runtime installs off, streams the
run's log, reads the run's real status from `flwr ls` (`flwr run` exits 0 even for a
failed run), prints the results table and stops everything it started.

    python -m fedcycle_tools.launcher simulate --sites 4 --run-config "num-server-rounds=3"
    python -m fedcycle_tools.launcher prepare-data

It runs the app that fedcycle ships (`shipped_app`), from a source checkout or an installed
wheel alike, with the task's own run-config keys declared in it, and works in the current folder:
`.flwr-home/` and the run's `results/` go there.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import click
import httpx
import torch
from flwr.common.config import parse_config_args
from rich.console import Console
from rich.table import Table

import fedcycle
import fedcycle_tools
from fedcycle.client_app import SITE_LOG_VARIABLE
from fedcycle.config import RENAMED_KEYS, RunSettings, current_keys
from fedcycle.errors import ConfigError, TaskError
from fedcycle.files import atomic_write
from fedcycle.metrics_lines import train_loss
from fedcycle.results import machine, read_metrics, versions
from fedcycle.site import NODE_CONFIG_VARIABLE, add_task_path
from fedcycle.strategies import check_strategy
from fedcycle.tasks import load_task, resolve, run_config_defaults
from fedcycle.tasks.image.datasets import data_root, load
from fedcycle.tasks.image.settings import ImageSettings
from fedcycle.tracking import check_tracking
from fedcycle_tools.centralized import train_centralized


def project_file(relative: str) -> Path:
    """A file of fedcycle's project root (its pyproject.toml, deploy/...): in place in a source
    checkout; an installed wheel carries a copy under fedcycle_tools/project/."""
    shipped = Path(fedcycle_tools.__file__).parent / "project" / relative
    return shipped if shipped.exists() else Path(fedcycle.__file__).resolve().parent.parent / relative


@dataclass
class RunOutcome:
    run_id: int | None
    status: str
    results_dir: Path | None
    log: str
    site_errors: Path | None = None  # the sites' tracebacks, when a site's code raised

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


class ProcessGroup:
    """Processes started here, each in its own session with its own log file, stopped by PID.

    A process's session id is its PID, so stopping the session also stops what it spawned
    (the ServerApp, ClientApps, Ray), even after the leader has exited; a descendant that
    started a session of its own (a simulation SuperLink's SuperExec, and under it the
    simulation and Ray) is stopped with it.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_until(self, name: str, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `ready` until true; raise with the log's tail if the process exits or time runs out."""
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before {what}:\n{self.tail(name)}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{name}: not {what} within {timeout:.0f}s; see {self.log(name)}:\n{self.tail(name)}")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop(self, name: str, grace: float = 15) -> None:
        """SIGTERM the process's session and those its descendants started, wait up to `grace`
        seconds, then SIGKILL what is left."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        # before the leader exits and its descendants are orphaned; never this process's own group
        groups = ({proc.pid} | _descendant_groups(proc.pid)) - {os.getpgrp()}
        for group in groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or any(map(_group_alive, groups))):
            time.sleep(0.2)
        for group in filter(_group_alive, groups):
            _signal_group(group, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _descendant_groups(pid: int) -> set[int]:
    """The process groups of `pid`'s descendants (Linux /proc; elsewhere none are found)."""
    parent_of, group_of = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        except (OSError, IndexError):
            continue
        child = int(stat.parent.name)
        parent_of[child], group_of[child] = int(fields[1]), int(fields[2])
    groups, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parent_of.items() if parent in frontier}
        groups |= {group_of[child] for child in frontier}
    return groups


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextlib.contextmanager
def app_folder(app_dir: Path | None = None, task_keys: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """The folder `flwr run` bundles and sends: `app_dir` as it is, or by default the app fedcycle
    ships, staged in a temporary folder: its pyproject.toml (components and run config, with
    `task_keys`, the task's own keys, declared beside fedcycle's: Flower refuses an undeclared
    key) beside a copy of the runtime package `fedcycle`, and nothing else (no tools, tests, data
    or venv; `flwr run` walks every file of the folder it is given, a checkout's .venv alone is
    47,000)."""
    if app_dir is not None:
        yield app_dir
        return
    with tempfile.TemporaryDirectory(prefix="fedcycle-app-") as staged:
        pyproject = project_file("pyproject.toml").read_text(encoding="utf-8")
        (Path(staged) / "pyproject.toml").write_text(declaring(pyproject, task_keys or {}), encoding="utf-8")
        shutil.copytree(Path(fedcycle.__file__).parent, Path(staged) / "fedcycle",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield Path(staged)


RUN_CONFIG_TABLE = "[tool.flwr.app.config]\n"


def declaring(pyproject: str, task_keys: Mapping[str, Any]) -> str:
    """pyproject.toml's text with `task_keys` declared first in its run config, as dotted keys
    like fedcycle's own (`image.model = ...`), so the file stays valid TOML (`task_keys` checks
    that none is, or nests in, one of fedcycle's keys)."""
    if not task_keys:
        return pyproject
    lines = "".join(f"{key} = {toml_value(value)}\n" for key, value in task_keys.items())
    header = f"{RUN_CONFIG_TABLE}# the task's own keys (its run_config_defaults)\n"
    return pyproject.replace(RUN_CONFIG_TABLE, header + lines, 1)


class FlwrCli:
    """The `flwr` command with a given FLWR_HOME, against one SuperLink connection."""

    def __init__(self, env: dict, app_dir: Path | None = None, connection: str | None = None) -> None:
        self.env, self.app_dir, self.connection = env, app_dir, connection

    def __call__(self, *args: str, timeout: float | None = None, stream: bool = False) -> subprocess.CompletedProcess:
        command = [_bin("flwr"), *args]
        if not stream:
            return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        lines = []
        with subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
        return subprocess.CompletedProcess(command, proc.returncode, "".join(lines), "")

    def _target(self) -> list[str]:
        return [self.connection] if self.connection else []

    def run(self, run_config: str = "", federation_config: str = "", stream: bool = True,
            task_keys: Mapping[str, Any] | None = None) -> RunOutcome:
        """`flwr run` one job to the end; its status comes from `flwr ls`, not the exit code.
        `task_keys`: the task's own run-config keys, declared in the app fedcycle stages."""
        with app_folder(self.app_dir, task_keys) as app:
            args = ["run", str(app), *self._target(), "--stream"]
            if federation_config:
                args += ["--federation-config", federation_config]
            if run_config:
                args += ["--run-config", run_config]
            done = self(*args, stream=stream)
        output = done.stdout + done.stderr
        found = re.search(r"Successfully started run (\d+)", output)
        if not found:
            status = f"not started (flwr run exited {done.returncode})"
            if "Invalid run configuration" in output:
                status += ": Flower refused the run config; every key must be declared in pyproject.toml (README lists them)"
            elif "Connection to the SuperLink is unavailable" in output:
                status += ": no SuperLink answers at the connection's address; start it, or fix 'address' in config.toml"
            return RunOutcome(None, status, None, output)
        run_id = int(found.group(1))
        status = self.status(run_id)
        deadline = time.monotonic() + 60
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(1)
            status = self.status(run_id)
        match = re.search(r"results go to (\S+)", output)
        return RunOutcome(run_id, status, Path(match.group(1)) if match else None, output)

    def status(self, run_id: int) -> str:
        listed = self("ls", *self._target(), "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            return str(json.loads(listed.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return f"unknown ({listed.stdout.strip() or listed.stderr.strip()})"


def flwr_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment for Flower's commands: this FLWR_HOME (if given), no runtime installs, this venv first."""
    return {
        **os.environ,
        **({"FLWR_HOME": str(flwr_home)} if flwr_home else {}),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def python_path(folder: str) -> dict[str, str]:
    """PYTHONPATH with `folder` first (where a user's task module lives), for the apps' processes."""
    if not folder:
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(Path(folder).resolve()), os.environ.get("PYTHONPATH", "")) if p)}


class LocalSimulation:
    """A simulation SuperLink on loopback, owned by this object; use as a context manager.

    Stopping it stops its session and the SuperExec's (which detaches into a session of its
    own): the simulation, the ServerApp and Ray. Left alone, a SuperExec whose SuperLink was
    stopped went on training for over a minute."""

    def __init__(self, flwr_home: Path, app_dir: Path | None = None, task_path: str = "",
                 node_config: Mapping[str, Any] | None = None) -> None:
        """`node_config`: what every simulated site's node config gets besides its partition,
        `{partition-id}` in a value filled in with the site's (fedcycle.site.simulated_node_config)."""
        self.flwr_home = Path(flwr_home).resolve()
        self.app_dir = Path(app_dir).resolve() if app_dir else None
        self.task_path = task_path
        self.port, self.control_port = free_port(), free_port()
        # where the sites write their tracebacks; emptied before each run, moved into its folder after
        self.site_log = self.flwr_home / "local-superlink" / "site-errors.log"
        self.env = flwr_env(
            self.flwr_home,
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(self.port),
            FLWR_LOCAL_CONTROL_API_PORT=str(self.control_port),
            **{SITE_LOG_VARIABLE: str(self.site_log),
               NODE_CONFIG_VARIABLE: json.dumps(dict(node_config or {}))},  # not one this shell set
            **python_path(task_path),
        )
        self.processes = ProcessGroup(self.flwr_home / "local-superlink")
        self.flwr = FlwrCli(self.env, self.app_dir)

    def __enter__(self) -> "LocalSimulation":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        """Start the SuperLink `flwr run` would start, but owned here (so `flwr run` reuses it)."""
        command = [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{self.control_port}",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.flwr_home / "local-superlink" / "state.db"),
        ]
        # the ServerApp's relative paths (results-dir) resolve against the folder this runs from
        self.processes.start("superlink", command, self.env, Path.cwd())
        url = f"http://127.0.0.1:{self.port}/health"
        try:
            self.processes.wait_until("superlink", lambda: http_ok(url), timeout, f"answering on {url}")
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the SuperLink and everything in its session (ServerApp, Ray, ClientApps)."""
        self.processes.stop_all()

    def run(self, sites: int, run_config: str = "", cpus_per_site: float = 1, stream: bool = True) -> RunOutcome:
        """One job with `sites` simulated data centers. With CUDA, the sites share the GPUs
        (Ray hides the GPUs from ClientApps that ask for none)."""
        federation = f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site}"
        gpus = cuda_devices()
        if gpus:
            federation += f" client-resources-num-gpus={min(1.0, round(gpus / sites, 3))}"
        keys = None
        if self.app_dir is None:  # the staged app declares the task's own keys
            if self.task_path:
                add_task_path(self.task_path)
            keys = task_keys(run_task(parse_pairs(run_config, "--run-config")))
        self.site_log.unlink(missing_ok=True)
        return self.keep_site_errors(self.flwr.run(run_config, federation, stream=stream, task_keys=keys))

    def keep_site_errors(self, outcome: RunOutcome) -> RunOutcome:
        """The sites' tracebacks of this run, if any, moved into its results folder."""
        if not (self.site_log.exists() and self.site_log.stat().st_size):
            return outcome
        outcome.site_errors = self.site_log
        if outcome.results_dir and outcome.results_dir.is_dir():
            outcome.site_errors = Path(shutil.move(self.site_log, outcome.results_dir / "site-errors.log"))
        return outcome


def trusting(ca: Path) -> ssl.SSLContext:
    """A TLS context that trusts only this CA."""
    return ssl.create_default_context(cafile=str(ca))


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def http_ok(url: str, ca: Path | None = None) -> bool:
    try:
        return httpx.get(url, timeout=0.5, verify=trusting(ca) if ca else True).is_success
    except httpx.HTTPError:
        return False


def results_table(run_id: int | None, rounds: list[dict]) -> Table:
    """A run's rounds: the primary metric and loss on the server's test set, or where it has none
    on the sites' held-out data (`metrics_source`), the sites' training loss; a failed round says so."""
    metric = rounds[0].get("primary_metric", "accuracy") if rounds else "accuracy"
    source = next((r["metrics_source"] for r in rounds if r.get("metrics_source")), "server-test")
    on = "test" if source == "server-test" else "validation"
    caption = None if on == "test" else "validation: the sites' held-out data, weighted by examples (no test set)"
    table = Table(title=f"fedcycle run {run_id}", caption=caption)
    for column in ("round", f"{on} {metric}", f"{on} loss", "train loss", "sites", "left out", "seconds"):
        table.add_column(column, justify="right")

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for r in rounds:
        value = "failed" if r.get("failed") else shown(r.get(metric))
        table.add_row(str(r["round"]), value, shown(r["loss"]), shown(train_loss(r)), str(len(r["sites"])),
                      str(len(r["events"])), f"{r['seconds']:.1f}")
    return table


def print_results(outcome: RunOutcome) -> None:
    console = Console()
    if not console.is_terminal:  # a pipe or a log: no terminal's width to fit the table's headers in
        console.width = max(console.width, 120)
    if outcome.results_dir and (outcome.results_dir / "metrics.jsonl").exists():
        rounds = read_metrics(outcome.results_dir / "metrics.jsonl")
        console.print(results_table(outcome.run_id, rounds))
        for r in rounds:
            if r.get("failed"):
                console.print(f"round {r['round']} failed: {r['failed']}", soft_wrap=True, markup=False,
                              highlight=False)
        console.print(f"results: {outcome.results_dir}", soft_wrap=True)
    if outcome.site_errors:
        console.print(f"sites' tracebacks: {outcome.site_errors}", soft_wrap=True)
    console.print(f"status: {outcome.status}")


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP (a CI timeout, a closed terminal) unwind like Ctrl-C, so every
    `with` block stops the processes it started."""
    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)


def prepare_data(run_config: dict | None = None) -> None:
    """Decode the dataset's train and test splits into the data root's .npy cache."""
    settings = ImageSettings.from_run_config(run_config or {})
    for split in ("train", "test"):
        data = load(settings, split)
        print(f"{settings.dataset} {split}: {len(data)} images {tuple(data.images.shape[1:])} in {data_root(settings)}")


def toml_value(value: Any) -> str:
    """A run-config value as `flwr run --run-config` and pyproject.toml take it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'" if "'" not in value and "\n" not in value else json.dumps(value, ensure_ascii=False)
    return repr(value)


# a `key=value` pair as Flower's parse_config_args finds them: what it does not match, it drops unsaid
PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_pairs(text: str, option: str) -> dict[str, Any]:
    """`key=value other='text'` as Flower reads --run-config (or the TOML file it names); text it
    would drop or cannot read is a ConfigError, one line naming it."""
    if text.strip().endswith(".toml"):
        try:
            return parse_config_args([text.strip()])
        except (OSError, ValueError) as err:
            raise ConfigError(f"{option} {text.strip()}: {err}") from None
    stray = PAIR.sub(" ", text).split()
    if stray:
        raise ConfigError(f"{option}: {stray[0]!r} is not a key=value pair; write \"key=1 other='text'\" "
                          "(no spaces around =, text in quotes)")
    try:
        return parse_config_args([text]) if text.strip() else {}
    except click.ClickException:
        for key, value in PAIR.findall(text):
            try:
                tomllib.loads(f"{key} = {value}")
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"{option}: {key}={value} does not read as TOML; a value is a number, true or "
                                  f"false, or text in quotes ({key}='...')") from None
        raise ConfigError(f"{option}: {text.strip()!r} does not read as TOML (a key given twice?)") from None


# node-config keys Flower's simulation sets for each site
PARTITION_KEYS = ("partition-id", "num-partitions")
# node-config keys that must differ between sites: the name a site is known (and seeded) by, its DP ledger
OWN_KEYS = ("site-name", "privacy-ledger")


def sites_node_config(text: str) -> dict[str, Any]:
    """--node-config: what every simulated site's node config gets; the keys the simulation sets
    for each site are refused (their values go inside a string: '/data/site-{partition-id}.pt')."""
    given = parse_pairs(text, "--node-config")
    for key in PARTITION_KEYS:
        if key in given:
            raise ConfigError(f"--node-config: {key!r} is the simulation's, set for each site; write {{{key}}} inside "
                              f"a value instead, e.g. train-file='/data/site-{{{key}}}/train.pt'")
    for key in OWN_KEYS:
        if key in given and "{partition-id}" not in str(given[key]):
            raise ConfigError(f"--node-config: {key}={given[key]!r} would be every simulated site's, and each site "
                              f"needs its own; put {{partition-id}} in it, e.g. {key}='site-{{partition-id}}'")
    return given


def renamed(overrides: str) -> str:
    """The overrides, a key that moved (`dataset`, now `image.dataset`) under its new name, with a
    note: Flower itself refuses a key that pyproject.toml does not declare."""
    parsed = parse_pairs(overrides, "--run-config")
    moved = [key for key in parsed if key in RENAMED_KEYS]
    if not moved:
        return overrides
    for key in moved:
        print(f"note: run config key {key!r} is {RENAMED_KEYS[key]!r} now; fedcycle passes it on under "
              "that name (plain `flwr run` refuses the old one)", file=sys.stderr)
    return " ".join(f"{key}={toml_value(value)}" for key, value in current_keys(parsed).items())


def fedcycle_run_config() -> dict[str, Any]:
    """fedcycle's own run-config keys with their defaults, as pyproject.toml declares them (flat)."""
    def flat(table: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in table.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    return flat(tomllib.loads(project_file("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def run_task(overrides: Mapping[str, Any]) -> str:
    """The task a run's overrides name, else fedcycle's default."""
    return str(overrides.get("task", fedcycle_run_config()["task"]))


def task_keys(spec: str) -> dict[str, Any]:
    """A task's own run-config keys with their defaults (its class's `run_config_defaults`; the
    module must be importable here: add_task_path first). One that is, or nests in or holds, one
    of fedcycle's keys is refused: the app's pyproject.toml could not declare both."""
    own = run_config_defaults(resolve(spec), spec)
    fedcycle_keys = fedcycle_run_config()
    for key in own:
        for theirs in fedcycle_keys:
            if key == theirs or theirs.startswith(f"{key}.") or key.startswith(f"{theirs}."):
                raise TaskError(f"task={spec!r}: run_config_defaults key {key!r} collides with fedcycle's run-config "
                                f"key {theirs!r}; give the task's keys a table of its own (e.g. 'clinic.hidden')")
    return own


def unknown_key(key: str, spec: str, fedcycle_keys: list[str], own: list[str]) -> str:
    """One line for an override that neither fedcycle nor the task declares: close matches, and
    where keys are declared."""
    close = difflib.get_close_matches(key, [*fedcycle_keys, *own], n=3, cutoff=0.8)
    guess = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return (f"run config key {key!r} is unknown{guess}; fedcycle's keys are declared in its pyproject.toml "
            f"(docs/configuration.md lists them), a task's own in its class's run_config_defaults "
            f"(task={spec!r} declares {own or 'none'})")


def full_run_config(overrides: str) -> dict:
    """The run config as the ServerApp will read it: fedcycle's defaults (pyproject.toml), the
    task's own (its run_config_defaults), the overrides; an override neither declares is a
    ConfigError naming it (Flower would refuse the run without naming it)."""
    given = parse_pairs(overrides, "--run-config")
    declared = fedcycle_run_config()
    spec = run_task(given)
    own = task_keys(spec)
    for key in given:
        if key not in declared and key not in own:
            raise ConfigError(unknown_key(key, spec, list(declared), list(own)))
    return {**declared, **own, **given}


def check_run_config(overrides: str, task_path: str = "") -> None:
    """The run config, checked here before anything starts: ConfigError or TaskError with one line."""

    if task_path:
        add_task_path(task_path)
    run_config = full_run_config(overrides)
    settings = RunSettings.from_run_config(run_config)
    check_strategy(settings)
    check_tracking(settings.tracking)
    load_task(run_config)


def centralize(overrides: str, sites: int, epochs: int, node_config: Mapping[str, Any] | None = None) -> Path:
    """The centralized baseline of a run config (fedcycle_tools.centralized), printed epoch by epoch
    and written to <results-dir>/<run-name>/centralized.json (run-name by default
    `<task>-centralized-<time>`). `node_config`: each pooled site's, as `simulate --node-config`."""

    run_config = full_run_config(overrides)
    settings = RunSettings.from_run_config(run_config)
    epochs = epochs or settings.num_server_rounds * settings.local_epochs  # a federated run's epochs over the data

    def progress(epoch: int, test: float | None, val: float | None) -> None:
        shown = " ".join(f"{name} {value:.4f}" for name, value in (("test", test), ("validation", val)) if value is not None)
        print(f"epoch {epoch}/{epochs}: {shown}", flush=True)

    result = train_centralized(run_config, sites, epochs, progress, node_config=dict(node_config or {}))
    label = result["task"].replace(":", ".")
    name = settings.run_name or f"{label}-centralized-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(settings.results_dir).expanduser().resolve() / name / "centralized.json"
    record = {**result, "sites": sites, "epochs": epochs, "run_config": run_config, "node_config": node_config or {},
              "versions": versions(), "machine": machine()}
    atomic_write(out, json.dumps(record, indent=1).encode())
    print(f"results: {out}")
    return out


NODE_CONFIG_HELP = (
    "what every simulated site's node config holds (a real site's SuperNode gets its own), written as "
    "--run-config is: \"train-file='/data/site-{partition-id}/train.pt' val-file='...'\"; in a value, "
    "{partition-id} becomes the site's number (0 to --sites minus 1) and {num-partitions} the number of sites"
)
RUN_CONFIG_HELP = ('run-config overrides, as for flwr run: "k=v k2=\'s\'"; fedcycle\'s keys are in '
                   "docs/configuration.md, a task's own in its class's run_config_defaults")
RESULTS_HELP = (
    "Results: each run gets a folder of its own, named after its task, under results-dir: 'results' in the folder "
    "you run from unless --run-config \"results-dir='...'\" says otherwise (run-name='...' names the folder)."
)


class WholeWordsHelp(argparse.HelpFormatter):
    """argparse's, without breaking a line inside a hyphenated word (`{partition-id}`, `--run-config`)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def main(argv: list[str] | None = None, prog: str = "python -m fedcycle_tools.launcher") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run one simulation job to the end and print its results",
                         description="Run one simulation job to the end and print its results.",
                         formatter_class=WholeWordsHelp,
                         epilog=f"{RESULTS_HELP} It holds metrics.jsonl, config.json, the models and a plot.")
    sim.add_argument("--sites", type=int, default=4, help="simulated data centers (default 4)")
    sim.add_argument("--run-config", default="", help=RUN_CONFIG_HELP)
    sim.add_argument("--node-config", default="", help=NODE_CONFIG_HELP)
    sim.add_argument("--cpus-per-site", type=float, default=1, help="Ray CPUs per ClientApp (default 1)")
    sim.add_argument("--flwr-home", default=".flwr-home", help="FLWR_HOME for this job (default ./.flwr-home)")
    sim.add_argument("--task-path", default="", help="a folder holding the module of the run config's task")
    cen = sub.add_parser("centralize", help="train the centralized baseline: the run config's task on the pooled "
                                            "data of --sites simulated sites, with one optimizer throughout",
                         description="Train the centralized baseline: the run config's task on the pooled data of "
                                     "--sites simulated sites, with one optimizer throughout.",
                         formatter_class=WholeWordsHelp,
                         epilog=f"{RESULTS_HELP} It holds centralized.json: the primary metric after every epoch.")
    cen.add_argument("--sites", type=int, default=4, help="the simulated sites whose data is pooled (default 4)")
    cen.add_argument("--epochs", type=int, default=0,
                     help="epochs over the pooled data (default: num-server-rounds x local-epochs, a federated run's)")
    cen.add_argument("--run-config", default="", help=RUN_CONFIG_HELP)
    cen.add_argument("--node-config", default="", help=NODE_CONFIG_HELP)
    cen.add_argument("--task-path", default="", help="a folder holding the module of the run config's task")
    sub.add_parser("prepare-data", help="decode Fashion-MNIST into the data cache")
    args = parser.parse_args(argv)
    exit_on_termination()

    if args.command == "prepare-data":
        prepare_data()
        return 0

    try:
        node_config = sites_node_config(args.node_config)
        args.run_config = renamed(args.run_config)
        check_run_config(args.run_config, args.task_path)
    except ValueError as err:  # ConfigError, TaskError, and a schedule's own (fedcycle.schedules)
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "centralize":
        try:
            centralize(args.run_config, args.sites, args.epochs, node_config)
        except ConfigError as err:  # the task's own, naming the method (a TaskError is one)
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    with LocalSimulation(Path(args.flwr_home), task_path=args.task_path, node_config=node_config) as sim_link:
        outcome = sim_link.run(args.sites, args.run_config, args.cpus_per_site)
    print_results(outcome)
    return 0 if outcome.completed else 1


if __name__ == "__main__":
    sys.exit(main())
