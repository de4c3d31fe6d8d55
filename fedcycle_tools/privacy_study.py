"""What record-level differential privacy costs: `make privacy-study` (a measurement, not a test).

Runs the same federated job at epsilon 1, 3 and 8 (delta 1e-5) and without DP, through
fedcycle in Flower's simulation, on the tabular task (scikit-learn's breast cancer set) and on
Fashion-MNIST, 4 sites each. The noise multiplier for each epsilon is Opacus's
(`get_noise_multiplier`) for the steps a site takes over the whole run; each site's reported
epsilon is read back from metrics.jsonl. Writes results/privacy/privacy.json and privacy.md
after every run, so a stopped study keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fedcycle.results import read_metrics
from fedcycle_tools.launcher import LocalSimulation

OUT = Path("results/privacy")
EPSILONS = (None, 8.0, 3.0, 1.0)
DELTA = 1e-5
SITES = 4


def jobs(data: Path, data_root: str) -> dict[str, str]:
    """Each job's run config."""
    from fedcycle_tools import demo_data  # lazily: scikit-learn, the optional demo extra

    return {
        "tabular": f"{demo_data.tabular(data)} num-server-rounds=5 local-epochs=3 batch-size=16 lr-min=0.01 lr-max=0.1",
        "fashion-mnist": f"data-root='{data_root}' train-subset=2000 test-subset=2000 num-server-rounds=5 "
                         "local-epochs=2 batch-size=64 lr-min=0.01 lr-max=0.1",
    }


# (job, target epsilon or None for no DP, what else differs). At epsilon 1 on Fashion-MNIST the
# noise makes every honest update longer than max-update-ratio allows (measured: 12.6 times the
# model's norm in round 1, every site rejected), so that run turns the bound off.
RUNS = [(job, target, "max-update-ratio=0.0" if (job, target) == ("fashion-mnist", 1.0) else "")
        for job in ("tabular", "fashion-mnist") for target in EPSILONS] + [
    ("fashion-mnist", 3.0, "image.model='small-cnn-tanh'"),
    ("fashion-mnist", 3.0, "image.model='small-cnn-tanh' dp.max-grad-norm=0.5"),
    ("fashion-mnist", 3.0, "image.model='small-cnn-tanh' local-epochs=1 lr-max=0.2"),
    ("fashion-mnist", 3.0, "image.model='small-cnn-tanh' train-subset=6000"),
]


def parse(config: str) -> dict:
    """A run-config string as the run config Flower hands the apps (Flower's own parser)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([config])


def merged(config: str, extra: str) -> str:
    """`config` with `extra`'s keys set (Flower refuses a key given twice)."""
    values = {**parse(config), **parse(extra)} if extra else parse(config)
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, bool) else repr(v)}" for k, v in values.items())


def noise_for(target: float, config: str) -> float:
    """Opacus's noise multiplier for `target` epsilon over the run, for the run's first site
    (the sites of an iid split differ by a record or two)."""
    from opacus.accountants.utils import get_noise_multiplier

    from fedcycle.config import RunSettings
    from fedcycle.site import load_site

    run_config = parse(config)
    settings = RunSettings.from_run_config(run_config)
    records = len(load_site(run_config, {"partition-id": 0, "num-partitions": SITES}).train)
    per_epoch = math.ceil(records / settings.batch_size)
    epochs = sum(settings.epochs_for_round(r) for r in range(1, settings.num_server_rounds + 1))
    return float(get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=1 / per_epoch,
                                      steps=per_epoch * epochs, accountant="rdp"))


def summary(rounds: list[dict]) -> dict:
    final = rounds[-1]
    seconds = [r["seconds"] for r in rounds[1:] if r.get("seconds") is not None]
    eps = [s.get("epsilon") for s in final.get("sites", []) if s.get("epsilon") is not None]
    return {"final": final[final["primary_metric"]], "metric": final["primary_metric"],
            "accuracy": final["metrics"].get("accuracy"), "round_seconds": statistics.median(seconds) if seconds else None,
            "epsilon_reported": max(eps) if eps else None}


def write(rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(), "command": " ".join(sys.argv)}
    (OUT / "privacy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| job | target epsilon | what else | noise multiplier | epsilon reported | final accuracy | median s/round |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['target'] or 'no DP'} | {r.get('variant') or '-'} | {r['noise'] or '-'} | "
                     f"{'-' if r.get('epsilon_reported') is None else round(r['epsilon_reported'], 2)} | "
                     f"{'-' if r.get('accuracy') is None else round(r['accuracy'], 4)} | "
                     f"{'-' if r.get('round_seconds') is None else round(r['round_seconds'], 1)} |")
    (OUT / "privacy.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcycle_tools.privacy_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(Path("~/.cache/fedcycle").expanduser()))
    parser.add_argument("--only", default="", help="one job: tabular or fashion-mnist")
    parser.add_argument("--missing", action="store_true",
                        help="run only what results/privacy/privacy.json lacks (a run that did not complete)")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    if args.missing and (OUT / "privacy.json").exists():
        rows = [r for r in json.loads((OUT / "privacy.json").read_text())["rows"] if r["status"] == "finished:completed"]
    done = {(r["job"], r["target"], r.get("variant", "")) for r in rows}
    work = (OUT / "work").resolve()
    with LocalSimulation(work / "flwr-home") as link:
        configs = jobs(work / "data", args.data_root)
        for name, target, extra in RUNS:
            if (args.only and name != args.only) or (name, target, extra) in done:
                continue
            config = merged(configs[name], extra)
            noise = round(noise_for(target, config), 4) if target else 0.0
            run = f"{name}-{'nodp' if target is None else f'eps{target:g}'}{'-' + str(RUNS.index((name, target, extra))) if extra else ''}"
            config = (f"{config} dp.noise-multiplier={noise} dp.delta={DELTA} seed=1 "
                      f"results-dir='{work / 'runs'}' run-name='{run}' checkpoints-keep=1")
            started = time.monotonic()
            out = link.run(SITES, config, stream=False)
            row = {"job": name, "target": target, "variant": extra, "noise": noise or None, "status": out.status,
                   "wall_seconds": round(time.monotonic() - started, 1), "config": config}
            if out.completed:
                row.update(summary(read_metrics(out.results_dir / "metrics.jsonl")))
            else:
                row["log_tail"] = out.log[-2000:]
            rows.append(row)
            write(rows)
            print(json.dumps({k: v for k, v in row.items() if k not in ("config", "log_tail")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
