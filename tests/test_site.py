"""One data center as the ClientApp sees it (fedcycle.site), on real Fashion-MNIST subsets: a
site is loaded once per process for the same configs; the node config's own keys (`device`,
`num-workers`, `task-path`) are checked and a bad one is named; the pre-flight report holds what
the server's pre-flight needs."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fedcycle import client_app, site
from fedcycle.config import RunSettings
from fedcycle.errors import ConfigError
from fedcycle.preflight import PreflightError, preflight
from fedcycle.site import load_site
from fedcycle.tasks import Task, fingerprint, load_task
from tests.fakes import AnsweringSites, context, preflight_query


@pytest.fixture
def run_config(data_root) -> dict:
    # val-fraction 0.2: 13 held-out records a site, at least the default policy's min-records=10
    return {"data-root": data_root, "train-subset": 64, "val-fraction": 0.2, "batch-size": 16}


@pytest.fixture
def fresh_sites():
    """No site of an earlier test in this process's cache, and none of this test's left in it."""
    clear = getattr(site._load_site, "cache_clear", lambda: None)  # without its cache, nothing to clear
    clear()
    yield
    clear()


@pytest.fixture
def data_loads(monkeypatch) -> list[dict]:
    """Every time a site's data is read (the task's own site_data, called through)."""
    calls, real = [], Task.site_data

    def counted(self, node_config):
        calls.append(dict(node_config))
        return real(self, node_config)

    monkeypatch.setattr(Task, "site_data", counted)
    return calls


def test_a_site_is_loaded_once_per_process_for_the_same_configs(run_config, fresh_sites, data_loads):
    node = {"partition-id": 0, "num-partitions": 2}
    first = load_site(run_config, node)
    # every message of a run hands the handler the same configs again, as new objects, in any order
    again = load_site(dict(reversed(list(run_config.items()))), {"num-partitions": 2, "partition-id": 0})
    assert again is first and len(data_loads) == 1
    other = load_site(run_config, {"partition-id": 1, "num-partitions": 2})
    assert other is not first and len(data_loads) == 2
    # two sites served in turn by one process keep their data
    assert load_site(run_config, node) is first and load_site(run_config, {"partition-id": 1, "num-partitions": 2}) is other
    assert len(data_loads) == 2
    # another run config (another run) is another site
    assert load_site({**run_config, "seed": 7}, node) is not first and len(data_loads) == 3
    assert len(first.train) == len(other.train) == 64  # train-subset: each site's train split, capped


@pytest.mark.parametrize("node_config, message", [
    ({"device": "tpu"}, "device='tpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:7"}, "device='cuda:7' is not available"),
    ({"num-workers": -1}, "num-workers=-1 in the node config must be an integer of at least 0"),
    ({"num-workers": "2"}, "num-workers='2' in the node config must be an integer of at least 0"),
    ({"num-workers": True}, "num-workers=True in the node config must be an integer of at least 0"),
    ({"task-path": "/no/such/folder"}, "task-path='/no/such/folder' in the node config is not a folder"),
])
def test_a_bad_node_config_key_is_named(run_config, fresh_sites, node_config, message):
    node = {"partition-id": 0, "num-partitions": 2, **node_config}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_site(run_config, node)


def test_a_bad_node_config_reaches_the_server_as_one_line_naming_the_site_and_key(run_config, fresh_sites,
                                                                                   task_identity):
    nodes = {1: {"partition-id": 0, "num-partitions": 2}, 2: {"partition-id": 1, "num-partitions": 2, "num-workers": -1}}
    grid = AnsweringSites(nodes, lambda m: client_app.preflight(m, context(run_config, nodes[m.metadata.dst_node_id])))
    with pytest.raises(PreflightError) as failed:
        preflight(grid, RunSettings.from_run_config(run_config), server_expects(run_config))
    lines = str(failed.value).splitlines()
    assert lines[0] == "pre-flight failed, no training started:"
    assert lines[1:] == ["  node 2 (partition 1/2): num-workers=-1 in the node config must be an integer of at least 0"]


def server_expects(run_config: dict) -> dict:
    """What fedcycle's ServerApp expects every site to report: its own model's fingerprint and
    classes, and one batch of its test split through the task (fedcycle.server_app.main)."""
    task = load_task(run_config)
    model = task.build_model()
    checked = task.dry_run(model, task.test_data(), torch.device("cpu"), 16)
    return {"model": fingerprint(model), "classes": task.classes,
            **{k: checked[k] for k in ("metric-names", "inputs", "targets")}}


def test_the_report_holds_what_the_preflight_needs(run_config, fresh_sites, task_identity):
    nodes = {3: {"partition-id": 0, "num-partitions": 2}, 4: {"partition-id": 1, "num-partitions": 2}}
    grid = AnsweringSites(nodes, lambda m: client_app.preflight(m, context(run_config, nodes[m.metadata.dst_node_id])))
    reports, refused = preflight(grid, RunSettings.from_run_config(run_config), server_expects(run_config))
    assert refused == {} and sorted(reports) == [3, 4] and [m.metadata.message_type for m in grid.sent] == ["query", "query"]
    for node, report in reports.items():
        loaded = load_site(run_config, nodes[node])
        assert report.site == f"partition {nodes[node]['partition-id']}/2"
        assert (report.num_train, report.num_val) == (len(loaded.train), len(loaded.val)) and report.num_train > 0
        assert report.metric_names == ["accuracy"] and report.inputs == "float32[1, 28, 28]" and report.targets == "int64[]"
        assert report.model == fingerprint(loaded.new_model()) and report.device == "cpu"
        assert report.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                  "Bag", "Ankle boot"]
        assert report.torch == torch.__version__ and report.flwr == "1.42.0"


def test_a_site_names_itself_and_seeds_each_round_its_own_way(run_config, fresh_sites):
    a = load_site(run_config, {"partition-id": 0, "num-partitions": 2, "num-workers": 0})
    b = load_site(run_config, {"partition-id": 1, "num-partitions": 2})
    assert (a.label, b.label) == ("partition 0/2", "partition 1/2")  # its own keys are not its name
    assert a.seed(1) != a.seed(2) and a.seed(1) != b.seed(1)
    # the same in every process and on every machine (a CRC of the name, not Python's salted hash)
    assert (a.seed(1), a.seed(2)) == (412958113, 412959122)  # seed=42, 'partition 0/2'
    # the rest of its node config never names it (it may hold what the site keeps to itself), nor does a path
    unnamed = site.Site(RunSettings(), {"device": "cpu", "hospital": "north"}, a.task, a.device, a.train, a.val)
    assert unnamed.label == "site"
    assert site.site_label({"site-name": "north", "partition-id": 0, "data-file": "/srv/n.csv"}) == "north"
    assert site.site_label({"data-file": "/srv/clinic/north.csv", "hospital": "north"}) == "data-file:north.csv"
    assert site.site_label({"data-dir": "/srv/clinic/images/"}) == "data-dir:images"


def test_a_task_path_puts_a_sites_own_task_module_on_the_path(tmp_path, fresh_sites, monkeypatch, task_identity):
    folder = tmp_path / "private"
    folder.mkdir()
    shutil.copy(Path(__file__).with_name("user_tasks.py"), folder / "north_clinic_tasks.py")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folder is not left on this process's path
    monkeypatch.delitem(sys.modules, "north_clinic_tasks", raising=False)
    run_config = {"task": "north_clinic_tasks:BloodPressure"}
    with pytest.raises(ConfigError, match="cannot be imported .* or name its folder in the node config's task-path"):
        load_site(run_config, {"partition-id": 0})
    loaded = load_site(run_config, {"partition-id": 0, "task-path": str(folder)})
    assert str(folder) in sys.path and loaded.task.primary_metric == "mae" and len(loaded.train) == 500
    query = preflight_query()
    report = client_app.preflight(query, context(run_config, {"partition-id": 0, "task-path": str(folder)}))
    assert report.content["report"]["ok"] is True and list(report.content["report"]["metric-names"]) == ["mae", "mse"]
