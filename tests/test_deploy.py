"""The deployment topology for real, on loopback: a SuperLink with TLS and SuperNode
authentication, the fleet-only proxy, SuperExecs, and SuperNodes with their own keys, each
under a site policy (the strict default unless it names its own) and known by its site-name."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fedcycle.policy import SitePolicy, load_policy
from fedcycle.results import read_metrics
from fedcycle.tasks.image.datasets import load
from fedcycle.tasks.image.settings import ImageSettings
from fedcycle_tools.deploy.loopback import LoopbackDeployment
from fedcycle_tools.deploy.pki import make_pki
from fedcycle_tools.launcher import FlwrCli, flwr_env, trusting

# every test runs on a LoopbackDeployment (SuperLink, nginx, SuperExecs, SuperNodes) or runs `flwr`
pytestmark = pytest.mark.e2e


FOLDERS = tuple(f"class-{i}" for i in range(10))  # a site's folder names for Fashion-MNIST's 10 classes


def run_config(data_root: str, results: Path, extra: str = "") -> str:
    return (
        f"num-server-rounds=2 local-epochs=2 train-subset=400 test-subset=1000 batch-size=32 "
        f"classes='{','.join(FOLDERS)}' data-root='{data_root}' results-dir='{results}' {extra}"
    )


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory, data_root) -> tuple[Path, Path]:
    """Two data centers' own files: 40 real Fashion-MNIST images per class each, as PNGs in class
    folders, no image in both."""
    train = load(ImageSettings(data_root=data_root), "train")
    rng = np.random.default_rng(0)
    folders = tuple(tmp_path_factory.mktemp(f"hospital-{x}") / "images" for x in "ab")
    for label, name in enumerate(FOLDERS):
        chosen = rng.choice(np.flatnonzero(train.labels == label), 80, replace=False)
        for folder, part in zip(folders, (chosen[:40], chosen[40:])):
            (folder / name).mkdir(parents=True)
            for i in part:
                Image.fromarray(train.images[i, 0]).save(folder / name / f"{i}.png")
    return folders


@pytest.fixture(scope="module")
def site_tables(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two hospitals' own tables (halves of the breast cancer set's 80%) and the server's test table."""
    from fedcycle_tools import demo_data

    root = tmp_path_factory.mktemp("tables")
    demo_data.tabular(root)
    header, *rows = (root / "breast-cancer-train.csv").read_text().splitlines()
    halves = (root / "hospital-a.csv", root / "hospital-b.csv")
    for path, part in zip(halves, (rows[::2], rows[1::2])):
        path.write_text("\n".join([header, *part]) + "\n")
    return (*halves, root / "breast-cancer-test.csv")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = LoopbackDeployment(tmp_path_factory.mktemp("deployment"))
    try:
        d.start_superlink()
        d.start_proxy()
        yield d
    finally:
        pids = d.processes.pids()
        d.stop()
        for pid in pids:  # every process it started is gone, with its children
            with pytest.raises(ProcessLookupError):
                __import__("os").killpg(pid, 0)


def stop_and_wait(deployment, name: str, online: int, timeout: float = 90) -> None:
    """Stop a site and wait until the SuperLink counts `online` sites again: a site it still
    counts would be sent the next run's pre-flight query."""
    deployment.stop_site(name)
    deadline = time.monotonic() + timeout
    while deployment.online_sites() > online:
        assert time.monotonic() < deadline, f"the SuperLink still counts {name} online after {timeout}s"
        time.sleep(1)


@pytest.fixture(scope="module")
def two_site_run(deployment, site_folders, site_tables, data_root, tmp_path_factory):
    """Two sites, each on its own ImageFolder (dataset 'image-folder': the server holds no test
    data, so the sites evaluate every round's model, the initial one too): 2 rounds. Each site
    also keeps a table of its own, for a tabular run. Both run under the deployment's strict
    default policy. A third site, whose own policy runs only the tabular task, is connected for
    this run (its pre-flight answer costs the run next to nothing) and stopped after it."""
    for name, folder, table in zip(("site-a", "site-b"), site_folders, site_tables):
        deployment.add_site(name, f"data-dir='{folder}' data-file='{table}'")
        deployment.start_site(name)
    policy = tmp_path_factory.mktemp("tables-only") / "policy.toml"
    policy.write_text('tasks = ["tabular"]\nmin-records = 20\n')
    deployment.add_site("site-tables-only", f"data-file='{site_tables[0]}' policy-file='{policy}'")
    deployment.start_site("site-tables-only")
    try:
        deployment.wait_for_sites(3)
        results = tmp_path_factory.mktemp("results")
        return deployment.run(run_config(data_root, results, "image.dataset='image-folder' run-name='deployed'"),
                              stream=False)
    finally:
        stop_and_wait(deployment, "site-tables-only", online=2)


