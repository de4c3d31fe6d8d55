"""The deployment topology as real processes on one machine's loopback.

The same services as docker-compose.yml: a SuperLink with TLS, SuperNode authentication
and a `--database`, and a SuperExec that runs the ServerApp; the fleet-only proxy (nginx),
the only address the sites dial; per site a SuperNode with its own key, node config and
port, and a SuperExec that runs its ClientApps. Each site runs under the strict default
policy (fedcycle_tools.deploy.policy) unless its node config names a `policy-file`, and is
known to the coordinator by its name (`site-name`). Used by `make deploy-demo` and the
end-to-end tests; the same commands with real host names are the README's recipe for
sites without Docker.
"""

from __future__ import annotations

import json
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fedcycle_tools.deploy.pki import Pki, make_pki, make_site_keys
from fedcycle_tools.deploy.policy import (
    parse_node_config,
    with_keys,
    write_strict_policy,
)
from fedcycle_tools.launcher import (
    FlwrCli,
    ProcessGroup,
    RunOutcome,
    _bin,
    flwr_env,
    free_port,
    http_ok,
    project_file,
    python_path,
    trusting,
)

CONNECTION = "fedcycle-deploy"
PROXY_TEMPLATE = project_file("deploy/fleet-proxy.conf.template")


@dataclass
class SiteProcess:
    name: str
    node_config: str
    port: int = field(default_factory=free_port)


