"""Step time and peak accelerator memory of LoRA training on full-size architectures.

Builds each family's denoiser from its published config with random weights (speed and memory do
not depend on the weights), attaches LoRA as training does, and times optimizer steps on random
latents and text embeddings, as a run with the latent and text caches filled does.

    python bench/train_step.py --family sdxl --preset sdxl-24gb --steps 20
    python bench/train_step.py --family sd15 --tiny           # CPU smoke test with the built-in model

Prints one JSON line per configuration: sec_per_step, peak_gib, achieved TFLOP/s.
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
from lora_gui.engine.quantize import quantize_denoiser

# Published architectures (diffusers configs of the official repositories).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Forward TFLOPs per sample at the reference resolution (torch flop counter on these architectures).
FORWARD_TFLOP = {"sd15": (512, 0.80), "sdxl": (1024, 6.76), "flux": (1024, 74.4)}


def build_denoiser(family: str, dtype: torch.dtype, device: torch.device):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device(device):
        if family == "flux":
            model = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        else:
            model = UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))
    return model.to(dtype).requires_grad_(False)


def random_inputs(family: str, batch: int, resolution: int, device, dtype):
    side = resolution // 8
    channels = 16 if family == "flux" else 4
    latents = torch.randn(batch, channels, side, side, device=device)
    if family == "sd15":
        embeds = {"prompt_embeds": torch.randn(batch, 77, 768, device=device, dtype=dtype)}
    elif family == "sdxl":
        embeds = {"prompt_embeds": torch.randn(batch, 77, 2048, device=device, dtype=dtype),
                  "pooled_prompt_embeds": torch.randn(batch, 1280, device=device, dtype=dtype)}
    else:
        embeds = {"prompt_embeds": torch.randn(batch, 512, 4096, device=device, dtype=dtype),
                  "pooled_prompt_embeds": torch.randn(batch, 768, device=device, dtype=dtype)}
    conditioning = [Conditioning((resolution, resolution), (0, 0), (resolution, resolution))] * batch
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
        denoiser = build_denoiser(config.model.family, dtype, device)
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

        components.scheduler = (FlowMatchEulerDiscreteScheduler() if config.model.family == "flux"
                                else DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    objective = family.make_objective(components, config.train)
    resolution = config.dataset.resolution if not args.tiny else 64
    batch = config.train.batch_size
    latents, embeds, conditioning = random_inputs(config.model.family, batch, resolution, device, dtype)
    if args.tiny:
        embeds = family.encode_prompts(components, ["a photo"] * batch)
        latents = torch.randn(batch, latents.shape[1], 8, 8)
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
    reference, tflop = FORWARD_TFLOP[config.model.family]
    step_tflop = tflop * (resolution / reference) ** 2 * batch * (3.2 if config.train.gradient_checkpointing else 2.2)
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
