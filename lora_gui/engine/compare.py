"""Rendering LoRA files at several scales with the same prompt and seed, as a labelled grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_gui.config import TrainingConfig

if TYPE_CHECKING:
    from lora_gui.engine.sampling import SampleSettings

NO_LORA = "no LoRA"
CURRENT_WEIGHTS = "<current weights>"  # a paused run's training adapter as it is in memory (no file)


@dataclass(frozen=True)
class ComparisonCell:
    row: str
    scale: float
    image: object  # PIL.Image


def load_pipeline(config: TrainingConfig, emit=None):
    """The family's pipeline for ``config.model`` on the best device, without any LoRA."""
    from lora_gui.engine.devices import resolve_placement
    from lora_gui.engine.families.detect import with_detected_family
    from lora_gui.engine.families.registry import get_family
    from lora_gui.events import ignore_events

    config = with_detected_family(config, emit)
    family = get_family(config.model.family)
    placement = resolve_placement(config)
    components = family.load(config.model, placement.device, placement.weight_dtype, emit or ignore_events)
    components.ensure_denoiser()
    return family, components, family.build_pipeline(components)


def render_comparison(
    family,
    components,
    pipeline,
    loras: Sequence[str | None],
    scales: Sequence[float],
    settings: SampleSettings,
    progress: Callable[[int, int], None] | None = None,
    labels: Sequence[str] | None = None,
) -> list[ComparisonCell]:
    """Every LoRA (None: the base model) at every scale, same prompt and seed; adapters removed afterwards.

    ``labels`` name the rows (default: the file names). Adapters already in the model (a paused run's
    training adapter) are switched off for the base-model row and inactive for the LoRA rows.
    """
    import torch

    from lora_gui.engine.sampling import pipeline_kwargs

    labels = list(labels) if labels is not None else _row_labels(loras)
    if len(set(labels)) != len(labels) or len(labels) != len(loras):
        raise ValueError("Each LoRA in a comparison needs its own row label; pick each file once.")
    prompt = settings.prompts[0]
    total, done, cells = len(loras) * len(scales), 0, []
    training = [(layer, list(layer.active_adapters))
                for layer in _tuner_layers([components.denoiser, *components.text_encoders])]
    pipeline.set_progress_bar_config(disable=True)
    for index, lora in enumerate(loras):
        adapter = f"compare_{index}"
        from_file = lora is not None and lora != CURRENT_WEIGHTS
        if from_file:
            check_lora_file(lora)
            pipeline.load_lora_weights(lora, adapter_name=adapter)
        row_scales = scales if lora is not None else scales[:1]
        try:
            for scale in row_scales:
                if from_file:
                    pipeline.set_adapters([adapter], adapter_weights=[float(scale)])
                current = _training_adapter_at(training, float(scale)) if lora == CURRENT_WEIGHTS else nullcontext()
                with torch.no_grad(), _adapters_off(components, lora is None), current:
                    kwargs = pipeline_kwargs(family, components, pipeline, prompt, settings, settings.seed)
                    image = pipeline(**kwargs).images[0]
                cells.append(ComparisonCell(row=labels[index], scale=float(scale), image=image))
                done += 1
                if progress:
                    progress(done, total)
        finally:
            if from_file:
                pipeline.delete_adapters([adapter])
    return cells


@contextmanager
def _training_adapter_at(training: list, scale: float):
    """The adapters that were active before the comparison (a paused run's training adapter), active again and
    at ``scale``; their scale is 1 again afterwards."""
    if not training:
        raise ValueError("This model has no training adapter in memory; pick a saved LoRA file instead.")
    for layer, names in training:
        layer.set_adapter(names)
        layer.enable_adapters(True)
        for name in names:
            layer.set_scale(name, scale)
    try:
        yield
    finally:
        for layer, names in training:
            for name in names:
                layer.set_scale(name, 1.0)


