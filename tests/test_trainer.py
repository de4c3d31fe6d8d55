"""The site trainer on its own: no Flower, real Fashion-MNIST subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from fedcycle.schedules import LRSchedule
from fedcycle.tasks import load_task
from fedcycle.trainer import TrainConfig, evaluate, pick_device, train


@pytest.fixture(scope="module")
def task(data_root):
    return load_task({"data-root": data_root})


@pytest.fixture(scope="module")
def small(task):
    """2,000 training and 1,000 test images of Fashion-MNIST, held in memory (the fast path)."""
    from fedcycle.tasks.image.in_memory import InMemoryImages

    test = task.test_data()
    train_data, _ = task.site_data({"partition-id": 0, "num-partitions": 1})

    def head(d, n):
        return InMemoryImages(d.images[:n], d.labels[:n], d.classes, d.mean, d.std)

    return head(train_data, 2000), head(test, 1000)


def fresh_model(task, seed=0):
    torch.manual_seed(seed)
    return task.build_model()


def test_training_learns(task, small):
    train_data, test_data = small
    model = fresh_model(task)
    device = pick_device("cpu")
    before = evaluate(task, model, test_data, device)[1]["accuracy"]
    result = train(task, model, train_data, TrainConfig(LRSchedule(), epochs=2, batch_size=32), device)
    after = evaluate(task, model, test_data, device)[1]["accuracy"]
    assert before < 0.2 and after > 0.65
    assert result.num_examples == 2000 and result.steps == 2 * 63
    assert result.lr_first == pytest.approx(0.005) and result.lr_peak == pytest.approx(0.05)


def test_same_seed_same_model(task, small):
    train_data, _ = small
    cfg = TrainConfig(LRSchedule(name="cosine"), epochs=1, batch_size=64, seed=7)
    states = []
    for seed in (7, 7, 8):
        model = fresh_model(task)
        train(task, model, Subset(train_data, np.arange(512)), TrainConfig(**{**cfg.__dict__, "seed": seed}), torch.device("cpu"))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_proximal_term_keeps_weights_near_the_global_model(task, small):
    train_data, _ = small
    data = Subset(train_data, np.arange(512))
    drift = {}
    for mu in (0.0, 10.0):
        model = fresh_model(task)
        start = [p.detach().clone() for p in model.parameters()]
        train(task, model, data, TrainConfig(LRSchedule(name="constant"), epochs=1, proximal_mu=mu), torch.device("cpu"))
        drift[mu] = sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[10.0] < 0.8 * drift[0.0]


def test_device_choice_refuses_what_the_machine_does_not_have():
    gpus = torch.cuda.device_count()
    assert pick_device("auto").type == ("cuda" if gpus else "cpu") and pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=f"device='cuda:{gpus}' is not available: this machine has {gpus} CUDA device"):
        pick_device(f"cuda:{gpus}")  # one past the last
    with pytest.raises(ValueError, match="device='tpu' is not a device; use auto, cpu, cuda or cuda:N"):
        pick_device("tpu")
