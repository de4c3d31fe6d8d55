"""What one rogue site out of four does to a run, measured against the honest run (issues 10 and 21).

Each scenario runs fedcycle's ServerApp with its default screen on a real loopback deployment
(SuperLink with TLS and node authentication, the fleet proxy, one SuperNode per site), the same
run config and seed, and four sites of which at most one runs a fault of
tests/faults/fault_client_app.py. A rogue that claims more data than it has claims 8,000
examples: four times an honest site's 2,000 (train-subset). `lying-metrics` lies in the
received-* metrics of its train replies (site-eval = "train-reply", the default);
`lying-evaluation` in its evaluate replies (site-eval = "evaluate-round"). The BatchNorm
scenarios train ResNet-18 (fedcycle's only image model with BatchNorm) on 500 images per site
and test on 1,000 (a round of ResNet-18 on 2,000 images per site takes minutes on 2 CPU cores),
and are compared with an honest ResNet-18 run of that size. It writes, as it goes,
`<out>/rogues.json` (each scenario's accuracy per round, accepted sites, events) and
`<out>/rogues.md` (a table):

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
from typing import NamedTuple

from fedcycle.files import atomic_write
from fedcycle.results import read_metrics
from fedcycle_tools.deploy.loopback import LoopbackDeployment
from fedcycle_tools.launcher import exit_on_termination


class Scenario(NamedTuple):
    faults: list[str]  # one per site, '' for none
    run_config: str = ""  # keys of its own, in place of RUN_CONFIG's
    baseline: str = "honest"  # the honest scenario its final accuracy is compared with


BATCHNORM = "image.model='resnet18' train-subset=500 test-subset=1000"
SCENARIOS = {
    "honest": Scenario(["", "", "", ""]),
    "flipped": Scenario(["", "", "flip:3", ""]),
    "flipped-same-length": Scenario(["", "", "flip:1", ""]),
    "lying": Scenario(["", "", "", "lie:1000000"]),
    "replaying": Scenario(["", "", "", "replay"]),
    "scaled": Scenario(["", "", "", "amplify:2.9+lie:8000"]),
    "stale": Scenario(["", "", "", "stale+lie:8000"]),
    "stale-previous": Scenario(["", "", "", "stale-previous"]),
    "drifting": Scenario(["", "", "", "push:0.5"]),
    "lying-metrics": Scenario(["", "", "", "evallie:1000000"]),
    "lying-evaluation": Scenario(["", "", "", "evallie:1000000+evalcount:1000000"], "site-eval='evaluate-round'"),
    "honest-batchnorm": Scenario(["", "", "", ""], BATCHNORM, baseline="honest-batchnorm"),
    "bn-poison": Scenario(["", "", "", "bn-poison:-3.5"], BATCHNORM, baseline="honest-batchnorm"),
}
RUN_CONFIG = "num-server-rounds=4 train-subset=2000 test-subset=2000 round-timeout=900"


def run_config(scenario: Scenario) -> str:
    """RUN_CONFIG with the scenario's own keys in place of its (Flower refuses a key given twice)."""
    own = {item.partition("=")[0] for item in scenario.run_config.split()}
    kept = [item for item in RUN_CONFIG.split() if item.partition("=")[0] not in own]
    return " ".join(kept + scenario.run_config.split())


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


def scenario_result(scenario: Scenario, metrics: Path, status: str, seconds: float) -> dict:
    faults = scenario.faults
    rounds = read_metrics(metrics) if metrics.exists() else []
    rogue = next((f"partition {i}/{len(faults)}" for i, f in enumerate(faults) if f), None)
    honest_screened = [e for r in rounds for e in r["events"]
                       if e.get("site") != rogue and e["event"] in ("rejected", "clipped", "weight-capped")]
    named = [sorted({e["event"] for e in r["events"] if e.get("site") == rogue}) for r in rounds[1:]]
    return {"faults": faults, "run_config": run_config(scenario), "baseline": scenario.baseline,
            "status": status, "seconds": round(seconds, 1),
            "accuracy": [r["accuracy"] for r in rounds], "rogue": rogue, "rogue_events_per_round": named,
            "honest_replies_screened": len(honest_screened),
            "events": [[{k: e.get(k) for k in ("site", "event", "reason")} for e in r["events"]] for r in rounds]}


def table(results: dict[str, dict]) -> str:
    lines = ["| scenario | rogue's fault | accuracy per round | final vs honest (points) | rogue named, per round | honest replies screened |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        acc, honest = r["accuracy"], results.get(r["baseline"], {}).get("accuracy") or [None]
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
                scenario = SCENARIOS[name]
                sites = start_sites(deployment, name, scenario.faults, args.data_root)
                started = time.monotonic()
                try:
                    outcome = deployment.run(f"{run_config(scenario)} run-name='{name}' results-dir='{out}'",
                                             stream=False)
                finally:
                    stop_sites(deployment, sites)
                results[name] = scenario_result(scenario, out / name / "metrics.jsonl", outcome.status,
                                                time.monotonic() - started)
                atomic_write(out / "rogues.json",
                             json.dumps({"run_config": RUN_CONFIG, "scenarios": results}, indent=1).encode())
                atomic_write(out / "rogues.md", table(results).encode())
                print(f"{name}: {outcome.status}, accuracy {results[name]['accuracy']}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
