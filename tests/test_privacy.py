"""Record-level differential privacy at a site (fedcycle.privacy, DP-SGD with Opacus), through
the real ClientApp train handler: every example's gradient is clipped to dp.max-grad-norm, the
epsilon a site reports is Opacus's accountant over the steps it took, a site stops at its
policy's ceiling, and a resumed run continues the accountant. Site-level DP: each site clips its
whole update, the server rejects one that is not clipped and noises the unweighted mean."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcycle import client_app
from fedcycle.config import DPSettings, RunSettings
from fedcycle.errors import ConfigError
from fedcycle.privacy import private_training
from fedcycle.site import load_site
from fedcycle.strategies import make_coordinator
from fedcycle.tasks import Task
from fedcycle.wire import SITE_FAILED
from tests.fakes import context, train_message
from tests.user_tasks import BloodPressure

NOISE, BATCH = 1.1, 100  # BloodPressure: 500 train records a site, 5 batches an epoch


def dp_run_config(task: type = BloodPressure, **extra) -> dict:
    return {"task": f"{task.__module__}:{task.__name__}", "batch-size": BATCH, "local-epochs": 1,
            "dp.noise-multiplier": NOISE, "dp.max-grad-norm": 1.0, "dp.delta": 1e-5, **extra}


def test_dp_sgd_clips_every_examples_gradient_to_max_grad_norm():
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(40, 4), torch.zeros(40, 1)), batch_size=10)
    private = private_training(model, optimizer, loader, DPSettings(noise_multiplier=1e-9, max_grad_norm=0.5))
    # crafted examples whose gradients are far longer than the bound: 20, 2000 and 0.01 times it
    inputs = torch.tensor([[10.0, 0, 0, 0], [0, 1000.0, 0, 0], [0, 0, 0.005, 0]])
    targets = torch.zeros(3, 1)
    raw = [torch.autograd.grad(((model(x[None]) - 1.0) ** 2).mean() / 2, model.weight)[0].norm() for x in inputs]
    for x, raw_norm in zip(inputs, raw):
        before = model.weight.detach().clone()
        loss = ((private.model(x[None]) - 1.0 - targets[:1]) ** 2).mean() / 2
        private.optimizer.zero_grad()
        loss.backward()
        private.optimizer.step()
        # one example, lr 1, no noise to speak of: the step is its clipped gradient over the expected batch
        step = (model.weight.detach() - before).norm() * loader.batch_size
        assert step == pytest.approx(min(float(raw_norm), 0.5), rel=1e-4)
    assert raw[0] > 0.5 and raw[1] > 0.5 and raw[2] < 0.5
    private.close()
    assert not model._forward_hooks and not model._backward_hooks  # the site's model is its own again


def test_the_epsilon_a_site_reports_is_opacus_accountant_for_the_steps_it_took(tmp_path, task_identity):
    run_config = dp_run_config(**{"data-root": str(tmp_path)})
    node = {"partition-id": 0, "privacy-ledger": str(tmp_path / "ledger.json")}
    accountant = RDPAccountant()
    for server_round in (1, 2):
        reply = client_app.train_round(train_message(run_config, None, server_round), context(run_config, node))
        metrics = reply.content["metrics"]
        steps, sample_rate = int(metrics["steps"]), 1 / 5
        assert steps == 5
        for _ in range(steps):
            accountant.step(noise_multiplier=NOISE, sample_rate=sample_rate)
        assert metrics["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    # a resumed run (the same run key) continues the accountant; another run starts its own
    resumed = client_app.train_round(train_message(run_config, None, 3), context(run_config, node)).content["metrics"]
    for _ in range(5):
        accountant.step(noise_multiplier=NOISE, sample_rate=1 / 5)
    assert resumed["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    other_run = train_message(run_config, None, 1, privacy_run="run-b")
    other = client_app.train_round(other_run, context(run_config, node)).content["metrics"]
    assert other["epsilon"] < metrics["epsilon"]


def test_a_site_refuses_the_round_that_would_pass_its_ceiling(tmp_path, task_identity):
    run_config = dp_run_config()
    one_round = RDPAccountant()
    for _ in range(5):
        one_round.step(noise_multiplier=NOISE, sample_rate=1 / 5)
    ceiling = one_round.get_epsilon(1e-5) * 1.2  # room for one round, not two
    policy = tmp_path / "policy.toml"
    policy.write_text(f'tasks = ["{run_config["task"]}"]\napp-code = true\n[dp]\nrequired = true\n'
                      f"max-epsilon = {ceiling}\ndelta = 1e-5\n")
    ledger = tmp_path / "ledger.json"
    node = {"partition-id": 0, "privacy-ledger": str(ledger), "policy-file": str(policy)}
    first = client_app.train_round(train_message(run_config, None, 1), context(run_config, node)).content["metrics"]
    assert first["epsilon"] == pytest.approx(one_round.get_epsilon(1e-5))
    written = ledger.read_text()
    refused = client_app.train_round(train_message(run_config, None, 2), context(run_config, node))
    assert refused.has_error() and refused.error.code == SITE_FAILED  # a refusal, not the task's failure
    message = refused.error.reason
    assert "(dp.max-epsilon)" in message and f"max-epsilon={ceiling}" in message
    assert f"epsilon spent {first['epsilon']:.3g}" in message
    assert ledger.read_text() == written  # nothing trained, nothing spent
    # a run without DP is refused by the same policy before anything is read
    no_dp = {**run_config, "dp.noise-multiplier": 0.0}
    assert "(dp.required)" in client_app.train_round(train_message(no_dp, None, 1), context(no_dp, node)).error.reason


class RecordsWhatItGets(BloodPressure):
    """A site's own loop that writes down what fedcycle hands it under DP-SGD."""

    got: ClassVar[list] = []

    def train(self, model, loader, optimizer, scheduler, epochs, device):
        RecordsWhatItGets.got.append((type(model), type(optimizer), type(loader)))
        for _ in range(epochs):
            for x, y in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        return {"loss": float(loss), "mae": 1.0, "mse": float(loss)}


