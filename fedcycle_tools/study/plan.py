"""A study's profile and its plan: which runs there are, with which run config, which are done.

The study runs in two phases: tuning (every method's grid at the tuning cell, chosen on the sites'
validation data) and the comparison (every method in every cell with its chosen setting).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fedcycle.config import current_keys
from fedcycle.tasks import load_task
from fedcycle_tools import demo_data
from fedcycle_tools.launcher import parse_pairs

METHODS = ("centralized-constant", "centralized-cyclical", "fedavg-constant", "fedavg-cyclical", "fedcycle",
           "fedavgm", "fedadam")
# method -> the lr_grid entry it is tuned on; `fedcycle` (a server-side recipe: schedule
# envelope, cycles across rounds, server momentum, averaging of cycle ends) only where a
# study file has a `fedcycle` grid, and so for the server optimizers
GRID_OF = {"centralized-constant": "constant", "centralized-cyclical": "cyclical", "fedavg-constant": "constant",
           "fedavg-cyclical": "cyclical", "fedcycle": "fedcycle", "fedavgm": "fedavgm", "fedadam": "fedadam"}
# Flower's server optimizers, as methods: a constant local rate (`lr-max`) and the strategy's
# own options as `<strategy>.<option>` (server momentum, server learning rate, eta, tau)
SERVER_OPTIMIZERS = ("fedavgm", "fedadam")
# the keys a `fedcycle` recipe may set, besides lr-min/lr-max/cycle-rounds: run-config keys,
# `strategy` and its `<strategy>.<option>` keys, and when the server starts averaging cycle
# ends as a fraction of the run's rounds
RECIPE_KEYS = ("schedule", "lr-min", "lr-max", "cycle-rounds", "lr-envelope", "lr-decay", "lr-warmup-rounds",
               "swa-start-fraction", "strategy")


class StudyError(ValueError):
    """A study file that cannot work; the message names the key."""


@dataclass(frozen=True)
class Split:
    name: str
    partitioner: str
    alpha: float | None = None


@dataclass(frozen=True)
class Study:
    profile: str
    dataset: str  # an image task's (`image.dataset`, `image.model`); "" with `demo_data`
    model: str
    epoch_budget: int
    sites: tuple[int, ...]
    local_epochs: tuple[int, ...]
    splits: tuple[Split, ...]
    seeds: tuple[int, ...]
    repeat_seeds: tuple[int, ...]  # seeds for the repeat cells (tuning_sites sites, repeat_splits) in the comparison
    grid: dict[str, tuple[dict, ...]]  # "constant" / "cyclical" / "fedcycle" -> settings to try
    tuning_sites: int = 4
    repeat_splits: tuple[str, ...] = ("iid",)
    run_config: dict[str, Any] = field(default_factory=dict)  # shared run-config keys (subsets, batch size)
    output: str = ""
    tracking: str = "mlflow"  # every run into one MLflow experiment per profile, or "off"
    mlflow_tracking_uri: str = ""  # default: a SQLite store in the study's output folder
    # Fixed communication (the paper's constraint): every federated run takes `rounds` rounds
    # whatever its local epochs, and centralized runs take `epoch_budget` epochs. 0: the
    # epoch budget (federated runs take epoch_budget / local epochs rounds).
    rounds: int = 0
    # the methods to run (a study file's `methods`: method -> the local epochs it runs at, [] for
    # a centralized one); default: every method whose grid the file has, at every local epochs
    method_local_epochs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # tune every method in every split at each of its local epochs, not once at the tuning cell
    tune_every_cell: bool = False
    # more seeds for the two best federated methods of a repeat cell when, after its repeat
    # seeds, they differ by less than two standard errors (of the paired difference)
    close_call_seeds: tuple[int, ...] = ()
    # another built-in task instead of an image one: fedcycle_tools.demo_data's `audio` (spoken
    # digits, one accent per site: non-IID by nature), made under the data root
    demo_data: str = ""
    # more studies whose records join this one's report (study files, relative to this one)
    parts: tuple["Study", ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> "Study":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise StudyError(f"{path}: cannot read the study file: {err}") from None
        if not isinstance(raw, dict):
            raise StudyError(f"{path}: a study file is a YAML mapping")

        def need(key: str, kind: type) -> Any:
            if key not in raw:
                raise StudyError(f"{path}: '{key}' is missing")
            if not isinstance(raw[key], kind):
                raise StudyError(f"{path}: '{key}' must be a {kind.__name__}, not {raw[key]!r}")
            return raw[key]

        splits = []
        for item in need("splits", list):
            if not isinstance(item, dict) or "name" not in item or "partitioner" not in item:
                raise StudyError(f"{path}: each of 'splits' needs 'name' and 'partitioner', got {item!r}")
            splits.append(Split(item["name"], item["partitioner"], item.get("alpha")))
        grid = need("lr_grid", dict)
        optional = {"fedcycle", *SERVER_OPTIMIZERS}
        if not {"constant", "cyclical"} <= set(grid) <= {"constant", "cyclical", *optional}:
            raise StudyError(
                f"{path}: 'lr_grid' needs 'constant' and 'cyclical', and may have {sorted(optional)}; got {sorted(grid)}"
            )
        for name in SERVER_OPTIMIZERS:
            for setting in grid.get(name, []):
                unknown = [k for k in setting if k != "lr-max" and not k.startswith(f"{name}.")]
                if "lr-max" not in setting or unknown:
                    raise StudyError(f"{path}: lr_grid.{name}: each setting has 'lr-max' (the sites' constant rate) "
                                     f"and '{name}.<option>' keys; got {setting!r}")
        for recipe in grid.get("fedcycle", []):
            unknown = [k for k in recipe if k not in RECIPE_KEYS and "." not in k]
            if unknown:
                raise StudyError(f"{path}: lr_grid.fedcycle: {unknown} unknown; a recipe may set {list(RECIPE_KEYS)} "
                                 "and '<strategy>.<option>'")
        study = cls(
            profile=need("profile", str),
            dataset="" if raw.get("demo_data") else need("dataset", str),
            model="" if raw.get("demo_data") else need("model", str),
            epoch_budget=need("epoch_budget", int),
            sites=tuple(need("sites", list)),
            local_epochs=tuple(need("local_epochs", list)),
            splits=tuple(splits),
            seeds=tuple(need("seeds", list)),
            repeat_seeds=tuple(raw.get("repeat_seeds", raw["seeds"])),
            grid={k: tuple(v) for k, v in grid.items()},
            tuning_sites=raw.get("tuning_sites", 4),
            repeat_splits=tuple(raw.get("repeat_splits", ["iid"])),
            run_config=dict(raw.get("run_config", {})),
            output=raw.get("output", ""),
            tracking=raw.get("tracking", "mlflow"),
            mlflow_tracking_uri=raw.get("mlflow_tracking_uri", ""),
            rounds=raw.get("rounds", 0),
            method_local_epochs={m: tuple(les) for m, les in (raw.get("methods") or {}).items()},
            tune_every_cell=raw.get("tune_every_cell", False),
            close_call_seeds=tuple(raw.get("close_call_seeds", [])),
            demo_data=raw.get("demo_data", ""),
            parts=tuple(cls.load(path.parent / part) for part in raw.get("also", [])),
        )
        if study.demo_data and study.demo_data not in DEMO_TASKS:
            raise StudyError(f"{path}: demo_data={study.demo_data!r}; choose one of {list(DEMO_TASKS)}")
        if study.tracking not in ("mlflow", "off"):
            raise StudyError(f"{path}: 'tracking' is {study.tracking!r}; choose 'mlflow' or 'off'")
        if not isinstance(study.rounds, int) or study.rounds < 0:
            raise StudyError(f"{path}: 'rounds' is {study.rounds!r}; give a positive number of rounds, or 0 for the epoch budget")
        for le in study.local_epochs:
            if not isinstance(le, int) or le < 1 or (not study.rounds and study.epoch_budget % le):
                raise StudyError(f"{path}: local_epochs {le} must be a positive divisor of epoch_budget={study.epoch_budget}")
        for method, les in study.method_local_epochs.items():
            if method not in METHODS or GRID_OF[method] not in study.grid:
                raise StudyError(f"{path}: methods: {method!r} is not a method with a grid in lr_grid; the methods are "
                                 f"{list(METHODS)}, each tuned on lr_grid.<{'|'.join(sorted(set(GRID_OF.values())))}>")
            if method.startswith("centralized") and les:
                raise StudyError(f"{path}: methods.{method}: a centralized method has no local epochs; give []")
            if not set(les) <= set(study.local_epochs):
                raise StudyError(f"{path}: methods.{method}: local epochs {list(les)} not all among local_epochs "
                                 f"{list(study.local_epochs)}")
        unknown = set(study.repeat_splits) - {s.name for s in study.splits}
        if unknown:
            raise StudyError(f"{path}: repeat_splits {sorted(unknown)} are not among the splits")
        if study.tuning_sites not in study.sites:
            raise StudyError(f"{path}: the tuning cell (tuning_sites={study.tuning_sites}) must be among the sites")
        return study

    @property
    def mlflow_experiment(self) -> str:
        return f"fedcycle-study-{self.profile}"

    @property
    def methods(self) -> tuple[str, ...]:
        if self.method_local_epochs:
            return tuple(m for m in METHODS if m in self.method_local_epochs)
        return tuple(m for m in METHODS if GRID_OF[m] in self.grid)

    @property
    def tuning_split(self) -> Split:
        """Where a method is tuned (without `tune_every_cell`) and centralized pools its sites:
        the iid split, or the first where there is none (a task whose sites are its own folders)."""
        return next((s for s in self.splits if s.name == "iid"), self.splits[0])

    def demo_data_folder(self, data_root: str) -> Path:
        return Path(data_root or "~/.cache/fedcycle").expanduser().resolve() / "study" / self.demo_data

    def make_demo_data(self, data_root: str) -> None:
        """The demo data under `data_root`, made where it is not yet (a few minutes, once)."""
        if self.demo_data:
            self.demo_data_folder(data_root).mkdir(parents=True, exist_ok=True)
            DEMO_TASKS[self.demo_data][0](self.demo_data_folder(data_root))

    def task_config(self, data_root: str) -> dict[str, Any]:
        """The run-config keys of the study's task: the image dataset and model, or the demo
        data's task and where its data is (`make_demo_data` makes it)."""
        if not self.demo_data:
            return {"image.dataset": self.dataset, "image.model": self.model}
        return parse_pairs(DEMO_TASKS[self.demo_data][1](self.demo_data_folder(data_root)), f"demo_data {self.demo_data}")

    @property
    def task_name(self) -> str:
        return f"{self.dataset}/{self.model}" if not self.demo_data else f"{self.demo_data} (fedcycle_tools.demo_data)"

    def local_epochs_of(self, method: str) -> tuple[int, ...]:
        return self.method_local_epochs.get(method) or self.local_epochs

    def rounds_of(self, run: "PlannedRun") -> int:
        """Rounds of a federated run (the fixed `rounds`, or the epoch budget over its local
        epochs); epochs of a centralized one."""
        if not run.federated:
            return self.epoch_budget
        return self.rounds or self.epoch_budget // run.local_epochs

    def tuning_cell(self, method: str, split: str, local_epochs: int) -> str:
        """The name a method's chosen setting goes by: the method, or with `tune_every_cell` the
        method in that split at those local epochs (centralized: pooled, tuned once)."""
        if not self.tune_every_cell or method.startswith("centralized"):
            return method
        return f"{method}/{split}/le{local_epochs}"

    def output_dir(self) -> Path:
        """`output` if the profile names one, else `docs/results` for the default profile and
        `results/reproduce/<profile>` for the others, under the folder the study runs from."""
        if self.output:
            return Path(self.output).resolve()
        return Path("docs/results").resolve() if self.profile == "default" else Path("results/reproduce", self.profile).resolve()


