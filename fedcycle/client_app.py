"""fedcycle's ClientApp: wires Flower's messages to the site's task and trainer, nothing more.

- query (pre-flight): the site's data size, the task's metric names, the shape of an example,
  the model's fingerprint, device and versions, or the error that stops the run before training;
- train: evaluate the received global model on the site's held-out split (unless `site-eval`
  says otherwise), train it with the round's schedule, reply with the weights;
- evaluate: the loss and metrics of the received model on the held-out split (when
  `site-eval=evaluate-round`, or when the task has no test split).
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcycle.errors import ConfigError, TaskError
from fedcycle.schedules import LRSchedule
from fedcycle.site import Site, load_site
from fedcycle.trainer import TrainConfig, evaluate, train

app = ClientApp()


@app.query()
def preflight(msg: Message, context: Context) -> Message:
    try:
        report = load_site(context.run_config, context.node_config).report()
    except (ConfigError, ValueError, OSError) as err:
        report = {"ok": False, "error": str(err), "node-config": str(dict(context.node_config))}
    return Message(RecordDict({"report": ConfigRecord(report)}), reply_to=msg)


def held_out(site: Site, model) -> dict[str, float]:
    """Loss and metrics of `model` on the site's held-out split (zeros when it has none)."""
    if not len(site.val):
        return {"loss": 0.0, **{name: 0.0 for name in site.metric_names}}
    loss, metrics = evaluate(site.task, model, site.val, site.device, site.settings.batch_size, site.num_workers)
    return {"loss": loss, **metrics}


def own_loop_metrics(site: Site, returned: dict[str, float]) -> dict[str, float]:
    """The task's metrics from what its own train() returned (which may hold more)."""
    missing = [name for name in site.metric_names if name not in returned]
    if missing:
        raise TaskError(
            f"task={site.task.name!r}: train() returned {sorted(returned)} besides the loss; "
            f"it must also return the task's metrics {missing}"
        )
    try:
        return {name: float(returned[name]) for name in site.metric_names}
    except (TypeError, ValueError):
        raise TaskError(f"task={site.task.name!r}: train() returned a metric of {site.metric_names} that is not a number") from None


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    entered = time.perf_counter()
    site = load_site(context.run_config, context.node_config)
    config = msg.content["config"]
    site.use_statistics(config)
    model = site.new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(site.device)
    setup_seconds = time.perf_counter() - entered  # data, model, weights, device: before any step

    metrics: dict[str, float] = {}
    if site.settings.site_eval == "train-reply":  # a site without held-out data reports 0 examples
        metrics.update({f"received-{k}": v for k, v in held_out(site, model).items()})
        metrics["val-examples"] = len(site.val)

    server_round = int(config["server-round"])
    result = train(
        site.task,
        model,
        site.train,
        TrainConfig(
            schedule=LRSchedule.from_config(config),
            epochs=int(config["local-epochs"]),
            server_round=server_round,
            epochs_before=int(config["epochs-before"]),
            batch_size=int(config["batch-size"]),
            optimizer=str(config["optimizer"]),
            momentum=float(config["momentum"]),
            weight_decay=float(config["weight-decay"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            mixed_precision=site.settings.mixed_precision,
            seed=site.seed(server_round),
            num_workers=site.num_workers,
        ),
        site.device,
    )
    train_metrics = result.metrics if site.task.own_train is None else own_loop_metrics(site, result.metrics)
    metrics.update(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            **{f"train-{k}": v for k, v in train_metrics.items()},
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
    site.use_statistics(msg.content["config"])
    model = site.new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = {**held_out(site, model), "num-examples": len(site.val)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