def test_every_site_runs_under_a_strict_policy_and_is_known_by_its_name(deployment, two_site_run):
    for name in ("site-a", "site-b"):
        node_config = deployment.sites[name].node_config
        assert f"site-name='{name}'" in node_config
        policy_file = deployment.workdir / "policies" / f"{name}.toml"
        assert f"policy-file='{policy_file}'" in node_config
        assert load_policy({"policy-file": str(policy_file)}) == SitePolicy.strict(policy_file.name)
    # a site that names its own policy keeps it: no default is written for it
    assert not (deployment.workdir / "policies" / "site-tables-only.toml").exists()


def test_a_site_whose_policy_refuses_the_task_is_left_out_and_named(two_site_run):
    assert two_site_run.completed, two_site_run.log[-4000:]
    config = json.loads((two_site_run.results_dir / "config.json").read_text())
    (reason,) = config["refused_sites"].values()
    assert reason.startswith("site site-tables-only (node ")
    assert ("its policy refuses the run (tasks): task='image-classification' is not among the tasks it runs "
            "['tabular']") in reason
    assert sorted(r["site"] for r in config["sites"].values()) == ["site-a", "site-b"]
    # the coordinator's log names it, its rule, and that the run went on
    assert f"{reason}; the run goes on without it" in " ".join(two_site_run.log.split())
    rounds = read_metrics(two_site_run.results_dir / "metrics.jsonl")
    for r in rounds[1:]:  # it was sent no work: no event names it, no round waits for it
        assert sorted(s["site"] for s in r["sites"]) == ["site-a", "site-b"] and r["events"] == []


def test_run_over_tls_with_node_auth_completes_and_learns(two_site_run):
    assert two_site_run.completed, two_site_run.log[-4000:]
    rounds = read_metrics(two_site_run.results_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert (two_site_run.results_dir / "global-final.safetensors").exists()
    assert (two_site_run.results_dir / "config.json").exists()


def test_each_site_trains_on_its_own_folder_and_the_sites_evaluate_every_model(two_site_run, site_folders):
    config = json.loads((two_site_run.results_dir / "config.json").read_text())
    sites = {report["site"]: report for report in config["sites"].values()}
    assert sorted(sites) == ["site-a", "site-b"]  # the coordinator knows each site by its site-name
    for name in sites:  # 40 images of each of 10 classes, 10% held out
        assert sites[name]["num-train"] == 360 and sites[name]["num-val"] == 40
    rounds = read_metrics(two_site_run.results_dir / "metrics.jsonl")
    assert [r["metrics_source"] for r in rounds] == ["sites-weighted"] * 3  # round 0 too
    for r in rounds:  # the example-weighted mean of the two sites' 40 held-out images each
        assert r["accuracy"] == pytest.approx(r["sites_evaluation"]["accuracy"]) and r["accuracy"] * 80 == pytest.approx(
            round(r["accuracy"] * 80))
    for r in rounds[1:]:
        assert sorted(s["num-examples"] for s in r["sites"]) == [360, 360] and r["events"] == []


def test_each_site_trains_on_its_own_table_and_the_model_learns(deployment, two_site_run, site_tables, tmp_path):
    out = deployment.run(f"task='tabular' tabular.test-file='{site_tables[2]}' tabular.label-column='diagnosis' "
                         f"classes='malignant,benign' num-server-rounds=2 local-epochs=3 batch-size=32 "
                         f"results-dir='{tmp_path}' run-name='tables'", stream=False)
    assert out.completed, out.log[-4000:]
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert rounds[-1]["primary_metric"] == "auroc" and rounds[-1]["auroc"] > 0.95
    assert rounds[-1]["metrics"]["accuracy"] > rounds[0]["metrics"]["accuracy"] + 0.2
    config = json.loads((out.results_dir / "config.json").read_text())
    sites = config["sites"].values()
    rows = sorted(len(t.read_text().splitlines()) - 1 for t in site_tables[:2])
    assert sorted(r["num-train"] + r["num-val"] for r in sites) == rows  # each site read its own file
    assert sorted(r["site"] for r in sites) == ["site-a", "site-b"] and config["refused_sites"] == {}
    # each site's sums went into the pooled statistics; the server keeps only their totals, not a site's
    assert all("statistics" not in r for r in sites)


def test_control_api_is_not_reachable_through_the_sites_address(deployment):
    ca = trusting(deployment.pki.ca_cert)
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/pull-task-input"):
        refused = httpx.post(f"https://{deployment.fleet_address}{path}", content=b"", verify=ca, timeout=10)
        assert refused.status_code == 403 and "only the Fleet API" in refused.text
        direct = httpx.post(f"https://{deployment.control_address}{path}", content=b"", verify=ca, timeout=10)
        # the same request reaches the SuperLink's own API on its address, which answers it (an empty body
        # is not a protobuf message: 415, from the SuperLink's server, not the proxy)
        assert direct.status_code == 415 and "Unsupported Content-Type" in direct.text and direct.headers["server"] == "uvicorn"
    # `flwr` pointed at the sites' address cannot list runs
    home = deployment.workdir / "sites-view"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fleet"\n[superlink.fleet]\naddress = "{deployment.fleet_address}"\n'
        f'root-certificates = "{deployment.pki.ca_cert}"\n'
    )
    listed = FlwrCli(flwr_env(home), deployment.app_dir, "fleet")("ls", "fleet", "--format", "json", timeout=60)
    answer = json.loads(listed.stdout)  # flwr exits 0 and says in its JSON that it failed
    assert answer["success"] is False and "403 Forbidden" in answer["error-message"] and "runs" not in answer