@dataclass(frozen=True)
class PlannedRun:
    """One run of the study. Its key names what it computes, not the phase that asked for it,
    so the comparison reuses a tuning run with the same method, cell, seed and setting."""

    method: str
    split: Split
    sites: int
    local_epochs: int
    seed: int
    lr: dict  # the lr settings tried or chosen

    @property
    def federated(self) -> bool:
        return not self.method.startswith("centralized")

    @property
    def key(self) -> str:
        lr = "-".join(f"{k}{v}" for k, v in sorted(self.lr.items()))
        where = f"{self.split.name}-s{self.sites}-le{self.local_epochs}" if self.federated else "pooled"
        return f"{self.method}-{where}-seed{self.seed}-{lr}"


def tuning_plan(study: Study) -> list[PlannedRun]:
    """Every method's grid at the tuning cell (iid, `tuning_sites`, its fewest local epochs,
    the first seed), or with `tune_every_cell` in every split at each of its local epochs."""
    tuning_split = study.tuning_split
    runs = []
    for method in study.methods:
        if method.startswith("centralized") or not study.tune_every_cell:
            cells = [(tuning_split, min(study.local_epochs_of(method)))]
        else:
            cells = [(split, le) for split in study.splits for le in study.local_epochs_of(method)]
        for split, le in cells:
            for lr in study.grid[GRID_OF[method]]:
                runs.append(PlannedRun(method, split, study.tuning_sites, le, study.seeds[0], dict(lr)))
    return runs


