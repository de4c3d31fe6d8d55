"""A site's policy: what the data center lets a run do with its data, decided by the site.

A site names a TOML file in its node config (`policy-file`); the ClientApp reads it and never
sends it. Every rule is checked at the site, before the task's code is imported or its data is
read where the rule allows, and a run the policy forbids is refused with one line naming the
rule (never the data):

    tasks = ["builtin", "clinic.tasks:BloodPressure"]  # "builtin" (all built-in tasks), names, module:Class
    app-code = false              # may a listed task's module come from the app the server ships
    min-records = 20              # the fewest records behind any statistic or metric the site sends
    error-values = false          # may error text sent to the server quote values from the data
    data-from-run-config = false  # may the run config name this site's files (else: node config only)

    [dp]
    required = true               # refuse a run without DP-SGD (dp.noise-multiplier > 0)
    max-epsilon = 8.0             # refuse a round that would spend more, at this delta
    delta = 1e-5

Without a file the permissive default applies (meant for simulation: any task, values in error
text, paths from the run config), except `min-records`, which is always at least 1 and 10 by
default. A file's missing keys take the strict values above; without `tasks` it runs the
built-in tasks only.
"""

from __future__ import annotations

import importlib.machinery
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcycle.errors import ConfigError, PolicyRefusal

DEFAULT_MIN_RECORDS = 10
KEYS = ("tasks", "app-code", "min-records", "error-values", "data-from-run-config", "dp")
DP_KEYS = ("required", "max-epsilon", "delta")


@dataclass(frozen=True)
class SitePolicy:
    source: str = "the default policy (no policy-file)"
    tasks: tuple[str, ...] | None = None  # None: any task
    app_code: bool = True
    min_records: int = DEFAULT_MIN_RECORDS
    error_values: bool = True
    data_from_run_config: bool = True
    dp_required: bool = False
    max_epsilon: float | None = None
    delta: float = 1e-5

    @classmethod
    def strict(cls, source: str) -> "SitePolicy":
        """A file's starting point: built-in tasks only, nothing the site has not allowed."""
        return cls(source=source, tasks=("builtin",), app_code=False, error_values=False, data_from_run_config=False)

    def refuse(self, rule: str, why: str) -> PolicyRefusal:
        return PolicyRefusal(f"its policy refuses the run ({rule}): {why}")

    # -- the rules ------------------------------------------------------------------------------

    def check_task(self, spec: str, builtin: dict[str, str]) -> None:
        """Refuse a task the policy does not list, before its module is imported: an import runs
        code. A built-in runs when `tasks` names it or "builtin"; a listed `module:Class` whose
        module would be found in the app the server shipped runs only with `app-code = true`."""
        builtin_ok = spec in builtin and "builtin" in (self.tasks or ())
        if self.tasks is not None and spec not in self.tasks and not builtin_ok:
            raise self.refuse("tasks", f"task={spec!r} is not among the tasks it runs {list(self.tasks)}")
        if spec in builtin or self.app_code:
            return
        top = spec.partition(":")[0].split(".")[0]
        found = importlib.machinery.PathFinder.find_spec(top)  # finds the module's file, runs none of it
        if found is not None and any(_inside(Path(p), app_bundles()) for p in _locations(found)):
            raise self.refuse("app-code", f"task={spec!r} comes from the app the server shipped, not from the site")

    def check_records(self, what: str, count: int) -> None:
        """Refuse to send statistics or metrics over fewer than `min-records` records (0: none sent)."""
        if 0 < count < self.min_records:
            raise self.refuse("min-records", f"its {what} holds fewer than min-records={self.min_records} records, "
                                             "and it sends no statistic or metric over fewer")

    def check_data_paths(self, run_keys: dict[str, Any], node_config: dict[str, Any]) -> None:
        """Refuse a run config that names this site's files, unless the policy lets it. A site
        that names its own data (`data-file`, `data-dir`) reads no path from the run config."""
        if self.data_from_run_config or any(node_config.get(k) for k in ("data-file", "data-dir")):
            return
        for key, value in sorted(run_keys.items()):
            option = key.rpartition(".")[2]
            if option in DATA_PATH_KEYS and value and not node_config.get(option):
                raise self.refuse("data-from-run-config", f"the run config names its data ({key}); this site "
                                                          f"reads its data only from its node config ({option})")

    def check_dp(self, noise_multiplier: float, delta: float) -> None:
        if self.dp_required and noise_multiplier <= 0:
            raise self.refuse("dp.required", "the run trains without differential privacy (dp.noise-multiplier=0)")
        if self.max_epsilon is not None and noise_multiplier > 0 and delta > self.delta:
            raise self.refuse("dp.delta", f"the run's dp.delta={delta} is above the site's {self.delta}")

    def check_budget(self, spent: float, next_round: float) -> None:
        """Refuse a round whose training would take epsilon past the ceiling."""
        if self.max_epsilon is not None and next_round > self.max_epsilon:
            raise self.refuse("dp.max-epsilon", f"epsilon spent {spent:.3g}; this round would reach {next_round:.3g}, "
                                                f"past its ceiling max-epsilon={self.max_epsilon} at delta={self.delta}")

    def public_error(self, err: BaseException) -> str:
        """What of an error may go to the server: the whole text with `error-values = true`,
        else the version without the data's values (fedcycle's errors carry one)."""
        if self.error_values:
            return str(err)
        without = getattr(err, "without_values", None)
        if isinstance(err, ConfigError):
            return without or str(err)
        return f"{type(err).__name__} (its text stays at the site: error-values=false)"


