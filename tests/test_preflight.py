"""The pre-flight round (fedcycle.preflight) with the sites' real ClientApp answering on real
Fashion-MNIST subsets: the run goes ahead only if every site fits, and otherwise stops naming
each site that does not and what differs; a site that never answers, or that the SuperLink
answers for, is named too. (A malformed report: tests/test_strategy.py; a site's file that
disagrees: tests/test_builtin_tasks.py.)"""

from __future__ import annotations

import pytest
import torch
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_res_message,
)

from fedcycle import client_app
from fedcycle.config import RunSettings
from fedcycle.preflight import PreflightError, preflight
from fedcycle.tasks import fingerprint, load_task
from tests.fakes import AnsweringSites, context


@pytest.fixture
def run_config(data_root) -> dict:
    # val-fraction 0.2: 13 held-out records a site, at least the default policy's min-records=10
    return {"data-root": data_root, "train-subset": 64, "val-fraction": 0.2, "test-subset": 100, "batch-size": 16,
            "round-timeout": 30.0}


def expected_by_the_server(run_config: dict, test_split: bool = True) -> dict:
    """What fedcycle's ServerApp expects (fedcycle.server_app.main): its model's fingerprint and
    classes, and with a test split, one batch of it through the task."""
    task = load_task(run_config)
    model = task.build_model()
    checked = task.dry_run(model, task.test_data(), torch.device("cpu"), 16) if test_split else {}
    return {"model": fingerprint(model), "classes": task.classes,
            **{k: checked.get(k) for k in ("metric-names", "inputs", "targets")}}


def sites(configs: dict[int, tuple[dict, dict]], silent=(), superlink_answers=()) -> AnsweringSites:
    """node -> (the run config its ClientApp sees, its node config)."""
    def answer(message):
        node = message.metadata.dst_node_id
        if node in silent:
            return None
        if node in superlink_answers:  # the node stopped sending heartbeats: the SuperLink replies
            return create_message_error_unavailable_res_message(message.metadata, "node_unavail")
        return client_app.preflight(message, context(*configs[node]))

    return AnsweringSites(configs, answer)


def half(i: int) -> dict:
    return {"partition-id": i, "num-partitions": 2}


def test_sites_that_fit_are_the_runs_with_what_they_reported(run_config, task_identity):
    reports, refused = preflight(sites({1: (run_config, half(0)), 2: (run_config, half(1))}),
                                 RunSettings.from_run_config(run_config), expected_by_the_server(run_config))
    assert refused == {}
    assert sorted(reports) == [1, 2] and {r.site for r in reports.values()} == {"partition 0/2", "partition 1/2"}
    assert all(r.num_train == 64 for r in reports.values())


def test_a_site_that_builds_another_model_is_named_with_the_first_array_that_differs(run_config, task_identity):
    # site 2 runs another version of the task (here: another model) than the server
    other = {**run_config, "image.model": "resnet18"}
    with pytest.raises(PreflightError) as failed:
        preflight(sites({1: (run_config, half(0)), 2: (other, half(1))}),
                  RunSettings.from_run_config(run_config), expected_by_the_server(run_config))
    (line,) = str(failed.value).splitlines()[1:]
    assert line.startswith("  node 2 (partition 1/2): the task builds another model than the server's (key model: "
                           "the site has 'conv1.weight:float32[64, 1, 3, 3]', the server 'features.0.weight:float32[32, 1, 3, 3]')")


def test_without_a_test_split_a_site_without_held_out_data_cannot_take_part(run_config, task_identity):
    no_val = {**run_config, "val-fraction": 0.0}  # its data has no held-out part
    configs = {1: (run_config, half(0)), 2: (no_val, half(1))}
    settings = RunSettings.from_run_config(run_config)
    reports, refused = preflight(sites(configs), settings, expected_by_the_server(run_config))
    assert sorted(reports) == [1, 2] and refused == {}  # the server tests
    with pytest.raises(PreflightError, match=r"node 2 \(partition 1/2\): it holds no held-out data \(num-val=0\), "
                                             r"and the run has no test split"):
        preflight(sites(configs), settings, expected_by_the_server(run_config, test_split=False), needs_val=True)


def test_a_site_that_never_answers_or_that_the_superlink_answers_for_is_named(run_config, task_identity):
    configs = {1: (run_config, half(0)), 2: (run_config, half(1)), 3: (run_config, half(1))}
    with pytest.raises(PreflightError) as failed:
        preflight(sites(configs, silent={2}, superlink_answers={3}), RunSettings.from_run_config(run_config),
                  expected_by_the_server(run_config))
    lines = str(failed.value).splitlines()[1:]
    assert len(lines) == 2 and lines[0] == "  node 2: no pre-flight reply within round-timeout=30.0s"
    assert lines[1].startswith("  node 3: the SuperLink answered in its place: Error: Node Unavailable")