def test_a_sites_own_loop_trains_the_private_model_optimizer_and_loader(tmp_path, task_identity):
    run_config = dp_run_config(RecordsWhatItGets)
    node = {"partition-id": 0, "privacy-ledger": str(tmp_path / "ledger.json")}
    load_site(run_config, node).report(RunSettings.from_run_config(run_config).batch_size)  # pre-flight
    metrics = client_app.train_round(train_message(run_config, None, 1), context(run_config, node)).content["metrics"]
    # pre-flight's rehearsal and the round: both private
    assert RecordsWhatItGets.got == [(GradSampleModule, DPOptimizer, DPDataLoader)] * 2
    assert metrics["steps"] == 5 and metrics["epsilon"] > 0


class WithBatchNorm(BloodPressure):
    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def test_a_model_dp_sgd_cannot_train_is_refused_in_one_line_or_fixed_when_allowed():
    run_config = dp_run_config(WithBatchNorm)
    with pytest.raises(ConfigError) as refused:
        Task(run_config["task"], run_config).build_model()
    assert "\n" not in str(refused.value) and "BatchNorm" in str(refused.value) and "dp.fix-model=true" in str(refused.value)
    fixed = Task(run_config["task"], {**run_config, "dp.fix-model": True}).build_model()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    # without DP the model is the task's own
    plain = Task(run_config["task"], {**run_config, "dp.noise-multiplier": 0.0}).build_model()
    assert any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())


@pytest.mark.parametrize("key, value, message", [
    ("dp.noise-multiplier", -1.0, "dp.noise-multiplier=-1.0 must be at least 0"),
    ("dp.max-grad-norm", 0.0, "dp.max-grad-norm=0.0 must be above 0"),
    ("dp.delta", 1.5, "dp.delta=1.5 must be in (0, 1)"),
    ("dp.noise", 1.0, "dp.noise is unknown"),
    ("dp.fix-model", "yes", "dp.fix-model='yes' must be true or false"),
])
def test_dp_keys_out_of_range_fail_in_one_line_naming_the_key(key, value, message):
    with pytest.raises(ConfigError) as failed:
        RunSettings.from_run_config({key: value})
    assert message in str(failed.value) and "\n" not in str(failed.value)