def render_on_training_model(
    family,
    components,
    loras: Sequence[str | None],
    scales: Sequence[float],
    settings: SampleSettings,
    progress: Callable[[int, int], None] | None = None,
    labels: Sequence[str] | None = None,
) -> list[ComparisonCell]:
    """``render_comparison`` with a paused run's model (call it on the training thread).

    Loading and switching LoRA files changes which adapters are active and trainable; afterwards the
    training adapter is active and trainable again, exactly as before, and its weights are untouched.
    The global random state is left as it was, so training continues as if nothing happened.
    """
    import torch

    from lora_gui.engine.sampling import modules_on

    modules = [components.denoiser, *components.text_encoders]
    saved = _AdapterSetup(modules)
    device = components.device or torch.device("cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        for module in modules:
            module.eval()
        pipeline = family.build_pipeline(components)
        with torch.random.fork_rng(devices=cuda), modules_on([components.vae], device):
            return render_comparison(family, components, pipeline, loras, scales, settings, progress, labels)
    finally:
        saved.restore()


class _AdapterSetup:
    """The active adapters, on/off switches, requires_grad flags and train/eval modes of some modules."""

    def __init__(self, modules) -> None:
        self.layers = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in _tuner_layers(modules)]
        self.grads = [(param, param.requires_grad) for module in modules for param in module.parameters()]
        self.modes = [(sub, sub.training) for module in modules for sub in module.modules()]

    def restore(self) -> None:
        for layer, active, disabled in self.layers:
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for param, requires_grad in self.grads:
            param.requires_grad_(requires_grad)
        for module, training in self.modes:
            module.training = training


def _tuner_layers(modules) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [layer for module in modules for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


@contextmanager
def _adapters_off(components, switch_off: bool):
    """Switch the adapters already in the model off (for the base-model row), and back on afterwards."""
    layers = [] if not switch_off else [
        layer for layer in _tuner_layers([components.denoiser, *components.text_encoders])
        if not layer.disable_adapters
    ]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _row_labels(loras: Sequence[str | None]) -> list[str]:
    names = [NO_LORA if lora is None else Path(lora).name for lora in loras]
    if len(set(names)) == len(names):
        return names
    return [NO_LORA if lora is None else str(Path(lora)) for lora in loras]


def check_lora_file(path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"LoRA file {path} does not exist.")
    if file.suffix.lower() != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; only safetensors LoRA files are loaded (no pickles).")
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            names = list(handle.keys())
            for name in names:
                handle.get_slice(name)  # each tensor's header must point inside the file
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or damaged. "
                         "Copy it again or pick another file.") from None
    if not names:
        raise ValueError(f"{path} holds no tensors; it is not a LoRA file.")


def grid_image(cells: Sequence[ComparisonCell], scales: Sequence[float]):
    """A labelled grid: one row per LoRA, one column per scale ('no LoRA' fills its row once)."""
    from PIL import Image, ImageDraw

    rows = list(dict.fromkeys(cell.row for cell in cells))
    width, height = cells[0].image.size
    label_w, label_h = label_width(width), 28
    grid = Image.new("RGB", (label_w + width * len(scales), label_h + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, scale in enumerate(scales):
        draw.text((label_w + column * width + 6, 8), f"scale {scale:g}", fill="black")
    for row_index, row in enumerate(rows):
        top = label_h + row_index * height
        draw.text((6, top + height // 2 - 6), _shorten(row, (label_w - 12) // 6), fill="black")
        for cell in (c for c in cells if c.row == row):
            # the base model does not depend on the scale: its one image fills the row
            columns = range(len(scales)) if row == NO_LORA else [list(scales).index(cell.scale)]
            for column in columns:
                grid.paste(cell.image.convert("RGB"), (label_w + column * width, top))
    return grid


def label_width(image_width: int) -> int:
    """The row labels' gutter: 180 px beside large images, narrower beside small ones (never under 96)."""
    return max(96, min(180, image_width))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]
