"""Step time and peak accelerator memory of LoRA training on full-size architectures.

Builds each family's denoiser from its published config with random weights (speed and memory do
not depend on the weights), attaches LoRA as training does, and times optimizer steps on random
latents and text embeddings, as a run with the latent and text caches filled does.

    python bench/train_step.py --family sdxl --preset sdxl-24gb --steps 20
    python bench/train_step.py --family sd15 --tiny           # CPU smoke test with the built-in model

Then the same steps with the plain loop of diffusers' LoRA training examples on a freshly built model
(peft's ``add_adapter``, fp32 LoRA weights, torch's AdamW or bitsandbytes' AdamW8bit), unless
--no-reference. Prints one JSON line per configuration: sec_per_step, peak_gib, achieved TFLOP/s (the
step's FLOPs as the memory planner counts them in its trace, divided by the measured time), with
--peak-tflops the fraction of the card's peak, and the reference loop's sec_per_step and peak_gib and
speed_vs_reference (its time over ours: above 1 means ours is faster).
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


def setup(args, config, family, device, dtype):
    """The denoiser (full size with random weights, or the tiny built-in), its components and inputs."""
    if args.tiny:
        components = family.load(config.model, device, dtype, lambda event: None)
        denoiser, architecture = components.denoiser, None
    else:
        denoiser, architecture = build_denoiser(config, family, dtype, device)
        components = Components(denoiser=denoiser, vae=None, text_encoders=[], tokenizers=[], scheduler=None,
                                source="random", device=device, weight_dtype=dtype)
    quantize_denoiser(denoiser, config.model.quantize, device)
    if components.scheduler is None:
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        components.scheduler = (DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
                                if config.model.family in ("sd15", "sdxl") else FlowMatchEulerDiscreteScheduler())
    resolution = config.dataset.resolution if not args.tiny else 64
    batch = config.train.batch_size
    if args.tiny:
        embeds = family.encode_prompts(components, ["a photo"] * batch)
        channels = components.vae.config.get("z_dim") or components.vae.config.latent_channels
        latents = torch.randn(batch, channels, resolution // 8, resolution // 8)
        conditioning = [Conditioning((resolution, resolution), (0, 0), (resolution, resolution))] * batch
    else:
        latents, embeds, conditioning = random_inputs(family, architecture, batch, resolution, device, dtype)
    return components, (latents, embeds, conditioning), resolution


def ours(config, family, components):
    """LoRA and optimizer as the trainer sets them up (engine/lora.py, engine/optim.py)."""
    denoiser = components.denoiser
    modules = {family.denoiser_key: denoiser}
    inject_lora(modules, {family.denoiser_key: family.lora_targets(config.lora.targets, denoiser)}, config.lora)
    params = lora_parameters(modules)[family.denoiser_key]
    return build_optimizer([{"params": params, "lr": config.train.learning_rate}], config.train)


def reference(config, family, components):
    """What diffusers' LoRA training examples do: peft's ``add_adapter`` with a LoraConfig on the same layers,
    the LoRA weights cast to fp32, and torch's AdamW (bitsandbytes' AdamW8bit for the 8-bit optimizers, as
    their ``--use_8bit_adam``)."""
    from peft import LoraConfig

    denoiser = components.denoiser
    targets = family.lora_targets(config.lora.targets, denoiser)
    denoiser.add_adapter(LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, init_lora_weights="gaussian",
                                    target_modules=targets))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for parameter in params:
        parameter.data = parameter.data.float()
    if "8bit" in config.train.optimizer:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.train.learning_rate)
    return torch.optim.AdamW(params, lr=config.train.learning_rate)


def time_steps(args, config, family, components, inputs, optimizer, device, dtype) -> tuple[float, float | None]:
    """The median seconds per optimizer step and the peak GiB allocated (CUDA)."""
    latents, embeds, conditioning = inputs
    denoiser = components.denoiser
    if config.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    objective = family.make_objective(components, config.train)
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
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else None
    return sorted(measured)[len(measured) // 2], peak


def run(args) -> dict:
    config = build_config(preset=args.preset, overrides=args.set)
    family = get_family(config.model.family)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loops = {"ours": ours} if args.no_reference else {"ours": ours, "reference": reference}
    results = {}
    for name, prepare in loops.items():  # one after the other, each on a freshly built model
        torch.manual_seed(0)
        components, inputs, resolution = setup(args, config, family, device, dtype)
        optimizer = prepare(config, family, components)
        results[name] = time_steps(args, config, family, components, inputs, optimizer, device, dtype)
        del components, inputs, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sec, peak = results["ours"]
    step_tflop = plan_memory(config).step_flops / config.train.gradient_accumulation / 1e12  # counted by the planner
    line = {
        "preset": args.preset, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "resolution": resolution, "batch": config.train.batch_size, "quantize": config.model.quantize,
        "checkpointing": config.train.gradient_checkpointing, "optimizer": config.train.optimizer,
        "sec_per_step": round(sec, 4), "peak_gib": None if peak is None else round(peak, 2),
        "tflops_achieved": None if args.tiny else round(step_tflop / sec, 1),
    }
    if args.peak_tflops and not args.tiny:
        line["fraction_of_peak"] = round(step_tflop / sec / args.peak_tflops, 3)
    if "reference" in results:
        ref_sec, ref_peak = results["reference"]
        line |= {"reference_sec_per_step": round(ref_sec, 4),
                 "reference_peak_gib": None if ref_peak is None else round(ref_peak, 2),
                 "speed_vs_reference": round(ref_sec / sec, 3)}
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="use the preset's built-in tiny model (CPU smoke test)")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain diffusers + peft loop")
    parser.add_argument("--peak-tflops", type=float, help="the card's peak dense bf16 TFLOP/s (datasheet), for "
                        "fraction_of_peak")
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
