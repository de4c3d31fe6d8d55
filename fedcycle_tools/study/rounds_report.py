"""The report of a study at fixed communication (a study file with `rounds`): how many rounds,
and bytes, each method needs to come within 1 point of centralized, with paired differences
across seeds. Generated from the run summaries alone: summary.json, REPORT.md, plots.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

from fedcycle.results import machine, versions
from fedcycle_tools.study.plan import (
    Study,
    choose,
    comparison_plan,
    load_done,
    tuning_cells,
    tuning_plan,
)
from fedcycle_tools.study.report import _fmt, _mean_curve, _std
from fedcycle_tools.study.runs import flattened_epoch

WITHIN_POINTS = 1.0  # "comes close to centralized": within this many accuracy points of its final accuracy


def rounds_to(curve: list[float], level: float) -> int | None:
    """The first round (0: the initial model) whose accuracy is at least `level`; None if none."""
    return next((i for i, acc in enumerate(curve) if acc >= level), None)


def rounds_to_stay(curve: list[float], level: float) -> int | None:
    """The first round from which the accuracy never falls below `level` again; None if none."""
    return next((i for i in range(len(curve)) if min(curve[i:]) >= level), None)


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """a - b over the seeds both have, in points: mean, 95% interval (t), and whether it is a tie
    (the interval holds 0); None with fewer than 2 shared seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [100 * (a[s] - b[s]) for s in seeds]
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * se
    return {"seeds": seeds, "mean_points": mean, "ci95_points": [mean - half, mean + half],
            "tie": bool(mean - half <= 0 <= mean + half)}


def centralized_record(study: Study, runs: list[dict]) -> dict:
    finals = {r["seed"]: r["final_accuracy"] for r in runs}
    val_curve = _mean_curve([r["val_accuracy"] for r in runs])
    return {
        "method": runs[0]["method"], "split": "pooled", "task": study.task_name, "sites": None, "local_epochs": None,
        "epochs": runs[0]["rounds"], "lr": runs[0]["lr"], "seeds": {str(s): a for s, a in sorted(finals.items())},
        "final_accuracy_mean": statistics.fmean(finals.values()), "final_accuracy_std": _std(list(finals.values())),
        # where the validation curve (the seeds' mean) stopped improving by 0.2 points or more
        "flattened_epoch": flattened_epoch(val_curve),
        "accuracy_curve": _mean_curve([r["accuracy"] for r in runs]), "val_accuracy_curve": val_curve,
    }


def federated_record(study: Study, runs: list[dict], central: dict | None) -> dict:
    first = runs[0]
    finals = {r["seed"]: r["final_accuracy"] for r in runs}
    curve = _mean_curve([r["accuracy"] for r in runs])
    level = None if central is None else central["final_accuracy_mean"] - WITHIN_POINTS / 100
    per_round = statistics.fmean(r["bytes_per_round"] for r in runs if "bytes_per_round" in r) \
        if any("bytes_per_round" in r for r in runs) else None
    reached = None if level is None else rounds_to(curve, level)
    return {
        "method": first["method"], "split": first["split"], "task": study.task_name, "sites": first["sites"],
        "local_epochs": first["local_epochs"], "rounds": first["rounds"], "lr": first["lr"],
        "seeds": {str(s): a for s, a in sorted(finals.items())},
        "final_accuracy_mean": statistics.fmean(finals.values()), "final_accuracy_std": _std(list(finals.values())),
        "centralized_accuracy_mean": None if central is None else central["final_accuracy_mean"],
        "gap_points": None if central is None else 100 * (statistics.fmean(finals.values()) - central["final_accuracy_mean"]),
        # of the seeds' mean curve (the first round there; the round from which it stays there),
        # and of each seed's own
        "rounds_to_within_1pt": reached,
        "rounds_to_stay_within_1pt": None if level is None else rounds_to_stay(curve, level),
        "rounds_to_within_1pt_per_seed": {str(r["seed"]): None if level is None else rounds_to(r["accuracy"], level)
                                          for r in sorted(runs, key=lambda r: r["seed"])},
        # all sites' training traffic in a round (each receives the global model, sends its own)
        "bytes_per_round": per_round,
        "bytes_to_within_1pt": None if reached is None or per_round is None else reached * per_round,
        "site_epochs_per_round": first["sites"] * first["local_epochs"],
        "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in runs),
        "accuracy_curve": curve,
    }


