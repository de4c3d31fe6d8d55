"""python -m fedcycle_tools.deploy: certificates, key registration, a site's processes, the loopback demo.

    certs     a CA, the SuperLink's certificate (--host names) and one key pair per --site
    register  register sites' public keys with the SuperLink (run on the coordinator)
    site      run a site's SuperNode and SuperExec without Docker, under a policy file, explaining failures
    demo      the whole topology on loopback with throw-away keys: 2 sites, 2 rounds
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedcycle.errors import ConfigError
from fedcycle.policy import load_policy
from fedcycle.results import read_metrics
from fedcycle.tasks.image.datasets import data_root
from fedcycle.tasks.image.settings import ImageSettings
from fedcycle_tools.deploy.loopback import (
    LoopbackDeployment,
    explain_supernode_exit,
    register_key,
)
from fedcycle_tools.deploy.pki import make_pki, write_secret
from fedcycle_tools.deploy.policy import (
    DEFAULT_POLICY_NAME,
    parse_node_config,
    quoted,
    with_keys,
    write_strict_policy,
)
from fedcycle_tools.launcher import (
    FlwrCli,
    ProcessGroup,
    _bin,
    exit_on_termination,
    flwr_env,
    print_results,
)

DEMO_RUN_CONFIG = "num-server-rounds=2 local-epochs=1 train-subset=2000 test-subset=2000"


def certs(args: argparse.Namespace) -> int:
    pki = make_pki(Path(args.out), args.host, args.site, days=args.days)
    print(f"CA:        {pki.ca_cert}  (every site and every flwr user gets this; keep {pki.root / 'ca.key'} offline)")
    if args.host:
        print(f"SuperLink: {pki.superlink_cert}, {pki.superlink_key}  (subjectAltName: {', '.join(args.host)})")
    for site in args.site:
        print(f"site {site}: {pki.site_key(site)} (to the site only), {pki.site_pub(site)} (register on the coordinator)")
    return 0


def register(args: argparse.Namespace) -> int:
    cli = FlwrCli(flwr_env(Path(args.flwr_home).expanduser() if args.flwr_home else None))
    failed = 0
    for pub in args.public_keys:
        try:
            print(f"registered {pub}: {register_key(cli, args.connection, Path(pub))}")
        except RuntimeError as err:
            failed += 1
            print(err, file=sys.stderr)
    return 1 if failed else 0


def site_node_config(name: str, node_config: str, policy_file: str = "") -> str:
    """The node config the site's SuperNode gets: its own, plus `site-name` and a `policy-file`.
    Without one (in --node-config or --policy-file) the strict default is written to
    ./fedcycle-site-policy.toml (unless that file exists) and named. The policy must read: a site
    whose policy-file does not would refuse every run."""
    own = parse_node_config(node_config)
    if policy_file and own.get("policy-file"):
        raise ValueError("name the policy once: --policy-file, or policy-file in --node-config")
    path = Path(policy_file or own.get("policy-file") or DEFAULT_POLICY_NAME).expanduser().resolve()
    if not (policy_file or own.get("policy-file")):
        if write_strict_policy(path):
            print(f"site {name}: no policy-file in its node config; wrote the strict default policy to {path} "
                  "(built-in tasks only, no values in error text, data paths from the node config only): "
                  "edit it, or name your own with --policy-file", flush=True)
        else:
            print(f"site {name}: no policy-file in its node config; using {path}", flush=True)
    try:
        load_policy({"policy-file": str(path)})
    except ConfigError as err:
        raise ValueError(f"site {name}: {err}") from None
    extra = {"site_name": name}
    if not own.get("policy-file"):
        extra["policy_file"] = str(path)
    return with_keys(node_config, **extra)


def site(args: argparse.Namespace) -> int:
    """A site's SuperNode and the SuperExec for its ClientApps, in the foreground."""
    node_config = site_node_config(args.name, args.node_config, args.policy_file)
    secret = Path(args.secret_file)
    write_secret(secret)
    env = flwr_env()
    group = ProcessGroup(Path(args.log_dir))
    supernode = [
        _bin("flower-supernode"), "--superlink", args.superlink, "--root-certificates", args.ca,
        "--auth-supernode-private-key", args.key, "--node-config", node_config,
        "--host", "127.0.0.1", "--port", str(args.port), "--isolation", "process",
        "--superexec-auth-secret-file", str(secret),
    ]
    superexec = [
        _bin("flower-superexec"), "--runtime-api-address", f"127.0.0.1:{args.port}", "--insecure",
        "--superexec-auth-secret-file", str(secret),
    ]
    group.start("supernode", supernode, env, Path.cwd())
    group.start("superexec", superexec, env, Path.cwd())
    print(f"site {args.name}: SuperNode dialing {args.superlink}; logs in {group.log_dir}", flush=True)
    try:
        while (code := group.procs["supernode"].poll()) is None:
            time.sleep(1)
        print(explain_supernode_exit(args.name, code, group.tail("supernode", 25)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        group.stop_all()


def demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fedcycle-deploy-"))
    results = Path(args.results_dir).resolve()
    outcome = None
    failed = True
    try:
        with LoopbackDeployment(workdir) as deployment:
            print(f"throw-away CA, certificates and site keys in {deployment.pki.root}", flush=True)
            deployment.start_superlink()
            print(f"SuperLink (TLS, SuperNode auth, --database) on {deployment.control_address}, loopback only", flush=True)
            deployment.start_proxy()
            print(f"fleet-only proxy for the sites on {deployment.fleet_address}", flush=True)
            # each site gets the strict default policy, which reads no data path from the run config:
            # the sites name the decoded Fashion-MNIST cache (data-root) in their own node config
            cache = data_root(ImageSettings())
            for i in range(2):
                name = f"site-{i + 1}"
                deployment.add_site(name, f"partition-id={i} num-partitions=2 data-root={quoted(str(cache))}")
                deployment.start_site(name)
            deployment.wait_for_sites(2)
            print(f"2 SuperNodes registered and online, each under a strict policy ({deployment.workdir / 'policies'}); "
                  "submitting the run", flush=True)
            outcome = deployment.run(f"{DEMO_RUN_CONFIG} results-dir='{results}'")
            failed = not outcome.completed
    except RuntimeError as err:
        print(f"deploy-demo failed: {err}", file=sys.stderr)
        return 1
    finally:  # the throw-away keys go; the logs stay when something failed
        if failed:
            print(f"logs kept in {workdir / 'logs'}", file=sys.stderr)
            shutil.rmtree(workdir / "secrets", ignore_errors=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_results(outcome)
    if outcome.results_dir and (outcome.results_dir / "metrics.jsonl").exists():
        final = read_metrics(outcome.results_dir / "metrics.jsonl")[-1]
        metric = final.get("primary_metric", "accuracy")
        print(f"final {metric}: {final[metric]:.4f} (round {final['round']})")
    return 0 if outcome.completed else 1


def main(argv: list[str] | None = None, prog: str = "python -m fedcycle_tools.deploy") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("certs", help="make the CA, the SuperLink certificate and site key pairs")
    p.add_argument("--out", required=True, help="folder for the files (never commit it)")
    p.add_argument("--host", action="append", default=[],
                   help="a name or address the sites dial; repeat (omit to keep the SuperLink certificate, e.g. to add a site)")
    p.add_argument("--site", action="append", default=[], help="a site name; repeat")
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    p.set_defaults(func=certs)
    p = sub.add_parser("register", help="register sites' public keys with the SuperLink")
    p.add_argument("--connection", required=True, help="the SuperLink connection in $FLWR_HOME/config.toml")
    p.add_argument("--flwr-home", default="", help="FLWR_HOME holding that connection (default: $FLWR_HOME or ~/.flwr)")
    p.add_argument("public_keys", nargs="+", help="<site>.pub files")
    p.set_defaults(func=register)
    p = sub.add_parser("site", help="run this site's SuperNode and SuperExec")
    p.add_argument("--name", required=True)
    p.add_argument("--superlink", required=True, help="host:port of the coordinator's fleet proxy")
    p.add_argument("--ca", required=True, help="the deployment's ca.crt")
    p.add_argument("--key", required=True, help="this site's private key (<site>.key)")
    p.add_argument("--node-config", required=True, help='e.g. "data-dir=\'/data/images\' device=\'cuda:0\'"')
    p.add_argument("--policy-file", default="",
                   help=f"the site's policy (TOML, docs/deploy.md); without one, here or as policy-file in --node-config, "
                        f"the strict default is written to ./{DEFAULT_POLICY_NAME} (if missing) and used")
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's local API port (default 9094)")
    p.add_argument("--secret-file", default="superexec.secret", help="SuperNode-SuperExec shared secret (made if missing)")
    p.add_argument("--log-dir", default="fedcycle-site-logs")
    p.set_defaults(func=site)
    p = sub.add_parser("demo", help="the whole topology on loopback, 2 sites, 2 rounds")
    p.add_argument("--results-dir", default="results/deploy-demo", help="where the run's results go (default ./results/deploy-demo)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    exit_on_termination()
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
