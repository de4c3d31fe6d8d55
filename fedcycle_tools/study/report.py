"""The study's report, generated from the run summaries alone: summary.json, REPORT.md, plots.

One record per (profile, split, sites, method, local_epochs), seeds averaged. The centralized
baseline of a cell is the better of the two centralized methods (same epochs over the same
pooled data), so a gap is measured against the stronger one.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedcycle.averaging import has_batchnorm
from fedcycle.results import machine, versions
from fedcycle.tasks import load_task
from fedcycle_tools.study.plan import (
    Study,
    choose,
    comparison_plan,
    load_done,
    tuning_plan,
)

THRESHOLDS = (0.85, 0.88)
CLAIM_POINTS = 1.0  # "competitive with centralized": within this many accuracy points


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*curves)]


def _rounds_to(curve: list[float], threshold: float) -> int | None:
    return next((i for i, acc in enumerate(curve) if acc >= threshold), None)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_runs(runs: list[dict]) -> list[dict]:
    """Seed-averaged records of the comparison runs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["profile"], run["split"], run["sites"], run["method"], run["local_epochs"])].append(run)
    centralized = {}
    for (profile, _split, _sites, method, _le), group in groups.items():
        if method.startswith("centralized"):
            centralized[(profile, method)] = statistics.fmean(r["final_accuracy"] for r in group)
    records = []
    for (profile, split, sites, method, le), group in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        finals = [r["final_accuracy"] for r in group]
        curve = _mean_curve([r["accuracy"] for r in group])
        base = max((v for (p, _m), v in centralized.items() if p == profile), default=None)
        mean = statistics.fmean(finals)
        records.append({
            "profile": profile,
            "split": "pooled" if method.startswith("centralized") else split,
            "sites": sites,
            "method": method,
            "local_epochs": le,
            "rounds": group[0]["rounds"],
            "seeds": sorted(r["seed"] for r in group),
            "final_accuracy_mean": mean,
            "final_accuracy_std": _std(finals),
            "best_accuracy_mean": statistics.fmean(r["best_accuracy"] for r in group),
            "centralized_accuracy_mean": base,
            "gap_points": None if base is None else 100 * (mean - base),
            "rounds_to_85": _rounds_to(curve, 0.85),
            "rounds_to_88": _rounds_to(curve, 0.88),
            "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in group),
            "bytes_per_site": group[0]["bytes_per_site_per_round"] * group[0]["rounds"],
            "lr": group[0]["lr"],
            "accuracy_curve": curve,
            # a recipe that delivers the server's mean of cycle ends: its plain global model too
            **({"global_accuracy_curve": _mean_curve([r["global_accuracy"] for r in group])}
               if all("global_accuracy" in r for r in group) else {}),
            "seconds_curve": _mean_curve([list(_cumulative(r["seconds"])) for r in group]),
        })
    return records


def claim_verdict(records: list[dict], local_epochs: tuple[int, ...] | None = None) -> tuple[bool | None, list[str]]:
    """Per (split, sites): does FedAvg + cyclical LR with the most local epochs come within
    CLAIM_POINTS of centralized, and beat plain FedAvg (constant LR, fewest local epochs)?
    The local epochs are fixed in advance (the most), not picked by test accuracy."""
    lines, held = [], []
    cells = sorted({(r["split"], r["sites"]) for r in records if r["method"].startswith("fedavg")}, key=str)
    for split, sites in cells:
        cell = [r for r in records if (r["split"], r["sites"]) == (split, sites)]
        if local_epochs and any(
            {r["local_epochs"] for r in cell if r["method"] == m} != set(local_epochs) for m in ("fedavg-constant", "fedavg-cyclical")
        ):
            continue  # a cell is judged once all its runs are in
        cyclical = [r for r in cell if r["method"] == "fedavg-cyclical"]
        plain = [r for r in cell if r["method"] == "fedavg-constant" and r["local_epochs"] == min(x["local_epochs"] for x in cell)]
        if not cyclical or not plain or cyclical[0]["centralized_accuracy_mean"] is None:
            continue
        best = max(cyclical, key=lambda r: r["local_epochs"])
        ok = best["gap_points"] >= -CLAIM_POINTS and best["final_accuracy_mean"] > plain[0]["final_accuracy_mean"]
        held.append(ok)
        lines.append(
            f"- {split}, {sites} sites: FedAvg + cyclical LR with {best['local_epochs']} local epoch(s) reaches "
            f"{best['final_accuracy_mean']:.4f}, {best['gap_points']:+.2f} points from centralized "
            f"({best['centralized_accuracy_mean']:.4f}); plain FedAvg (constant LR, {plain[0]['local_epochs']} local "
            f"epoch(s)) {plain[0]['final_accuracy_mean']:.4f}: **{'held' if ok else 'did not hold'}**"
        )
    return (all(held) if held else None), lines


