"""The run config, read once per process into typed settings, by its owner.

Flower hands the ServerApp and every ClientApp the same flat run config (hyphenated keys,
nested tables flattened to `table.key`). Each side reads what it owns:
- `SiteSettings`: what a site needs to build its task and its data (the task, the data's
  split and cache, the partitioner's and the task's tables).
  A site reads nothing else; what it needs for a round arrives in the round's config
  (`fedcycle.wire.RoundConfig`).
- `RunSettings`: the server's view, every key: the site's, and its own (the strategy, the
  schedule, rounds, timeouts, the reply screen, checkpoints, results, tracking).
`from_run_config` returns one frozen object and raises `ConfigError` with a one-line message that
names the key, the value and what is allowed. Every default has one home: these fields (the
schedule's, `fedcycle.schedules`; the trainer's `TrainConfig` takes its from here), and
pyproject.toml declares the same ones to Flower, which needs them there (tests/test_config.py
holds the two together).

A task checks its own keys (the built-in image task: dataset, model, classes, partitioner) when
it is built (`fedcycle.tasks`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from fedcycle.errors import ConfigError
from fedcycle.schedules import Envelope, LRSchedule, local_epochs_for_round
from fedcycle.tracking import TRACKING

SITE_EVAL_MODES = ("train-reply", "evaluate-round", "off")
# The strategies whose aggregate is the mean of the sites' models: site-level DP noises that mean.
SITE_DP_STRATEGIES = ("cyclical-fedavg", "fedavg", "fedprox")
OPTIMIZERS = ("sgd", "adamw")

__all__ = ["ConfigError", "DPSettings", "RunSettings", "SiteSettings", "SITE_EVAL_MODES", "OPTIMIZERS", "RENAMED_KEYS"]

# A built-in task whose options table is not named after the task.
TASK_TABLES = {"image-classification": "image"}
# Keys that moved, old name -> new: the image task's keys went into its `image.` table.
RENAMED_KEYS = {"dataset": "image.dataset", "model": "image.model", "image-size": "image.image-size",
                "augment": "image.augment"}


def current_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` under today's key names (a run config, a checkpoint's identity, a study's
    summary written before a key moved)."""
    return {RENAMED_KEYS.get(key, key): value for key, value in config.items()}


@dataclass(frozen=True)
class DPSettings:
    """Differential privacy (`dp.*` keys; fedcycle.privacy).

    Record-level, DP-SGD at every site with Opacus: per-sample gradients clipped to
    `max-grad-norm`, Gaussian noise of `noise-multiplier` times that norm, Poisson sampling, and
    Opacus's accountant at `delta`. `noise-multiplier = 0`: off.
    Site-level: each site clips its whole update to `site-clip-norm` before sending it, and the
    server adds Gaussian noise of `site-noise-multiplier` times that norm to the unweighted mean
    of the updates. `site-clip-norm = 0`: off.
    `fix-model`: let Opacus replace the layers neither can handle (BatchNorm by GroupNorm)."""

    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    fix_model: bool = False
    site_clip_norm: float = 0.0
    site_noise_multiplier: float = 1.0

    @property
    def enabled(self) -> bool:
        """DP-SGD at the sites."""
        return self.noise_multiplier > 0

    @property
    def site_level(self) -> bool:
        return self.site_clip_norm > 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "DPSettings":
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"dp.{unknown[0]} is unknown; the dp table's keys are {['dp.' + k for k in known]}")
        dp = cls(**{known[k]: coerce(f"dp.{k}", v, type(getattr(cls, known[k]))) for k, v in options.items()})
        _at_least("dp.noise-multiplier", dp.noise_multiplier, 0)
        positive("dp.max-grad-norm", dp.max_grad_norm)
        _at_least("dp.site-clip-norm", dp.site_clip_norm, 0)
        _at_least("dp.site-noise-multiplier", dp.site_noise_multiplier, 0)
        if not 0 < dp.delta < 1:
            raise ConfigError(f"dp.delta={dp.delta} must be in (0, 1); 1e-5 is usual, below 1 / (records at a site)")
        return dp


