"""Checkpoints: what they hold, how a bad one is refused, and the update-norm bound."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedcycle.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedcycle.config import RENAMED_KEYS, ConfigError, RunSettings
from fedcycle.recorder import load_resume_point, run_identity
from fedcycle.strategies import make_coordinator
from fedcycle.tasks import Task
from fedcycle.tasks.image.models import build_model
from tests.fakes import SHAPES, arrays, reply, screen_and_average, start_round

IMAGE = {"dataset": "fashion-mnist", "model": "small-cnn"}  # the image task's table, as Flower passes it


def image_run(image: dict | None = None, **settings) -> RunSettings:
    """Settings of an image-task run, its `image.` table given in full as in a real run."""
    return RunSettings(options={"image": {**IMAGE, **(image or {})}}, **settings)


def task_of(settings: RunSettings) -> Task:
    return Task(settings.task, settings.as_run_config())


def checkpoint(settings: RunSettings, server_round: int, **extra) -> Checkpoint:
    model = task_of(settings).build_model().state_dict()
    return Checkpoint(
        round=server_round,
        model=model,
        best_model=model,
        best_value=0.5 + server_round / 100,
        metrics=[{"round": r, "accuracy": 0.5 + r / 100} for r in range(server_round + 1)],
        identity=run_identity(settings, task_of(settings)),
        **extra,
    )


def test_a_checkpoint_holds_model_metrics_rng_and_the_strategy_state(tmp_path, task_identity):
    settings = RunSettings(strategy="fedadam", batch_size=4)
    server = make_coordinator(settings, num_sites=3)
    strategy = server.strategy
    rng = np.random.default_rng(0)
    start = ArrayRecord({k: Array(v) for k, v in arrays(rng).items()})
    honest = start_round(server, 1, start, [1, 2, 3])  # a real round: FedAdam's moments come from it
    sent = [{k: a.numpy() + 0.01 * rng.standard_normal(a.shape).astype(np.float32) for k, a in start.items()}
            for _ in range(3)]
    after_round_1 = screen_and_average(server, 1, [reply(n, w, 10, **honest) for n, w in enumerate(sent, start=1)])
    assert after_round_1 is not None and set(strategy.m_t) == set(SHAPES) and not server.events[1]
    random.seed(5)
    expected_draw = random.random()
    random.seed(5)
    server_arrays, screen_state = server.state()
    save_checkpoint(tmp_path, checkpoint(settings, 3, server_arrays=server_arrays, screen_state=screen_state), keep=3)
    random.random()  # the state moves on; the checkpoint keeps the one it saw

    loaded = load_checkpoint(checkpoint_files(tmp_path)[-1])
    assert loaded.round == 3 and loaded.best_value == pytest.approx(0.53)
    assert [m["round"] for m in loaded.metrics] == [0, 1, 2, 3]
    assert loaded.identity == run_identity(settings, task_of(settings))
    fresh = make_coordinator(settings, num_sites=3)  # the resumed server's
    fresh.restore(loaded.server_arrays, loaded.screen_state)
    for key in SHAPES:
        np.testing.assert_array_equal(fresh.strategy.m_t[key], strategy.m_t[key])
        np.testing.assert_array_equal(fresh.strategy.v_t[key], strategy.v_t[key])
    assert fresh.screen.memory.digests == server.screen.memory.digests  # the screen remembers round 1's replies
    # round 2 from the restored moments is round 2 of the uninterrupted server
    replies = [{k: a.numpy() + 0.01 * rng.standard_normal(a.shape).astype(np.float32) for k, a in after_round_1.items()}
               for _ in range(3)]
    results = []
    for coordinator in (server, fresh):
        honest = start_round(coordinator, 2, after_round_1, [1, 2, 3])
        results.append(screen_and_average(coordinator, 2, [reply(n, w, 10, **honest) for n, w in enumerate(replies, start=1)]))
    for key in SHAPES:
        np.testing.assert_array_equal(results[0][key].numpy(), results[1][key].numpy())
    random.setstate(loaded.python_rng)
    assert random.random() == expected_draw
    model = build_model("small-cnn", (1, 28, 28), 10).state_dict()
    assert set(loaded.model) == set(model)


def test_fedavgm_momentum_survives_a_checkpoint(tmp_path, task_identity):
    settings = RunSettings(strategy="fedavgm")
    server = make_coordinator(settings, num_sites=2)
    server.strategy.momentum_vector = [np.arange(4, dtype=np.float32), np.ones((2, 2))]
    # the model FedAvgM pairs with the aggregate by position: its keys not in alphabetical order
    server.strategy.current_arrays = ArrayRecord({"fc.weight": Array(np.ones((3, 5), np.float32)),
                                                  "fc.bias": Array(np.zeros(3, np.float32))})
    server_arrays, screen_state = server.state()
    save_checkpoint(tmp_path, checkpoint(settings, 1, server_arrays=server_arrays, screen_state=screen_state), keep=3)
    fresh = make_coordinator(settings, num_sites=2)
    loaded = load_checkpoint(checkpoint_files(tmp_path)[-1])
    fresh.restore(loaded.server_arrays, loaded.screen_state)
    assert [v.dtype for v in fresh.strategy.momentum_vector] == [np.float32, np.float64]
    np.testing.assert_array_equal(fresh.strategy.momentum_vector[0], np.arange(4))
    assert list(fresh.strategy.current_arrays.keys()) == ["fc.weight", "fc.bias"]


def test_only_the_last_few_are_kept_in_round_order_past_round_9999(tmp_path):
    for r in range(5):
        save_checkpoint(tmp_path, checkpoint(RunSettings(), r), keep=2)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["round-0003.safetensors", "round-0004.safetensors"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))
    for r in (9999, 10000):
        save_checkpoint(tmp_path, checkpoint(RunSettings(), r), keep=2)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["round-9999.safetensors", "round-10000.safetensors"]
    assert latest_checkpoint(tmp_path).round == 10000


def test_a_truncated_checkpoint_is_refused_and_the_previous_one_loads(tmp_path):
    for r in (1, 2):
        save_checkpoint(tmp_path, checkpoint(RunSettings(), r), keep=3)
    newest = checkpoint_files(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="round-0002.safetensors cannot be read \\(truncated or corrupted\\?\\)"):
        load_checkpoint(newest)
    assert latest_checkpoint(tmp_path).round == 1


def test_a_corrupted_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, checkpoint(RunSettings(), 1), keep=3)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the weights: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted: its tensors and metadata do not match the checksum"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint of the run can be read"):
        latest_checkpoint(tmp_path)


def test_a_checkpoint_whose_metadata_was_changed_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save

    path = save_checkpoint(tmp_path, checkpoint(RunSettings(), 1), keep=3)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    # the same tensors and checksum, the round number and a metrics line edited
    metadata["fedcycle"] = metadata["fedcycle"].replace('"round": 1', '"round": 7').replace("0.51", "0.99")
    path.write_bytes(save(tensors, metadata=metadata))
    with pytest.raises(CheckpointError, match="corrupted: its tensors and metadata do not match the checksum"):
        load_checkpoint(path)


def test_resume_refuses_another_model_or_dataset_and_a_missing_folder(tmp_path):
    save_checkpoint(tmp_path, checkpoint(image_run(), 2), keep=3)
    settings = image_run(resume_from=str(tmp_path))
    run_dir, ckpt = load_resume_point(settings, task_of(settings), build_model("small-cnn", (1, 28, 28), 10))
    assert run_dir == tmp_path and ckpt.round == 2
    other = image_run({"model": "resnet18"}, resume_from=str(tmp_path))
    with pytest.raises(CheckpointError, match="made with image.model='small-cnn', this run has image.model='resnet18'"):
        load_resume_point(other, task_of(other), build_model("resnet18", (1, 28, 28), 10))
    cifar = image_run({"dataset": "cifar10"}, resume_from=str(tmp_path))
    with pytest.raises(CheckpointError, match="made with image.dataset='fashion-mnist', this run has image.dataset='cifar10'"):
        load_resume_point(cifar, task_of(cifar), build_model("small-cnn", (3, 32, 32), 10))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_resume_point(RunSettings(resume_from=str(tmp_path / "checkpoints")), task_of(settings), build_model("small-cnn", (1, 28, 28), 10))
    with pytest.raises(ConfigError, match="resume-from='/nowhere': /nowhere is not a folder"):
        load_resume_point(RunSettings(resume_from="/nowhere"), task_of(settings), build_model("small-cnn", (1, 28, 28), 10))


def resume(tmp_path, **changed):
    settings = RunSettings.from_run_config({"resume-from": str(tmp_path), **changed})
    return load_resume_point(settings, task_of(settings), build_model("small-cnn", (1, 28, 28), 10))


@pytest.mark.parametrize("key, value, saved", [
    ("seed", 7, 42), ("partitioner", "dirichlet", "'iid'"), ("local-epochs", 5, 2), ("lr-max", 0.1, 0.05),
    ("lr-envelope", "exponential", "'flat'"), ("swa-start", 3, 0), ("batch-size", 32, 64), ("train-subset", 500, 0),
])
def test_resume_refuses_any_setting_that_changes_the_computation(tmp_path, key, value, saved):
    save_checkpoint(tmp_path, checkpoint(RunSettings(), 2), keep=3)
    with pytest.raises(CheckpointError, match=f"made with {key}={saved}, this run has {key}={value!r}"):
        resume(tmp_path, **{key: value})


def test_resume_may_change_only_how_long_and_where(tmp_path):
    save_checkpoint(tmp_path, checkpoint(RunSettings(), 2), keep=3)
    _, ckpt = resume(tmp_path, **{"num-server-rounds": 50, "round-timeout": 60.0, "min-replies": 2, "data-root": "/elsewhere"})
    assert ckpt.round == 2
    cosine = RunSettings(lr_envelope="cosine")
    save_checkpoint(tmp_path, checkpoint(cosine, 3), keep=3)
    with pytest.raises(CheckpointError, match="made with num-server-rounds=5, this run has num-server-rounds=50"):
        resume(tmp_path, **{"lr-envelope": "cosine", "num-server-rounds": 50})  # the cosine spans the run
    with pytest.raises(CheckpointError, match="made with dirichlet.alpha=0.3, this run has dirichlet.alpha=0.5"):
        save_checkpoint(tmp_path, checkpoint(RunSettings.from_run_config({"partitioner": "dirichlet", "dirichlet.alpha": 0.3}), 4), keep=3)
        resume(tmp_path, **{"partitioner": "dirichlet", "dirichlet.alpha": 0.5})


def test_an_update_far_from_the_global_model_is_rejected(task_identity):
    strategy = make_coordinator(RunSettings(), num_sites=3)
    rng = np.random.default_rng(2)
    global_model = arrays(rng)
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in global_model.items()})
    near = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in global_model.items()}
    scaled = {k: v * 1000 for k, v in global_model.items()}
    nan = {k: v.copy() for k, v in near.items()}
    nan["conv.bias"][1] = np.nan  # found by the same pass that measures the change
    agg = screen_and_average(strategy, 1, [reply(1, near, 10), reply(2, scaled, 10), reply(3, nan, 10)])
    np.testing.assert_allclose(agg["conv.weight"].numpy(), near["conv.weight"], rtol=1e-6)
    scaled_event, nan_event = strategy.events[1]
    assert scaled_event["node_id"] == 2 and "999 times the model's norm, above max-update-ratio=10.0" in scaled_event["reason"]
    assert nan_event["node_id"] == 3 and nan_event["reason"] == "array 'conv.bias' holds NaN or Inf"
    (site,) = strategy.site_metrics[1]
    delta = np.sqrt(sum(((near[k] - global_model[k]).astype(np.float64) ** 2).sum() for k in SHAPES))
    norm = np.sqrt(sum((global_model[k].astype(np.float64) ** 2).sum() for k in SHAPES))
    assert site["update-ratio"] == pytest.approx(delta / norm, rel=1e-5)  # measured in float32

    # near-duplicate-ratio=0 too: next to an update 1000 times the model's norm, any honest update
    # is shorter than 1% of the round's median update norm and would be left out as stale work
    unbounded = make_coordinator(RunSettings(max_update_ratio=0, near_duplicate_ratio=0), num_sites=3)
    unbounded.global_arrays = ArrayRecord({k: Array(v) for k, v in global_model.items()})
    screen_and_average(unbounded, 1, [reply(1, near, 10), reply(2, scaled, 10)])
    assert not unbounded.events[1] and len(unbounded.site_metrics[1]) == 2


def test_metrics_lines_are_strict_json_even_when_a_loss_diverges(tmp_path):
    import json

    import numpy as np

    from fedcycle.results import RunResults

    results = RunResults(tmp_path)
    results.rewrite_rounds([{"round": 0, "loss": float("-inf")}, {"round": 1, "loss": torch.tensor(0.25)}])
    results.append_round({"round": 2, "loss": float("nan"), "metrics": {"accuracy": np.float32("inf"), "mae": 0.5}})

    def strict(token):
        raise ValueError(f"not strict JSON: {token}")

    lines = [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"round": 0, "loss": None}, {"round": 1, "loss": 0.25},
                     {"round": 2, "loss": None, "metrics": {"accuracy": None, "mae": 0.5}}]


def test_a_checkpoint_made_before_the_image_keys_moved_resumes_under_their_new_names(tmp_path):
    """Until the image task's keys went into its `image.` table, a checkpoint's identity named
    them `dataset`, `model`, `image-size` and `augment`."""
    settings = image_run({"image-size": 32, "augment": ""})
    old = checkpoint(settings, 2)
    old.identity = {RENAMED_BACK.get(k, k): v for k, v in old.identity.items()}
    assert {"dataset", "model", "image-size", "augment"} <= set(old.identity) and "image.model" not in old.identity
    save_checkpoint(tmp_path, old, keep=3)
    resumed = image_run({"image-size": 32, "augment": ""}, resume_from=str(tmp_path))
    _, ckpt = load_resume_point(resumed, task_of(resumed), task_of(resumed).build_model())
    assert ckpt.round == 2
    other = image_run({"image-size": 32, "augment": "flip"}, resume_from=str(tmp_path))
    with pytest.raises(CheckpointError, match="made with image.augment='', this run has image.augment='flip'"):
        load_resume_point(other, task_of(other), task_of(other).build_model())


RENAMED_BACK = {new: old for old, new in RENAMED_KEYS.items()}
