"""fedcycle's ClientApp: wires Flower's messages to the site trainer, nothing more.

- query (pre-flight): the site's data size, classes, image shape, device and versions,
  or the node-config error that stops the run before training;
- train: evaluate the received global model on the site's held-out split (unless
  `site-eval` says otherwise), train it with the round's schedule, reply with the weights;
- evaluate: the held-out accuracy of the received model (when `site-eval=evaluate-round`).
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcycle.config import ConfigError
from fedcycle.schedules import LRSchedule
from fedcycle.site import load_site
from fedcycle.trainer import TrainConfig, evaluate, train

app = ClientApp()

# What a train reply's MetricRecord holds; the server leaves out a reply with other keys.
TRAIN_METRICS = frozenset(
    {"num-examples", "train-loss", "train-accuracy", "train-seconds", "setup-seconds", "local-epochs", "steps",
     "lr-first", "lr-peak", "lr-last"}
)
RECEIVED_MODEL_METRICS = frozenset({"received-loss", "received-accuracy", "val-examples"})


def train_metric_keys(site_eval: str) -> frozenset[str]:
    return TRAIN_METRICS | RECEIVED_MODEL_METRICS if site_eval == "train-reply" else TRAIN_METRICS


@app.query()
def preflight(msg: Message, context: Context) -> Message:
    try:
        report = load_site(context.run_config, context.node_config).report()
    except (ConfigError, ValueError, OSError) as err:
        report = {"ok": False, "error": str(err), "node-config": str(dict(context.node_config))}
    return Message(RecordDict({"report": ConfigRecord(report)}), reply_to=msg)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    entered = time.perf_counter()
    site = load_site(context.run_config, context.node_config)
    config = msg.content["config"]
    model = site.new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(site.device)
    mean, std = site.norm
    setup_seconds = time.perf_counter() - entered  # data, model, weights, device: before any step

    metrics: dict[str, float] = {}
    if site.settings.site_eval == "train-reply":  # a site without held-out data reports 0 examples
        loss, accuracy = evaluate(model, site.val, site.device, mean, std) if len(site.val) else (0.0, 0.0)
        metrics.update({"received-loss": loss, "received-accuracy": accuracy, "val-examples": len(site.val)})

    server_round = int(config["server-round"])
    result = train(
        model,
        site.train,
        TrainConfig(
            schedule=LRSchedule.from_config(config),
            epochs=int(config["local-epochs"]),
            server_round=server_round,
            epochs_before=int(config["epochs-before"]),
            batch_size=int(config["batch-size"]),
            momentum=float(config["momentum"]),
            weight_decay=float(config["weight-decay"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            mixed_precision=site.settings.mixed_precision,
            seed=site.seed(server_round),
        ),
        site.device,
        mean,
        std,
    )
    metrics.update(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
            "train-seconds": result.seconds,
            "setup-seconds": setup_seconds,
            "local-epochs": int(config["local-epochs"]),
            "steps": result.steps,
            "lr-first": result.lr_first,
            "lr-peak": result.lr_peak,
            "lr-last": result.lr_last,
        }
    )
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}), reply_to=msg
    )


@app.evaluate()
def evaluate_round(msg: Message, context: Context) -> Message:
    site = load_site(context.run_config, context.node_config)
    model = site.new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = evaluate(model, site.val, site.device, *site.norm)
    metrics = {"loss": loss, "accuracy": accuracy, "num-examples": len(site.val)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