@dataclass(frozen=True)
class SiteSettings:
    """The run config's keys a site reads: its task and how its data is split and cached."""

    task: str = "image-classification"
    partitioner: str = "iid"
    seed: int = 42
    data_root: str = ""
    train_subset: int = 0
    train_pool: int = 0
    test_subset: int = 0
    val_fraction: float = 0.1
    classes: str = ""
    # `name.option` keys: the options of the partitioner, strategy or task called `name`
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "SiteSettings":
        """The settings of this class's keys; the other keys of the run config are another
        owner's (a site skips the server's)."""
        return cls._parse(run_config, strict=False)

    @classmethod
    def _parse(cls, run_config: Mapping[str, Any], strict: bool):
        kwargs: dict[str, Any] = {"options": {}}
        plain = {f.name.replace("_", "-"): f for f in fields(cls) if f.name != "options"}
        for key, value in run_config.items():
            table, _, option = key.partition(".")
            if option:
                kwargs["options"].setdefault(table, {})[option] = value
            elif key in plain:
                kwargs[plain[key].name] = coerce(key, value, type(getattr(cls, plain[key].name)))
            elif strict:
                raise ConfigError(f"run config key {key!r} is unknown; see docs/configuration.md for the keys")
        settings = cls(**kwargs)
        settings.validate()
        return settings

    @functools.cached_property
    def dp(self) -> DPSettings:
        """The `dp.*` keys, read once (the screen asks for them with every reply)."""
        return DPSettings.from_options(self.options.get("dp", {}))

    @property
    def partitioner_options(self) -> dict[str, Any]:
        return self.options.get(self.partitioner, {})

    @property
    def task_table(self) -> str:
        """The name of the task's options table: the task's own, `image` for the image task."""
        return TASK_TABLES.get(self.task, self.task)

    @property
    def task_options(self) -> dict[str, Any]:
        """The `<table>.option` keys of a built-in task (`tabular.label-column`, `image.model`, ...)."""
        return self.options.get(self.task_table, {})

    @property
    def class_list(self) -> list[str]:
        return [c.strip() for c in self.classes.split(",") if c.strip()]

    def validate(self) -> None:
        """Check the site's values that need no task, dataset or site; raise ConfigError."""
        if not self.task.strip():
            raise ConfigError("task='' is empty; give a built-in task's name or 'package.module:Class'")
        _at_least("train-subset", self.train_subset, 0)
        _at_least("train-pool", self.train_pool, 0)
        _at_least("test-subset", self.test_subset, 0)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val-fraction={self.val_fraction} must be in [0, 1)")
        self.dp  # noqa: B018 - validates the dp.* keys

    def __hash__(self) -> int:  # the option tables are dicts; hash the whole settings by value
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))