def comparison_plan(study: Study, chosen: dict[str, dict], done: dict[str, dict] | None = None) -> list[PlannedRun]:
    """Every method in every cell with the setting chosen for it (`chosen`: by tuning cell);
    given the runs `done`, also the close calls' extra seeds (see `close_calls`)."""
    runs = []
    tuning_split = study.tuning_split
    federated = [m for m in study.methods if not m.startswith("centralized")]
    for method in study.methods:  # centralized: the pooled data of the tuning cell's sites, whatever the split
        if method.startswith("centralized"):
            for seed in study.repeat_seeds:
                runs.append(PlannedRun(method, tuning_split, study.tuning_sites, 1, seed, chosen[method]))
    for split in study.splits:
        for sites in study.sites:
            repeat = split.name in study.repeat_splits and sites == study.tuning_sites
            seeds = study.repeat_seeds if repeat else study.seeds
            for le in study.local_epochs:
                for method in federated:
                    if le not in study.local_epochs_of(method):
                        continue
                    setting = chosen[study.tuning_cell(method, split.name, le)]
                    runs.extend(PlannedRun(method, split, sites, le, seed, setting) for seed in seeds)
    return runs + close_calls(study, runs, done) if done is not None else runs


def close_calls(study: Study, runs: list[PlannedRun], done: dict[str, dict]) -> list[PlannedRun]:
    """`close_call_seeds` runs of the two best federated methods of each cell whose runs are all
    done and where those two differ (paired by seed, final test accuracy) by less than two
    standard errors: three seeds cannot tell them apart."""
    extra = []
    cells: dict[tuple, dict[tuple, list[PlannedRun]]] = {}
    for run in runs:
        if run.federated:
            cells.setdefault((run.split.name, run.sites), {}).setdefault((run.method, run.local_epochs), []).append(run)
    for methods in cells.values():
        if not study.close_call_seeds or any(r.key not in done for group in methods.values() for r in group):
            continue
        finals = {m: {r.seed: done[r.key]["final_accuracy"] for r in group} for m, group in methods.items()}
        if len(finals) < 2:
            continue
        best, second = sorted(finals, key=lambda m: -statistics.fmean(finals[m].values()))[:2]
        diffs = [finals[best][s] - finals[second][s] for s in finals[best].keys() & finals[second].keys()]
        if len(diffs) > 1 and statistics.fmean(diffs) < 2 * statistics.stdev(diffs) / math.sqrt(len(diffs)):
            for method in (best, second):
                first = methods[method][0]
                extra += [replace(first, seed=seed) for seed in study.close_call_seeds if seed not in finals[method]]
    return extra


