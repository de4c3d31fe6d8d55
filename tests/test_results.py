"""A run's files (fedcycle.results): where a run's folder goes and that no run overwrites
another's, metrics.jsonl read back as written, models saved as safetensors that load back equal,
config.json with what a reader needs to repeat the run and nothing the run did not use, and the
plot: the primary metric, the loss and every step's learning rate against rounds, labelled as
what they are."""

from __future__ import annotations

import re

import flwr
import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedcycle.config import RunSettings
from fedcycle.results import RunResults, draw_run, load_model, read_metrics, resolve_run_dir
from fedcycle.schedules import LRSchedule
from fedcycle.tasks.image.models import build_model
from fedcycle.wire import RoundConfig


def settings(results_dir, **extra) -> RunSettings:
    return RunSettings.from_run_config({"results-dir": str(results_dir), **extra})


def test_a_run_folder_is_never_overwritten_a_second_run_of_the_name_gets_a_suffix(tmp_path):
    first = resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=1, what="x")
    assert first == tmp_path / "baseline" and first.is_dir()
    RunResults(first).append_round({"round": 0, "accuracy": 0.1})
    second = resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=2, what="x")
    assert second == tmp_path / "baseline-2" and second.is_dir()
    RunResults(second).append_round({"round": 0, "accuracy": 0.2})
    third = resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=3, what="x")
    assert third == tmp_path / "baseline-3"
    # the earlier runs' lines are where they were
    assert read_metrics(first / "metrics.jsonl") == [{"round": 0, "accuracy": 0.1}]
    assert read_metrics(second / "metrics.jsonl") == [{"round": 0, "accuracy": 0.2}]
    # a folder without a round in it (a run that stopped before its first round) is taken again
    assert resolve_run_dir(settings(tmp_path, **{"run-name": "baseline"}), run_id=4, what="x") == third


def test_a_folder_another_run_holds_is_neither_shared_nor_resumed(tmp_path):
    import fcntl

    import pytest

    from fedcycle.errors import ConfigError
    from fedcycle.results import take_for_resume

    held = tmp_path / "busy"
    held.mkdir()
    other = open(held / "run.lock", "a+")  # another ServerApp's lock (flock: per open file, as between processes)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write("pid 4242 on coordinator\n")
    other.flush()
    # before its first round there is no metrics.jsonl: only the lock says the folder is in use
    assert resolve_run_dir(settings(tmp_path, **{"run-name": "busy"}), run_id=2, what="x") == tmp_path / "busy-2"
    with pytest.raises(ConfigError) as refused:
        take_for_resume(held)
    assert f"resume-from={str(held)!r} is in use by another run (run.lock is held: pid 4242 on coordinator)" in str(
        refused.value)
    other.close()  # that run ended (however it ended: the OS drops its lock)
    assert take_for_resume(held) == held


def test_an_unnamed_run_is_named_after_what_it_trains_and_relative_paths_follow_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_run_dir(RunSettings.from_run_config({"results-dir": "out", "strategy": "flwr.serverapp.strategy:FedMedian",
                                                        "lr-schedule": "cosine"}), run_id=17, what="fashion-mnist")
    assert path.parent == tmp_path / "out"
    assert re.fullmatch(r"fashion-mnist-flwr\.serverapp\.strategy\.FedMedian-cosine-\d{8}-\d{6}-run17", path.name), path.name


def test_metrics_lines_round_trip_through_read_metrics(tmp_path):
    results = RunResults(tmp_path)
    lines = [
        {"round": 0, "primary_metric": "accuracy", "accuracy": 0.1, "loss": 2.3, "sites": [], "events": [],
         "train_config": None},
        {"round": 1, "primary_metric": "accuracy", "accuracy": 0.5, "loss": 1.2,
         "metrics": {"accuracy": 0.5}, "swa": {"rounds": [1], "accuracy": 0.5},
         "sites": [{"node_id": 7, "site": "partition 0/2", "lr-peak": 0.05, "num-examples": 500}],
         "events": [{"node_id": 8, "event": "rejected", "reason": "array 'conv.bias' holds NaN or Inf"}]},
    ]
    for line in lines:
        results.append_round(line)
    assert read_metrics(results.metrics_path) == lines
    # NumPy and torch scalars (what metrics come as) are written as plain numbers
    results.append_round({"round": 2, "accuracy": np.float32(0.75), "loss": torch.tensor(0.5), "steps": np.int64(8)})
    assert read_metrics(results.metrics_path)[-1] == {"round": 2, "accuracy": 0.75, "loss": 0.5, "steps": 8}
    # a resumed run's rounds replace the file's, whatever it held
    results.rewrite_rounds(lines[:1])
    assert read_metrics(results.metrics_path) == lines[:1]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left beside it