@dataclass(frozen=True)
class RunSettings(SiteSettings):
    """Every key of the run config, as the server reads it: the site's and the server's own."""

    strategy: str = "cyclical-fedavg"
    # the schedule's and the envelope's defaults are theirs (fedcycle.schedules): one home each
    lr_schedule: str = LRSchedule.name
    lr_min: float = LRSchedule.lr_min
    lr_max: float = LRSchedule.lr_max
    lr_cycle_unit: str = LRSchedule.cycle_unit
    lr_cycle_length: float = LRSchedule.cycle_length
    lr_gamma: float = LRSchedule.gamma
    lr_envelope: str = Envelope.shape
    lr_decay: float = Envelope.decay
    lr_warmup_rounds: int = Envelope.warmup_rounds
    swa_start: int = 0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    local_epochs: int = 2
    local_epochs_growth: float = 0.0
    local_epochs_max: int = 0
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    min_sites: int = 2
    round_timeout: float = 3600.0
    min_replies: int = 1
    min_reply_fraction: float = 0.5
    round_retries: int = 1
    max_update_ratio: float = 10.0
    peer_clip_ratio: float = 1.0
    peer_norm_ratio: float = 2.0
    peer_pullback_ratio: float = 0.5
    max_weight_ratio: float = 4.0
    near_duplicate_ratio: float = 0.01
    drift_consistency: float = 0.7
    drift_margin: float = 0.1
    drift_rounds: int = 4
    checkpoints_keep: int = 3
    run_name: str = ""
    results_dir: str = "results"
    resume_from: str = ""
    site_eval: str = "train-reply"
    mixed_precision: bool = False
    model_weights: str = ""
    tracking: str = "tensorboard"
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "fedcycle"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunSettings":
        """Every key; one the run config does not declare is an error."""
        return cls._parse(run_config, strict=True)

    @property
    def schedule(self) -> LRSchedule:
        try:
            return LRSchedule(
                name=self.lr_schedule,
                lr_min=self.lr_min,
                lr_max=self.lr_max,
                cycle_unit=self.lr_cycle_unit,
                cycle_length=self.lr_cycle_length,
                gamma=self.lr_gamma,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @property
    def envelope(self) -> Envelope:
        try:
            return Envelope(self.lr_envelope, self.lr_decay, self.lr_warmup_rounds)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def schedule_for_round(self, server_round: int) -> LRSchedule:
        """The schedule the sites follow in a round: the run's, its peak moved by the envelope."""
        return self.envelope.apply(self.schedule, server_round, self.num_server_rounds)

    @property
    def strategy_options(self) -> dict[str, Any]:
        return self.options.get(self.strategy, {})

    def evaluates_on_sites(self, has_test_data: bool) -> bool:
        """Whether each round ends with an evaluate message to the sites: asked for, or the
        task has no test split and the sites' held-out data is the only test there is."""
        return self.site_eval == "evaluate-round" or not has_test_data

    def epochs_for_round(self, server_round: int) -> int:
        return local_epochs_for_round(
            self.local_epochs, self.local_epochs_growth, self.local_epochs_max, server_round
        )

    def validate(self) -> None:
        """Check every value that does not need a task, a dataset or a site; raise ConfigError."""
        super().validate()
        _choice("site-eval", self.site_eval, SITE_EVAL_MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("tracking", self.tracking, TRACKING)  # its packages are the server's: check_tracking
        self.schedule  # noqa: B018 - validates the lr-* keys
        self.envelope  # noqa: B018
        _at_least("swa-start", self.swa_start, 0)
        positive("num-server-rounds", self.num_server_rounds)
        positive("local-epochs", self.local_epochs)
        positive("batch-size", self.batch_size)
        positive("min-sites", self.min_sites)
        positive("round-timeout", self.round_timeout)
        positive("min-replies", self.min_replies)
        positive("checkpoints-keep", self.checkpoints_keep)
        _at_least("round-retries", self.round_retries, 0)
        _at_least("max-update-ratio", self.max_update_ratio, 0)
        _at_least("peer-norm-ratio", self.peer_norm_ratio, 0)
        _at_least("max-weight-ratio", self.max_weight_ratio, 0)
        _at_least("peer-pullback-ratio", self.peer_pullback_ratio, 0)
        _at_least("peer-clip-ratio", self.peer_clip_ratio, 0)
        _at_least("near-duplicate-ratio", self.near_duplicate_ratio, 0)
        positive("drift-rounds", self.drift_rounds)
        _at_least("drift-margin", self.drift_margin, 0)
        if not 0 <= self.drift_consistency <= 1:
            raise ConfigError(f"drift-consistency={self.drift_consistency} must be in [0, 1] (0: off)")
        _at_least("local-epochs-growth", self.local_epochs_growth, 0)
        _at_least("local-epochs-max", self.local_epochs_max, 0)
        _at_least("momentum", self.momentum, 0)
        _at_least("weight-decay", self.weight_decay, 0)
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train={self.fraction_train} must be in (0, 1]")
        if not 0 <= self.min_reply_fraction <= 1:
            raise ConfigError(f"min-reply-fraction={self.min_reply_fraction} must be in [0, 1]")
        if self.site_eval == "evaluate-round" and self.val_fraction == 0:
            raise ConfigError(
                "val-fraction=0 leaves the sites nothing to evaluate on, but site-eval='evaluate-round' needs it; "
                "use a val-fraction above 0"
            )
        if self.dp.site_level and self.strategy not in SITE_DP_STRATEGIES:
            raise ConfigError(f"dp.site-clip-norm={self.dp.site_clip_norm}: site-level DP adds its noise to the mean of "
                              f"the clipped updates, which strategy={self.strategy!r} does not take; use one of "
                              f"{list(SITE_DP_STRATEGIES)}, or dp.site-clip-norm=0")
        if self.dp.enabled and float(self.strategy_options.get("proximal-mu", 0.0)) > 0:
            raise ConfigError(f"strategy={self.strategy!r} adds FedProx's proximal term, which DP-SGD's per-example "
                              "clipping leaves out (dp.noise-multiplier > 0); choose another strategy or turn DP off")
        if self.local_epochs_max and self.local_epochs_max < self.local_epochs:
            raise ConfigError(
                f"local-epochs-max={self.local_epochs_max} must be 0 (no cap) or at least local-epochs={self.local_epochs}"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_run_config(self) -> dict[str, Any]:
        """The settings under their run-config keys, with the options of the chosen partitioner,
        strategy and task as `name.option` (the other tables are not used)."""
        plain = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name != "options"}
        for table in (self.partitioner, self.strategy, self.task_table, "dp"):
            plain.update({f"{table}.{k}": v for k, v in self.options.get(table, {}).items()})
        return plain

    __hash__ = SiteSettings.__hash__


def coerce(key: str, value: Any, kind: type) -> Any:
    """TOML gives ints where users meant floats (lr-min=0); accept those, refuse the rest."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}={value!r} must be of type {kind.__name__}")
    return value


def _choice(key: str, value: str, choices: Mapping[str, Any] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; choose one of {sorted(choices)}")


def positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} must be above 0")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"{key}={value} must be at least {low}")