RECIPE_POINTS = 0.3  # the target: fedcycle's recipe within this many points of centralized-cyclical at iid


def recipe_cells(records: list[dict]) -> list[dict]:
    """Per cell and local epochs: fedcycle's recipe against centralized-cyclical and fedavg-constant, and
    whether it met its target there ("-" where the target says nothing)."""
    central = next((r for r in records if r["method"] == "centralized-cyclical"), None)
    cells = sorted({(r["split"], r["sites"], r["local_epochs"]) for r in records if r["method"] == "fedcycle"}, key=str)
    judged = []
    for split, sites, le in cells:
        by = {r["method"]: r for r in records if (r["split"], r["sites"], r["local_epochs"]) == (split, sites, le)}
        if central is None or "fedavg-constant" not in by:
            continue
        c, plain, ours = central["final_accuracy_mean"], by["fedavg-constant"], by["fedcycle"]
        to_central = 100 * (ours["final_accuracy_mean"] - c)
        to_plain = 100 * (ours["final_accuracy_mean"] - plain["final_accuracy_mean"])
        gap = c - plain["final_accuracy_mean"]
        closed = (ours["final_accuracy_mean"] - plain["final_accuracy_mean"]) / gap if gap > 0 else None
        if split == "iid":
            target = "met" if to_central >= -RECIPE_POINTS and to_plain > 0 else "missed"
        elif split == "dirichlet-0.3":
            target = "-" if closed is None else ("met" if closed >= 0.5 else "missed")
        else:
            target = "-"
        judged.append({"split": split, "sites": sites, "local_epochs": le, "methods": by, "to_central": to_central,
                       "to_plain": to_plain, "closed": closed, "target": target})
    return judged


def recipe_table(records: list[dict]) -> str:
    """The cells of recipe_cells as a Markdown table."""
    rows = ["| split | sites | local epochs | fedavg-constant | fedavg-cyclical | fedcycle | fedcycle - centralized-cyclical"
            " | fedcycle - fedavg-constant | fedavg-constant's gap closed | target |", "|" + "---|" * 10]

    def cell(r: dict | None) -> str:
        return "-" if r is None else f"{r['final_accuracy_mean']:.4f} ± {r['final_accuracy_std']:.4f}"

    for c in recipe_cells(records):
        by = c["methods"]
        rows.append(f"| {c['split']} | {c['sites']} | {c['local_epochs']} | {cell(by['fedavg-constant'])} | "
                    f"{cell(by.get('fedavg-cyclical'))} | {cell(by['fedcycle'])} | {c['to_central']:+.2f} | "
                    f"{c['to_plain']:+.2f} | {_fmt(c['closed'], '.0%')} | {c['target']} |")
    return "\n".join(rows)


def recipe_verdict(records: list[dict]) -> str:
    """One plain sentence: in how many cells the target was met, and where fedcycle beat fedavg-constant."""
    cells = recipe_cells(records)
    judged = [c for c in cells if c["target"] != "-"]
    if not judged:
        return "No cell with a target is in yet."
    met = sum(c["target"] == "met" for c in judged)
    ahead = [f"{c['split']} {c['sites']} sites {c['local_epochs']} local epoch(s) ({c['to_plain']:+.2f})"
             for c in cells if c["to_plain"] > 0]
    return (f"**Target met in {met} of {len(judged)} cells{' (missed in every one)' if met == 0 else ''}.** "
            f"fedcycle beat fedavg-constant in {len(ahead)} of {len(cells)} cells"
            + (f": {', '.join(ahead)}." if ahead else ".")
            + " The recipes tried are in the tuning table below.")


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
    head = ("| sites | method | local epochs | rounds | final acc (mean ± std) | best acc | rounds to 85% | "
            "rounds to 88% | gap to centralized (points) | wall s | MB per site (training) |")
    rows = [head, "|" + "---|" * 11]
    for r in records:
        rows.append(
            f"| {r['sites'] or '-'} | {r['method']} | {r['local_epochs'] or '-'} | {r['rounds']} | "
            f"{r['final_accuracy_mean']:.4f} ± {r['final_accuracy_std']:.4f} (n={len(r['seeds'])}) | "
            f"{r['best_accuracy_mean']:.4f} | {_fmt(r['rounds_to_85'], 'd')} | {_fmt(r['rounds_to_88'], 'd')} | "
            f"{_fmt(r['gap_points'], '+.2f')} | {r['wall_seconds_mean']:.0f} | {r['bytes_per_site'] / 1e6:.1f} |"
        )
    return "\n".join(rows)


