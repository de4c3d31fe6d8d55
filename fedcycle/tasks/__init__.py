"""Tasks: what a data center trains. A task is one small class, in fedcycle or in a user's module:

    class KidneyTask:
        def __init__(self, run_config: dict): ...
        def build_model(self) -> torch.nn.Module: ...
        def site_data(self, node_config: dict) -> tuple[Dataset, Dataset]: ...  # this site's (train, validation)
        def test_data(self) -> Dataset | None: ...                             # the server's held-out set, or None
        # optional:
        def loss(self, outputs, targets) -> torch.Tensor: ...                  # default: cross-entropy
        def metrics(self, outputs, targets) -> dict[str, float]: ...           # default: accuracy
        def metric_collection(self) -> torchmetrics.MetricCollection: ...      # instead of metrics(): over a
                                                                                 # whole split (AUROC)
        primary_metric = ("accuracy", "max")                                     # what "best" means
        run_config_defaults = {"clinic.hidden": 64}      # the task's own run-config keys and their defaults
        metric_ranges = {"loss": (-math.inf, math.inf)}  # a metric's allowed values, beyond the screen's
                                                          # own (accuracy in [0, 1], a loss not negative)
        def train(self, model, loader, optimizer, scheduler, epochs, device) -> dict: ...  # the site's own loop
        def statistics(self, train) -> dict[str, list[float]]: ...  # sums over a site's train split; the
        def use_statistics(self, totals: dict[str, list[float]]): ...  # server adds them up across sites
                                                                         # and hands every site the totals

named in the run config as `task = "mypackage.tasks:KidneyTask"` (built-ins by short name).
`Task` wraps one: it fills in the defaults for what the class leaves out, and turns each mistake
(a class that cannot be imported, a method that raises, a Dataset that yields something other
than `(inputs, targets)`, outputs that do not fit the loss) into one line naming the task, the
method and what was expected. Nothing here knows Flower.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedcycle.batches import batch_size_of, batches, describe, map_tensors, to_device
from fedcycle.config import SiteSettings
from fedcycle.errors import ConfigError, TaskError
from fedcycle.privacy import check_model, fixed_model

# Built-in tasks by short name. Adding one is writing its class and one line here.
BUILTIN = {
    "image-classification": "fedcycle.tasks.image:ImageClassification",
    "tabular": "fedcycle.tasks.tabular:TabularClassification",
    "text": "fedcycle.tasks.text:TextClassification",
    "audio": "fedcycle.tasks.audio:AudioClassification",
}
DIRECTIONS = ("max", "min")
# Metric names that would collide with a metrics.jsonl line's keys or a reply's own keys.
RESERVED_METRIC_NAMES = frozenset({
    "round", "primary_metric", "metrics", "metrics_source", "loss", "seconds", "elapsed", "train_config",
    "sites_evaluation", "timing", "sites", "events", "failed", "num-examples", "epsilon",
})


# a task's own run-config key: a table of its own and a name, as Flower's run config keys are written
TASK_KEY = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)+")


def run_config_defaults(cls: type, spec: str) -> dict[str, bool | int | float | str]:
    """A task class's own run-config keys with their defaults (`run_config_defaults`, a class
    attribute): `{"clinic.hidden": 64}`. The launcher declares them in the app it stages (Flower
    refuses an undeclared key) and `Task` hands them to the class whatever the app declares."""
    value = getattr(cls, "run_config_defaults", {})
    if not isinstance(value, dict):
        raise TaskError(f"task={spec!r}: run_config_defaults={value!r} must be a dict of key -> default, "
                        "e.g. {'clinic.hidden': 64}")
    for key, default in value.items():
        if not (isinstance(key, str) and TASK_KEY.fullmatch(key)):
            raise TaskError(f"task={spec!r}: run_config_defaults key {key!r} must be '<table>.<name>' in lower case "
                            "(e.g. 'clinic.hidden'): a table of the task's own keeps them apart from fedcycle's keys")
        if not isinstance(default, (bool, int, float, str)):
            raise TaskError(f"task={spec!r}: run_config_defaults[{key!r}]={default!r} must be a bool, int, float or "
                            "string (what a run config holds)")
    return dict(value)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": (outputs.argmax(1) == targets).double().mean()}


class BatchMeans:
    """A split's metrics as means over its examples of a task's per-batch `metrics()`."""

    def __init__(self, metrics: Callable) -> None:
        self.metrics, self.sums, self.seen = metrics, {}, 0

    def update(self, outputs: Any, targets: Any) -> None:
        n = batch_size_of(targets)
        for name, value in self.metrics(outputs, targets).items():
            self.sums[name] = self.sums.get(name, 0.0) + (value.double() if isinstance(value, torch.Tensor) else value) * n
        self.seen += n

    def compute(self) -> dict[str, Any]:
        return {k: v / max(self.seen, 1) for k, v in self.sums.items()}


class WholeSplit:
    """A split's metrics from a task's `metric_collection()` (torchmetrics: updated batch by
    batch, computed over everything seen, so AUROC is the split's, not a mean of batches')."""

    def __init__(self, collection: Any, device: torch.device) -> None:
        self.collection = collection.to(device)

    def update(self, outputs: Any, targets: Any) -> None:
        self.collection.update(outputs, targets)

    def compute(self) -> dict[str, Any]:
        return dict(self.collection.compute())


def resolve(spec: str) -> type:
    """The task class that `spec` names: a built-in's short name or `package.module:Class`."""
    target = BUILTIN.get(spec, spec)
    module_name, _, attr = target.partition(":")
    if not (module_name and attr and all(p.isidentifier() for p in module_name.split("."))):
        raise TaskError(f"task={spec!r} is neither a built-in task {sorted(BUILTIN)} nor 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name != err.name and not module_name.startswith(f"{err.name}."):
            raise TaskError(f"task={spec!r}: its module imports {err.name!r}, which is not installed here") from None
        raise TaskError(
            f"task={spec!r} cannot be imported ({err}); put its module in the app folder (flwr run ships it), "
            "install it where the apps run, or name its folder in the node config's task-path"
        ) from None
    except Exception as err:
        raise TaskError(f"task={spec!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from err
    cls = getattr(module, attr, None)
    if cls is None:
        raise TaskError(f"task={spec!r}: module {module_name!r} has no {attr!r}")
    missing = [m for m in ("build_model", "site_data") if not callable(getattr(cls, m, None))]
    if missing:
        raise TaskError(
            f"task={spec!r} lacks {', '.join(m + '()' for m in missing)}; a task defines at least "
            "build_model() and site_data(node_config)"
        )
    return cls


class Task:
    """A task class's instance, with fedcycle's defaults and checks around it."""

    def __init__(self, spec: str, run_config: Mapping[str, Any]) -> None:
        self.name = spec
        self.dp = SiteSettings.from_run_config(run_config).dp
        cls = resolve(spec)
        self.impl = self._call("__init__", cls, {**run_config_defaults(cls, spec), **run_config})
        self.loss: Callable = getattr(self.impl, "loss", None) or cross_entropy
        self.metrics: Callable = getattr(self.impl, "metrics", None) or accuracy
        self.metric_collection: Callable | None = getattr(self.impl, "metric_collection", None)
        self.own_train: Callable | None = getattr(self.impl, "train", None)
        self.primary_metric, self.direction = self._primary_metric()
        self.metric_ranges = self._metric_ranges()
        classes = getattr(self.impl, "classes", None)
        self.classes: list[str] | None = list(classes) if classes is not None else None
        # what the task trains on, in a run folder's name: the task's `label` if it has one
        # (the image task's dataset), else its name (a user's class name)
        self.label = str(getattr(self.impl, "label", "") or spec.rpartition(":")[2])

    def _primary_metric(self) -> tuple[str, str]:
        value = getattr(self.impl, "primary_metric", ("accuracy", "max"))
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
                and value[1] in DIRECTIONS):
            raise TaskError(
                f"task={self.name!r}: primary_metric={value!r} must be (metric name, 'max' or 'min'), "
                "e.g. ('accuracy', 'max') or ('mae', 'min')"
            )
        return value[0], value[1]

    def _metric_ranges(self) -> dict[str, tuple[float, float]]:
        """The task's own ranges for its metrics (and `loss`), which the server holds sites'
        replies to: a name -> (low, high)."""
        value = getattr(self.impl, "metric_ranges", {})
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v) and v[0] <= v[1]
            for k, v in value.items())
        if not ok:
            raise TaskError(f"task={self.name!r}: metric_ranges={value!r} must map a metric name to (low, high), "
                            "e.g. {'loss': (-math.inf, math.inf)}")
        return {k: (float(v[0]), float(v[1])) for k, v in value.items()}

    def _call(self, method: str, fn: Callable, *args: Any) -> Any:
        """A call into the task's code; what it raises comes back naming the task and method."""
        try:
            return fn(*args)
        except ConfigError:
            raise
        except Exception as err:
            raise TaskError(f"task={self.name!r}: {method}() raised {type(err).__name__}: {err}",
                            without_values=f"task={self.name!r}: {method}() raised {type(err).__name__}") from err

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` of the primary metric beats `best` (None: nothing yet)."""
        if value is None or not math.isfinite(value):
            return False
        return best is None or (value > best if self.direction == "max" else value < best)

    def metric_tracker(self, device: torch.device) -> BatchMeans | WholeSplit:
        """What accumulates the task's metrics over a split, batch by batch."""
        if self.metric_collection is None:
            return BatchMeans(self.metrics)
        collection = self._call("metric_collection", self.metric_collection)
        if not all(callable(getattr(collection, m, None)) for m in ("update", "compute", "to")):
            raise TaskError(f"task={self.name!r}: metric_collection() returned {type(collection).__name__}, "
                            "not a torchmetrics Metric or MetricCollection")
        return WholeSplit(collection, device)

    def statistics(self, train) -> dict[str, list[float]] | None:
        """The task's sums over a site's train split (None: the task needs none)."""
        if not callable(getattr(self.impl, "statistics", None)):
            return None
        sums = self._call("statistics", self.impl.statistics, train)
        if not (isinstance(sums, dict) and all(isinstance(k, str) and isinstance(v, (list, tuple))
                                               and all(_is_number(x) for x in v) for k, v in sums.items())):
            raise TaskError(f"task={self.name!r}: statistics() returned {type(sums).__name__}; it returns a dict of "
                            "name -> list of numbers (sums the server adds up across sites)")
        return {k: [float(x) for x in v] for k, v in sums.items()}

    def use_statistics(self, totals: dict[str, list[float]] | None) -> None:
        """Hand the task the sites' summed statistics (a no-op for a task without them)."""
        if totals is not None and callable(getattr(self.impl, "use_statistics", None)):
            self._call("use_statistics", self.impl.use_statistics, totals)

    # -- what the task gives -------------------------------------------------------------

    def build_model(self) -> nn.Module:
        model = self._call("build_model", self.impl.build_model)
        if not isinstance(model, nn.Module):
            raise TaskError(f"task={self.name!r}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
        if self.dp.enabled or self.dp.site_level:  # the server and every site build the same model: fixed, or refused, alike
            if self.dp.fix_model:
                model = fixed_model(model)
            check_model(model, self.name)
        if self.dp.enabled:  # an in-place activation breaks Opacus's per-example gradients; the values are the same
            for module in model.modules():
                if getattr(module, "inplace", False) is True:
                    module.inplace = False
        return model

    def site_data(self, node_config: Mapping[str, Any]):
        data = self._call("site_data", self.impl.site_data, dict(node_config))
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TaskError(f"task={self.name!r}: site_data() returned {type(data).__name__}; it returns (train, validation)")
        for role, dataset in zip(("train", "validation"), data):
            _check_dataset(self.name, f"site_data()'s {role} set", dataset)
        if len(data[0]) == 0:
            raise TaskError(f"task={self.name!r}: site_data() gave this site an empty train set")
        return data[0], data[1]

    def test_data(self):
        if not callable(getattr(self.impl, "test_data", None)):
            return None
        data = self._call("test_data", self.impl.test_data)
        if data is not None:
            _check_dataset(self.name, "test_data()", data)
            if len(data) == 0:
                raise TaskError(f"task={self.name!r}: test_data() returned an empty set; return None if there is none")
        return data

    def initial_model(self, weights: str = "") -> nn.Module:
        """The model the run starts from: `build_model()`, with `model-weights` loaded if given."""
        model = self.build_model()
        if weights:
            load_weights(model, weights)
        return model

    # -- checks before training ------------------------------------------------------------

    def dry_run(self, model: nn.Module, data, device: torch.device, batch_size: int) -> dict[str, Any]:
        """One batch of `data` through the model, the loss and the metrics, without training:
        what a site reports in the pre-flight round (metric names, the shape of an example)."""
        if len(data) == 0:
            raise TaskError(f"task={self.name!r}: the data set to check is empty")
        loader = batches(data, max(1, min(batch_size, len(data))), device, shuffle=False)
        try:
            batch = next(iter(loader))
        except Exception as err:
            raise TaskError(f"task={self.name!r}: the Dataset's items cannot be batched: {type(err).__name__}: {err}") from err
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TaskError(
                f"task={self.name!r}: the Dataset yields {describe(first(batch))} per example, not (inputs, targets); "
                "make __getitem__ return (inputs, targets)"
            )
        inputs, targets = to_device(batch[0], device), to_device(batch[1], device)
        if not (isinstance(inputs, torch.Tensor) or (isinstance(inputs, dict) and all(isinstance(v, torch.Tensor) for v in inputs.values()))):
            raise TaskError(f"task={self.name!r}: the Dataset's inputs are {describe(inputs)}; they must be a tensor or a dict of tensors")
        model = model.to(device).eval()
        with torch.no_grad():
            try:
                outputs = model(inputs)
            except Exception as err:
                raise TaskError(
                    f"task={self.name!r}: the model cannot take the Dataset's inputs {describe(first(inputs))} "
                    f"(batched): {type(err).__name__}: {err}"
                ) from err
            self._check_outputs(outputs, targets, getattr(data, "classes", None))
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                try:
                    loss = self.loss(outputs, targets)
                except Exception as err:
                    raise TaskError(
                        f"task={self.name!r}: the model's outputs {describe(first(outputs))} do not fit loss() with "
                        f"targets {describe(first(targets))}: {type(err).__name__}: {err}"
                    ) from err
                tracker = self.metric_tracker(device)
                self._call("metrics", tracker.update, outputs, targets)
                metrics = self._call("metrics", tracker.compute)
            self._check_warnings(warned, outputs, targets)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TaskError(f"task={self.name!r}: loss() returned {describe(loss)}; it must return one number (a 0-d tensor)")
        if not (isinstance(metrics, dict) and metrics and all(isinstance(k, str) for k in metrics)):
            raise TaskError(f"task={self.name!r}: metrics() returned {metrics!r}; it returns a dict of metric name -> number")
        reserved = sorted(RESERVED_METRIC_NAMES & set(metrics))
        if reserved:
            raise TaskError(f"task={self.name!r}: metrics() names {reserved}, which fedcycle's records use; rename them")
        if self.primary_metric not in metrics:
            raise TaskError(
                f"task={self.name!r}: primary_metric {self.primary_metric!r} is not among metrics()'s keys {sorted(metrics)}"
            )
        return {
            "metric-names": list(metrics),
            "inputs": describe(first(inputs)),
            "targets": describe(first(targets)),
        }


    def _check_outputs(self, outputs: Any, targets: Any, data_classes: Any) -> None:
        """A classifier's outputs hold one logit per class: a model with 12 outputs for 10 classes
        trains without a word otherwise (cross-entropy takes it)."""
        classes = self.classes if self.classes is not None else data_classes
        if not (classes is not None and isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
            return
        one_logit_binary = len(classes) == 2 and outputs.shape[-1:] == (1,)  # BCE with logits: allowed
        if (outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point()
                and outputs.shape[1] != len(classes) and not one_logit_binary):
            raise TaskError(
                f"task={self.name!r}: the model gives {outputs.shape[1]} outputs per example for {len(classes)} classes "
                f"{_short_list(list(classes))}; a classifier gives one logit per class: make its last layer's "
                f"out_features {len(classes)}"
            )

    def _check_warnings(self, warned: list, outputs: Any, targets: Any) -> None:
        """What torch warns of in loss() or metrics(), refused: outputs and targets of different
        shapes broadcast (mse_loss of (N, 1) against (N,) is an N x N loss) and the model learns
        nothing, with a warning lost in a site's log."""
        for warning in warned:
            text = str(warning.message)
            if issubclass(warning.category, UserWarning) and ("target size" in text or "broadcast" in text):
                raise TaskError(
                    f"task={self.name!r}: loss() or metrics() of outputs {describe(outputs)} against targets "
                    f"{describe(targets)} (a batch) broadcasts them: {text.splitlines()[0]} Give the targets the "
                    "outputs' shape (e.g. y[:, None] for a model with one output)"
                )


def _short_list(values: list, limit: int = 4) -> str:
    return repr(values) if len(values) <= limit else repr(values[:limit])[:-1] + ", ...]"


def statistics_mismatch(sums: dict[str, list[float]], reference: dict[str, list[float]] | None) -> str | None:
    """Why one site's statistics cannot be added to the others' (`reference`: another site's), if so."""
    if reference is not None and set(sums) != set(reference):
        return f"statistics keys {sorted(sums)} differ from the other sites' {sorted(reference)}"
    for key, values in sums.items():
        if reference is not None and len(values) != len(reference[key]):
            return f"statistics {key!r} has {len(values)} numbers, the other sites' {len(reference[key])}"
        if not all(math.isfinite(v) for v in values):
            return f"statistics {key!r} holds NaN or Inf"
    return None


def add_up(all_sums: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """The sites' statistics added up key by key, exactly rounded (math.fsum): the same totals
    whatever order the sites come in."""
    return {key: [math.fsum(column) for column in zip(*(s[key] for s in all_sums))] for key in all_sums[0]}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first(value: Any) -> Any:
    """The first example of a batch (a tensor, or a dict / list / tuple of them)."""
    return map_tensors(value, lambda t: t[0] if t.dim() else t)


def _check_dataset(task: str, what: str, data: Any) -> None:
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise TaskError(
            f"task={task!r}: {what} is {type(data).__name__}; it must be a torch.utils.data.Dataset "
            "(with __getitem__ and __len__)"
        )


def fingerprint(model: nn.Module) -> list[str]:
    """The model's arrays as `name:dtype[shape]`: two sites build the same model iff these agree."""
    return [f"{k}:{describe(v)}" for k, v in model.state_dict().items()]


def load_weights(model: nn.Module, path: str) -> None:
    """Starting weights from a local safetensors file (never a hub, never a pickle)."""
    from safetensors import SafetensorError  # lazily: model-weights only
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model-weights={path!r}: no such file")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"model-weights={path!r} is not a readable safetensors file: {err}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    differ = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or differ:
        parts = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs for", differ)) if keys]
        raise ConfigError(f"model-weights={path!r} does not fit the task's model: {'; '.join(parts)}")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own})


def load_task(run_config: Mapping[str, Any]) -> Task:
    """The run's task, from the run config's `task` key."""

    return Task(str(run_config.get("task", SiteSettings.task)), run_config)
