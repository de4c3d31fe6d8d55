"""Shared fixtures: one decoded Fashion-MNIST cache per test session, Flower's task identity."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """A data root with Fashion-MNIST decoded once for the whole session."""
    from fedcycle.config import RunSettings
    from fedcycle.tasks.image.datasets import load

    root = tmp_path_factory.mktemp("data")
    settings = RunSettings(data_root=str(root))
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