def tuning_cells(study: Study) -> list[str]:
    return list(dict.fromkeys(study.tuning_cell(r.method, r.split.name, r.local_epochs) for r in tuning_plan(study)))


def choose(study: Study, summaries: dict[str, dict]) -> dict[str, dict]:
    """Per tuning cell, the lr setting with the best final validation accuracy in tuning."""
    tried: dict[str, list] = {}
    for i, run in enumerate(tuning_plan(study)):
        if run.key in summaries:
            cell = study.tuning_cell(run.method, run.split.name, run.local_epochs)
            tried.setdefault(cell, []).append((summaries[run.key]["final_val_accuracy"], i, run.lr))
    return {cell: max(runs, key=lambda t: (t[0], -t[1]))[2] for cell, runs in tried.items()}


def lr_run_config(run: PlannedRun, rounds: int) -> dict[str, Any]:
    """The run-config keys for a run's learning-rate setting.

    A cyclical setting gives its cycle as `cycle-rounds` (federated: rounds of local
    training) and `cycle-epochs` (centralized: epochs over the pooled data). A `fedcycle`
    recipe adds its envelope, strategy and, as `swa-start-fraction`, the point of the run
    (a fraction of its rounds) from which the server averages the cycle ends."""
    if run.method == "fedcycle":
        recipe = {k: v for k, v in run.lr.items() if k not in ("schedule", "cycle-rounds", "swa-start-fraction")}
        return {
            "lr-schedule": run.lr.get("schedule", "triangular"),
            "lr-cycle-unit": "round",
            "lr-cycle-length": float(run.lr.get("cycle-rounds", 1)),
            **recipe,
            **({"swa-start": max(1, math.ceil(run.lr["swa-start-fraction"] * rounds))} if "swa-start-fraction" in run.lr else {}),
        }
    if run.method in SERVER_OPTIMIZERS:
        return {"lr-schedule": "constant", "lr-min": 0.0, "strategy": run.method, **run.lr}
    if GRID_OF[run.method] == "constant":
        return {"lr-schedule": "constant", "lr-max": run.lr["lr-max"], "lr-min": 0.0}
    unit, length = ("round", run.lr.get("cycle-rounds", 1)) if run.federated else ("epochs", run.lr.get("cycle-epochs", 1))
    return {
        "lr-schedule": run.lr.get("schedule", "triangular"),
        "lr-min": run.lr["lr-min"],
        "lr-max": run.lr["lr-max"],
        "lr-cycle-unit": unit,
        "lr-cycle-length": float(length),
    }


