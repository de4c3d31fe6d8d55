"""Every bad run-config or node-config value gives a one-line error naming key, value and what is allowed."""

from __future__ import annotations

import re

import pytest

from fedcycle.config import DPSettings, ConfigError, RunSettings, SiteSettings
from fedcycle.results import used_settings
from fedcycle.site import load_site
from fedcycle.tasks import load_task
from fedcycle.tasks.image import check_node_config
from fedcycle.tasks.image.models import build_model, check_fits
from fedcycle.tasks.image.settings import ImageSettings


def declared_run_config() -> dict:
    """pyproject.toml's declared run config, flat, as Flower gives it to a run: every key's default."""
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {}
    for key, value in declared.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def test_defaults_are_valid_and_match_pyproject():
    flat = declared_run_config()
    settings = RunSettings.from_run_config(flat)
    # The dataclass defaults and pyproject.toml's declared defaults agree.
    assert settings == RunSettings(options=settings.options)
    assert settings.dp == DPSettings()  # the dp table's too
    image = ImageSettings.from_run_config(flat)  # the image task's table, against its own defaults
    assert image == ImageSettings(options=image.options, **{f: getattr(settings, f) for f in ("seed", "data_root")})


def check_as_the_server_does(run_config: dict) -> None:
    """The server's checks before any site is asked: its settings (every key), then the task."""
    RunSettings.from_run_config(run_config)
    load_task(run_config)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"image.dataset": "mnist"}, "image.dataset='mnist' is unknown; choose one of ['cifar10', 'fashion-mnist', 'image-folder']"),
        ({"image.model": "vgg"}, "image.model='vgg' is unknown; choose one of ['resnet18', 'small-cnn', 'small-cnn-tanh'] or 'torchvision:<name>'"),
        ({"image.model": "torchvision:resnet5"}, "image.model='torchvision:resnet5': torchvision has no classification model 'resnet5'"),
        ({"image.model": "torchvision:resnet18"}, "image.model='torchvision:resnet18' takes 3-channel images; the dataset's have 1"),
        ({"image.augment": "crop,rotate"}, "image.augment='crop,rotate': unknown ['rotate']"),
        ({"optimizer": "lion"}, "optimizer='lion' is unknown; choose one of ['adamw', 'sgd']"),
        ({"task": "no_such_pkg.tasks:Kidney"}, "task='no_such_pkg.tasks:Kidney' cannot be imported"),
        ({"task": "kidney"}, "task='kidney' is neither a built-in task ['audio', 'image-classification', 'tabular', 'text'] nor 'package.module:Class'"),
        ({"task": "fedcycle.tasks.image.in_memory:InMemoryImages"}, "task='fedcycle.tasks.image.in_memory:InMemoryImages' lacks build_model(), site_data()"),
        ({"lr-schedule": "step"}, "lr-schedule='step' is unknown; choose one of ['constant', 'cosine', 'exp_range', 'triangular', 'triangular2']"),
        ({"partitioner": "random"}, "partitioner='random' is unknown; choose one of"),
        ({"lr-min": 0.5, "lr-max": 0.1}, "lr-min=0.5 must be between 0 and lr-max=0.1"),
        ({"local-epochs": 0}, "local-epochs=0 must be above 0"),
        ({"local-epochs": -2}, "local-epochs=-2 must be above 0"),
        ({"num-server-rounds": 0}, "num-server-rounds=0 must be above 0"),
        ({"partitioner": "dirichlet", "dirichlet.alpha": 0.0}, "dirichlet.alpha=0.0 must be a number above 0"),
        ({"partitioner": "dirichlet", "dirichlet.alpha": -1.0}, "dirichlet.alpha=-1.0 must be a number above 0"),
        ({"site-eval": "sometimes"}, "site-eval='sometimes' is unknown"),
        ({"num-server-rounds": 2.5}, "num-server-rounds=2.5 must be an integer"),
        ({"image.dataset": "image-folder"}, "classes='': the image-folder dataset needs the class list"),
        ({"partitioner": "label-shards", "label-shards.shards-per-site": 0}, "label-shards.shards-per-site=0 must be an integer"),
        ({"colour": "red"}, "run config key 'colour' is unknown"),
        ({"image.colour": "red"}, "image.colour is not an option of the image task; it takes ['augment', 'dataset', 'image-size', 'model']"),
        ({"image.image-size": 0}, "image.image-size=0 must be above 0"),
        ({"image.image-size": "big"}, "image.image-size='big' must be an integer"),
    ],
)
def test_bad_run_config(override, message):
    """Each caught before any training: by the server's settings, or by the task built from them."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_as_the_server_does(override)


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition-id": 4, "num-partitions": 4}, "partition-id=4 must be in 0..3 (num-partitions=4)"),
        ({"partition-id": -1, "num-partitions": 2}, "partition-id=-1 must be in 0..1"),
        ({"num-partitions": 2}, "partition-id=None in the node config must be an integer"),
        ({"partition-id": 0, "num-partitions": 0}, "num-partitions=0 must be at least 1"),
    ],
)
def test_bad_node_config(node_config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_node_config(node_config, ImageSettings())


def test_missing_data_dir_and_empty_data_dir(tmp_path):
    run_config = {"image.dataset": "image-folder", "classes": "a,b", "data-root": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match=re.escape(f"data-dir='{tmp_path / 'nope'}' does not exist")):
        load_site(run_config, {"data-dir": str(tmp_path / "nope")})
    for name in ("a", "b"):
        (tmp_path / "empty" / name).mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no images"):
        load_site(run_config, {"data-dir": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="data-dir is missing from the node config"):
        check_node_config({"partition-id": 0, "num-partitions": 1}, ImageSettings.from_run_config(run_config))


def test_missing_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"device='cuda:7' is not available"):
        load_site({}, {"partition-id": 0, "num-partitions": 1, "device": "cuda:7"})


def test_model_must_fit_the_images():
    with pytest.raises(ConfigError, match=re.escape("image.model='small-cnn' takes images of size [28, 32]; the dataset's are 64x64")):
        check_fits("small-cnn", (3, 64, 64), 10)
    with pytest.raises(ConfigError, match=re.escape("image.model='resnet18' needs images of at least 16x16; got 8")):
        build_model("resnet18", (3, 8, 8), 10)
    with pytest.raises(ConfigError, match="needs at least 2 classes"):
        build_model("small-cnn", (1, 28, 28), 1)


def test_every_error_is_one_line():
    for bad in ({"lr-min": 1.0}, {"image.dataset": "x"}, {"local-epochs": 0}, {"task": "x.y:Z"}):
        with pytest.raises(ConfigError) as err:
            check_as_the_server_does(bad)
        assert "\n" not in str(err.value)


def test_unknown_strategy_is_refused_before_start_up():
    from fedcycle.strategies import resolve_strategy

    with pytest.raises(ConfigError, match=re.escape("strategy='fedsomething' is unknown; choose one of")):
        resolve_strategy("fedsomething")


def test_a_site_reads_only_the_keys_it_owns():
    """A site builds its task and data from its own keys; a bad value of the server's own (a
    timeout, the screen, the tracking) is the server's to refuse, not every site's."""
    server_only = {"round-timeout": -1.0, "optimizer": "lion", "tracking": "nowhere", "train-subset": 10}
    with pytest.raises(ConfigError):
        RunSettings.from_run_config(server_only)
    site = SiteSettings.from_run_config(server_only)
    assert site.train_subset == 10 and not hasattr(site, "round_timeout")
    with pytest.raises(ConfigError, match=re.escape("val-fraction=1.5 must be in [0, 1)")):
        SiteSettings.from_run_config({**server_only, "val-fraction": 1.5})


@pytest.mark.parametrize("choices, tables", [
    ({"task": "tabular"}, {"tabular", "dp"}),
    ({"task": "tests.user_tasks:BloodPressure", "clinic.hidden": 64}, {"clinic", "dp"}),  # a task's own table
    ({"partitioner": "dirichlet", "strategy": "fedprox"}, {"image", "dirichlet", "fedprox", "dp"}),
])
def test_the_settings_a_run_records_hold_only_the_tables_it_uses(choices, tables):
    """Flower gives every run every declared default: a regression's config.json said
    `dataset: fashion-mnist, model: small-cnn`, the image task's, and every strategy's options."""
    settings = RunSettings.from_run_config({**declared_run_config(), **choices})
    assert set(used_settings(settings)["options"]) == tables
    assert used_settings(settings)["options"]["dp"] == settings.options["dp"]
