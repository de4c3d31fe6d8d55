'''Tasks as a data center writes them, outside fedcycle: the tests copy this file into a folder of
their own (nothing of fedcycle's is in it, and it imports nothing of fedcycle's) and name its
classes in the run config, e.g. `task = "clinic_tasks:BloodPressure"`.

A regression on tabular records: 8 measurements per patient, one number to predict. Each site
draws its own patients (its own seed); the server holds a test cohort of its own.
'''

import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

FEATURES = 8


def patients(seed: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    weights = torch.linspace(-1.0, 1.0, FEATURES)
    y = x @ weights + 0.5 * torch.sin(2 * x[:, 0]) + 0.05 * torch.randn(n, generator=g)
    return TensorDataset(x, y[:, None])


class BloodPressure:
    """Mean absolute error, lower is better: what "best" means here."""

    primary_metric = ("mae", "min")

    def __init__(self, run_config: dict) -> None:
        self.hidden = 32

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def site_data(self, node_config: dict):
        records = patients(1000 + int(node_config["partition-id"]), 600)
        return Subset(records, range(500)), Subset(records, range(500, 600))

    def test_data(self):
        return patients(7, 1000)

    def loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)

    def metrics(self, outputs, targets):
        return {"mae": (outputs - targets).abs().mean(), "mse": F.mse_loss(outputs, targets)}


class BloodPressureOwnLoop(BloodPressure):
    """The same work with the site's own training loop, which writes down the learning rate of
    every optimizer step (next to this file) so that a test can compare it with the server's."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        model.train()
        used, loss_sum, abs_sum, n = [], 0.0, 0.0, 0
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss = F.mse_loss(out, y)
                optimizer.zero_grad()
                loss.backward()
                used.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(y)
                abs_sum += (out - y).abs().sum().item()
                n += len(y)
        Path(__file__).with_name(f"lrs-{os.getpid()}-{time.time_ns()}.json").write_text(json.dumps(used))
        return {"loss": loss_sum / n, "mae": abs_sum / n, "mse": loss_sum / n}


class BloodPressureFixedRate(BloodPressure):
    """A loop that keeps its own learning rate: it steps the scheduler, then overrides the rate."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                for group in optimizer.param_groups:
                    group["lr"] = 0.01
                loss = F.mse_loss(model(x.to(device)), y.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        return {"loss": loss.item(), "mae": 0.0, "mse": loss.item()}


# -- a newcomer's mistakes: each passes a glance and is refused before round 1 -----------------

def plain_loop(loss_fn, model, loader, optimizer, scheduler, epochs, device, step_scheduler=True) -> float:
    """The loop most PyTorch users have, with the one line fedcycle asks (`step_scheduler`); the
    mean loss over the examples it trained on."""
    total, n = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step_scheduler:
                scheduler.step()
            total, n = total + loss.item() * len(y), n + len(y)
    return total / n


class ForgetsTheScheduler(BloodPressure):
    """The plain loop most PyTorch users have: it never calls scheduler.step()."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        return {"loss": plain_loop(F.mse_loss, model, loader, optimizer, scheduler, epochs, device,
                                   step_scheduler=False)}


class ReturnsItsOwnKey(BloodPressure):
    """A loop that names its loss as it likes, not 'loss'."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        return {"mse_loss": plain_loop(F.mse_loss, model, loader, optimizer, scheduler, epochs, device)}


class FailsInTraining(BloodPressure):
    """A loop that works for one epoch (what pre-flight rehearses) and raises from the second:
    the task's own code failing in a round."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        if epochs > 1:
            raise ValueError(f"this loop was written for one epoch, not {epochs}")
        return {"loss": plain_loop(F.mse_loss, model, loader, optimizer, scheduler, epochs, device)}


class FlatTargets(BloodPressure):
    """Targets of shape (N,) against the model's (N, 1): mse_loss broadcasts them to (N, N)."""

    def site_data(self, node_config: dict):
        train, val = super().site_data(node_config)
        flat = TensorDataset(train.dataset.tensors[0], train.dataset.tensors[1][:, 0])
        return Subset(flat, train.indices), Subset(flat, val.indices)


class Digits:
    """A classifier of scikit-learn's bundled 8x8 handwritten digits (BSD-3-Clause): every
    partition-th image of 1,797 for a site, a fifth of them held out."""

    classes = [str(d) for d in range(10)]
    outputs = 10

    def __init__(self, run_config: dict) -> None:
        pass

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, self.outputs))

    def site_data(self, node_config: dict):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        part = slice(int(node_config["partition-id"]), None, int(node_config.get("num-partitions", 1)))
        mine = TensorDataset(torch.tensor(x[part] / 16, dtype=torch.float32), torch.tensor(y[part]))
        cut = len(mine) * 4 // 5
        return Subset(mine, range(cut)), Subset(mine, range(cut, len(mine)))

    def test_data(self):
        return None


class TwelveOutputs(Digits):
    """A classifier whose last layer has 12 outputs for 10 classes: cross-entropy takes it."""

    outputs = 12


class DigitsOwnLoop(Digits):
    """The digits classifier with the plain loop a PyTorch user has: it tracks its loss alone."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        return {"loss": plain_loop(F.cross_entropy, model, loader, optimizer, scheduler, epochs, device)}


class ChangesItsKeys(BloodPressure):
    """A loop that tracks its MAE only when it trains more than one epoch (pre-flight rehearses one)."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        loss = plain_loop(F.mse_loss, model, loader, optimizer, scheduler, epochs, device)
        return {"loss": loss, **({"mae": 0.5} if epochs > 1 else {})}


class OneLogitTriage(Digits):
    """A binary classifier with one logit (a zero against the other digits), trained with BCE."""

    classes = ["other", "zero"]
    outputs = 1

    def site_data(self, node_config: dict):
        train, val = super().site_data(node_config)
        x, y = train.dataset.tensors
        zeros = TensorDataset(x, (y == 0).long())
        return Subset(zeros, train.indices), Subset(zeros, val.indices)

    def loss(self, outputs, targets):
        return F.binary_cross_entropy_with_logits(outputs[:, 0], targets.float())

    def metrics(self, outputs, targets):
        return {"accuracy": ((outputs[:, 0] > 0).long() == targets).float().mean()}


# -- a site that trains on several processes (nproc-per-site) -----------------------------------

class FailsOnRankOne(BloodPressure):
    """A loop that raises on its second process only."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise ValueError("rank one has no data")
        return {"loss": plain_loop(F.mse_loss, model, loader, optimizer, scheduler, epochs, device)}


class DiesOnRankOne(BloodPressure):
    """A second process that dies outright (as one killed for memory would)."""

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            os._exit(3)
        return {"loss": plain_loop(F.mse_loss, model, loader, optimizer, scheduler, epochs, device)}
