"""The server's mean of cycle-end models: which rounds join it, its value, and a resume through a
real checkpoint file. (End to end, with Flower: tests/test_simulation.py and test_failures.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcycle.averaging import CycleAverage, has_batchnorm
from fedcycle.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcycle.schedules import LRSchedule
from fedcycle.tasks.image.models import build_model


def global_model(server_round: int) -> dict[str, torch.Tensor]:
    """A stand-in global model per round: float weights that change, and a BatchNorm counter."""
    g = torch.Generator().manual_seed(server_round)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(100 * server_round),
    }


@pytest.mark.parametrize(
    "schedule, ends",
    [
        (LRSchedule(cycle_unit="round", cycle_length=1), [1, 2, 3, 4, 5, 6]),
        (LRSchedule(cycle_unit="round", cycle_length=2), [2, 4, 6]),
        (LRSchedule(cycle_unit="round", cycle_length=1.5), [2, 3, 5, 6]),  # cycles end at 1.5, 3, 4.5, 6
        (LRSchedule(cycle_unit="epochs", cycle_length=3), [1, 2, 3, 4, 5, 6]),  # cycles inside rounds
    ],
)
def test_the_rounds_that_end_a_cycle(schedule, ends):
    average = CycleAverage(start_round=1, schedule=schedule)
    assert [r for r in range(1, 7) if average.cycle_ends_in(r)] == ends


def test_the_mean_is_the_float64_mean_of_the_cycle_ends_from_the_start_round():
    average = CycleAverage(start_round=3, schedule=LRSchedule(cycle_unit="round", cycle_length=2))
    joined = [r for r in range(1, 9) if average.add(r, global_model(r))]
    assert joined == average.rounds == [4, 6, 8]
    model = average.model(global_model(8))
    for key in ("w", "b"):
        expected = np.mean(np.stack([global_model(r)[key].numpy().astype(np.float64) for r in joined]), axis=0)
        assert model[key].dtype == global_model(8)[key].dtype
        np.testing.assert_array_equal(model[key].numpy(), expected.astype(model[key].numpy().dtype))
    assert int(model["bn.num_batches_tracked"]) == 800  # counters: the newest global model's


def test_the_mean_continues_exactly_after_a_checkpoint(tmp_path):
    schedule = LRSchedule(cycle_unit="round", cycle_length=1)
    uninterrupted = CycleAverage(2, schedule)
    for r in range(1, 7):
        uninterrupted.add(r, global_model(r))

    before = CycleAverage(2, schedule)
    for r in range(1, 4):
        before.add(r, global_model(r))
    state = global_model(3)
    save_checkpoint(tmp_path, Checkpoint(round=3, model=state, best_model={}, best_value=None, metrics=[],
                                         identity={}, swa_total=before.total, swa_rounds=before.rounds), keep=1)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "round-0003.safetensors")
    resumed = CycleAverage(2, schedule)
    resumed.restore(ckpt.swa_total, ckpt.swa_rounds)
    for r in range(4, 7):
        resumed.add(r, global_model(r))
    assert resumed.rounds == uninterrupted.rounds == [2, 3, 4, 5, 6]
    for key, value in uninterrupted.model(global_model(6)).items():
        assert torch.equal(resumed.model(global_model(6))[key], value)


def test_batchnorm_is_found_where_a_model_has_it():
    assert not has_batchnorm(build_model("small-cnn", (1, 28, 28), 10))
    assert has_batchnorm(build_model("resnet18", (3, 32, 32), 10))