class LoopbackDeployment:
    """Owns every process it starts; `stop()` (or leaving the `with` block) ends them all."""

    def __init__(self, workdir: Path, app_dir: Path | None = None, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                 server_task_path: str = "") -> None:
        self.workdir = Path(workdir).resolve()
        self.app_dir = Path(app_dir).resolve() if app_dir else None
        self.pki: Pki = make_pki(self.workdir / "secrets", list(hosts), sites=[])
        self.port = free_port()  # the SuperLink itself: Fleet + Control + Runtime, loopback only
        self.fleet_port = free_port()  # the proxy: what the sites dial
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flwr_env(self.flwr_home)
        # where the coordinator finds a user's task module; each site names its own in its node config (task-path)
        self.server_env = {**self.env, **python_path(server_task_path)}
        self.processes = ProcessGroup(self.workdir / "logs")
        self.flwr = FlwrCli(self.env, self.app_dir, CONNECTION)
        self.sites: dict[str, SiteProcess] = {}
        self._write_connection()

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.fleet_port}"

    def __enter__(self) -> "LoopbackDeployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.control_address}"\n'
            f'root-certificates = "{self.pki.ca_cert}"\n'
        )

    # -- coordinator -----------------------------------------------------------------

    def start_superlink(self, timeout: float = 60) -> None:
        secret = str(self.pki.superexec_secret("superlink"))
        command = [
            _bin("flower-superlink"),
            "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--ssl-certfile", str(self.pki.superlink_cert),
            "--ssl-keyfile", str(self.pki.superlink_key),
            "--enable-supernode-auth",
            "--database", str(self.workdir / "superlink-state.db"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--isolation", "process",
            "--superexec-auth-secret-file", secret,
            "--disable-runtime-dependency-installation",
        ]
        self.processes.start("superlink", command, self.env, self.workdir)
        url = f"https://{self.control_address}/health"
        self.processes.wait_until("superlink", lambda: http_ok(url, self.pki.ca_cert), timeout, f"serving {url}")
        serverapp_exec = [
            _bin("flower-superexec"),
            "--runtime-api-address", self.control_address,
            "--root-certificates", str(self.pki.ca_cert),
            "--superexec-auth-secret-file", secret,
        ]
        self.processes.start("superexec-serverapp", serverapp_exec, self.server_env, self.workdir)

    def start_proxy(self, timeout: float = 30) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        prefix = self.workdir / "proxy"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        server = string.Template(PROXY_TEMPLATE.read_text()).safe_substitute(
            FLEET_LISTEN=self.fleet_address,
            CERT_DIR=str(self.pki.root),
            SUPERLINK_ADDRESS=self.control_address,
            SUPERLINK_TLS_NAME="localhost",  # nginx checks DNS names, not IP subjectAltNames
        )
        (prefix / "fleet-proxy.conf").write_text(server)
        (prefix / "nginx.conf").write_text(
            "worker_processes 1;\n"
            f"pid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/logs/error.log warn;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"  access_log {prefix}/logs/access.log;\n"
            + "".join(f"  {kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + f"  include {prefix}/fleet-proxy.conf;\n"
            "}\n"
        )
        self.processes.start("proxy", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                             self.env, self.workdir)
        url = f"https://{self.fleet_address}/"
        self.processes.wait_until("proxy", lambda: _answers(url, self.pki.ca_cert), timeout, f"serving {url}")

    # -- sites -------------------------------------------------------------------------

    def add_site(self, name: str, node_config: str, register: bool = True, *, name_site: bool = True) -> SiteProcess:
        """Make the site's key pair and, unless told not to, register its public key.

        Security by default: a site whose node config names no `policy-file` gets the strict
        default policy (`policies/<name>.toml` in the workdir), and `site-name='<name>'` so the
        coordinator names it. `name_site=False` leaves its label to Flower's node config (partition,
        data file): for tests that need those, never for a real site."""
        make_site_keys(self.pki, [name])
        if register:
            register_key(self.flwr, CONNECTION, self.pki.site_pub(name))
        own = parse_node_config(node_config)
        extra = {}
        if name_site:
            extra["site_name"] = name
        if "policy-file" not in own:
            policy = self.workdir / "policies" / f"{name}.toml"
            write_strict_policy(policy)
            extra["policy_file"] = str(policy)
        site = SiteProcess(name, with_keys(node_config, **extra))
        self.sites[name] = site
        return site

    def start_site(
        self, name: str, root_certificates: Path | None = None, superlink: str | None = None, max_retries: int = 10
    ) -> None:
        """The site's SuperNode (dialing the proxy) and the SuperExec that runs its ClientApps."""
        site = self.sites[name]
        secret = str(self.pki.superexec_secret(name))
        command = [
            _bin("flower-supernode"),
            "--superlink", superlink or self.fleet_address,
            "--root-certificates", str(root_certificates or self.pki.ca_cert),
            "--auth-supernode-private-key", str(self.pki.site_key(name)),
            "--node-config", site.node_config,
            "--host", "127.0.0.1", "--port", str(site.port),
            "--isolation", "process",
            "--superexec-auth-secret-file", secret,
            "--max-retries", str(max_retries),
        ]
        self.processes.start(f"supernode-{name}", command, self.env, self.workdir)
        clientapp_exec = [
            _bin("flower-superexec"),
            "--runtime-api-address", f"127.0.0.1:{site.port}",
            "--insecure",  # loopback inside the site, between its own SuperNode and SuperExec
            "--superexec-auth-secret-file", secret,
        ]
        self.processes.start(f"superexec-{name}", clientapp_exec, self.env, self.workdir)

    def stop_site(self, name: str) -> None:
        """Stop a site's SuperNode and SuperExec and forget it."""
        self.processes.stop(f"supernode-{name}")
        self.processes.stop(f"superexec-{name}")
        self.sites.pop(name, None)

    def online_sites(self) -> int:
        done = self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=60)
        try:
            nodes = json.loads(done.stdout)["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_for_sites(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.online_sites() < count:
            for name in self.sites:
                proc = self.processes.procs.get(f"supernode-{name}")
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(explain_supernode_exit(name, proc.returncode, self.processes.tail(f"supernode-{name}")))
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.online_sites()} of {count} sites online after {timeout:.0f}s")
            time.sleep(1)

    def run(self, run_config: str = "", stream: bool = True) -> RunOutcome:
        return self.flwr.run(run_config, stream=stream)

    def stop(self) -> None:
        self.processes.stop_all()


def _answers(url: str, ca: Path) -> bool:
    """True once the server completes a TLS handshake and answers anything over HTTP."""

    try:
        httpx.get(url, timeout=0.5, verify=trusting(ca))
        return True
    except httpx.HTTPError:
        return False


def register_key(cli: FlwrCli, connection: str, public_key: Path) -> str:
    """Register a site's public key with the SuperLink behind `connection`; what Flower answered."""
    done = cli("supernode", "register", str(public_key), connection, timeout=60)
    text = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise RuntimeError(
            f"could not register {public_key} with connection {connection!r}:\n{text}\n"
            "Check that the SuperLink runs with --enable-supernode-auth, that this connection in "
            "$FLWR_HOME/config.toml points at its Control address (loopback or VPN) with "
            "root-certificates = the deployment's ca.crt, and that the key is not registered already."
        )
    return text.splitlines()[-1] if text else "ok"


def explain_supernode_exit(name: str, code: int | None, log_tail: str) -> str:
    """Turn a SuperNode's exit (Flower says only 'Exit Code: 305') into what is wrong and what to do."""
    if "Failed to activate SuperNode" in log_tail:
        return (
            f"site {name}: the SuperLink refused its key ('Failed to activate SuperNode'). On the coordinator, "
            f"register the site's public key: python -m fedcycle_tools.deploy register --connection <name> {name}.pub"
        )
    if "CERTIFICATE_VERIFY_FAILED" in log_tail:
        return (
            f"site {name}: it does not trust the SuperLink's certificate. Give it the deployment's CA "
            "(--root-certificates ca.crt from the coordinator) and check that the address it dials is "
            "one of the certificate's --host names"
        )
    if any(text in log_tail for text in ("Connection refused", "Name or service not known", "No address associated", "timed out")):
        return (
            f"site {name}: nothing answers at the SuperLink address it dials. Check --superlink host:port "
            "(the coordinator's fleet proxy, port 9443 in docker-compose.yml), that the coordinator is up, "
            "and that the port is open in the firewall"
        )
    return f"site {name}: flower-supernode exited with code {code}:\n{log_tail}"