def test_dp_sgd_and_fedprox_together_are_refused():
    with pytest.raises(ConfigError, match="proximal term"):
        RunSettings.from_run_config({"strategy": "fedprox", "fedprox.proximal-mu": 0.01, "dp.noise-multiplier": 1.0})


# -- site-level DP: each site's whole update clipped at the site, the mean noised at the server ------


def test_a_site_clips_its_whole_update_and_leaves_its_counters_alone():
    from fedcycle.privacy import clip_update

    received = {"w": torch.zeros(3), "b": torch.zeros(1), "steps": torch.tensor(4)}
    trained = {"w": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([4.0]), "steps": torch.tensor(9)}
    clipped = clip_update(trained, received, 1.0)  # the update's norm is 5: scaled to 1
    assert clipped["w"].tolist() == pytest.approx([0.6, 0, 0]) and clipped["b"].tolist() == pytest.approx([0.8])
    assert clipped["steps"].item() == 9 and clipped["steps"].dtype == torch.int64
    assert clip_update(trained, received, 10.0)["w"].tolist() == [3.0, 0.0, 0.0]  # short enough: as trained
    assert clip_update(received, received, 1.0)["w"].tolist() == [0.0, 0.0, 0.0]  # no update: no division


def test_site_level_dp_clips_at_the_site_noises_the_unweighted_mean_and_rejects_a_site_that_does_not_clip(task_identity):
    import numpy as np
    from flwr.app import Array, MetricRecord

    from tests.fakes import Sites, honest_schedule

    run_config = {"dp.site-clip-norm": 0.5, "dp.site-noise-multiplier": 0.0, "min-sites": 3,
                  "peer-clip-ratio": 0.0, "peer-norm-ratio": 0.0, "peer-pullback-ratio": 0.0}
    strategy = make_coordinator(RunSettings.from_run_config(run_config), num_sites=3, metric_names=["accuracy"])
    start = {"w": np.zeros(4, dtype=np.float32)}
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    strategy.configure_train(1, arrays, Sites([1, 2, 3]))

    def reply(strategy, node, update, examples):
        """An honest train reply for round 1 (its schedule an honest site's), with this update."""
        schedule = honest_schedule(strategy, 1)
        metrics = {"num-examples": examples, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 1.0,
                   "setup-seconds": 0.1, "local-epochs": strategy.sent_config[1]["local-epochs"], **schedule,
                   "received-loss": 1.0, "received-accuracy": 0.5, "val-examples": 10, "processes": 1}
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(update, dtype=np.float32))}),
                              "metrics": MetricRecord(metrics)})
        msg = Message(content, dst_node_id=0, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    replies = [reply(strategy, 1, [0.5, 0, 0, 0], 10), reply(strategy, 2, [0, 0.3, 0, 0], 60),
               reply(strategy, 3, [2.0, 0, 0, 0], 10)]
    accepted = strategy.screen_round(1, replies)
    assert [m.metadata.src_node_id for m in accepted] == [1, 2]
    assert "above dp.site-clip-norm=0.5: a site that does not clip" in strategy.events[1][0]["reason"]
    mean = strategy.aggregate(1, accepted)
    assert mean["w"].numpy().tolist() == pytest.approx([0.25, 0.15, 0, 0])  # not weighted by examples

    noisy = make_coordinator(RunSettings.from_run_config({**run_config, "dp.site-noise-multiplier": 4.0}), num_sites=3,
                             metric_names=["accuracy"])
    big = ArrayRecord({"w": Array(np.zeros(20_000, dtype=np.float32))})
    noisy.configure_train(1, big, Sites([1, 2, 3]))
    out = noisy.aggregate(1, [reply(noisy, n, np.zeros(20_000), 10) for n in (1, 2)])
    assert out["w"].numpy().std() == pytest.approx(4.0 * 0.5 / 2, rel=0.03)  # z * clip / n