def test_a_saved_model_loads_back_equal_as_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_model("small-cnn", (1, 28, 28), 10)
    state = dict(model.state_dict())
    state["features.0.weight"] = state["features.0.weight"].transpose(2, 3)  # not contiguous
    state["counter"] = torch.tensor(3, dtype=torch.int64)  # a BatchNorm's num_batches_tracked, say
    results = RunResults(tmp_path)
    path = results.save_model("global-best", state)
    assert path == tmp_path / "global-best.safetensors"
    loaded = load_model(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: any reader opens it
        assert set(f.keys()) == set(state)
    # saved again under the same name, the file holds the new model, whole
    results.save_model("global-best", {k: torch.zeros_like(v) for k, v in state.items()})
    assert all(not v.any() for v in load_model(path).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-best.safetensors"]


def test_config_json_holds_the_run_config_seed_versions_and_machine(tmp_path):
    results = RunResults(tmp_path)
    assert results.read_config() == {}  # none yet
    run_config = {"num-server-rounds": 3, "seed": 7, "lr-max": 0.05}
    results.write_config(RunSettings.from_run_config(run_config), run_config, run_id=42, sites={"1": {"site": "a"}})
    config = results.read_config()
    assert config["run_config"] == run_config and config["seed"] == 7 and config["run_id"] == 42
    assert config["settings"]["num_server_rounds"] == 3 and config["sites"] == {"1": {"site": "a"}}
    assert config["versions"]["flwr"] == flwr.__version__ and config["versions"]["torch"] == torch.__version__.split("+")[0]
    assert {"hostname", "platform", "python", "cpu_count", "cuda"} <= set(config["machine"])
    (tmp_path / "config.json").write_text('{"run_config": ')  # cut short
    assert results.read_config() == {}


def test_config_json_of_a_non_image_task_holds_no_image_or_other_unused_tables(tmp_path):
    """Flower gives every run every declared key's default: the tables of the built-in tasks,
    partitioners and strategies the run does not use say nothing of it."""
    run_config = {"task": "tabular", "image.dataset": "fashion-mnist", "image.model": "small-cnn",
                  "tabular.label-column": "y", "fedprox.proximal-mu": 0.01, "dirichlet.alpha": 0.5, "dp.delta": 1e-5,
                  "clinic.hidden": 64, "num-server-rounds": 3}  # clinic: no built-in's table (a task's own)
    results = RunResults(tmp_path)
    results.write_config(RunSettings.from_run_config(run_config), run_config)
    config = results.read_config()
    assert config["settings"]["options"] == {"tabular": {"label-column": "y"}, "dp": {"delta": 1e-5}, "clinic": {"hidden": 64}}
    assert config["run_config"] == {"task": "tabular", "tabular.label-column": "y", "dp.delta": 1e-5, "clinic.hidden": 64,
                                    "num-server-rounds": 3}
    text = (tmp_path / "config.json").read_text()
    assert "fashion-mnist" not in text and "small-cnn" not in text


def round_lines(source: str = "server-test", metric: str = "accuracy") -> list[dict]:
    """metrics.jsonl lines of rounds 0-2: each trained 2 local epochs under a triangular cycle
    per round, by a site of 300 examples (20 steps) and one of 100 (8 steps)."""
    lines = [{"round": 0, "primary_metric": metric, metric: 0.2, "loss": 2.3, "metrics_source": source,
              "train_config": None, "sites": [], "events": []}]
    for r in (1, 2):
        sent = RoundConfig(r, LRSchedule("triangular", 0.01, 0.11), local_epochs=2, epochs_before=2 * (r - 1),
                           batch_size=32, optimizer="sgd", momentum=0.9, weight_decay=0.0)
        sites = [{"site": "a", "num-examples": 300, "train-loss": 1.0 / r, "local-epochs": 2, "steps": 20},
                 {"site": "b", "num-examples": 100, "train-loss": 2.0 / r, "local-epochs": 2, "steps": 8}]
        lines.append({"round": r, "primary_metric": metric, metric: 0.2 + 0.3 * r, "loss": 2.3 - r, "metrics_source": source,
                      "train_config": sent.to_record(), "sites": sites, "events": []})
    return lines


def curves(ax) -> dict[str, tuple[list[float], list[float]]]:
    """An axes' lines by their label: (x, y)."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def texts(fig) -> list[str]:
    """Every text a reader sees: the title, the axes' labels, the legends."""
    found = [fig.get_suptitle()]
    for ax in fig.axes:
        found += [ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in (ax.get_legend().get_texts() if ax.get_legend() else []))]
    return found


def test_the_plot_has_the_metric_the_training_loss_and_every_steps_learning_rate_on_integer_rounds(tmp_path):
    fig = draw_run(round_lines(), "accuracy", "demo")
    fig.canvas.draw()
    top, middle, bottom = fig.axes
    low, high = bottom.get_xlim()
    assert [t for t in bottom.get_xticks() if low <= t <= high] == [0, 1, 2]  # no 0.5, no 1.5
    assert top.get_ylabel() == "test accuracy" and curves(top)["global model"] == ([0, 1, 2], [0.2, 0.5, 0.8])
    # the sites' training loss, weighted by their examples, per round
    assert curves(middle)["train loss (sites' mean)"] == ([1, 2], pytest.approx([1.25, 0.625]))
    assert curves(middle)["test loss (global model)"] == ([0, 1, 2], pytest.approx([2.3, 1.3, 0.3]))
    # the larger site's 20 steps a round, round r's between r - 1 and r, one cycle up and down in each
    x, lr = curves(bottom)["triangular, every optimizer step"]
    assert x == pytest.approx([r - 1 + j / 20 for r in (1, 2) for j in range(20)])
    assert lr[:20] == pytest.approx(lr[20:]) and lr[0] == pytest.approx(0.01) and max(lr) == pytest.approx(0.11)
    assert lr[:20] == pytest.approx(LRSchedule("triangular", 0.01, 0.11).lrs(0, 20, 20))
    assert fig.get_suptitle() == "demo"


def test_without_a_test_split_the_plot_says_the_values_are_the_sites_held_out_data():
    fig = draw_run(round_lines(source="sites-weighted", metric="mae"), "mae", "regression")
    assert fig.axes[0].get_ylabel() == "validation mae\n(sites' held-out data)"
    assert "validation loss (global model)" in curves(fig.axes[1])
    assert not any("test" in text for text in texts(fig)), texts(fig)


def test_a_failed_runs_plot_marks_the_round_and_says_why_in_its_title():
    reason = ("round 3 failed 2 time(s): 0 of 2 replies usable, min-replies=1 needs 1; bring the sites back and "
              "resume the run\nTraceback (most recent call last): ...")
    lines = [*round_lines(), {"round": 3, "primary_metric": "accuracy", "accuracy": None, "loss": None,
                              "metrics_source": None, "failed": reason, "train_config": None, "sites": [], "events": []}]
    fig = draw_run(lines, "accuracy", "demo")
    headline, why = fig.get_suptitle().split("\n")
    assert headline == "demo: failed at round 3"
    assert why.startswith("round 3 failed 2 time(s): 0 of 2 replies usable") and why.endswith("…") and len(why) <= 100
    for ax in fig.axes:  # a red line at round 3 in every panel
        assert any(list(line.get_xdata()) == [3, 3] and line.get_color() == "red" for line in ax.get_lines())


def test_the_plot_draws_any_run_from_metrics_jsonl_alone(tmp_path):
    """Nulls (a diverged loss, a failed round, a round the sites did not train in), a run with no
    round done yet, a resumed or DP run: each is drawn, never an error."""
    results = RunResults(tmp_path)
    assert results.plot("mae") == tmp_path / "mae.png"  # no metrics.jsonl yet: an empty figure
    results.append_round({"round": 0, "primary_metric": "mae", "mae": 0.9, "loss": None, "train_config": None,
                          "sites": [], "events": []})
    path = results.plot()  # the primary metric from the lines
    assert path == tmp_path / "mae.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trained = round_lines(metric="mae")[1]
    for line in [
        {**trained, "round": 1, "mae": None, "loss": float("nan"), "swa": None, "metrics": None,
         "sites": [{**trained["sites"][0], "train-loss": None, "num-examples": None}, {"site": "c", "steps": None}]},
        {**trained, "round": 2, "sites": None, "train_config": {**trained["train_config"], "lr-max": None}},
        {**trained, "round": 3, "site_epsilon": 2.5, "swa": {"mae": 0.4, "rounds": [3]},
         "sites": [{**site, "epsilon": 1.2} for site in trained["sites"]]},
        {"round": 4, "mae": 0.3},  # a line of an older fedcycle: no schedule, no sites
    ]:
        results.append_round(line)
    assert results.plot("mae").stat().st_size > 0

