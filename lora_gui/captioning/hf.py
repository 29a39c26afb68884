"""Loading a transformers captioning model and its processor, shared by BLIP and Florence-2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_gui.captioning.base import CaptionerError, Placement
from lora_gui.captioning.weights import (
    TRANSFORMERS_FILES,
    load_pretrained,
    model_folder,
    processor_kwargs,
    read_config,
)
from lora_gui.events import Emit


def load_model_and_processor(model: str, cache_dir: str | None, placement: Placement, progress: Emit, *, what: str,
                             model_types: set[str], classes: Callable[[], tuple[type, type]],
                             hint: str) -> tuple[Any, Any]:
    """Fetch ``model`` (Hub id or folder), check its config names one of ``model_types``, load both parts."""

    def check(folder: Path) -> None:
        check_model_type(folder, model_types, what, hint)

    folder = model_folder(model, TRANSFORMERS_FILES, ["config.json"], what, progress, cache_dir, check)
    model_class, processor_class = classes()
    processor = load_pretrained(lambda: processor_class.from_pretrained(str(folder), **processor_kwargs()),
                                folder, what, hint)
    network = load_pretrained(
        lambda: model_class.from_pretrained(str(folder), dtype=placement.dtype, use_safetensors=True),
        folder, what, hint)
    network.requires_grad_(False)
    network.eval()
    load_pretrained(lambda: network.to(placement.device), folder, what, hint)
    return network, processor


def check_model_type(folder: Path, model_types: set[str], what: str, hint: str) -> None:
    config = read_config(folder)
    found = config.get("model_type")
    if found not in model_types:
        raise CaptionerError(f"{folder} holds a {found or 'unknown'} model, not a {what}. {hint}")
    if "auto_map" in config:
        raise CaptionerError(f"{folder} is a {what} that needs its own Python code (trust_remote_code), which "
                             f"lora-gui does not run. {hint}")
