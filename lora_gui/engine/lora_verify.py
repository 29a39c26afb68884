"""Check a written LoRA file: load it into a pipeline and report whether every layer was applied.

Loader limits found with diffusers 0.42 / transformers 5 (``verify_lora_file`` reports them):
diffusers reads ``lora_transformer_*`` Flux keys only for attention layers (ComfyUI reads all of
them), so for Flux feed-forward/single-block targets use the diffusers file in diffusers.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class LoraFileReport:
    """What happened when a LoRA file was loaded into a pipeline."""

    path: str
    file_tensors: int
    file_layers: int
    applied_layers: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.applied_layers == self.file_layers


# ----------------------------------------------------------------------------- checking


def lora_deltas(module: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``scale * B @ A`` per adapted layer (the low-rank update, without DoRA's rescaling)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
            down = layer.lora_A[adapter_name].weight.detach().float()
            up = layer.lora_B[adapter_name].weight.detach().float()
            delta = up.flatten(1) @ down.flatten(1)
            shape = layer.get_base_layer().weight.shape
            deltas[name] = (layer.scaling[adapter_name] * delta).reshape(shape)
    return deltas


class _CollectLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))  # no terminal colours


def _file_layers(path: str | os.PathLike) -> tuple[int, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())
    downs = [n for n in names if n.endswith((".lora_down.weight", ".lora_A.weight"))]
    return len(names), len(downs)


def verify_lora_file(pipeline: Any, path: str | os.PathLike, adapter_name: str = "verify",
                     keep: bool = False) -> LoraFileReport:
    """Load a LoRA file into ``pipeline`` and report whether every layer in it was applied.

    The adapter is removed again unless ``keep``; a loader failure becomes a problem in the report.
    """
    file_tensors, file_layers = _file_layers(path)
    messages, problems = _load_collecting_messages(pipeline, path, adapter_name)
    problems += [m for m in messages if _is_key_problem(m)]
    applied = _applied_layers(pipeline, adapter_name)
    if applied and not keep:
        pipeline.delete_adapters(adapter_name)
    return LoraFileReport(str(path), file_tensors, file_layers, applied, problems)


def _load_collecting_messages(pipeline: Any, path, adapter_name: str) -> tuple[list[str], list[str]]:
    handler = _CollectLogs()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    failures: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
            except Exception as exc:  # the loader's failure is the finding
                failures.append(f"load_lora_weights failed ({type(exc).__name__}: {exc})")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return handler.messages + [str(w.message) for w in caught], failures


def _is_key_problem(message: str) -> bool:
    """Loader messages that mean tensors in the file were not applied (the rest are informational)."""
    text = message.lower()
    if text.startswith("no lora keys associated"):  # a component the file has no layers for
        return False
    unmatched = "lora" in text and ("unexpected" in text or "missing" in text)
    return unmatched or "dora_scale" in text or "not been correctly renamed" in text


def _applied_layers(pipeline: Any, adapter_name: str) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(
        1
        for component in _lora_components(pipeline)
        for layer in component.modules()
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A
    )


def _lora_components(pipeline: Any) -> list[torch.nn.Module]:
    names = getattr(pipeline, "_lora_loadable_modules", [])
    return [getattr(pipeline, name) for name in names if getattr(pipeline, name, None) is not None]
