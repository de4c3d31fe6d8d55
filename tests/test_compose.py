"""docker-compose.yml, validated for real: no Docker engine runs here, so the file goes through
Debian's docker-compose, and every service's flags through `--help` of the pinned flwr. That the
topology works is shown by tests/test_deploy.py, which runs the same services as processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedcycle_tools.deploy.pki import make_pki
from fedcycle_tools.launcher import _bin

REPO = Path(__file__).resolve().parent.parent
FLWR_PIN = re.search(r"flwr\[simulation\]==([\d.]+)", (REPO / "pyproject.toml").read_text()).group(1)
BINARIES = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode", "fedcycle-superexec": "flower-superexec"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the compose files with the secrets `fedcycle_tools.deploy certs` makes."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose (Debian's, the validator) is missing: run `make deploy-tools`")
    root = tmp_path_factory.mktemp("compose")
    for name in ("docker-compose.yml", "docker-compose.gpu.yml", ".env"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "deploy", root / "deploy", ignore=shutil.ignore_patterns("secrets"))
    make_pki(root / "deploy" / "secrets", ["superlink", "fleet-proxy", "localhost"], ["site-1", "site-2"])
    return root


def compose_config(project: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run(
        ["docker-compose", "--project-directory", str(project), "config"],
        cwd=project, env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.e2e  # runs Debian's docker-compose
def test_compose_file_is_valid_with_every_profile_and_gpus(project):
    done = compose_config(project)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"superlink", "fleet-proxy", "superexec-serverapp", "supernode-1", "superexec-1", "supernode-2", "superexec-2"}
    for site in ("superexec-1", "superexec-2"):
        (device,) = services[site]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.e2e  # runs Debian's docker-compose
def test_gpus_can_be_switched_off_and_each_host_starts_only_its_role(project):
    done = compose_config(project, COMPOSE_FILE="docker-compose.yml")
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert all("deploy" not in service for service in services.values())
    roles = {name: service["profiles"] for name, service in services.items()}
    assert roles == {
        "superlink": ["coordinator"], "fleet-proxy": ["coordinator"], "superexec-serverapp": ["coordinator"],
        "supernode-1": ["site-1"], "superexec-1": ["site-1"], "supernode-2": ["site-2"], "superexec-2": ["site-2"],
    }


@pytest.mark.e2e  # runs Debian's docker-compose
def test_the_validator_rejects_a_broken_file(project, tmp_path):
    broken = yaml.safe_load((project / "docker-compose.yml").read_text())
    broken["services"]["superlink"]["ports"] = {"not": "a list"}
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    shutil.copytree(project / "deploy", tmp_path / "deploy")
    done = compose_config(tmp_path, COMPOSE_FILE="docker-compose.yml")
    assert done.returncode != 0 and "ports" in done.stderr


def services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


@pytest.mark.e2e  # runs flower-superlink/-supernode/-superexec --help
@pytest.mark.parametrize("name", sorted(n for n, s in services().items() if "command" in s))
def test_every_flag_is_one_the_pinned_flwr_accepts(name):
    service = services()[name]  # safe_load applies the <<: *anchor merge keys
    image = service["image"].split(":")[0]
    binary = BINARIES[image]
    help_text = subprocess.run([_bin(binary), "--help"], capture_output=True, text=True, timeout=120).stdout
    accepted = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    flags = [arg.split("=", 1)[0] for arg in service["command"] if arg.startswith("--")]
    assert flags, name
    unknown = [flag for flag in flags if flag not in accepted]
    assert not unknown, f"{name}: {binary} {FLWR_PIN} does not accept {unknown}"


def test_images_are_pinned_to_the_flwr_version_of_pyproject():
    for name, service in services().items():
        image = service["image"]
        if image.startswith("flwr/"):
            assert image.split(":")[1] == FLWR_PIN, name
    dockerfile = (REPO / "deploy" / "superexec.Dockerfile").read_text()
    assert re.search(rf"^FROM flwr/superexec:{re.escape(FLWR_PIN)}(-|$)", dockerfile, re.M)
    assert "requirements.txt" in dockerfile  # fedcycle's pinned dependencies are in the image


def test_tls_and_node_authentication_are_on_and_control_stays_private():
    s = services()
    link = s["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= {a.split("=")[0] for a in link}
    assert s["superlink"]["ports"] == ["127.0.0.1:8000:8000"]
    assert s["fleet-proxy"]["ports"] == ["9443:9443"]
    for name in ("supernode-1", "supernode-2"):
        args = {a.split("=")[0] for a in s[name]["command"]}
        assert {"--root-certificates", "--auth-supernode-private-key"} <= args and "--insecure" not in args
        assert "fleet-proxy:9443" in " ".join(s[name]["command"])
    assert "--insecure" not in s["superexec-serverapp"]["command"]


def test_every_site_runs_under_the_strict_policy_where_its_clientapps_run():
    from fedcycle.policy import parse_policy
    from fedcycle_tools.deploy.policy import STRICT_POLICY, parse_node_config

    import tomllib

    s = services()
    for n in ("1", "2"):
        flag = next(a for a in s[f"supernode-{n}"]["command"] if a.startswith("--node-config="))
        node = parse_node_config(flag.split("=", 1)[1])
        assert node["site-name"] == f"site-{n}" and node["policy-file"] == "/run/secrets/site-policy.toml"
        assert "site-policy.toml" in s[f"superexec-{n}"]["secrets"]  # the ClientApp runs in the SuperExec
    policy = parse_policy(tomllib.loads((REPO / "deploy" / "site-policy.toml").read_text()), "site-policy.toml")
    assert (policy.app_code, policy.error_values, policy.data_from_run_config) == (False, False, False)
    assert (REPO / "deploy" / "site-policy.toml").read_text() == STRICT_POLICY  # one file for every recipe