def plot(records: list[dict], out_dir: Path, sites: int) -> list[Path]:
    """Test accuracy against round, bytes and wall time; one panel per split, at `sites` sites."""
    import matplotlib  # lazily: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({r["split"] for r in records if r["split"] != "pooled"})
    central = [r for r in records if r["split"] == "pooled"]
    lowest = min((min(r["accuracy_curve"][1:] or [0.0]) for r in records), default=0.0)
    paths = []
    for axis, label in (("round", "round (centralized: epoch)"), ("bytes", "MB per site (training traffic)"), ("time", "wall time (s)")):
        fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(5 * max(len(splits), 1), 4), dpi=110, squeeze=False)
        for ax, split in zip(axes[0], splits):
            for r in central if axis != "round" else []:  # no rounds or bytes: a level to reach
                ax.axhline(r["final_accuracy_mean"], linestyle="--", linewidth=1, label=f"{r['method']} (final)")
            for r in [x for x in records if x["split"] == split and x["sites"] == sites] + (central if axis == "round" else []):
                curve = r["accuracy_curve"]
                per_round_mb = r["bytes_per_site"] / max(r["rounds"], 1) / 1e6
                xs = {"round": range(len(curve)), "bytes": [i * per_round_mb for i in range(len(curve))],
                      "time": r["seconds_curve"]}[axis]
                name = r["method"] + (f" le={r['local_epochs']}" if r["local_epochs"] else "")
                line = ax.plot(list(xs), curve, "--" if r["method"].startswith("centralized") else "-", marker=".", label=name)
                if "global_accuracy_curve" in r:
                    ax.plot(list(xs), r["global_accuracy_curve"], ":", color=line[0].get_color(),
                            label=f"{name}, global model (not averaged)")
            ax.set_title(f"{split}, {sites} sites")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(bottom=max(0.0, lowest - 0.05))
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_{axis}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _optimizer_note(runs: list[dict]) -> str:
    central = [r for r in runs if r["method"].startswith("centralized")]
    if central and all(r.get("optimizer") == "one for the whole run" for r in central):
        how = "keep one optimizer (and its momentum) for the whole run, stepping the schedule every batch"
    else:
        how = ("were made with a new optimizer every epoch (fedcycle before the long profile), so momentum restarted at "
               "every epoch boundary")
    return f"The centralized runs {how}; federated sites start a new optimizer every round, as FedAvg does."


def _averaging_note(study: Study) -> str:
    model = load_task({"image.dataset": study.dataset, "image.model": study.model}).build_model()
    batchnorm = ("it has BatchNorm, whose running statistics are averaged with the weights, not recomputed on "
                 "training data" if has_batchnorm(model) else "it has no BatchNorm, so the average needs no recomputed statistics")
    return ("Where the recipe averages cycle ends on the server, its accuracy is the averaged model's from the round "
            f"the average holds a model, the plain global model's before (plots: dotted). {study.model}: {batchnorm}.")


def _cumulative(values: list[float]):
    total = 0.0
    for v in values:
        total += v
        yield total


