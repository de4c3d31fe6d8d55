"""fedcycle's ServerApp: check everything, ask the sites, then run the strategy's rounds.

1. Read and check the run config and build the task (a bad value fails the run before any
   training); with `resume-from`, load the run's newest readable checkpoint and check that it fits.
2. Pre-flight (`fedcycle.preflight`): every connected site reports what it would train; the
   run stops with each site's reason if one cannot take part.
3. Run the strategy (FedAvg by default) with the server's schedule and reply screen
   (`fedcycle.coordinator`) in fedcycle's round loop up to
   `num-server-rounds`, evaluating the global model before training and after every round,
   and write the results, models and checkpoints round by round (`fedcycle.recorder`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from logging import ERROR, INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from fedcycle.config import RunSettings
from fedcycle.checkpoint import CheckpointError
from fedcycle.errors import ConfigError, TaskError
from fedcycle.preflight import PreflightError, preflight, summed_statistics
from fedcycle.recorder import RoundRecorder, load_resume_point
from fedcycle.results import RunResults, resolve_run_dir, take_for_resume, used_run_config
from fedcycle.round_loop import RoundFailed, initial_round, run_rounds
from fedcycle.screen import Declared
from fedcycle.strategies import check_strategy, make_coordinator
from fedcycle.tasks import fingerprint, load_task
from fedcycle.tracking import Trackers, check_tracking

# fedcycle's own errors: a bad run config or task, a site that cannot take part, a checkpoint
# that does not fit, a round that failed. Each message says what is wrong and what to do.
ONE_LINE_ERRORS = (ConfigError, TaskError, PreflightError, CheckpointError, RoundFailed)


class OneLineErrors(logging.Filter):
    """Flower logs an exception out of a ServerApp with its traceback, 30 lines through its own
    internals for an error whose message already says everything: log fedcycle's own as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ONE_LINE_ERRORS):
            record.msg, record.args, record.exc_info, record.exc_text = "fedcycle: %s", (error,), None, None
        return True


FLOWER_LOGGER.addFilter(OneLineErrors())
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    check_strategy(settings)
    check_tracking(settings.tracking)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)  # Flower samples the round's sites with the random module
    task = load_task(context.run_config)
    if task.own_train is not None and float(settings.strategy_options.get("proximal-mu", 0.0)) > 0:
        raise ConfigError(
            f"strategy={settings.strategy!r} needs FedProx's proximal term, which fedcycle's own loop adds, but "
            f"task={settings.task!r} brings its own train(); choose another strategy, or drop the task's train()"
        )
    model = task.initial_model(settings.model_weights)
    test = task.test_data()
    checked = task.dry_run(model, test, torch.device("cpu"), settings.batch_size) if test is not None else {}
    resume_dir, ckpt = load_resume_point(settings, task, model) if settings.resume_from else (None, None)
    if ckpt is not None and ckpt.round >= settings.num_server_rounds:
        log(INFO, "fedcycle: %s has finished round %d of num-server-rounds=%d; nothing to do (raise "
            "num-server-rounds to extend it)", resume_dir, ckpt.round, settings.num_server_rounds)
        return

    results = RunResults(take_for_resume(resume_dir) if resume_dir else resolve_run_dir(settings, context.run_id, task.label))
    log(INFO, "fedcycle run %s: results go to %s", context.run_id, results.path)
    extra: dict[str, Any] = {"run_id": context.run_id}
    if ckpt is not None:
        earlier = results.read_config()
        extra.update(
            resumed_from_round=ckpt.round,
            resumed_from_checkpoint=str(ckpt.path),
            earlier_run_ids=[*earlier.get("earlier_run_ids", []), earlier.get("run_id")],
        )
        log(INFO, "fedcycle: resuming from %s (round %d)", ckpt.path, ckpt.round)
    results.write_config(settings, dict(context.run_config), **extra)

    expected = {"model": fingerprint(model), "classes": task.classes, **{k: checked.get(k) for k in ("metric-names", "inputs", "targets")}}
    reports, refused = preflight(grid, settings, expected, needs_val=settings.evaluates_on_sites(test is not None))
    statistics = summed_statistics(reports)
    task.use_statistics(statistics)
    coordinator = make_coordinator(
        settings, num_sites=len(reports), has_test_data=test is not None,
        sites={node: Declared(r.num_train, r.num_val, r.site) for node, r in reports.items()},
        metric_names=next(iter(reports.values())).metric_names, ranges=task.metric_ranges, task_statistics=statistics,
        train_metric_names=next(iter(reports.values())).train_metric_names,
        # the sites' DP ledgers file the run's rounds under its first id
        privacy_run=str((extra.get("earlier_run_ids") or [context.run_id])[0]),
        late_nodes=refused,  # their refusal is logged and kept in config.json; no event each round
    )
    trackers = Trackers(settings, results.path, used_run_config(settings, context.run_config),
                        first_round=0 if ckpt is None else ckpt.round + 1)
    recorder = RoundRecorder(settings, task, test, results, trackers, coordinator.metric_names)
    try:
        if ckpt is None:
            arrays, first_round = ArrayRecord(model.state_dict()), 1
            recorder.record(initial_round(grid, coordinator, settings, arrays, sites_evaluate=test is None))
        else:
            arrays, first_round = ArrayRecord(ckpt.model), ckpt.round + 1
            coordinator.restore(ckpt.server_arrays, ckpt.screen_state)
            random.setstate(ckpt.python_rng)
            torch.set_rng_state(ckpt.torch_rng)
            extra["resumed_value"] = recorder.resume(ckpt)
            log(INFO, "fedcycle: the resumed model's %s, evaluated again: %s", task.primary_metric,
                extra["resumed_value"])
        # what each site reported, less its own sums: the server keeps only the sites' totals
        results.write_config(settings, dict(context.run_config), **extra, refused_sites=refused,
                             sites={node: replace(report, statistics=None).to_record()
                                    for node, report in reports.items()})
        for outcome in run_rounds(grid, coordinator, settings, arrays, first_round):
            recorder.record(outcome)
    except RoundFailed as err:
        log(ERROR, "fedcycle run %s stopped: %s", context.run_id, err)
        recorder.record_failed_round(err.outcome, str(err))
        recorder.finish("failed")
        raise
    recorder.finish("finished")
    final = recorder.lines[-1][task.primary_metric]
    log(INFO, "fedcycle run %s finished: final %s %s; results in %s", context.run_id, task.primary_metric,
        None if final is None else round(float(final), 4), results.path)
