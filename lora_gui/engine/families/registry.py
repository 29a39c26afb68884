"""The model families by name. Family modules import torch and diffusers, so they load on first use."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from lora_gui.engine.families.builtin import builtin_family

if TYPE_CHECKING:
    from lora_gui.engine.families.base import ModelFamily

# name -> "module:class"; adding a family is one line here.
FAMILIES: dict[str, str] = {
    "sd15": "lora_gui.engine.families.sd15:SD15Family",
    "sdxl": "lora_gui.engine.families.sdxl:SDXLFamily",
    "flux": "lora_gui.engine.families.flux:FluxFamily",
    "zimage": "lora_gui.engine.families.zimage:ZImageFamily",
    "flux2-klein": "lora_gui.engine.families.flux2_klein:Flux2KleinFamily",
    "flux2-dev": "lora_gui.engine.families.flux2_dev:Flux2DevFamily",
    "qwen-image": "lora_gui.engine.families.qwen_image:QwenImageFamily",
}


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_class(name: str) -> type[ModelFamily]:
    if name not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise ValueError(f"model.family: unknown model family {name!r}. Choose one of: {known}.")
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(import_module(module_name), class_name)


def get_family(name: str) -> ModelFamily:
    """A new instance of the named family (families hold no state, but instances stay per run)."""
    return family_class(name)()


def family_for_builtin(base: str) -> str:
    """The family of a ``builtin:`` model, e.g. "flux" for builtin:tiny-flux."""
    return builtin_family(base)
