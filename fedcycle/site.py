"""One data center as the ClientApp sees it: its settings (the run config's keys a site owns,
`SiteSettings`), task, device and data, loaded once.

Knows the node config (`site-name`, `device`, `num-workers`, `nproc-per-site`, `task-path`,
`policy-file`, `privacy-ledger`, and whatever the task reads: `partition-id`/`num-partitions`, or a site's
own `data-dir` or `data-file`) but nothing of Flower's messages, so the pre-flight report and
the trainer calls stay testable without a network. The site's policy (`fedcycle.policy`) is
applied here, before the task's module is imported and after its data is read.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import flwr
import torch

from fedcycle.config import SiteSettings
from fedcycle.errors import ConfigError
from fedcycle.policy import SitePolicy, load_policy
from fedcycle.privacy import PrivacyLedger, epsilon
from fedcycle.tasks import BUILTIN, Task, fingerprint
from fedcycle.trainer import pick_device, rehearse
from fedcycle.wire import SiteReport

# What `fedcycle simulate --node-config` gives every simulated site, as JSON: Flower's simulation
# hands a site only its partition-id and num-partitions, and this variable reaches the ClientApps
# from the launcher that starts the simulation (never from the coordinator of a deployment).
NODE_CONFIG_VARIABLE = "FEDCYCLE_NODE_CONFIG"
# How many processes a site trains on (`fedcycle.distributed`): one per GPU, or CPU shares
PROCESSES_KEY = "nproc-per-site"


def simulated_node_config(node_config: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The node config with the launcher's (`NODE_CONFIG_VARIABLE`) added, each string value's
    `{partition-id}` and `{num-partitions}` filled in with this site's; the node's own keys win."""
    text = environ.get(NODE_CONFIG_VARIABLE) or "{}"
    try:
        given = json.loads(text)
    except ValueError:
        given = None
    if not isinstance(given, dict):
        raise ConfigError(f"{NODE_CONFIG_VARIABLE}={text[:80]!r} is not a JSON object of node-config keys; "
                          "fedcycle simulate --node-config sets it")
    return with_given(node_config, given)