def summarize(study: Study, compared: list[dict]) -> list[dict]:
    """One record per centralized baseline and per (method, split, sites, local epochs), seeds kept apart."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in compared:
        groups[(run["method"], run["split"] if run["sites"] else "pooled", run["sites"], run["local_epochs"])].append(run)
    centrals = [centralized_record(study, g) for k, g in sorted(groups.items(), key=str) if k[1] == "pooled"]
    central = max(centrals, key=lambda r: r["final_accuracy_mean"], default=None)
    federated = [federated_record(study, g, central) for k, g in sorted(groups.items(), key=str) if k[1] != "pooled"]
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for record in federated:
        by_cell[(record["split"], record["sites"])].append(record)
    for records in by_cell.values():
        best = max(records, key=lambda r: r["final_accuracy_mean"])
        for record in records:
            record["vs_best_in_split"] = None if record is best else paired(
                {int(s): a for s, a in record["seeds"].items()}, {int(s): a for s, a in best["seeds"].items()})
            record["vs_centralized"] = None if central is None else paired(
                {int(s): a for s, a in record["seeds"].items()}, {int(s): a for s, a in central["seeds"].items()})
    return centrals + federated


def _name(record: dict) -> str:
    return record["method"] + (f", {record['local_epochs']} local epoch{'s' if record['local_epochs'] > 1 else ''}"
                               if record["local_epochs"] else "")


def _difference(d: dict | None) -> str:
    if d is None:
        return "-"
    low, high = d["ci95_points"]
    return f"{d['mean_points']:+.2f} [{low:+.2f}, {high:+.2f}]{' tie' if d['tie'] else ''}"


def table(records: list[dict]) -> str:
    rows = ["| method | final test accuracy (mean ± sd, n) | rounds to within 1 point of centralized | "
            "MB per round (all sites) | MB to within 1 point | minus centralized (points, 95% CI) | "
            "minus the split's best (points, 95% CI) | wall s |", "|" + "---|" * 8]
    for r in sorted(records, key=lambda r: -r["final_accuracy_mean"]):
        mb = None if r["bytes_per_round"] is None else r["bytes_per_round"] / 1e6
        to_mb = None if r["bytes_to_within_1pt"] is None else r["bytes_to_within_1pt"] / 1e6
        reached = "never" if r["rounds_to_within_1pt"] is None else (
            f"{r['rounds_to_within_1pt']} ({_fmt(r['rounds_to_stay_within_1pt'], 'd')})")
        per_seed = ", ".join("never" if v is None else str(v) for v in r["rounds_to_within_1pt_per_seed"].values())
        rows.append(f"| {_name(r)} | {r['final_accuracy_mean']:.4f} ± {r['final_accuracy_std']:.4f} ({len(r['seeds'])}) | "
                    f"{reached} (seeds: {per_seed}) | {_fmt(mb, '.2f')} | {_fmt(to_mb, '.1f')} | "
                    f"{_difference(r['vs_centralized'])} | {_difference(r['vs_best_in_split'])} | {r['wall_seconds_mean']:.0f} |")
    return "\n".join(rows)


def plot(records: list[dict], out_dir: Path, name: str) -> list[Path]:
    """Test accuracy against rounds and against all sites' training megabytes, one panel per
    split; centralized's final accuracy, and 1 point below it, as lines."""
    import matplotlib  # lazily: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    central = max((r for r in records if r["split"] == "pooled"), key=lambda r: r["final_accuracy_mean"], default=None)
    splits = sorted({r["split"] for r in records if r["split"] != "pooled"})
    # from where the curves are after their first rounds: the differences that matter are at the top
    bottom = max(0.0, min(min(r["accuracy_curve"][3:] or r["accuracy_curve"]) for r in records) - 0.02)
    paths = []
    for axis, label in (("round", "round"), ("bytes", "MB sent and received, all sites (training)")):
        fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(6 * max(len(splits), 1), 4.5), dpi=110, squeeze=False)
        for ax, split in zip(axes[0], splits):
            if central is not None:
                ax.axhline(central["final_accuracy_mean"], color="black", linewidth=1, label=f"centralized ({_name(central)})")
                ax.axhline(central["final_accuracy_mean"] - WITHIN_POINTS / 100, color="black", linestyle=":", linewidth=1,
                           label=f"centralized - {WITHIN_POINTS:g} point")
            for r in sorted((x for x in records if x["split"] == split), key=lambda x: -x["final_accuracy_mean"]):
                rounds = range(len(r["accuracy_curve"]))
                xs = list(rounds) if axis == "round" else [i * (r["bytes_per_round"] or 0) / 1e6 for i in rounds]
                ax.plot(xs, r["accuracy_curve"], marker=".", label=f"{_name(r)} (n={len(r['seeds'])})")
            ax.set_title(f"{records[-1]['task']}, {split}, {records[-1]['sites']} sites: test accuracy, mean over seeds",
                         fontsize=9)
            ax.set_xlabel(label)
            if axis == "round":
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel("test accuracy")
            ax.set_ylim(bottom=bottom)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"{name}_accuracy_vs_{axis}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def tuning_table(study: Study, done: dict[str, dict], chosen: dict[str, dict], tuned: list[str]) -> list[str]:
    """Every tuning run and its validation accuracy; the chosen setting of each cell ("so far"
    while the cell's runs are not all in)."""
    lines = ["| method | split | local epochs | setting | final validation accuracy | chosen |", "|---|---|---|---|---|---|"]
    for run in tuning_plan(study):
        got = done.get(run.key)
        cell = study.tuning_cell(run.method, run.split.name, run.local_epochs)
        where = ("pooled", "-") if not run.federated else (run.split.name, run.local_epochs)
        mark = "" if not got or chosen.get(cell) != run.lr else "yes" if cell in tuned else "so far"
        lines.append(f"| {run.method} | {where[0]} | {where[1]} | `{run.lr}` | {_fmt(got and got['final_val_accuracy'])} | "
                     f"{mark} |")
    return lines


