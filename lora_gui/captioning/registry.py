"""Captioners by name. Each entry is ``module:Class``, imported only when that captioner is asked for."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from lora_gui.captioning.base import Captioner, CaptionerError

CAPTIONERS = {
    "blip": "lora_gui.captioning.blip:BlipCaptioner",
    "blip-large": "lora_gui.captioning.blip:BlipLargeCaptioner",
    "florence2": "lora_gui.captioning.florence:FlorenceCaptioner",
    "florence2-large": "lora_gui.captioning.florence:FlorenceLargeCaptioner",
    "wd14": "lora_gui.captioning.wd14:Wd14Captioner",
    "template": "lora_gui.captioning.template:TemplateCaptioner",
}
_COMMON_OPTIONS = ("model", "cache_dir")


@dataclass(frozen=True)
class CaptionerInfo:
    name: str
    label: str
    default_model: str | None
    options: tuple[str, ...]  # the keyword options get_captioner accepts for it


def captioner_names() -> list[str]:
    return list(CAPTIONERS)


def captioner_class(name: str) -> type[Captioner]:
    key = (name or "").strip().lower()
    if key not in CAPTIONERS:
        raise CaptionerError(f"Unknown captioner {name!r}. Choose one of: {', '.join(CAPTIONERS)}.")
    module_name, class_name = CAPTIONERS[key].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def captioner_options(cls: type[Captioner]) -> tuple[str, ...]:
    parameters = inspect.signature(cls.__init__).parameters
    return tuple(name for name in parameters if name != "self" and name not in _COMMON_OPTIONS)


def list_captioners() -> list[CaptionerInfo]:
    infos = []
    for name in CAPTIONERS:
        cls = captioner_class(name)
        infos.append(CaptionerInfo(name, cls.label, cls.default_model, captioner_options(cls)))
    return infos


def get_captioner(name: str, model: str | None = None, **options: Any) -> Captioner:
    """Build the captioner called ``name`` (nothing is loaded yet: call ``load`` or let ``caption`` do it).

    ``model`` is a Hugging Face id or a local folder (default: the captioner's own model);
    ``options`` are the captioner's own settings, e.g. ``threshold=0.4`` for wd14.
    """
    cls = captioner_class(name)
    accepted = captioner_options(cls)
    unknown = sorted(set(options) - set(accepted) - {"cache_dir"})
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise CaptionerError(f"The {cls.name} captioner has no option {', '.join(unknown)}; it takes: {takes}.")
    return cls(model=model, **options)
