"""The report generator on small, hand-made run summaries: tables and numbers as expected."""

from __future__ import annotations

import json

import pytest

from fedcycle_tools.study.plan import Study, comparison_plan, tuning_plan
from fedcycle_tools.study.report import claim_verdict, summarize_runs, write_report

STUDY = """
profile: {profile}
dataset: fashion-mnist
model: small-cnn
epoch_budget: 4
sites: [2]
tuning_sites: 2
local_epochs: [1, 2]
splits:
  - {{name: iid, partitioner: iid}}
seeds: [0]
repeat_seeds: [0, 1]
lr_grid:
  constant: [{{lr-max: 0.05}}, {{lr-max: 0.1}}]
  cyclical: [{{lr-min: 0.005, lr-max: 0.1, cycle-rounds: 1, cycle-epochs: 1}}]
output: {output}
"""


def summary(run, accuracy, val=0.8, seconds=None, bytes_per_round=1_000_000) -> dict:
    return {
        "key": run.key, "profile": "unit", "method": run.method, "split": run.split.name,
        "sites": run.sites if run.federated else None, "local_epochs": run.local_epochs if run.federated else None,
        "seed": run.seed, "lr": run.lr, "rounds": len(accuracy) - 1, "accuracy": accuracy,
        "val_accuracy": [val] * len(accuracy), "seconds": seconds or [1.0] * len(accuracy),
        "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy), "final_val_accuracy": val,
        "wall_seconds": 10.0, "bytes_per_site_per_round": bytes_per_round if run.federated else 0,
    }


@pytest.fixture
def study(tmp_path) -> Study:
    path = tmp_path / "unit.yaml"
    path.write_text(STUDY.format(profile="unit", output=tmp_path / "out"))
    return Study.load(path)


def write(study: Study, runs: list[dict]) -> None:
    folder = study.output_dir() / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    for run in runs:
        (folder / f"{run['key']}.json").write_text(json.dumps(run))


def test_report_tables_and_numbers(study):
    tuning = tuning_plan(study)
    # tuning: lr-max 0.1 wins for fedavg-constant on validation accuracy (0.9 > 0.7)
    vals = {("fedavg-constant", 0.05): 0.7, ("fedavg-constant", 0.1): 0.9, ("centralized-constant", 0.05): 0.9,
            ("centralized-constant", 0.1): 0.6}
    runs = [summary(r, [0.1, 0.5], val=vals.get((r.method, r.lr.get("lr-max")), 0.8)) for r in tuning]
    write(study, runs)
    chosen_plan = comparison_plan(study, {"centralized-constant": {"lr-max": 0.05}, "centralized-cyclical": tuning[2].lr,
                                          "fedavg-constant": {"lr-max": 0.1}, "fedavg-cyclical": tuning[5].lr})
    curves = {
        "centralized-constant": [0.1, 0.80, 0.84, 0.86, 0.87],
        "centralized-cyclical": [0.1, 0.82, 0.86, 0.88, 0.89],
        ("fedavg-constant", 1): [0.1, 0.70, 0.80, 0.83, 0.85],
        ("fedavg-constant", 2): [0.1, 0.75, 0.84],
        ("fedavg-cyclical", 1): [0.1, 0.78, 0.84, 0.87, 0.88],
        ("fedavg-cyclical", 2): [0.1, 0.86, 0.886],
    }
    comparison = []
    for r in chosen_plan:
        curve = curves[r.method] if r.method.startswith("centralized") else curves[(r.method, r.local_epochs)]
        shift = 0.01 * r.seed  # seed 1 is one point better everywhere
        # a comparison run with a tuning run's key is that run (the runner reuses it): same validation
        comparison.append(summary(r, [a + shift for a in curve], val=vals.get((r.method, r.lr.get("lr-max")), 0.8)))
    write(study, comparison)

    report = write_report(study, command="python -m fedcycle_tools.study unit.yaml")
    records = {(r["method"], r["local_epochs"]): r for r in json.loads((study.output_dir() / "summary.json").read_text())}
    cyc2 = records[("fedavg-cyclical", 2)]
    # two seeds at the tuning cell: 0.886 and 0.896
    assert cyc2["final_accuracy_mean"] == pytest.approx(0.891) and cyc2["final_accuracy_std"] == pytest.approx(0.00707, abs=1e-5)
    assert cyc2["centralized_accuracy_mean"] == pytest.approx(0.895)  # the better centralized method
    assert cyc2["gap_points"] == pytest.approx(-0.4)
    assert cyc2["rounds_to_85"] == 1 and cyc2["rounds_to_88"] == 2 and cyc2["rounds"] == 2
    assert cyc2["bytes_per_site"] == 2_000_000
    assert records[("fedavg-constant", 1)]["rounds_to_88"] is None
    text = report.read_text()
    assert "| 2 | fedavg-cyclical | 2 | 2 | 0.8910 ± 0.0071 (n=2) | 0.8910 | 1 | 2 | -0.40 | 10 | 2.0 |" in text
    assert "**held**" in text and "it held in every cell" in text
    assert "| fedavg-constant | `{'lr-max': 0.1}` | 0.9000 | yes |" in text
    assert "| centralized-constant | `{'lr-max': 0.05}` | 0.9000 | yes |" in text
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "accuracy_vs_time.png"):
        assert (study.output_dir() / name).read_bytes()[:4] == b"\x89PNG" and name in text


