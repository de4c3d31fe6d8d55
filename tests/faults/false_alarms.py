"""How often the default reply screen leaves out an honest site (issue 10: the target is never).

Runs fedcycle's own app in simulation with every site honest, at 4 and 8 sites on iid,
Dirichlet 0.3 and Dirichlet 0.1 splits, and counts what the screen did: replies rejected,
updates clipped to the round's norm bound, weights capped. Each rejected reply here is a false
alarm; a clipped or capped one is an honest reply the screen changed. It writes, as it goes,
`<out>/false-alarms.json` (counts, events with reasons, accuracy per round) and
`<out>/false-alarms.md` (a table):

    .venv/bin/python tests/faults/false_alarms.py --out results/false-alarms

A measurement, not a test: tests/test_strategy.py and tests/test_failures.py assert the screen's
verdicts on chosen replies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedcycle.files import atomic_write
from fedcycle.results import read_metrics
from fedcycle_tools.launcher import LocalSimulation, exit_on_termination

SPLITS = {
    "iid": "partitioner='iid'",
    "dirichlet-0.3": "partitioner='dirichlet' dirichlet.alpha=0.3",
    "dirichlet-0.1": "partitioner='dirichlet' dirichlet.alpha=0.1",
}
SITES = (4, 8)
RUN_CONFIG = "num-server-rounds=5 train-pool=6000 test-subset=2000"
SCREEN_EVENTS = ("rejected", "clipped", "weight-capped")


def cell_result(metrics: Path, status: str) -> dict:
    rounds = read_metrics(metrics) if metrics.exists() else []
    screened = [e for r in rounds for e in r["events"] if e["event"] in SCREEN_EVENTS]
    return {"status": status, "accuracy": [r["accuracy"] for r in rounds],
            "replies": sum(len(r["sites"]) for r in rounds[1:]) + sum(e["event"] == "rejected" for e in screened),
            **{kind.replace("-", "_"): sum(e["event"] == kind for e in screened) for kind in SCREEN_EVENTS},
            "events": [{k: e.get(k) for k in ("site", "event", "reason")} for e in screened],
            "peer_cosine_min": min((s["peer-cosine"] for r in rounds for s in r["sites"] if "peer-cosine" in s), default=None),
            "peer_pullback_max": max((s["peer-pullback"] for r in rounds for s in r["sites"] if "peer-pullback" in s),
                                     default=None),
            "norm_to_median_max": max((s["update-norm-to-median"] for r in rounds for s in r["sites"]
                                       if "update-norm-to-median" in s), default=None)}


def table(results: dict[str, dict]) -> str:
    lines = ["| cell | replies | rejected | clipped | weights capped | lowest peer cosine | highest pull-back | "
             "highest norm / median | final accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell, r in results.items():
        cosine = "-" if r["peer_cosine_min"] is None else f"{r['peer_cosine_min']:.2f}"
        ratio = "-" if r["norm_to_median_max"] is None else f"{r['norm_to_median_max']:.2f}"
        pullback = "-" if r.get("peer_pullback_max") is None else f"{r['peer_pullback_max']:.2f}"
        final = r["accuracy"][-1] if r["accuracy"] and r["accuracy"][-1] is not None else float("nan")
        lines.append(f"| {cell} | {r['replies']} | {r['rejected']} | {r['clipped']} | {r['weight_capped']} | {cosine} | {pullback} | "
                     f"{ratio} | {final:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/false-alarms"))
    parser.add_argument("--data-root", default="", help="where Fashion-MNIST is (default: fedcycle's cache)")
    cells = [f"{sites}-sites-{split}" for sites in SITES for split in SPLITS]
    parser.add_argument("--cells", nargs="+", default=cells, choices=cells, help="which cells to run (default: all)")
    args = parser.parse_args()
    exit_on_termination()  # a killed measurement stops the SuperLink and sites it started
    out = args.out.resolve()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work, LocalSimulation(Path(work, "flwr-home")) as sim:
        for sites in SITES:
            for split, partitioner in SPLITS.items():
                cell = f"{sites} sites, {split}"
                name = f"{sites}-sites-{split}"
                if name not in args.cells:
                    continue
                outcome = sim.run(sites, f"{RUN_CONFIG} {partitioner} run-name='{name}' results-dir='{out}' "
                                         f"data-root='{args.data_root}'", stream=False)
                results[cell] = cell_result(out / name / "metrics.jsonl", outcome.status)
                atomic_write(out / "false-alarms.json",
                             json.dumps({"run_config": RUN_CONFIG, "cells": results}, indent=1).encode())
                atomic_write(out / "false-alarms.md", table(results).encode())
                r = results[cell]
                print(f"{cell}: {outcome.status}, {r['rejected']} rejected, {r['clipped']} clipped, "
                      f"{r['weight_capped']} capped of {r['replies']} replies", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
