"""The site trainer on its own: no Flower, real Fashion-MNIST subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcycle.config import RunSettings
from fedcycle.datasets import DATASETS, load
from fedcycle.models import build_model
from fedcycle.schedules import LRSchedule
from fedcycle.trainer import TrainConfig, evaluate, pick_device, train

NORM = (DATASETS["fashion-mnist"].mean, DATASETS["fashion-mnist"].std)


@pytest.fixture(scope="module")
def small(data_root):
    settings = RunSettings(data_root=data_root)
    train_data, test_data = load(settings, "train"), load(settings, "test")
    return train_data.subset(np.arange(2000)), test_data.subset(np.arange(1000))


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return build_model("small-cnn", (1, 28, 28), 10)


def test_training_learns(small):
    train_data, test_data = small
    model = fresh_model()
    device = pick_device("cpu")
    _, before = evaluate(model, test_data, device, *NORM)
    result = train(model, train_data, TrainConfig(LRSchedule(), epochs=2, batch_size=32), device, *NORM)
    _, after = evaluate(model, test_data, device, *NORM)
    assert before < 0.2 and after > 0.65
    assert result.num_examples == 2000 and result.steps == 2 * 63
    assert result.lr_first == pytest.approx(0.005) and result.lr_peak == pytest.approx(0.05)


def test_same_seed_same_model(small):
    train_data, _ = small
    cfg = TrainConfig(LRSchedule(name="cosine"), epochs=1, batch_size=64, seed=7)
    states = []
    for seed in (7, 7, 8):
        model = fresh_model()
        train(model, train_data.subset(np.arange(512)), TrainConfig(**{**cfg.__dict__, "seed": seed}), torch.device("cpu"), *NORM)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_proximal_term_keeps_weights_near_the_global_model(small):
    train_data, _ = small
    data = train_data.subset(np.arange(512))
    drift = {}
    for mu in (0.0, 10.0):
        model = fresh_model()
        start = [p.detach().clone() for p in model.parameters()]
        train(model, data, TrainConfig(LRSchedule(name="constant"), epochs=1, proximal_mu=mu), torch.device("cpu"), *NORM)
        drift[mu] = sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[10.0] < 0.8 * drift[0.0]


def test_device_choice():
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='tpu' is not a device"):
        pick_device("tpu")