def run_config_for(study: Study, run: PlannedRun, data_root: str) -> dict[str, Any]:
    config = {
        **study.task_config(data_root),
        "partitioner": run.split.partitioner,
        "seed": run.seed,
        "local-epochs": run.local_epochs,
        "num-server-rounds": study.rounds_of(run),
        "site-eval": "evaluate-round",  # the validation accuracy that tuning reads
        **({"data-root": data_root} if data_root else {}),
        **study.run_config,
        **lr_run_config(run, study.rounds_of(run)),
    }
    if run.split.alpha is not None:
        config[f"{run.split.partitioner}.alpha"] = float(run.split.alpha)
    return config


def model_bytes(study: Study) -> int:
    model = load_task(study.task_config("")).build_model()
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# where a run ran and where it was watched, not what it computed
VOLATILE_KEYS = ("results-dir", "run-name", "data-root", "tracking", "mlflow-tracking-uri", "mlflow-experiment")
# the demo data a study can run on: kind -> (what makes it in a folder, its run config there), and
# the keys that say where the data was made (not what it is)
DEMO_TASKS = {"audio": (demo_data.audio, demo_data.audio_run_config)}
DEMO_DATA_PATHS = ("audio.data-dir", "audio.test-dir")


def check_same_config(study: Study, run: PlannedRun, summary: dict, data_root: str) -> None:
    """Refuse to reuse a finished run that was made with another study file (budget, data, model)."""
    volatile = (*VOLATILE_KEYS, *DEMO_DATA_PATHS)
    planned = {k: v for k, v in run_config_for(study, run, data_root).items() if k not in volatile}
    # a summary written before a key moved names it the old way
    saved = {k: v for k, v in current_keys(summary.get("run_config", {})).items() if k not in volatile}
    if planned != saved:
        differ = sorted(k for k in planned.keys() | saved.keys() if planned.get(k) != saved.get(k))
        raise StudyError(
            f"runs/{run.key}.json was made with another run config (differs in {differ}); the study file changed "
            f"since. Move {study.output_dir() / 'runs'} away to start over, or restore the study file."
        )


def load_done(runs_dir: Path) -> dict[str, dict]:
    """The finished runs' summaries, by key."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*.json"))}


def missing_runs(study: Study, done: dict) -> int:
    tuning = tuning_plan(study)
    if any(r.key not in done for r in tuning):
        return sum(r.key not in done for r in tuning) + len(comparison_plan(study, {c: {} for c in tuning_cells(study)}))
    return sum(r.key not in done for r in comparison_plan(study, choose(study, done), done))