def wait_for_exit(deployment, name: str, timeout: float = 90) -> str:
    proc = deployment.processes.procs[f"supernode-{name}"]
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is not None, f"supernode-{name} still running after {timeout}s"
    from fedcycle_tools.deploy.loopback import explain_supernode_exit

    message = explain_supernode_exit(name, proc.returncode, deployment.processes.tail(f"supernode-{name}", 30))
    deployment.stop_site(name)
    return message


def test_a_site_whose_key_is_not_registered_is_refused(deployment, two_site_run):
    deployment.add_site("intruder", "partition-id=1 num-partitions=2", register=False)
    deployment.start_site("intruder", max_retries=1)
    message = wait_for_exit(deployment, "intruder")
    assert "refused its key" in message and "register" in message
    assert deployment.online_sites() == 2


def test_a_site_without_the_ca_cannot_connect(deployment, two_site_run):
    other = make_pki(deployment.workdir / "other-ca", ["localhost", "127.0.0.1"], [])
    deployment.add_site("no-ca", "partition-id=1 num-partitions=2")
    deployment.start_site("no-ca", root_certificates=other.ca_cert, max_retries=1)
    message = wait_for_exit(deployment, "no-ca")
    assert "does not trust the SuperLink's certificate" in message and "ca.crt" in message


def test_a_missing_data_dir_fails_the_preflight_round(deployment, two_site_run, data_root, tmp_path):
    deployment.add_site("site-c", f"data-dir='{tmp_path / 'not-there'}'")
    deployment.start_site("site-c")
    deployment.wait_for_sites(3)
    try:
        outcome = deployment.run(run_config(data_root, tmp_path / "results", "run-name='preflight'"), stream=False)
    finally:
        deployment.stop_site("site-c")
    assert outcome.status == "finished:failed"
    assert "pre-flight failed, no training started" in outcome.log
    # the site's strict policy (error-values=false) lets only the error's text without the data's
    # values go: the key and what is wrong, which the coordinator passes on to the site's operator
    assert "data-dir=" in outcome.log and "does not exist or is not a directory" in outcome.log
    assert not (tmp_path / "results" / "preflight" / "metrics.jsonl").exists()


def test_deploy_site_runs_under_the_strict_default_unless_the_site_names_a_policy(tmp_path, monkeypatch, capsys):
    from fedcycle_tools.deploy.__main__ import site_node_config

    monkeypatch.chdir(tmp_path)
    written = tmp_path / "fedcycle-site-policy.toml"
    node_config = site_node_config("st-marys", "data-dir='/data/images'")
    assert node_config == f"data-dir='/data/images' site-name='st-marys' policy-file='{written}'"
    assert f"wrote the strict default policy to {written}" in capsys.readouterr().out
    assert load_policy({"policy-file": str(written)}) == SitePolicy.strict(written.name)
    written.write_text('tasks = ["tabular"]\n')  # the site's own edits are kept, never written over
    assert site_node_config("st-marys", "data-dir='/data/images'") == node_config
    assert f"using {written}" in capsys.readouterr().out and written.read_text() == 'tasks = ["tabular"]\n'
    own = tmp_path / "own.toml"
    own.write_text("min-records = 50\n")
    assert (site_node_config("st-marys", "data-file='/d/t.csv' site-name='St Marys'", str(own))
            == f"data-file='/d/t.csv' site-name='St Marys' policy-file='{own}'")
    with pytest.raises(ValueError, match="'missing.toml' cannot be read"):  # it would refuse every run
        site_node_config("st-marys", "", str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="name the policy once"):
        site_node_config("st-marys", f"policy-file='{own}'", str(own))


def test_a_dead_superlink_fails_flwr_run_at_once(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "gone"\n[superlink.gone]\naddress = "127.0.0.1:9"\ninsecure = true\n')
    started = time.monotonic()
    outcome = FlwrCli(flwr_env(home), Path(__file__).parent.parent, "gone").run("", stream=False)
    assert outcome.run_id is None and time.monotonic() - started < 60
    assert "no SuperLink answers" in outcome.status