def with_given(node_config: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """`node_config` with `given`'s keys added, `{partition-id}` and `{num-partitions}` in their
    string values filled in with the node's; the node's own keys win."""
    return {**{key: fill_partition(value, node_config) for key, value in given.items()}, **node_config}


def fill_partition(value: Any, node_config: Mapping[str, Any]) -> Any:
    """A string with `{partition-id}` / `{num-partitions}` as this node's; other values as they are."""
    if not isinstance(value, str):
        return value
    for key in ("partition-id", "num-partitions"):
        if key in node_config:
            value = value.replace("{" + key + "}", str(node_config[key]))
    return value


def site_label(node_config: Mapping[str, Any]) -> str:
    """The name the server knows the site by: its `site-name`, its simulated partition, or the
    base name of its data (never a path, never the rest of its node config)."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"partition {node_config['partition-id']}/{node_config.get('num-partitions', '?')}"
    own = [f"{k}:{Path(str(node_config[k])).name}" for k in ("data-dir", "data-file") if node_config.get(k)]
    return " ".join(own) or "site"


@dataclass(frozen=True)
class Site:
    settings: SiteSettings
    node_config: dict[str, Any]
    task: Task
    device: torch.device
    train: Any  # torch Datasets
    val: Any
    policy: SitePolicy = SitePolicy()
    processes: int = 1  # `nproc-per-site`: processes of one DistributedDataParallel training
    dry_runs: dict[int, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def label(self) -> str:
        return site_label(self.node_config)

    @property
    def num_workers(self) -> int:
        return int(self.node_config.get("num-workers", 0))

    def seed(self, server_round: int) -> int:
        """This site's training seed for a round: the run's seed, the round and the site's name."""
        return (self.settings.seed * 100_003 + server_round * 1_009 + zlib.crc32(self.label.encode())) % 2**63

    def new_model(self) -> torch.nn.Module:
        return self.task.build_model()

    def checked(self, batch_size: int) -> dict[str, Any]:
        """One batch (of the server's batch size) of the site's train data through the task's
        model, loss and metrics; once per process."""
        if batch_size not in self.dry_runs:
            self.dry_runs[batch_size] = self.task.dry_run(self.new_model(), self.train, self.device, batch_size)
        return self.dry_runs[batch_size]

    def metric_names(self, batch_size: int) -> list[str]:
        return self.checked(batch_size)["metric-names"]

    def train_metric_names(self, batch_size: int) -> list[str]:
        """The metrics the site reports while training: the task's own train() rehearsed for a
        couple of batches on a fresh model (once per process, kept with the dry run's findings);
        fedcycle's loop reports all."""
        checked = self.checked(batch_size)
        if "train-metric-names" not in checked:
            if self.task.own_train is not None:  # this site's own sums stand in for the totals it has yet to get
                self.task.use_statistics(self.task.statistics(self.train))
            checked["train-metric-names"] = rehearse(self.task, self.new_model(), self.train, batch_size, self.device,
                                                     checked["metric-names"], self.settings.dp)
        return checked["train-metric-names"]

    def report(self, batch_size: int) -> SiteReport:
        """What the server asks in the pre-flight round."""
        import torchvision  # lazily: for its version only; a train or evaluate message needs none

        checked = self.checked(batch_size)
        classes = getattr(self.train, "classes", None)
        return SiteReport(
            site=self.label,
            num_train=len(self.train),
            num_val=len(self.val),
            metric_names=list(checked["metric-names"]),
            train_metric_names=self.train_metric_names(batch_size),
            inputs=checked["inputs"],
            targets=checked["targets"],
            model=fingerprint(self.new_model()),
            device=str(self.device),
            device_name=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu",
            python=platform.python_version(),
            torch=torch.__version__,
            torchvision=torchvision.__version__,
            flwr=flwr.__version__,
            classes=None if classes is None else [str(c) for c in classes],
            statistics=self.task.statistics(self.train),
        )

    # -- differential privacy: what the site has spent, checked before each round trains --------

    @property
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.for_site(self.node_config, self.settings.data_root, self.label)

    def privacy_budget(self, run: str, batch_size: int, epochs: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The run's ledger entries so far and this round's planned entry; refuses (its policy's
        `dp.max-epsilon`) a round whose training would take epsilon past the ceiling."""
        dp = self.settings.dp
        per_epoch = -(-len(self.train) // batch_size)
        planned = {"run": run, "noise-multiplier": dp.noise_multiplier, "sample-rate": 1 / per_epoch,
                   "steps": epochs * per_epoch}
        spent = self.ledger.entries(run)
        self.policy.check_budget(epsilon(spent, dp.delta), epsilon([*spent, planned], dp.delta))
        return spent, planned

    def spend(self, spent: list[dict[str, Any]], entry: dict[str, Any]) -> float:
        """Write a trained round's entry to the ledger; the run's epsilon with it."""
        self.ledger.add(entry)
        return epsilon([*spent, entry], self.settings.dp.delta)


@functools.lru_cache(maxsize=2)
def _load_site(settings: SiteSettings, run_items: tuple, node_items: tuple) -> Site:
    node_config = dict(node_items)
    try:
        device = pick_device(str(node_config.get("device", "auto")))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    workers = node_config.get("num-workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"num-workers={workers!r} in the node config must be an integer of at least 0")
    processes = processes_of(node_config, device)
    policy = load_policy(node_config)
    if node_config.get("task-path"):  # on the path first (nothing runs), so the policy sees where a module would come from
        add_task_path(str(node_config["task-path"]))
    policy.check_task(settings.task, BUILTIN)  # before its module is imported: an import runs code
    policy.check_data_paths(dict(run_items), node_config)
    policy.check_dp(settings.dp.noise_multiplier, settings.dp.delta)
    task = Task(settings.task, dict(run_items))
    train, val = task.site_data(node_config)
    policy.check_records("train split", len(train))
    policy.check_records("held-out split", len(val))
    return Site(settings, node_config, task, device, train, val, policy, processes)


def processes_of(node_config: Mapping[str, Any], device: torch.device) -> int:
    """The site's `nproc-per-site` (1 by default), one per GPU from `device`'s on; ConfigError if
    it is not a count the site can run."""
    n = node_config.get(PROCESSES_KEY, 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{PROCESSES_KEY}={n!r} in the node config must be an integer of at least 1")
    first = device.index or 0
    if device.type == "cuda" and first + n > torch.cuda.device_count():
        raise ConfigError(f"{PROCESSES_KEY}={n} in the node config from {device} on, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s): one process per GPU")
    return n


def add_task_path(folder: str) -> None:
    """A site-private folder that holds the task's module (node config `task-path`)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"task-path={folder!r} in the node config is not a folder")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def load_site(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Site:
    """This process's site, built once per (run config, node config), from the run config's
    keys a site owns."""
    settings = SiteSettings.from_run_config(run_config)
    return _load_site(settings, _frozen(run_config), _frozen(simulated_node_config(node_config)))


def _frozen(config: Mapping[str, Any]) -> tuple:
    """A Flower config (scalar values) as a hashable cache key."""
    return tuple(sorted(config.items()))