def task_section(study: Study, out: Path) -> tuple[list[dict], list[str]]:
    """One task's records and its part of REPORT.md: centralized, a table per split, the plots
    (named after the task's profile in `out`), the set-up and the tuning table."""
    done = load_done(study.output_dir() / "runs")
    chosen = choose(study, done)
    cells = tuning_cells(study)
    tuned = [c for c in cells if c in chosen and all(
        r.key in done for r in tuning_plan(study) if study.tuning_cell(r.method, r.split.name, r.local_epochs) == c)]
    planned = comparison_plan(study, {c: chosen.get(c, {}) for c in cells}, done)
    compared = [done[r.key] for r in planned
                if r.key in done and study.tuning_cell(r.method, r.split.name, r.local_epochs) in tuned]
    records = summarize(study, compared)
    central = next((r for r in records if r["split"] == "pooled"), None)
    text = [f"## {study.task_name}", "",
            f"{len(done)} runs in `{study.output_dir().name}/runs/`: {len(tuned)} of {len(cells)} tuning cells tuned, "
            f"{len(compared)} of {len(planned)} comparison runs done.", ""]
    if central is not None:
        text += [f"Centralized ({_name(central)}, `{central['lr']}`): {central['final_accuracy_mean']:.4f} ± "
                 f"{central['final_accuracy_std']:.4f} after {central['epochs']} epochs (seeds {list(central['seeds'])}); "
                 f"its validation curve flattened at epoch {central['flattened_epoch']}.", ""]
    for split in sorted({r["split"] for r in records if r["split"] != "pooled"}):
        text += [f"### {split}", "", table([r for r in records if r["split"] == split]), ""]
    for path in plot(records, out, study.profile) if records else []:
        text += [f"![{path.stem}]({path.name})", ""]
    text += [f"Set-up: {list(study.sites)} sites; splits {[s.name for s in study.splits]}; {study.rounds} rounds for "
             f"every federated method, {study.epoch_budget} epochs for centralized; seeds {list(study.repeat_seeds)}"
             f"{f' ({list(study.close_call_seeds)} too where two methods are too close to call)' if study.close_call_seeds else ''}. "
             f"Shared run config: `{study.run_config}`.", "",
             f"Tuning (seed {study.seeds[0]}, final validation accuracy on the sites' held-out data; never the test set):", ""]
    return records, text + tuning_table(study, done, chosen, tuned) + [""]


def write_rounds_report(study: Study, command: str) -> Path:
    """REPORT.md, summary.json and the plots of a study at fixed communication and its parts."""
    out = study.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    text = [f"# fedcycle at fixed communication: profile `{study.profile}`", "",
            f"Generated by `{command}` from the run summaries alone.", "",
            "## The question", "",
            f"Every federated method runs the same rounds: the same communication. How many rounds, and bytes, does "
            f"each need to come within {WITHIN_POINTS:g} point of centralized training's final test accuracy (the "
            "first round the seeds' mean test accuracy gets there; in brackets, the round from which it stays)? "
            "Differences are paired by seed, in accuracy points, with 95% intervals (t); 'tie' where the interval "
            "holds 0. Traffic is measured: the bytes of the arrays all sites received and sent in a round's training "
            "(`bytes` in each run's metrics.jsonl; the study's per-round evaluation on the sites' validation data is "
            "not counted).", ""]
    records = []
    for part in (study, *study.parts):
        got, section = task_section(part, out)
        records += got
        text += section
    (out / "summary.json").write_text(json.dumps(records, indent=1) + "\n")
    text += ["## Versions and machine", "", f"```\n{json.dumps({'versions': versions(), 'machine': machine()}, indent=1)}\n```", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(text))
    return report
