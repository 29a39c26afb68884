"""Heavy libraries imported when first used, not when a module that mentions them is imported.

The app's page is built from the model families' descriptions (labels, presets, target layers); their
modules name torch and diffusers throughout, but building the page needs neither. ``lazy_module`` stands
in for a module and imports it on first attribute access (Python caches it in ``sys.modules`` as usual).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


class LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name}>"


def lazy_module(name: str) -> Any:
    return LazyModule(name)


def no_grad(function):
    """``@torch.no_grad()`` without importing torch until the function runs."""

    @functools.wraps(function)
    def without_gradients(*args, **kwargs):
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return without_gradients
