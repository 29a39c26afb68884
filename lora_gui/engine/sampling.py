"""Rendering images with the model in memory: validation images during training and comparison grids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_gui.config import SampleSection
from lora_gui.engine.families.base import Components, ModelFamily
from lora_gui.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class SampleSettings:
    prompts: tuple[str, ...]
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int

    @classmethod
    def from_config(cls, sample: SampleSection, resolution: int, multiple: int) -> SampleSettings:
        def snap(value: int) -> int:
            value = value or resolution
            return max(multiple, value // multiple * multiple)

        return cls(
            prompts=tuple(p for p in sample.prompts if p.strip()),  # none: no validation images
            negative_prompt=sample.negative_prompt,
            seed=sample.seed,
            steps=sample.steps,
            guidance_scale=sample.guidance_scale,
            width=snap(sample.width),
            height=snap(sample.height),
        )


@contextmanager
def modules_on(modules: Sequence[torch.nn.Module], device: torch.device):
    """Move modules to ``device`` for a while, then back where each was (caches may have offloaded them)."""
    previous = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, where in zip(modules, previous, strict=True):
            module.to(where)


def encode_sampling_prompt(family: ModelFamily, components: Components, pipeline, prompt: str,
                           settings: SampleSettings) -> dict:
    """A prompt's embeddings for the pipeline; the text encoders visit the device only meanwhile
    (or stay on the CPU when they do not fit next to the model)."""
    from lora_gui.engine.devices import text_encoder_device

    device = text_encoder_device(components.text_encoders, components.device or torch.device("cpu"))
    with modules_on(components.text_encoders, device), torch.no_grad():
        return family.sampling_prompt_kwargs(pipeline, components, prompt, settings.negative_prompt,
                                             settings.guidance_scale, device)


def pipeline_kwargs(family: ModelFamily, components: Components, pipeline, prompt: str,
                    settings: SampleSettings, seed: int, encoded: dict | None = None) -> dict:
    """Everything a pipeline call needs, with the prompt already encoded (``encoded``: from a cache).

    With cached embeddings a large text encoder (Flux's T5) never returns to the device for sampling.
    """
    device = components.device or torch.device("cpu")
    if encoded is None:
        encoded = encode_sampling_prompt(family, components, pipeline, prompt, settings)
    embeds = {key: moved(value, device) for key, value in encoded.items()}
    return dict(
        **embeds, num_inference_steps=settings.steps, **family.guidance_kwargs(settings.guidance_scale),
        width=settings.width, height=settings.height, generator=torch.Generator(device="cpu").manual_seed(seed),
        **family.sample_kwargs(components),
    )


def moved(value: Any, device: torch.device) -> Any:
    """A tensor, or a list of tensors (one per prompt, as some pipelines take them), on ``device``."""
    if isinstance(value, (list, tuple)):
        return type(value)(moved(item, device) for item in value)
    return value.to(device)


def encode_sampling_prompts(family: ModelFamily, components: Components, settings: SampleSettings) -> dict:
    """Embeddings of every validation prompt, on the CPU, for ``render(..., encoded=...)``."""
    components.ensure_text_encoders()
    pipeline = family.build_pipeline(components)
    return {
        prompt: {key: moved(value, torch.device("cpu")) for key, value in
                 encode_sampling_prompt(family, components, pipeline, prompt, settings).items()}
        for prompt in settings.prompts
    }


def render(
    family: ModelFamily,
    components: Components,
    settings: SampleSettings,
    progress: Callable[[int, int], None] | None = None,
    encoded: dict[str, dict] | None = None,
    between_steps: Callable[[], None] | None = None,
) -> list:
    """One PIL image per prompt, each with seed ``settings.seed + index``; leaves global RNG state untouched.

    ``encoded`` maps prompts to embeddings from ``encode_sampling_prompts`` (valid while the text
    encoders are frozen); other prompts are encoded on the spot. ``between_steps`` runs after every
    denoising step (it may raise to abandon the images, for a prompt stop).
    """
    components.ensure_denoiser()
    if any(prompt not in (encoded or {}) for prompt in settings.prompts):
        components.ensure_text_encoders()
    pipeline = family.build_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    denoiser = components.denoiser
    was_training = denoiser.training
    denoiser.eval()
    images = []
    device = components.device or torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)), modules_on([components.vae], device), \
                torch.no_grad():
            for index, prompt in enumerate(settings.prompts):
                kwargs = pipeline_kwargs(family, components, pipeline, prompt, settings, settings.seed + index,
                                         (encoded or {}).get(prompt))
                if between_steps is not None:
                    kwargs["callback_on_step_end"] = _step_callback(between_steps)
                images.append(pipeline(**kwargs).images[0])
                if progress:
                    progress(index + 1, len(settings.prompts))
    finally:
        denoiser.train(was_training)
    return images


def _step_callback(between_steps: Callable[[], None]):
    def on_step_end(_pipeline, _step, _timestep, callback_kwargs):
        between_steps()
        return callback_kwargs

    return on_step_end


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index or 0]
    return []


def save_images(images: Sequence, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:02d}.png"
        tmp = path.with_name(path.name + ".tmp.png")
        image.save(tmp)
        tmp.replace(path)
        paths.append(str(path))
    return paths
