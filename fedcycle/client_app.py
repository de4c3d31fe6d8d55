"""fedcycle's ClientApp: wires Flower's messages to the site's task and trainer, nothing more.

- query (pre-flight): the site's data size, the task's metric names, the shape of an example,
  the model's fingerprint, device and versions, or the error that stops the run before training;
- train: evaluate the received global model on the site's held-out split (unless `site-eval`
  says otherwise), train it with the round's schedule, reply with the weights;
- evaluate: the loss and metrics of the received model on the held-out split (when
  `site-eval=evaluate-round`, or when the task has no test split).

An error goes to the server as a failed reply holding what the site's policy allows
(`SitePolicy.public_error`), coded as the task's own failure or another; the whole error stays at
the site.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcycle.distributed import train_on_processes
from fedcycle.errors import ConfigError, PolicyRefusal, TaskError
from fedcycle.policy import SitePolicy, load_policy
from fedcycle.privacy import clip_update
from fedcycle.site import Site, load_site, simulated_node_config, site_label
from fedcycle.trainer import TrainConfig, evaluate, own_loop_metrics, task_fault, train
from fedcycle.wire import SITE_FAILED, TASK_FAILED, EvaluateConfig, EvaluateReply, RoundConfig, SiteReport, TrainReply

app = ClientApp()
logger = logging.getLogger("fedcycle.site")


# Where a site writes the whole of an error (its traceback), when set: `fedcycle simulate` names a
# file and moves it into the run's folder; a real site keeps its tracebacks in its own log.
SITE_LOG_VARIABLE = "FEDCYCLE_SITE_LOG"


def public_error(err: BaseException, node_config) -> str:
    """The error's text as the site's policy lets it leave. The whole error stays at the site: in
    the file `SITE_LOG_VARIABLE` names (the log then gets one line), else in its log."""
    site_log = os.environ.get(SITE_LOG_VARIABLE)
    if site_log:
        logger.error("fedcycle site %s: %s: %s", site_label(node_config), type(err).__name__, err)
        with open(site_log, "a", encoding="utf-8") as log_file:
            log_file.write(f"--- site {site_label(node_config)}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                           f"{''.join(traceback.format_exception(err))}\n")
    else:
        logger.error("fedcycle site: %s: %s", type(err).__name__, err, exc_info=not isinstance(err, ConfigError))
    try:
        policy = load_policy(dict(node_config))
    except ConfigError:
        policy = SitePolicy.strict("the unreadable policy-file")
    return policy.public_error(err)


def reported_node_config(context: Context) -> dict:
    """The node config an error names the site by: as the site trained, or Flower's if that is what failed."""
    try:
        return simulated_node_config(context.node_config)
    except ConfigError:
        return dict(context.node_config)


