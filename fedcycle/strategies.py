"""Strategies by name: Flower's own, or a user's `package.module:Class`.

Each one runs as it is, inside a `fedcycle.coordinator.Coordinator` that adds the server's
schedule and the reply screen around it (`cyclical-fedavg`, the default, is Flower's FedAvg so
wrapped). Options come from the run-config table named after the chosen strategy (`fedprox.proximal-mu`
becomes `proximal_mu=`); each strategy receives the ones its constructor takes.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedcycle.config import RunSettings
from fedcycle.coordinator import Coordinator
from fedcycle.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    "cyclical-fedavg": FedAvg,
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

__all__ = ["STRATEGIES", "check_strategy", "check_strategy_name", "make_coordinator"]


def check_strategy_name(name: str) -> None:
    """Raise ConfigError unless `name` is registered or looks like `package.module:Class`."""
    if name in STRATEGIES:
        return
    module, _, attr = name.partition(":")
    if not (module and attr and all(part.isidentifier() for part in module.split("."))):
        raise ConfigError(
            f"strategy={name!r} is unknown; choose one of {sorted(STRATEGIES)} or give 'package.module:Class'"
        )


# What the built-in strategies' numeric options may be: option -> (low, high, low included).
OPTION_RANGES: dict[str, tuple[float, float, bool]] = {
    "proximal-mu": (0.0, math.inf, True),
    "server-learning-rate": (0.0, math.inf, False),
    "server-momentum": (0.0, 1.0, True),
    "eta": (0.0, math.inf, False),
    "eta-l": (0.0, math.inf, False),
    "beta-1": (0.0, 1.0, True),
    "beta-2": (0.0, 1.0, True),
    "tau": (0.0, math.inf, False),
    "beta": (0.0, 0.5, True),
    "num-malicious-nodes": (0.0, math.inf, True),
}


def check_strategy(settings: RunSettings) -> type[Strategy]:
    """The run's strategy class, once its options are known to be its own and in range:
    ConfigError naming the option otherwise, before any site is asked anything."""
    cls = resolve_strategy(settings.strategy)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    own = sorted(k.replace("_", "-") for k in params if k not in ("self", "args", "kwargs"))
    for key, value in settings.strategy_options.items():
        if not takes_any and key.replace("-", "_") not in params:
            raise ConfigError(f"{settings.strategy}.{key} is not an option of strategy={settings.strategy!r}; it takes {own}")
        if key in OPTION_RANGES and settings.strategy in STRATEGIES:
            low, high, low_included = OPTION_RANGES[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not (low <= value if low_included else low < value) or not value < high:
                bounds = f"{'[' if low_included else '('}{low:g}, {high:g})"
                raise ConfigError(f"{settings.strategy}.{key}={value!r} must be a number in {bounds}")
    return cls


def resolve_strategy(name: str) -> type[Strategy]:
    check_strategy_name(name)
    if name in STRATEGIES:
        return STRATEGIES[name]
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"strategy={name!r} cannot be imported: {err}") from None
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy={name!r} is not a subclass of flwr.serverapp.strategy.Strategy")
    return cls


def make_coordinator(settings: RunSettings, num_sites: int, has_test_data: bool = True, **known: Any) -> Coordinator:
    """The run's strategy, with sampling and options from the settings, inside a Coordinator
    (`known`: what the pre-flight round told it, see Coordinator). Without a test split on the
    server, the sites evaluate every round's model."""
    cls = resolve_strategy(settings.strategy)
    evaluate_on_sites = settings.evaluates_on_sites(has_test_data)
    wanted: dict[str, Any] = {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": 1.0 if evaluate_on_sites else 0.0,
        "min_train_nodes": min(settings.min_sites, num_sites),
        "min_evaluate_nodes": min(settings.min_sites, num_sites) if evaluate_on_sites else 0,
        "min_available_nodes": settings.min_sites,
        **{k.replace("-", "_"): v for k, v in settings.strategy_options.items()},
    }
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in wanted.items() if takes_any or k in params}
    return Coordinator(cls(**kwargs), settings, evaluate_on_sites, **known)
