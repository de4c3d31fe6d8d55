"""The reproduction study: centralized vs FedAvg vs FedAvg + cyclical LR + more local epochs.

    python -m fedcycle_tools.study studies/default.yaml          # or: make reproduce PROFILE=quick

A study file (YAML) names the data, the epoch budget, the grid of data centers, splits and
local epochs, the seeds and a small learning-rate grid. The study runs in two phases:

1. tuning: every method tries its grid at the tuning cell (4 sites, iid, one seed) and
   keeps the setting with the best final accuracy on the sites' held-out validation data
   (never the test set);
2. the comparison: every method in every cell with its chosen setting, the same number of
   epochs over the data for all (the federated ones in budget / local-epochs rounds).

Methods: `centralized-constant` and `centralized-cyclical` (fedcycle's trainer on the pooled
data of all sites, one optimizer for the whole run), `fedavg-constant`, `fedavg-cyclical` (the
paper's: a cycle per round) and, where the study file has a `fedcycle` grid, `fedcycle`: a
server-side recipe (an envelope on the peak, cycles across rounds, server momentum, the
server's mean of cycle ends), and `fedavgm` / `fedadam` (Flower's server optimizers). A study
file with `rounds` asks the paper's question at fixed communication instead: every federated
method runs that many rounds whatever its local epochs, each tuned in every split at its own
local epochs, and the report says how many rounds and bytes each needs to come within 1 point
of centralized (studies/paper.yaml). `--pilot EPOCHS` runs only centralized training, to choose the
epoch budget from where validation accuracy flattens.

Federated runs go through fedcycle's own ServerApp, strategy, ClientApp and trainer in
Flower's simulation (one SuperLink for the whole study); centralized runs are the same
trainer on the pooled data of all sites. Each finished run leaves a small JSON summary in
`runs/`; a run whose summary exists is not run again, so an interrupted study continues
where it stopped, on this machine or another.
"""

from __future__ import annotations

import argparse
import sys

from fedcycle_tools.launcher import exit_on_termination
from fedcycle_tools.study.plan import Study, StudyError
from fedcycle_tools.study.report import write_report
from fedcycle_tools.study.rounds_report import write_rounds_report
from fedcycle_tools.study.runs import run_pilot, run_study


def main(argv: list[str] | None = None, prog: str = "python -m fedcycle_tools.study") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study file, e.g. studies/default.yaml")
    parser.add_argument("--data-root", default="", help="where decoded data is cached (default ~/.cache/fedcycle)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (run a study in parts)")
    parser.add_argument("--report-only", action="store_true", help="only write the report from the runs done")
    parser.add_argument("--pilot", type=int, metavar="EPOCHS", default=0,
                        help="only run centralized training this many epochs, to choose epoch_budget (writes pilot/PILOT.md)")
    args = parser.parse_args(argv)
    exit_on_termination()
    try:
        study = Study.load(args.study)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.pilot:
        print(f"pilot: {run_pilot(study, args.pilot, args.data_root)}")
        return 0
    try:
        missing = 0 if args.report_only else run_study(study, args.data_root, args.max_runs)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
    report = (write_rounds_report if study.rounds else write_report)(study, command=command)
    print(f"report: {report}" + (f" ({missing} runs still to do; run the same command to continue)" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