def write_report(study: Study, command: str) -> Path:
    out = study.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    done = load_done(out / "runs")
    chosen = choose(study, done)
    complete = len(chosen) == len(study.methods)
    compared = [done[r.key] for r in comparison_plan(study, chosen) if r.key in done] if complete else []
    records = summarize_runs(compared)
    (out / "summary.json").write_text(
        json.dumps([{k: v for k, v in r.items() if not k.endswith("_curve")} for r in records], indent=1)
    )
    plots = plot(records, out, study.tuning_sites) if records else []
    verdict, lines = claim_verdict(records, study.local_epochs)
    planned = len(tuning_plan(study))

    text = [f"# fedcycle reproduction: profile `{study.profile}`", ""]
    text += [f"Generated by `{command}` from the run summaries in `runs/` ({len(done)} runs, "
             f"{len(compared)} of them in the comparison).", ""]
    text += ["## Does the claim hold?", ""]
    planned_comparison = len(comparison_plan(study, chosen)) if complete else None
    if verdict is None or len(compared) != planned_comparison:
        text += [f"Not yet known: {len(compared)} of {planned_comparison or 'the'} comparison runs are finished "
                 "(run the same command to continue). Cells whose runs are all in:", ""]
    else:
        text += [f"Claim (Xu et al. 2018): FedAvg with a server-set cyclical learning rate and more local epochs comes "
                 f"within {CLAIM_POINTS:g} point of centralized training and beats plain FedAvg. "
                 f"**Overall: {'it held in every cell' if verdict else 'it did not hold in every cell'}.**", ""]
    text += (lines or ["- none yet"]) + [""]
    if "fedcycle" in study.methods:
        text += ["## fedcycle's recipe, cell by cell", "",
                 f"The recipe chosen in tuning: `{chosen.get('fedcycle')}`. Target (not a condition): within "
                 f"{RECIPE_POINTS:g} points of centralized-cyclical and ahead of fedavg-constant at iid; at "
                 f"dirichlet-0.3 at least half of fedavg-constant's gap to centralized-cyclical closed. "
                 "Differences in accuracy points; ± is the standard deviation over seeds.", "",
                 recipe_verdict(records), "", recipe_table(records), ""]
    screened = [r for r in compared if "screened" in r]
    if screened:
        text += ["## The reply screen on honest runs", "",
                 "Every site in these runs is honest, so a reply the screen left out is a false alarm. "
                 "Replies left out (`rejected`), updates scaled down to the round's norm bound (`clipped`) and weights "
                 "capped (`weight-capped`), of all replies, per split and sites:", "",
                 "| split | sites | runs | replies | rejected | clipped | weight-capped |", "|---|---|---|---|---|---|---|"]
        for split, sites in sorted({(r["split"], r["sites"]) for r in screened}, key=str):
            group = [r for r in screened if (r["split"], r["sites"]) == (split, sites)]
            text.append(f"| {split} | {sites} | {len(group)} | {sum(r['replies'] for r in group)} | "
                        f"{sum(r['screened']['rejected'] for r in group)} | {sum(r['screened'].get('clipped', 0) for r in group)} | "
                        f"{sum(r['screened']['weight-capped'] for r in group)} |")
        text.append("")
    text += ["## Set-up", "",
             f"{study.dataset}, {study.model}, {study.epoch_budget} epochs over the data for every method "
             f"(federated: {study.epoch_budget} / local epochs rounds); sites {list(study.sites)}; splits "
             f"{[s.name for s in study.splits]}; seeds {list(study.seeds)} ({list(study.repeat_seeds)} at "
             f"{study.tuning_sites} sites, splits {list(study.repeat_splits)}). Shared run config: `{study.run_config}`. "
             + _optimizer_note(compared), ""]
    if "fedcycle" in study.methods:
        text += [_averaging_note(study), ""]
    text += [f"## Tuning (validation accuracy at {study.tuning_sites} sites iid, seed "
             f"{study.seeds[0]}; never the test set)", "", "| method | lr setting | final validation accuracy | chosen |", "|---|---|---|---|"]
    for run in tuning_plan(study):
        got = done.get(run.key)
        text.append(f"| {run.method} | `{run.lr}` | {_fmt(got and got['final_val_accuracy'])} | "
                    f"{'yes' if chosen.get(run.method) == run.lr else ''} |")
    text += ["", f"{sum(r.key in done for r in tuning_plan(study))} of {planned} tuning runs done.", ""]
    for split in sorted({r["split"] for r in records}, key=lambda s: (s != "pooled", s)):
        text += [f"## {split}", "", table([r for r in records if r["split"] == split]), ""]
    for path in plots:
        text += [f"![{path.stem}]({path.name})", ""]
    text += ["## Versions and machine", "", f"```\n{json.dumps({'versions': versions(), 'machine': machine()}, indent=1)}\n```", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(text))
    return report
