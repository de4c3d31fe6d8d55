"""What one rogue site out of four does to a run, measured against the honest run (issue 10).

Each scenario runs fedcycle's ServerApp with its default screen on a real loopback deployment
(SuperLink with TLS and node authentication, the fleet proxy, one SuperNode per site), the same
run config and seed, and four sites of which at most one runs a fault of
tests/faults/fault_client_app.py. It writes, as it goes, `<out>/rogues.json` (each scenario's
accuracy per round, accepted sites, events) and `<out>/rogues.md` (a table):

    .venv/bin/python tests/faults/rogues.py --out results/rogues

A measurement, not a test: tests/test_failures.py asserts the screen's verdicts on shorter runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedcycle.files import atomic_write
from fedcycle.results import read_metrics
from fedcycle_tools.deploy.loopback import LoopbackDeployment
from fedcycle_tools.launcher import exit_on_termination

SCENARIOS = {
    "honest": ["", "", "", ""],
    "flipped": ["", "", "flip:3", ""],
    "flipped-same-length": ["", "", "flip:1", ""],
    "lying": ["", "", "", "lie:1000000"],
    "replaying": ["", "", "", "replay"],
}
RUN_CONFIG = "num-server-rounds=3 train-subset=2000 test-subset=2000 round-timeout=900"


def start_sites(deployment: LoopbackDeployment, prefix: str, faults: list[str], data_root: str = "") -> list[str]:
    """One site per entry of `faults` ('' for none), each on its partition of len(faults) of the
    dataset under `data_root` (default: fedcycle's cache). Each runs under the deployment's strict
    default policy, so its node config names its data (the policy reads no path from the run
    config); the server knows it by its partition ("partition 2/4"), which the measurements and
    tests/test_failures.py name the rogue by."""
    names = []
    for i, fault in enumerate(faults):
        name = f"{prefix}-{i}"
        extra = f" fault='{fault}'" if fault else ""
        extra += f" data-root='{data_root}'" if data_root else ""
        deployment.add_site(name, f"partition-id={i} num-partitions={len(faults)}{extra}", name_site=False)
        deployment.start_site(name, max_retries=1000)  # they outlive a SuperLink restart
        names.append(name)
    deployment.wait_for_sites(len(names))
    return names


def stop_sites(deployment: LoopbackDeployment, names: list[str]) -> None:
    for name in names:
        deployment.stop_site(name)
    deadline = time.monotonic() + 120  # the SuperLink sees them go within its heartbeat patience
    while deployment.online_sites() and time.monotonic() < deadline:
        time.sleep(2)


def scenario_result(faults: list[str], metrics: Path, status: str, seconds: float) -> dict:
    rounds = read_metrics(metrics) if metrics.exists() else []
    rogue = next((f"partition {i}/{len(faults)}" for i, f in enumerate(faults) if f), None)
    honest_screened = [e for r in rounds for e in r["events"]
                       if e.get("site") != rogue and e["event"] in ("rejected", "clipped", "weight-capped")]
    named = [sorted({e["event"] for e in r["events"] if e.get("site") == rogue}) for r in rounds[1:]]
    return {"faults": faults, "status": status, "seconds": round(seconds, 1),
            "accuracy": [r["accuracy"] for r in rounds], "rogue": rogue, "rogue_events_per_round": named,
            "honest_replies_screened": len(honest_screened),
            "events": [[{k: e.get(k) for k in ("site", "event", "reason")} for e in r["events"]] for r in rounds]}


def table(results: dict[str, dict]) -> str:
    honest = results.get("honest", {}).get("accuracy") or [None]
    lines = ["| scenario | rogue's fault | accuracy per round | final vs honest (points) | rogue named, per round | honest replies screened |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        acc = r["accuracy"]
        gap = f"{100 * (acc[-1] - honest[-1]):+.1f}" if acc and honest[-1] is not None and acc[-1] is not None else "-"
        fault = next((f for f in r["faults"] if f), "none")
        named = ", ".join("/".join(e) or "no" for e in r["rogue_events_per_round"]) if r["rogue"] else "-"
        lines.append(f"| {name} | {fault} | {' -> '.join(f'{a:.3f}' for a in acc if a is not None)} | {gap} | "
                     f"{named} | {r['honest_replies_screened']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from fault_client_app import build_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/rogues"))
    parser.add_argument("--data-root", default="", help="where Fashion-MNIST is (default: fedcycle's cache)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args()
    exit_on_termination()  # a killed measurement stops the SuperLink and sites it started
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        app = Path(work, "app")
        app.mkdir()
        build_app(app)
        with LoopbackDeployment(Path(work, "deployment"), app_dir=app) as deployment:
            deployment.start_superlink()
            deployment.start_proxy()
            for name in args.scenarios:
                faults = SCENARIOS[name]
                sites = start_sites(deployment, name, faults, args.data_root)
                started = time.monotonic()
                try:
                    outcome = deployment.run(f"{RUN_CONFIG} run-name='{name}' results-dir='{out}'", stream=False)
                finally:
                    stop_sites(deployment, sites)
                results[name] = scenario_result(faults, out / name / "metrics.jsonl", outcome.status,
                                                time.monotonic() - started)
                atomic_write(out / "rogues.json",
                             json.dumps({"run_config": RUN_CONFIG, "scenarios": results}, indent=1).encode())
                atomic_write(out / "rogues.md", table(results).encode())
                print(f"{name}: {outcome.status}, accuracy {results[name]['accuracy']}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
