"""``model.merge_loras``: LoRA files fused into the base model before training.

The route for a distilled model's training adapter and for training on top of a style: each file is
loaded by the family's own diffusers pipeline (kohya/ComfyUI and diffusers files alike), checked to
apply completely, fused at its scale, and unloaded, so the base simply has new weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_gui.engine.errors import TrainingError
from lora_gui.events import Emit, Status

_SCALE_SUFFIX = re.compile(r"^(?P<path>.+?):(?P<scale>[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class MergeEntry:
    path: str
    scale: float = 1.0

    def describe(self) -> str:
        return f"{Path(self.path).name} at scale {self.scale:g}"


def parse_merge_entry(text: str) -> MergeEntry:
    """``path`` or ``path:scale`` (a Windows drive letter is not a scale: ``C:\\loras\\a.safetensors``)."""
    match = _SCALE_SUFFIX.match(text.strip())
    if match:
        return MergeEntry(match.group("path"), float(match.group("scale")))
    return MergeEntry(text.strip())


def merge_loras(family: Any, components: Any, entries: list[str], emit: Emit) -> None:
    """Fuse every LoRA of ``entries`` into ``components`` (in place), in order."""
    from lora_gui.engine.compare import check_lora_file
    from lora_gui.engine.lora_verify import verify_lora_file

    components.ensure_denoiser()
    pipeline = family.build_pipeline(components)
    for index, text in enumerate(entries):
        entry = parse_merge_entry(text)
        try:
            check_lora_file(entry.path)
        except ValueError as exc:
            raise TrainingError(f"model.merge_loras: {exc}", "Fix or remove that entry.") from None
        adapter = f"merged_{index}"
        report = verify_lora_file(pipeline, entry.path, adapter_name=adapter, keep=True)
        if not report.ok:
            _drop(pipeline, adapter)
            problems = "; ".join(report.problems) or f"{report.applied_layers} of {report.file_layers} layers applied"
            raise TrainingError(
                f"model.merge_loras: {entry.path} does not fit this base model ({problems}).",
                f"Merge only LoRAs trained for {family.label}, or remove that entry.",
            )
        pipeline.fuse_lora(lora_scale=entry.scale, adapter_names=[adapter])
        pipeline.unload_lora_weights()
        emit(Status(f"Merged {entry.describe()} into the base model ({report.applied_layers} layers)"))


def _drop(pipeline: Any, adapter: str) -> None:
    try:
        pipeline.delete_adapters([adapter])
    except Exception:  # nothing was loaded under that name
        pass