# The node-config keys that name a site's data; the run config's `<task>.<key>` names them in simulation.
DATA_PATH_KEYS = ("data-file", "data-dir", "data-root")


def app_bundles() -> Path:
    """Where Flower unpacks the apps it ships to this node."""
    from flwr.common.config import get_flwr_home  # lazily: the only Flower import here

    return get_flwr_home() / "apps"


def _locations(spec) -> list[str]:
    """A found module's file, or a package's folders."""
    return [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def load_policy(node_config: dict[str, Any]) -> SitePolicy:
    """The site's policy from its node config's `policy-file`, or the default; raise ConfigError
    naming the file and key when it cannot be read."""
    name = node_config.get("policy-file")
    if not name:
        return SitePolicy()
    path = Path(str(name)).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise PolicyRefusal(f"its policy-file {path.name!r} cannot be read; it takes part in no run until it can") from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyRefusal(f"its policy-file {path.name!r} is not valid TOML ({err}); it takes part in no run until "
                            "it parses") from None
    return parse_policy(data, path.name)


def parse_policy(data: dict[str, Any], source: str) -> SitePolicy:
    def bad(key: str, value: Any, want: str) -> PolicyRefusal:
        return PolicyRefusal(f"its policy-file {source!r}: {key}={value!r} must be {want}")

    unknown = sorted(set(data) - set(KEYS)) + sorted(f"dp.{k}" for k in set(data.get("dp", {})) - set(DP_KEYS))
    if unknown:
        raise PolicyRefusal(f"its policy-file {source!r} has unknown keys {unknown}; known: {list(KEYS)}, dp.{list(DP_KEYS)}")
    base = SitePolicy.strict(source)
    values: dict[str, Any] = {}
    tasks = data.get("tasks", ["builtin"])
    if not (isinstance(tasks, list) and all(isinstance(t, str) and t.strip() for t in tasks)):
        raise bad("tasks", tasks, "a list of task names ('tabular', 'package.module:Class')")
    values["tasks"] = tuple(t.strip() for t in tasks)
    for key in ("app-code", "error-values", "data-from-run-config"):
        if key in data:
            if not isinstance(data[key], bool):
                raise bad(key, data[key], "true or false")
            values[key.replace("-", "_")] = data[key]
    if "min-records" in data:
        value = data["min-records"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("min-records", value, "a whole number of at least 1")
        values["min_records"] = value
    dp = data.get("dp", {})
    if not isinstance(dp, dict):
        raise bad("dp", dp, "a table ([dp])")
    if "required" in dp:
        if not isinstance(dp["required"], bool):
            raise bad("dp.required", dp["required"], "true or false")
        values["dp_required"] = dp["required"]
    for key in ("max-epsilon", "delta"):
        if key in dp:
            value = dp[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise bad(f"dp.{key}", value, "a number above 0")
            if key == "delta" and value >= 1:
                raise bad("dp.delta", value, "below 1")
            values[key.replace("-", "_")] = float(value)
    return SitePolicy(**{**base.__dict__, **values})
