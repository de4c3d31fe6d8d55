"""Real `flwr run` simulations on real Fashion-MNIST subsets, through fedcycle's own SuperLink."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from fedcycle.checkpoint import load_checkpoint
from fedcycle.results import load_model, read_metrics
from fedcycle_tools.launcher import LocalSimulation

SMALL = "train-subset=500 test-subset=1000 batch-size=32"


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = LocalSimulation(tmp_path_factory.mktemp("flwr-home"))
    link.start()
    yield link
    pids = link.processes.pids()
    link.stop()
    for pid in pids:  # nothing of its session is left behind
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def run(superlink, tmp_path, data_root, overrides: str, sites: int = 2):
    pairs = dict(item.split("=", 1) for item in f"{SMALL} data-root='{data_root}' results-dir='{tmp_path}' {overrides}".split())
    return superlink.run(sites, " ".join(f"{k}={v}" for k, v in pairs.items()), stream=False)


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_cyclical_fedavg_run_completes_and_learns(superlink, tmp_path, data_root):
    out = run(superlink, tmp_path, data_root, "num-server-rounds=2 local-epochs=2 swa-start=1 checkpoints-keep=5 run-name='e2e'")
    assert out.completed, out.log[-3000:]
    assert out.results_dir == tmp_path / "e2e"
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["metrics_source"] == "server-test" for r in rounds)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    for r in rounds[1:]:
        assert len(r["sites"]) == 2 and r["events"] == []
        for site in r["sites"]:  # what the server set is what the sites trained with
            assert site["local-epochs"] == 2 and site["lr-peak"] == pytest.approx(0.05)
            assert site["lr-first"] == pytest.approx(0.005) and site["num-examples"] == 500
    config = json.loads((out.results_dir / "config.json").read_text())
    assert config["seed"] == 42 and config["versions"]["flwr"] == "1.42.0"
    assert config["run_config"]["num-server-rounds"] == 2 and len(config["sites"]) == 2
    assert "cpu_count" in config["machine"]
    final = load_model(out.results_dir / "global-final.safetensors")
    assert "classifier.3.weight" in final and final["classifier.3.weight"].shape == (10, 128)
    assert (out.results_dir / "global-best.safetensors").exists()
    assert (out.results_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # the server's mean of cycle ends (a cycle per round, from round 1): the float64 mean of the
    # global models of rounds 1 and 2, as their checkpoints hold them, evaluated beside the global model
    assert rounds[0].get("swa") is None and [r["swa"]["rounds"] for r in rounds[1:]] == [[1], [1, 2]]
    assert rounds[1]["swa"]["accuracy"] == pytest.approx(rounds[1]["accuracy"], abs=1e-12)
    assert rounds[2]["swa"]["batchnorm"] == "none in the model"
    averaged = load_model(out.results_dir / "global-swa.safetensors")
    saved = [load_checkpoint(out.results_dir / "checkpoints" / f"round-{r:04d}.safetensors").model for r in (1, 2)]
    for key, value in averaged.items():
        mean = (saved[0][key].double() + saved[1][key].double()) / 2
        assert torch.equal(value, mean.to(value.dtype)), key


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_fedprox_with_site_evaluation_on_a_dirichlet_split(superlink, tmp_path, data_root):
    out = run(
        superlink, tmp_path, data_root,
        "num-server-rounds=2 local-epochs=1 strategy='fedprox' fedprox.proximal-mu=0.1 "
        "partitioner='dirichlet' dirichlet.alpha=0.5 site-eval='evaluate-round' lr-schedule='cosine' run-name='prox'",
        sites=3,
    )
    assert out.completed, out.log[-3000:]
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert {len(r["sites"]) for r in rounds[1:]} == {3}
    assert "received-accuracy" not in rounds[1]["sites"][0]  # evaluated in its own round instead
    for r in rounds[1:]:  # the evaluate round's aggregate: an example-weighted accuracy
        assert 0 < r["sites_evaluation"]["accuracy"] <= 1
    assert "Starting FedProx, rounds 1 to 2" in out.log and "the sites' evaluation of the global model" in out.log


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_bad_run_config_fails_the_run_before_training(superlink, tmp_path, data_root):
    out = run(superlink, tmp_path, data_root, "lr-min=0.5 lr-max=0.1 run-name='bad'")
    assert out.run_id is not None
    assert out.status == "finished:failed"
    assert "fedcycle: lr-min=0.5 must be between 0 and lr-max=0.1" in out.log
    assert "Traceback" not in out.log  # one line, not Flower's internals
    assert not (tmp_path / "bad").exists()


@pytest.mark.e2e  # runs `fedcycle simulate` as a process
@pytest.mark.parametrize("overrides, message", [
    ("dataset='no-such-set'", "error: image.dataset='no-such-set' is unknown; choose one of ['cifar10', 'fashion-mnist', 'image-folder']"),
    ("strategy='fedprox' fedprox.proximal-mu=-1.0", "error: fedprox.proximal-mu=-1.0 must be a number in [0, inf)"),
    ("learning-rate=0.1", "error: run config key 'learning-rate' is unknown"),
])
def test_the_launcher_checks_the_run_config_before_it_starts_anything(tmp_path, overrides, message):
    import subprocess
    import sys

    home = tmp_path / "flwr-home"  # the `fedcycle` command pip installed beside this Python
    out = subprocess.run([str(Path(sys.executable).parent / "fedcycle"), "simulate", "--flwr-home", str(home),
                          "--run-config", overrides], capture_output=True, text=True, timeout=300)
    notes = [line for line in out.stderr.strip().splitlines() if line.startswith("note: ")]
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), out.stderr
    # a key that moved still works through the launcher, with one line that says so
    assert notes == (["note: run config key 'dataset' is 'image.dataset' now; fedcycle passes it on under that "
                      "name (plain `flwr run` refuses the old one)"] if overrides.startswith("dataset=") else [])
    assert not home.exists()  # no SuperLink was started


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_undeclared_key_is_refused_by_flower(superlink, tmp_path, data_root):
    out = run(superlink, tmp_path, data_root, "learning-rate=0.1")
    assert out.run_id is None and not out.completed
    assert "Invalid run configuration" in out.log


# The built-in tasks on real data made offline (fedcycle_tools.demo_data), small: each learns in
# simulation by a margin stated here (what "learns" means for the kind: accuracy from chance,
# and for the binary table its AUROC).
KINDS = {
    "tabular": ("num-server-rounds=3 local-epochs=3 batch-size=32", 3, {"accuracy": 0.2}),
    "text": ("num-server-rounds=3 local-epochs=2 text.max-length=128 optimizer='adamw' lr-min=0.0005 lr-max=0.005",
             2, {"accuracy": 0.3}),
    "audio": ("num-server-rounds=3 local-epochs=4 batch-size=16 val-fraction=0.2", 2, {"accuracy": 0.3}),
}


def kind_data(kind: str, root) -> str:
    from fedcycle_tools import demo_data

    if kind == "tabular":
        return demo_data.tabular(root)
    if kind == "text":
        return demo_data.text(root, per_language=200, test_per_language=40)
    # two sites of their own accents; the server tests on clips of both at a speed no site has
    voices = {k: demo_data.VOICE_SETS[k] for k in ("site-0", "site-1")}
    config = demo_data.audio(root, speeds=(140, 180), pitches=(40, 60), voice_sets=voices)
    demo_data.audio(root / "test-clips", speeds=(160,), pitches=(50,), voice_sets=voices)
    for digit in demo_data.DIGITS:
        (root / "test" / digit).mkdir(parents=True, exist_ok=True)
        for wav in (root / "test-clips").glob(f"*/{digit}/*.wav"):
            wav.rename(root / "test" / digit / f"{wav.parent.parent.name}-{wav.name}")
    return config


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_builtin_kind_learns_in_simulation(superlink, tmp_path, kind):
    overrides, sites, margins = KINDS[kind]
    config = f"{kind_data(kind, tmp_path / 'data')} {overrides} results-dir='{tmp_path}' run-name='{kind}'"
    out = superlink.run(sites, config, stream=False)
    assert out.completed, out.log[-3000:]
    rounds = read_metrics(out.results_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and all(r["events"] == [] for r in rounds)
    assert {r["metrics_source"] for r in rounds} == {"server-test"}
    for metric, margin in margins.items():
        assert rounds[-1]["metrics"][metric] > rounds[0]["metrics"][metric] + margin, [r["metrics"] for r in rounds]
    if kind == "tabular":  # two classes: AUROC, over the whole test set, is what "best" means
        assert rounds[-1]["primary_metric"] == "auroc" and rounds[-1]["auroc"] > 0.95
        assert json.loads((out.results_dir / "config.json").read_text())["sites"]  # with their statistics


def test_flwr_run_gets_the_runtime_package_and_its_manifest_only():
    # the app that `flwr run` bundles: fedcycle's pyproject.toml and the runtime package, no tools
    from flwr.cli.build import build_fab_from_disk

    import fedcycle
    from fedcycle_tools.launcher import app_folder

    with app_folder() as staged:
        files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
        fab = build_fab_from_disk(staged)
    runtime = {f"fedcycle/{p.relative_to(Path(fedcycle.__file__).parent).as_posix()}"
               for p in Path(fedcycle.__file__).parent.rglob("*.py")}
    assert files == {"pyproject.toml", *runtime}
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert {"pyproject.toml", "fedcycle/server_app.py", "fedcycle/client_app.py"} <= names
    assert not any(n.startswith("fedcycle_tools") or "__pycache__" in n for n in names)
