"""Models by name: fedcycle's own (`MODELS`; adding one is adding one `ModelSpec`) and any of
torchvision's classification models as `torchvision:<name>` (e.g. `torchvision:resnet50`), built
without weights: starting weights come from a local file (`model-weights`), never a hub."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn

from fedcycle.errors import ConfigError


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers: fast on a CPU, about 91% on Fashion-MNIST. With
    `tanh` its activations are bounded, which DP-SGD's clipped gradients favour (Papernot et al.,
    "Tempered Sigmoid Activations for Deep Learning with Differential Privacy")."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, tanh: bool = False) -> None:
        super().__init__()

        def act() -> nn.Module:
            return nn.Tanh() if tanh else nn.ReLU(inplace=True)

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), act(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), act(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), act(), nn.Linear(128, num_classes)
        )

    def forward(self, x):  # noqa: D102
        return self.classifier(self.features(x))


def resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv, no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18  # lazily: torchvision costs seconds to import

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[int, int, int], nn.Module]  # (in_channels, image_size, num_classes)
    image_sizes: tuple[int, ...] | None  # the sizes it is made for; None: any of at least min_size
    min_size: int = 8


MODELS: dict[str, ModelSpec] = {
    "small-cnn": ModelSpec(SmallCNN, image_sizes=(28, 32)),
    "small-cnn-tanh": ModelSpec(functools.partial(SmallCNN, tanh=True), image_sizes=(28, 32)),
    "resnet18": ModelSpec(resnet18, image_sizes=None, min_size=16),
}


TORCHVISION = "torchvision:"


def torchvision_models() -> list[str]:
    """The names of torchvision's classification models."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_model_name(name: str) -> None:
    if name in MODELS:
        return
    if name.startswith(TORCHVISION):
        if name[len(TORCHVISION):] not in torchvision_models():
            raise ConfigError(
                f"image.model={name!r}: torchvision has no classification model {name[len(TORCHVISION):]!r}; "
                f"choose one of torchvision.models.list_models(module=torchvision.models), e.g. 'torchvision:resnet50'"
            )
        return
    raise ConfigError(f"image.model={name!r} is unknown; choose one of {sorted(MODELS)} or 'torchvision:<name>'")


def check_fits(name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    """Raise ConfigError unless model `name` takes images of `shape` and has a class to learn."""
    check_model_name(name)
    channels, height, width = shape
    if num_classes < 2:
        raise ConfigError(f"image.model={name!r} needs at least 2 classes; the dataset has {num_classes}")
    if name.startswith(TORCHVISION):
        if channels != 3:
            raise ConfigError(
                f"image.model={name!r} takes 3-channel images; the dataset's have {channels} "
                "(use small-cnn or resnet18, which take any)"
            )
        return
    spec = MODELS[name]
    if height != width:
        raise ConfigError(f"image.model={name!r} needs square images; the dataset's are {height}x{width}")
    if spec.image_sizes is not None and height not in spec.image_sizes:
        raise ConfigError(
            f"image.model={name!r} takes images of size {list(spec.image_sizes)}; the dataset's are {height}x{width}"
        )
    if height < spec.min_size:
        raise ConfigError(f"image.model={name!r} needs images of at least {spec.min_size}x{spec.min_size}; got {height}")


def build_model(name: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    check_fits(name, shape, num_classes)
    if name.startswith(TORCHVISION):
        import torchvision

        return torchvision.models.get_model(name[len(TORCHVISION):], weights=None, num_classes=num_classes)
    return MODELS[name].build(shape[0], shape[1], num_classes)
