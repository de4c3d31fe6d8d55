"""One data center as the ClientApp sees it: its settings, device and data, loaded once.

Knows the node config (`partition-id`/`num-partitions` for a simulated split, or
`data-dir` for the site's own files; `device`; `data-root`) but nothing of Flower's
messages, so the pre-flight report and the trainer calls stay testable without a network.
"""

from __future__ import annotations

import functools
import platform
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fedcycle.config import ConfigError, RunSettings
from fedcycle.datasets import DATASETS, ImageData, site_split
from fedcycle.models import build_model
from fedcycle.trainer import pick_device

NODE_KEYS = ("partition-id", "num-partitions", "data-dir", "data-root", "device")


@dataclass(frozen=True)
class Site:
    settings: RunSettings
    node_config: dict[str, Any]
    device: torch.device
    train: ImageData
    val: ImageData

    @property
    def label(self) -> str:
        if "data-dir" in self.node_config:
            return f"data-dir:{self.node_config['data-dir']}"
        return f"partition {self.node_config['partition-id']}/{self.node_config['num-partitions']}"

    def seed(self, server_round: int) -> int:
        """This site's training seed for a round: the run's seed, the round and the site's name."""
        return (self.settings.seed * 100_003 + server_round * 1_009 + zlib.crc32(self.label.encode())) % 2**63

    @property
    def norm(self) -> tuple[tuple, tuple]:
        spec = DATASETS[self.settings.dataset]
        return spec.mean, spec.std

    def new_model(self) -> torch.nn.Module:
        spec = DATASETS[self.settings.dataset]
        return build_model(self.settings.model, spec.shape(self.settings), len(spec.classes(self.settings)))

    def report(self) -> dict[str, Any]:
        """What the server asks in the pre-flight round."""
        import flwr
        import torchvision

        return {
            "ok": True,
            "site": self.label,
            "num-train": len(self.train),
            "num-val": len(self.val),
            "classes": list(self.train.classes),
            "image-shape": list(self.train.images.shape[1:]),
            "device": str(self.device),
            "device-name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "flwr": flwr.__version__,
        }


def check_node_config(node_config: Mapping[str, Any], settings: RunSettings) -> None:
    """Raise ConfigError naming the node-config key that cannot work.

    A site trains either on its own folder (`data-dir`) or on a simulated part of the
    dataset (`partition-id` of `num-partitions`).
    """
    if node_config.get("data-dir"):
        return  # the folder itself is checked when it is read
    if DATASETS[settings.dataset].site_local:
        raise ConfigError(f"data-dir is missing from the node config; dataset={settings.dataset!r} reads each site's own folder")
    for key in ("partition-id", "num-partitions"):
        if not isinstance(node_config.get(key), int) or isinstance(node_config.get(key), bool):
            raise ConfigError(f"{key}={node_config.get(key)!r} in the node config must be an integer (or set data-dir)")
    parts, pid = node_config["num-partitions"], node_config["partition-id"]
    if parts < 1:
        raise ConfigError(f"num-partitions={parts} must be at least 1")
    if not 0 <= pid < parts:
        raise ConfigError(f"partition-id={pid} must be in 0..{parts - 1} (num-partitions={parts})")


@functools.lru_cache(maxsize=2)
def _load_site(settings: RunSettings, node_items: tuple) -> Site:
    node_config = dict(node_items)
    check_node_config(node_config, settings)
    try:
        device = pick_device(str(node_config.get("device", "auto")))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    train, val = site_split(settings, node_config)
    return Site(settings, node_config, device, train, val)


def load_site(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Site:
    """This process's site, built once per (run config, node config)."""
    settings = RunSettings.from_run_config(run_config)
    return _load_site(settings, tuple(sorted((k, v) for k, v in node_config.items() if k in NODE_KEYS)))