def policy_screened(handler):
    """A handler whose error reaches the server as a failed reply: one line its policy allows,
    coded TASK_FAILED when the task's own code failed (the server stops the run; a retry would
    fail alike). A failed reply, not a raised exception: Flower would wrap that in tracebacks."""

    @functools.wraps(handler)
    def screened(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # noqa: BLE001 - every error leaves only as its public text
            code = TASK_FAILED if task_fault(err) else SITE_FAILED
            return Message(Error(code, public_error(err, reported_node_config(context))), reply_to=msg)

    return screened


@app.query()
def preflight(msg: Message, context: Context) -> Message:
    try:
        config = EvaluateConfig.from_record(msg.content["config"])
        report = load_site(context.run_config, context.node_config).report(config.batch_size)
    except Exception as err:  # noqa: BLE001 - a site that cannot take part says why, as its policy allows
        node_config = reported_node_config(context)
        report = SiteReport(ok=False, error=public_error(err, node_config),
                            refused=isinstance(err, PolicyRefusal), site=site_label(node_config))
    return Message(RecordDict({"report": ConfigRecord(report.to_record())}), reply_to=msg)


def held_out(site: Site, model, batch_size: int) -> EvaluateReply:
    """Loss and metrics of `model` on the site's held-out split (zeros when it has none)."""
    if not len(site.val):
        return EvaluateReply(0.0, {name: 0.0 for name in site.metric_names(batch_size)}, 0)
    loss, metrics = evaluate(site.task, model, site.val, site.device, batch_size, site.num_workers)
    return EvaluateReply(loss, metrics, len(site.val))


def own_loop_metrics_as_declared(site: Site, returned: dict, config: RoundConfig) -> dict[str, float]:
    """The metrics a task's own train() returned, the keys the sites' rehearsals declared in
    pre-flight (the round config says which): the server holds every reply to those."""
    metrics = own_loop_metrics(site.task, returned, site.metric_names(config.batch_size))
    declared = config.train_metrics
    if declared is not None and tuple(metrics) != declared:
        raise TaskError(f"task={site.task.name!r}: train() returned the metrics {list(metrics)} in this round and "
                        f"{list(declared)} in pre-flight's rehearsal; return the same keys every time")
    return metrics


@app.train()
@policy_screened
def train_round(msg: Message, context: Context) -> Message:
    entered = time.perf_counter()
    site = load_site(context.run_config, context.node_config)
    config = RoundConfig.from_record(msg.content["config"])
    dp = site.settings.dp
    if dp.enabled:  # refuses, before any step, a round past the policy's epsilon ceiling
        spent, planned = site.privacy_budget(config.privacy_run, config.batch_size, config.local_epochs)
    site.task.use_statistics(config.task_statistics)
    start = msg.content["arrays"].to_torch_state_dict()
    model = site.new_model()
    model.load_state_dict(start)
    model.to(site.device)
    setup_seconds = time.perf_counter() - entered  # data, model, weights, device: before any step

    # a site without held-out data reports 0 examples
    received = held_out(site, model, config.batch_size) if config.evaluate_received else None
    train_config = TrainConfig(
        schedule=config.schedule,
        epochs=config.local_epochs,
        server_round=config.server_round,
        epochs_before=config.epochs_before,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        proximal_mu=config.proximal_mu,
        mixed_precision=config.mixed_precision,
        seed=site.seed(config.server_round),
        num_workers=site.num_workers,
        dp=dp,
    )
    if site.processes > 1:
        result, trained = train_on_processes(context.run_config, context.node_config, start, train_config,
                                             config.task_statistics, site.processes)
    else:
        result = train(site.task, model, site.train, train_config, site.device)
        trained = {k: v.cpu() for k, v in model.state_dict().items()}
    spent_epsilon = None
    if dp.enabled:
        spent_epsilon = site.spend(spent, {**planned, "round": config.server_round, "sample-rate": result.sample_rate,
                                           "steps": result.steps, "time": time.time()})
    reply = TrainReply(
        num_examples=result.num_examples,
        train_loss=result.loss,
        train_metrics=(result.metrics if site.task.own_train is None
                       else own_loop_metrics_as_declared(site, result.metrics, config)),
        train_seconds=result.seconds,
        setup_seconds=setup_seconds,
        local_epochs=config.local_epochs,
        steps=result.steps,
        lr_first=result.lr_first,
        lr_peak=result.lr_peak,
        lr_last=result.lr_last,
        received=received,
        epsilon=spent_epsilon,
        processes=site.processes,
    )
    if dp.site_level:  # site-level DP: the update leaves clipped; the server adds the noise
        trained = clip_update(trained, start, dp.site_clip_norm)
    return Message(
        RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(reply.to_record())}),
        reply_to=msg,
    )


@app.evaluate()
@policy_screened
def evaluate_round(msg: Message, context: Context) -> Message:
    site = load_site(context.run_config, context.node_config)
    config = EvaluateConfig.from_record(msg.content["config"])
    site.task.use_statistics(config.task_statistics)
    model = site.new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    reply = held_out(site, model, config.batch_size)
    return Message(RecordDict({"metrics": MetricRecord(reply.to_record())}), reply_to=msg)
