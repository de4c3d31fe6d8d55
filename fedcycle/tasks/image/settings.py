"""The image task's settings: the site's (`SiteSettings`) and its own, from its `image.` table
(`image.dataset`, `image.model`, `image.image-size`, `image.augment`), each with its default here."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from fedcycle.config import SiteSettings, coerce, positive
from fedcycle.errors import ConfigError


@dataclass(frozen=True)
class ImageSettings(SiteSettings):
    dataset: str = "fashion-mnist"
    model: str = "small-cnn"
    image_size: int = 32
    augment: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ImageSettings":
        site = SiteSettings.from_run_config(run_config)
        own = {f.name.replace("_", "-"): f.name for f in fields(cls) if f not in fields(SiteSettings)}
        values: dict[str, Any] = {}
        for key, value in site.options.get("image", {}).items():
            if key not in own:
                raise ConfigError(f"image.{key} is not an option of the image task; it takes {sorted(own)}")
            values[own[key]] = coerce(f"image.{key}", value, type(getattr(cls, own[key])))
        settings = cls(**{f.name: getattr(site, f.name) for f in fields(SiteSettings)}, **values)
        positive("image.image-size", settings.image_size)
        return settings

    __hash__ = SiteSettings.__hash__