def test_verdict_says_when_the_claim_did_not_hold():
    base = {"profile": "p", "split": "iid", "sites": 4, "centralized_accuracy_mean": 0.90}
    records = [
        {**base, "method": "fedavg-constant", "local_epochs": 1, "final_accuracy_mean": 0.85, "gap_points": -5.0},
        {**base, "method": "fedavg-cyclical", "local_epochs": 5, "final_accuracy_mean": 0.87, "gap_points": -3.0},
    ]
    verdict, lines = claim_verdict(records)
    assert verdict is False and "-3.00 points" in lines[0] and "did not hold" in lines[0]


def test_a_report_before_any_comparison_run_says_so(study):
    report = write_report(study, command="x")
    assert "Not yet known" in report.read_text()
    assert json.loads((study.output_dir() / "summary.json").read_text()) == []


def test_summaries_group_seeds():
    runs = [{"profile": "p", "split": "iid", "sites": 2, "method": "fedavg-cyclical", "local_epochs": 1, "rounds": 1,
             "seed": s, "accuracy": [0.1, a], "final_accuracy": a, "best_accuracy": a, "wall_seconds": 1.0,
             "bytes_per_site_per_round": 10, "lr": {}, "seconds": [0.0, 1.0]} for s, a in ((0, 0.8), (1, 0.9), (2, 0.85))]
    (record,) = summarize_runs(runs)
    assert record["seeds"] == [0, 1, 2] and record["final_accuracy_mean"] == pytest.approx(0.85)
    assert record["final_accuracy_std"] == pytest.approx(0.05)


def test_the_recipe_table_measures_fedcycle_against_centralized_and_plain_fedavg():
    from fedcycle_tools.study.report import recipe_table, recipe_verdict

    def record(method, split, final, std=0.0, le=1):
        central = method.startswith("centralized")
        return {"method": method, "split": "pooled" if central else split, "sites": None if central else 4,
                "local_epochs": None if central else le, "final_accuracy_mean": final, "final_accuracy_std": std}

    records = [
        record("centralized-cyclical", None, 0.90),
        record("fedavg-constant", "iid", 0.88), record("fedavg-cyclical", "iid", 0.87), record("fedcycle", "iid", 0.898, 0.002),
        record("fedavg-constant", "dirichlet-0.3", 0.80), record("fedcycle", "dirichlet-0.3", 0.84),
        record("fedavg-constant", "iid", 0.88, le=5), record("fedcycle", "iid", 0.89, le=5),
    ]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in recipe_table(records).splitlines()[2:]}
    assert rows[("iid", "4", "1")].endswith("| 0.8980 ± 0.0020 | -0.20 | +1.80 | 90% | met |")
    assert rows[("iid", "4", "5")].endswith("| -1.00 | +1.00 | 50% | missed |")  # 1 point short of centralized
    assert rows[("dirichlet-0.3", "4", "1")].endswith("| -6.00 | +4.00 | 40% | missed |")  # under half the gap closed
    verdict = recipe_verdict(records)
    assert verdict.startswith("**Target met in 1 of 3 cells.**") and "beat fedavg-constant in 3 of 3 cells" in verdict
    records[3]["final_accuracy_mean"] = 0.87  # fedcycle behind fedavg-constant at iid, 1 local epoch: target missed
    verdict = recipe_verdict(records)
    assert "Target met in 0 of 3 cells (missed in every one)" in verdict and "in 2 of 3 cells" in verdict
