"""A study at fixed communication (`rounds` in the study file, studies/paper.yaml): the plan
(every federated run the same rounds, every method tuned in every split at its own local
epochs) and the report (rounds to within 1 point of centralized, paired differences), on
hand-made run summaries."""

from __future__ import annotations

import json

import pytest

from fedcycle_tools.study.plan import (
    Study,
    StudyError,
    choose,
    comparison_plan,
    run_config_for,
    tuning_plan,
)
from fedcycle_tools.study.rounds_report import paired, write_rounds_report

STUDY = """
profile: rounds
output: {output}
dataset: fashion-mnist
model: small-cnn
rounds: 3
epoch_budget: 4
sites: [2]
tuning_sites: 2
tune_every_cell: true
local_epochs: [1, 5]
methods:
  centralized-constant: []
  fedavg-constant: [1, 5]
  fedavgm: [5]
splits:
  - {{name: iid, partitioner: iid}}
  - {{name: dirichlet-0.3, partitioner: dirichlet, alpha: 0.3}}
seeds: [0]
repeat_seeds: [0, 1, 2]
repeat_splits: [iid, dirichlet-0.3]
lr_grid:
  constant: [{{lr-max: 0.02}}, {{lr-max: 0.05}}]
  cyclical: [{{lr-min: 0.005, lr-max: 0.1, cycle-rounds: 1}}]
  fedavgm: [{{lr-max: 0.02, fedavgm.server-momentum: 0.9}}]
"""


@pytest.fixture
def study(tmp_path) -> Study:
    path = tmp_path / "rounds.yaml"
    path.write_text(STUDY.format(output=tmp_path / "out"))
    return Study.load(path)


def test_every_federated_run_takes_the_same_rounds_and_each_method_is_tuned_in_every_split(study):
    tuning = tuning_plan(study)
    cells = {(r.method, r.split.name if r.federated else "pooled", r.local_epochs if r.federated else None)
             for r in tuning}
    assert cells == {("centralized-constant", "pooled", None),
                     *{("fedavg-constant", s, le) for s in ("iid", "dirichlet-0.3") for le in (1, 5)},
                     ("fedavgm", "iid", 5), ("fedavgm", "dirichlet-0.3", 5)}
    for run in tuning:
        config = run_config_for(study, run, "")
        assert config["num-server-rounds"] == (3 if run.federated else 4)  # centralized: epoch_budget epochs
    fedavgm = next(r for r in tuning if r.method == "fedavgm")
    config = run_config_for(study, fedavgm, "")
    assert config["strategy"] == "fedavgm" and config["fedavgm.server-momentum"] == 0.9
    assert config["lr-schedule"] == "constant" and config["lr-max"] == 0.02


def test_each_split_keeps_the_setting_its_own_validation_chose(study):
    """0.02 wins at iid, 0.05 under Dirichlet: each split's comparison runs use its own."""
    done = {}
    for run in tuning_plan(study):
        wins = (run.split.name == "iid") == (run.lr.get("lr-max") == 0.02)
        done[run.key] = {"final_val_accuracy": 0.9 if wins else 0.8}
    chosen = choose(study, done)
    plan = comparison_plan(study, chosen)
    for run in plan:
        if run.method == "fedavg-constant":
            assert run.lr == {"lr-max": 0.02 if run.split.name == "iid" else 0.05}
    assert sorted({r.seed for r in plan}) == [0, 1, 2]
    assert not any(r.method == "fedavgm" and r.local_epochs == 1 for r in plan)


def test_bad_method_lists_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    base = STUDY.format(output=tmp_path / "out")
    path.write_text(base.replace("fedavgm: [5]", "fedyogi: [5]"))
    with pytest.raises(StudyError, match="methods: 'fedyogi' is not a method"):
        Study.load(path)
    path.write_text(base.replace("fedavg-constant: [1, 5]", "fedavg-constant: [1, 2]"))
    with pytest.raises(StudyError, match=r"methods.fedavg-constant: local epochs \[1, 2\] not all among"):
        Study.load(path)
    path.write_text(base.replace("{lr-max: 0.02, fedavgm.server-momentum: 0.9}", "{fedavgm.server-momentum: 0.9}"))
    with pytest.raises(StudyError, match="lr_grid.fedavgm: each setting has 'lr-max'"):
        Study.load(path)


def test_a_paired_difference_is_a_tie_when_its_interval_holds_zero():
    assert paired({0: 0.90, 1: 0.91, 2: 0.92}, {0: 0.89, 1: 0.90, 2: 0.91})["tie"] is False  # 1 point, every seed
    noisy = paired({0: 0.90, 1: 0.88, 2: 0.92}, {0: 0.89, 1: 0.90, 2: 0.90})
    assert noisy["tie"] is True and noisy["ci95_points"][0] < 0 < noisy["ci95_points"][1]
    assert noisy["mean_points"] == pytest.approx(100 * (0.90 - 0.8967), abs=0.01)
    assert paired({0: 0.9}, {0: 0.8}) is None


def summary(run, accuracy: list[float], val: float = 0.8, bytes_per_round: float = 1e6) -> dict:
    return {
        "key": run.key, "profile": "rounds", "method": run.method, "split": run.split.name,
        "sites": run.sites if run.federated else None, "local_epochs": run.local_epochs if run.federated else None,
        "seed": run.seed, "lr": run.lr, "rounds": len(accuracy) - 1, "accuracy": accuracy,
        "val_accuracy": [val] * len(accuracy), "final_accuracy": accuracy[-1], "final_val_accuracy": val,
        "wall_seconds": 10.0, **({"bytes_per_round": bytes_per_round} if run.federated else {}),
    }


