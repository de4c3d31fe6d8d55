"""Shared fixtures: one decoded Fashion-MNIST cache per test session, Flower's task identity."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """A data root with Fashion-MNIST decoded once for the whole session."""
    from fedcycle.config import RunSettings
    from fedcycle.datasets import load

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
