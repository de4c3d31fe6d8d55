"""What sites that collude do to a run, measured against the honest run (issue 21).

Each scenario runs fedcycle's own ServerApp with its default screen in simulation: 8 sites on an
iid split of Fashion-MNIST, the same run config and seed, of which 0, 2 or 4 collude
(faults of tests/faults/fault_client_app.py): each claims 10,000,000 examples, with the steps
and learning rates that count gives, and either all send one and the same update, the global
model plus a fixed random direction as long as an honest update (`collude`), or each sends its
own honest update pushed along one fixed direction by half its length (`push`: replies that
differ, pulling one way). Simulated sites share
one node config, so the run config's `fault.partitions` names the colluding partitions. It
writes, as it goes, `<out>/colluders.json` (each scenario's accuracy per round, the colluders'
events, replies averaged in) and `<out>/colluders.md` (a table):

    .venv/bin/python tests/faults/colluders.py --out results/colluders

A measurement, not a test: tests/faults/rogues.py measures one rogue at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedcycle.files import atomic_write
from fedcycle.results import read_metrics
from fedcycle_tools.launcher import LocalSimulation, exit_on_termination

SITES = 8
COLLUDE = "collude+lie:10000000"  # one and the same crafted update
PUSH = "push:0.5:1+lie:10000000"  # each its own honest update, pushed one way by half its length
SCENARIOS = {  # the colluding partitions and their fault
    "honest": ((), ""),
    "2-colluders": ((6, 7), COLLUDE),
    "4-colluders": ((4, 5, 6, 7), COLLUDE),
    "2-pushing": ((6, 7), PUSH),
    "4-pushing": ((4, 5, 6, 7), PUSH),
}
RUN_CONFIG = "num-server-rounds=4 train-pool=6000 test-subset=2000 partitioner='iid'"
SCREEN_EVENTS = ("rejected", "clipped", "weight-capped")


def scenario_result(colluding: tuple[int, ...], fault: str, metrics: Path, status: str) -> dict:
    rounds = read_metrics(metrics) if metrics.exists() else []
    colluders = [f"partition {p}/{SITES}" for p in colluding]
    events = [[{k: e.get(k) for k in ("site", "event", "reason")} for e in r["events"]] for r in rounds]
    theirs = [[e for e in round_events if e["site"] in colluders] for round_events in events[1:]]
    honest_screened = [e for round_events in events for e in round_events
                       if e["site"] not in colluders and e["event"] in SCREEN_EVENTS]
    return {"colluders": colluders, "fault": fault, "status": status,
            "accuracy": [r["accuracy"] for r in rounds],
            "colluders_named_per_round": [len({e["site"] for e in named}) for named in theirs],
            "colluder_events_per_round": [sorted({e["event"] for e in named}) for named in theirs],
            "colluders_averaged_in_per_round": [sum(s.get("site") in colluders for s in r["sites"])
                                                for r in rounds[1:]],
            "colluder_events": [e for named in theirs for e in named],
            "honest_replies_screened": len(honest_screened), "events": events}


def table(results: dict[str, dict]) -> str:
    honest = results.get("honest", {}).get("accuracy") or [None]
    lines = [("| scenario | colluders | fault | accuracy per round | final vs honest (points) | colluders named, per round | "
              "colluders averaged in, per round | honest replies screened |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        acc, k = r["accuracy"], len(r["colluders"])
        gap = f"{100 * (acc[-1] - honest[-1]):+.1f}" if acc and honest[-1] is not None and acc[-1] is not None else "-"
        named = ", ".join(f"{n}/{k} {'/'.join(kinds)}".strip() for n, kinds in
                          zip(r["colluders_named_per_round"], r["colluder_events_per_round"])) if k else "-"
        averaged = ", ".join(f"{n}/{k}" for n in r["colluders_averaged_in_per_round"]) if k else "-"
        lines.append(f"| {name} | {k} of {SITES} | {r['fault'] or '-'} | {' -> '.join(f'{a:.3f}' for a in acc if a is not None)} | {gap} | "
                     f"{named} | {averaged} | {r['honest_replies_screened']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from fault_client_app import build_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/colluders"))
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
        build_app(app, partition_faults=True)
        with LocalSimulation(Path(work, "flwr-home"), app_dir=app) as sim:
            for name in args.scenarios:
                colluding, fault = SCENARIOS[name]
                faults = f"{','.join(map(str, colluding))}={fault}" if colluding else ""
                outcome = sim.run(SITES, f"{RUN_CONFIG} fault.partitions='{faults}' run-name='{name}' "
                                         f"results-dir='{out}' data-root='{args.data_root}'", stream=False)
                results[name] = scenario_result(colluding, fault, out / name / "metrics.jsonl", outcome.status)
                record = {"run_config": RUN_CONFIG, "sites": SITES, "scenarios": results}
                atomic_write(out / "colluders.json", json.dumps(record, indent=1).encode())
                atomic_write(out / "colluders.md", table(results).encode())
                print(f"{name}: {outcome.status}, accuracy {results[name]['accuracy']}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