def test_the_report_says_how_many_rounds_and_bytes_each_method_needs_to_come_within_a_point(study):
    out = study.output_dir() / "runs"
    out.mkdir(parents=True)
    for run in tuning_plan(study):
        (out / f"{run.key}.json").write_text(json.dumps(summary(run, [0.1, 0.5, 0.7, 0.8], val=0.8 + run.lr["lr-max"])))
    chosen = choose(study, {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")})
    curves = {"centralized-constant": [0.1, 0.80, 0.85, 0.88, 0.90],  # 4 epochs
              ("fedavg-constant", 1): [0.1, 0.70, 0.80, 0.85],
              ("fedavg-constant", 5): [0.1, 0.85, 0.895, 0.90],  # within 1 point of 0.90 from round 2
              ("fedavgm", 5): [0.1, 0.893, 0.88, 0.895]}  # within from round 1, back out, within again
    for run in comparison_plan(study, chosen):
        curve = curves[run.method if not run.federated else (run.method, run.local_epochs)]
        noise = 0.001 * run.seed
        (out / f"{run.key}.json").write_text(json.dumps(summary(run, [a + noise for a in curve], val=0.8 + run.lr["lr-max"])))
    write_rounds_report(study, command="test")

    records = json.loads((study.output_dir() / "summary.json").read_text())
    keys = {"method", "split", "sites", "local_epochs", "rounds", "seeds", "final_accuracy_mean",
            "rounds_to_within_1pt", "bytes_per_round"}
    central = [r for r in records if r["split"] == "pooled"]
    assert len(central) == 1 and central[0]["final_accuracy_mean"] == pytest.approx(0.901)
    federated = {(r["method"], r["split"], r["local_epochs"]): r for r in records if r["split"] != "pooled"}
    assert len(federated) == 6 and all(keys <= set(r) for r in federated.values())
    five = federated[("fedavg-constant", "iid", 5)]
    assert five["seeds"] == {"0": pytest.approx(0.90), "1": pytest.approx(0.901), "2": pytest.approx(0.902)}
    assert five["rounds_to_within_1pt"] == 2 and five["bytes_to_within_1pt"] == pytest.approx(2e6)
    assert federated[("fedavg-constant", "iid", 1)]["rounds_to_within_1pt"] is None  # never
    assert five["vs_best_in_split"] is None  # it is the best
    behind = federated[("fedavgm", "iid", 5)]["vs_best_in_split"]
    assert behind["mean_points"] == pytest.approx(-0.5) and behind["tie"] is False
    report = (study.output_dir() / "REPORT.md").read_text()
    assert "| fedavg-constant, 5 local epochs | 0.9010 ± 0.0010 (3) | 2 (2) (seeds: 2, 2, 2) | 1.00 | 2.0 |" in report
    dipped = federated[("fedavgm", "iid", 5)]
    assert dipped["rounds_to_within_1pt"] == 1 and dipped["rounds_to_stay_within_1pt"] == 3
    assert (study.output_dir() / "rounds_accuracy_vs_bytes.png").exists()


def test_two_methods_too_close_to_call_get_more_seeds(tmp_path):
    path = tmp_path / "rounds.yaml"
    path.write_text(STUDY.format(output=tmp_path / "out") + "close_call_seeds: [3, 4]\n")
    study = Study.load(path)
    chosen = choose(study, {r.key: {"final_val_accuracy": 0.8} for r in tuning_plan(study)})
    plan = comparison_plan(study, chosen)
    # iid: fedavg-constant at 5 and fedavgm within noise of each other; dirichlet: 1 point apart on every seed
    finals = {("iid", "fedavg-constant", 1): [0.80, 0.80, 0.80], ("iid", "fedavg-constant", 5): [0.90, 0.88, 0.92],
              ("iid", "fedavgm", 5): [0.89, 0.90, 0.90], ("dirichlet-0.3", "fedavg-constant", 1): [0.80, 0.80, 0.80],
              ("dirichlet-0.3", "fedavg-constant", 5): [0.90, 0.91, 0.92], ("dirichlet-0.3", "fedavgm", 5): [0.89, 0.90, 0.91]}
    done = {r.key: {"final_accuracy": finals[(r.split.name, r.method, r.local_epochs)][r.seed] if r.federated else 0.9}
            for r in plan}
    extra = [r for r in comparison_plan(study, chosen, done) if r.key not in done]
    assert sorted((r.split.name, r.method, r.local_epochs, r.seed) for r in extra) == [
        ("iid", "fedavg-constant", 5, 3), ("iid", "fedavg-constant", 5, 4), ("iid", "fedavgm", 5, 3), ("iid", "fedavgm", 5, 4)]
    unfinished = {k: v for k, v in done.items() if not k.startswith("fedavgm-iid-s2-le5-seed2")}
    assert {r.key for r in comparison_plan(study, chosen, unfinished)} == set(done)  # a cell is judged once all in


def test_a_study_on_the_demo_data_joins_the_report_of_the_study_that_names_it(tmp_path):
    """studies/paper.yaml names paper-audio.yaml: one report, a section and records per task;
    where the demo data was made is not what a run computed."""
    from fedcycle_tools.study.plan import check_same_config

    study = Study.load("studies/paper.yaml")
    (audio,) = study.parts
    assert audio.demo_data == "audio" and audio.tuning_split.name == "accents" and audio.rounds == study.rounds
    assert audio.output_dir().parent == study.output_dir()
    run = tuning_plan(audio)[-1]
    config = {**run_config_for(audio, run, str(tmp_path / "here")), "audio.data-dir": "/elsewhere/site-{partition-id}"}
    assert config["task"] == "audio" and config["num-server-rounds"] == 20
    check_same_config(audio, run, {"run_config": config}, str(tmp_path / "here"))
