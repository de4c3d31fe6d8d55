"""The `fedcycle` command: one verb per job, each the module that `python -m` also runs.

    fedcycle simulate --sites 4 --run-config "num-server-rounds=10"
    fedcycle deploy certs|register|site|demo ...
    fedcycle study studies/default.yaml
    fedcycle <verb> --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

# verb: (what it does, module, the module's own sub-command, if the verb is one)
VERBS: dict[str, tuple[str, str, str]] = {
    "simulate": ("run one simulation job to the end and print its results", "fedcycle_tools.launcher", "simulate"),
    "centralize": ("train the centralized baseline on the pooled data of simulated sites", "fedcycle_tools.launcher", "centralize"),
    "prepare-data": ("decode Fashion-MNIST into the data cache", "fedcycle_tools.launcher", "prepare-data"),
    "deploy": ("the deployment: certs, register, site, demo (see `fedcycle deploy --help`)", "fedcycle_tools.deploy.__main__", ""),
    "study": ("run a reproduction study, or continue it where it stopped", "fedcycle_tools.study.__main__", ""),
    "report": ("write a study's report from the runs done so far", "fedcycle_tools.study.__main__", ""),
    "bench": ("measure where the seconds of a round go (a benchmark, not a test)", "fedcycle_tools.bench", ""),
    "demo-data": ("make a built-in task's demo data offline and print its run config", "fedcycle_tools.demo_data", ""),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [__doc__.split("\n\n")[0], "", "usage: fedcycle <verb> [options]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (help_, _, _) in VERBS.items()]
    return "\n".join([*lines, "", "`fedcycle <verb> --help` for a verb's options; `python -m <module>` runs the same."])


def report(argv: list[str], study_main: Callable[..., int]) -> int:
    parser = argparse.ArgumentParser(prog="fedcycle report", description=VERBS["report"][0])
    parser.add_argument("study", help="the study file, e.g. studies/default.yaml")
    args = parser.parse_args(argv)
    return study_main([args.study, "--report-only"], prog="fedcycle study")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"fedcycle: unknown verb {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    _, module, command = VERBS[verb]
    verb_main = importlib.import_module(module).main
    if verb == "report":
        return report(rest, verb_main)
    if command:
        return verb_main([command, *rest], prog="fedcycle")
    return verb_main(rest, prog=f"fedcycle {verb}")


if __name__ == "__main__":
    sys.exit(main())
