"""Step time and peak accelerator memory of LoRA training on full-size architectures.

Builds each family's denoiser from its published config with random weights (speed and memory do
not depend on the weights), attaches LoRA as training does, and times optimizer steps on random
latents and text embeddings, as a run with the latent and text caches filled does.

    python bench/train_step.py --family sdxl --preset sdxl-24gb --steps 20
    python bench/train_step.py --family sd15 --tiny           # CPU smoke test with the built-in model

Prints one JSON line per configuration: sec_per_step, peak_gib, achieved TFLOP/s (the step's FLOPs as the
memory planner counts them in its trace, divided by the measured time).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lora_gui.config import build_config
from lora_gui.engine.families.base import Components, Conditioning
from lora_gui.engine.families.registry import get_family
from lora_gui.engine.lora import inject_lora, lora_parameters
from lora_gui.engine.optim import build_optimizer
from lora_gui.engine.planner import plan_memory
from lora_gui.engine.planner.architecture import build_on_meta, denoiser_config
from lora_gui.engine.quantize import quantize_denoiser


def build_denoiser(config, family, dtype: torch.dtype, device: torch.device):
    """The denoiser the memory planner would trace (its published or local config), with random weights."""
    architecture = denoiser_config(family, config.model)
    model = build_on_meta(architecture).to(dtype).to_empty(device=device)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    return model.requires_grad_(False), architecture


def random_inputs(family, architecture: dict, batch: int, resolution: int, device, dtype):
    latents, embeds, conditioning = family.planning_inputs(architecture, batch, resolution, resolution, dtype)
    latents = torch.randn(latents.shape, device=device)
    embeds = {key: torch.randn(value.shape, device=device, dtype=value.dtype) for key, value in embeds.items()}
    return latents, embeds, conditioning


def run(args) -> dict:
    config = build_config(preset=args.preset, overrides=args.set)
    family = get_family(config.model.family)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        components = family.load(config.model, device, dtype, lambda event: None)
        denoiser = components.denoiser
    else:
        denoiser, architecture = build_denoiser(config, family, dtype, device)
        components = Components(denoiser=denoiser, vae=None, text_encoders=[], tokenizers=[], scheduler=None,
                                source="random", device=device, weight_dtype=dtype)
    quantize_denoiser(denoiser, config.model.quantize, device)
    modules = {family.denoiser_key: denoiser}
    torch.manual_seed(0)
    inject_lora(modules, {family.denoiser_key: family.lora_targets(config.lora.targets, denoiser)}, config.lora)
    if config.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    params = lora_parameters(modules)[family.denoiser_key]
    optimizer = build_optimizer([{"params": params, "lr": config.train.learning_rate}], config.train)
    if components.scheduler is None:
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        components.scheduler = (DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
                                if config.model.family in ("sd15", "sdxl") else FlowMatchEulerDiscreteScheduler())
    objective = family.make_objective(components, config.train)
    resolution = config.dataset.resolution if not args.tiny else 64
    batch = config.train.batch_size
    if args.tiny:
        embeds = family.encode_prompts(components, ["a photo"] * batch)
        channels = components.vae.config.get("z_dim") or components.vae.config.latent_channels
        latents = torch.randn(batch, channels, resolution // 8, resolution // 8)
        conditioning = [Conditioning((resolution, resolution), (0, 0), (resolution, resolution))] * batch
    else:
        latents, embeds, conditioning = random_inputs(family, architecture, batch, resolution, device, dtype)
    generator = torch.Generator().manual_seed(0)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        noised = objective.add_noise(latents, generator)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            prediction = family.predict(components, noised.noisy.to(dtype), noised.timesteps, embeds, conditioning,
                                        config.train)
            loss = objective.loss(prediction, noised)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    measured = times[args.warmup:]
    sec = sorted(measured)[len(measured) // 2]
    step_tflop = plan_memory(config).step_flops / config.train.gradient_accumulation / 1e12  # counted by the planner
    return {
        "preset": args.preset, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "resolution": resolution, "batch": batch, "quantize": config.model.quantize,
        "checkpointing": config.train.gradient_checkpointing, "optimizer": config.train.optimizer,
        "sec_per_step": round(sec, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if device.type == "cuda" else None,
        "tflops_achieved": None if args.tiny else round(step_tflop / sec, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="use the preset's built-in tiny model (CPU smoke test)")
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
