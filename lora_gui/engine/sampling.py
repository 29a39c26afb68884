"""Rendering images with the model in memory: validation images during training and comparison grids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_gui.config import SampleSection
from lora_gui.engine.families.base import Components, ModelFamily


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
            prompts=tuple(p for p in sample.prompts if p.strip()) or ("",),
            negative_prompt=sample.negative_prompt,
            seed=sample.seed,
            steps=sample.steps,
            guidance_scale=sample.guidance_scale,
            width=snap(sample.width),
            height=snap(sample.height),
        )


class ModelsOnDevice:
    """Moves the VAE and text encoders to the training device for sampling, and back afterwards."""

    def __init__(self, components: Components, device: torch.device) -> None:
        self.modules = [components.vae, *components.text_encoders]
        self.device = device
        self.previous = [next(m.parameters()).device for m in self.modules]

    def __enter__(self) -> None:
        for module in self.modules:
            module.to(self.device)

    def __exit__(self, *exc) -> None:
        for module, device in zip(self.modules, self.previous, strict=True):
            module.to(device)


def render(
    family: ModelFamily,
    components: Components,
    settings: SampleSettings,
    seed_offset_per_prompt: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list:
    """One PIL image per prompt with fixed seeds; leaves global RNG state untouched."""
    pipeline = family.build_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    denoiser = components.denoiser
    was_training = denoiser.training
    denoiser.eval()
    images = []
    device = components.device or torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)), ModelsOnDevice(components, device), torch.no_grad():
            for index, prompt in enumerate(settings.prompts):
                seed = settings.seed + (index if seed_offset_per_prompt else 0)
                generator = torch.Generator(device="cpu").manual_seed(seed)
                kwargs = dict(
                    prompt=prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                    width=settings.width, height=settings.height, generator=generator,
                    **family.sample_kwargs(components),
                )
                if settings.negative_prompt and family.name != "flux":
                    kwargs["negative_prompt"] = settings.negative_prompt
                images.append(pipeline(**kwargs).images[0])
                if progress:
                    progress(index + 1, len(settings.prompts))
    finally:
        denoiser.train(was_training)
    return images


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
