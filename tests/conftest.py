"""Shared fixtures: one decoded Fashion-MNIST cache per test session, Flower's task identity;
and the unit lane's guard: a test not marked `e2e` may not start a process or connect a socket.

The two lanes (docs/testing.md): `make test-fast` runs `pytest -m "not e2e"`, the unit tests;
`make test` runs both. A test that starts a process (a subprocess, `flwr run`, LocalSimulation,
LoopbackDeployment, a SuperLink or SuperNode, nginx, an `mlflow server`, `python -m ...`) or
opens a network socket is end-to-end: mark it `@pytest.mark.e2e` (or its module with
`pytestmark = pytest.mark.e2e`). Anywhere else, starting a process or connecting a socket fails
the test at once, naming what it tried; also when the code under test catches the error, and
also while the test's fixtures are set up (a module-scoped fixture that starts a SuperLink is
set up by the first test that asks for it).
"""

from __future__ import annotations

import multiprocessing.process
import os
import socket
import subprocess

import pytest

E2E = "mark it @pytest.mark.e2e"


class UnitLaneViolation(RuntimeError):
    """A test outside the e2e lane started a process or connected a socket."""


# The node id of the unit test being set up or run now (None: an e2e test, teardown, or no test),
# and what each one tried that the unit lane does not allow.
_unit_test: str | None = None
_violations: dict[str, list[str]] = {}


def _refuse(what: str) -> None:
    if _unit_test is None:
        return
    message = f"{_unit_test}: this test {what}: {E2E}"
    _violations.setdefault(_unit_test, []).append(message)
    raise UnitLaneViolation(message)


def _command(args, kwargs) -> str:
    argv = args[0] if args else kwargs.get("args")
    text = " ".join(map(str, argv)) if isinstance(argv, (list, tuple)) else str(argv)
    text = " ".join(text.split())  # one line
    return text if len(text) <= 160 else text[:156] + " ..."


def _address(address) -> str:
    return ":".join(map(str, address)) if isinstance(address, tuple) else str(address)


def _guarded_process_starters() -> dict:
    """(owner, name) -> the wrapper that refuses it in a unit test, else calls the original."""
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_popen(self, *args, **kwargs):
        _refuse(f"starts a process ({_command(args, kwargs)})")
        return popen_init(self, *args, **kwargs)

    def guarded_process(self):
        _refuse(f"starts a process (multiprocessing {self.name})")
        return process_start(self)

    def guarded_connect(self, address):
        _refuse(f"opens a socket (connect to {_address(address)})")
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _refuse(f"opens a socket (connect_ex to {_address(address)})")
        return connect_ex(self, address)

    wrappers = {
        (subprocess.Popen, "__init__"): guarded_popen,
        (multiprocessing.process.BaseProcess, "start"): guarded_process,
        (socket.socket, "connect"): guarded_connect,
        (socket.socket, "connect_ex"): guarded_connect_ex,
    }
    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp"):  # what bypasses subprocess.Popen
        original = getattr(os, name, None)
        if original is not None:
            def guarded(*args, _original=original, _name=name, **kwargs):
                _refuse(f"starts a process (os.{_name}{'' if _name.startswith('fork') else ' ' + _command(args, kwargs)})")
                return _original(*args, **kwargs)

            wrappers[(os, name)] = guarded
    return wrappers


def _warm_caches() -> None:
    """Start, once and before any test, the processes the libraries start on first use and then
    cache for the life of the process, so that no unit test is blamed for them: the standard
    library's `platform.processor()` runs `uname -p` (a site's pre-flight report asks for it), and
    matplotlib runs `fc-list` to build its font cache where it has none (a fresh machine)."""
    import platform

    import matplotlib

    platform.processor()
    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401  (builds the font cache if missing)


@pytest.fixture(scope="session", autouse=True)
def unit_lane():
    """The unit lane's guard, for the whole session: in a test not marked e2e (from its fixtures'
    set-up to the end of the test), starting a subprocess (subprocess.Popen, os.fork, os.system,
    os.posix_spawn, multiprocessing) or connecting a socket (socket.connect, connect_ex) raises
    UnitLaneViolation at once. Which test is a unit test is set by pytest_runtest_setup below."""
    _warm_caches()
    with pytest.MonkeyPatch.context() as patch:
        for (owner, name), wrapper in _guarded_process_starters().items():
            patch.setattr(owner, name, wrapper)
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    # before the test's fixtures are set up, module- and session-scoped ones included
    global _unit_test
    _unit_test = None if item.get_closest_marker("e2e") else item.nodeid
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    tried = _violations.pop(item.nodeid, [])
    if tried and report.passed:  # the code under test caught the UnitLaneViolation: fail anyway
        report.outcome, report.longrepr = "failed", "\n".join(tried)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    # tearing down may stop what an e2e test started; no test is running
    global _unit_test
    _unit_test = None
    yield


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """A data root with Fashion-MNIST decoded once for the whole session."""
    from fedcycle.tasks.image.datasets import load
    from fedcycle.tasks.image.settings import ImageSettings

    root = tmp_path_factory.mktemp("data")
    settings = ImageSettings(data_root=str(root))
    load(settings, "train")
    load(settings, "test")
    return str(root)


@pytest.fixture
def task_identity():
    """Flower stamps every Message with the running task's identity; a test is task 1 of run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class MLflowServer:
    """A real `mlflow server` on loopback, its store and artifacts in a test folder."""

    def __init__(self, folder) -> None:
        import sys
        from pathlib import Path

        from fedcycle_tools.launcher import ProcessGroup, free_port

        self.folder, self.port = Path(folder), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.processes = ProcessGroup(self.folder / "logs")
        self.command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                        "--port", str(self.port), "--workers", "1",
                        "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                        "--artifacts-destination", str(self.folder / "artifacts")]

    def start(self) -> "MLflowServer":
        import os

        from fedcycle_tools.launcher import http_ok

        self.processes.start("mlflow", self.command, dict(os.environ), self.folder)
        self.processes.wait_until("mlflow", lambda: http_ok(f"{self.uri}/health"), 120, "the MLflow server")
        return self

    def stop(self) -> None:
        self.processes.stop("mlflow")

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MLflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()
