"""Helpers several families share: frozen components, tokenizing, VAE latents, unwrapping, schedulers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.base import Components
from lora_gui.engine.families.loading import LoadedPipeline, place_frozen
from lora_gui.lazy import lazy_module, no_grad

torch = lazy_module("torch")

if TYPE_CHECKING:
    from lora_gui.engine.families.base import ModelFamily


# How single-file checkpoints prefix the denoiser's tensor names (ComfyUI, original releases).
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def without_checkpoint_prefix(name: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def frozen_components(family: ModelFamily, loaded: LoadedPipeline, device: torch.device, dtype: torch.dtype,
                      **extra: Any) -> Components:
    """A loaded pipeline's parts, frozen and placed, under the names the family uses; a denoiser the pipeline was
    loaded without comes on first use."""
    pipe = loaded.pipe
    encoders = [place_frozen(getattr(pipe, key), device, dtype) for key in family.text_encoder_keys]
    tokenizers = [getattr(pipe, key.replace("text_encoder", "tokenizer")) for key in family.text_encoder_keys]
    denoiser = getattr(pipe, family.denoiser_key)
    load_denoiser, load_encoders = loaded.load_denoiser, loaded.load_text_encoders
    return Components(
        denoiser=place_frozen(denoiser, device, dtype) if denoiser is not None else None,
        vae=place_frozen(pipe.vae, device, dtype),
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler=pipe.scheduler,
        source=loaded.source,
        device=device,
        weight_dtype=dtype,
        extra=extra,
        denoiser_loader=(lambda: place_frozen(load_denoiser(), device, dtype)) if denoiser is None else None,
        text_encoder_loader=(lambda: _placed_encoders(family, load_encoders(), device, dtype))
        if load_encoders else None,
    )


def _placed_encoders(family: ModelFamily, encoders: dict[str, Any], device: torch.device,
                     dtype: torch.dtype) -> list[Any]:
    return [place_frozen(encoders[key], device, dtype) for key in family.text_encoder_keys]


def clip_input_ids(tokenizer: Any, captions: list[str], encoder: Any) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as the diffusers pipelines do."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(encoder.device)


@no_grad
def encode_vae_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Deterministic latents (the distribution's mode), shifted and scaled as the denoiser expects.

    A float16 VAE that asks for it (``force_upcast``) encodes in float32, as the pipelines decode.
    """
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    # torch's own .to(): diffusers' override warns on every cast, and this one is undone at once.
    if upcast:
        torch.nn.Module.to(vae, torch.float32)
    try:
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    finally:
        if upcast:
            torch.nn.Module.to(vae, torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def unwrap(module: Any) -> Any:
    """The plain diffusers/transformers module under a peft or torch.compile wrapper."""
    if hasattr(module, "get_base_model"):
        module = module.get_base_model()
    return getattr(module, "_orig_mod", module)


def fresh_scheduler(scheduler: Any) -> Any:
    """A copy, so sampling never changes the scheduler state the trainer holds."""
    return scheduler.__class__.from_config(scheduler.config)


def flow_matching_objective(components: Components, train: Any, patch: int | None = 2) -> Any:
    """Rectified flow with the config's timestep sampling; ``patch`` latent pixels per image token make
    ``resolution_shift`` follow the pipeline (None: the family has no such shift)."""
    from lora_gui.engine.objectives import FlowMatchingObjective, ResolutionShift

    config = components.scheduler.config
    return FlowMatchingObjective(
        train.timestep_sampling, logit_mean=train.logit_mean, logit_std=train.logit_std, shift=train.flow_shift,
        num_train_timesteps=config.num_train_timesteps,
        resolution_shift=None if patch is None else ResolutionShift.from_scheduler_config(config, patch=patch),
    )


def linear_layers(denoiser: Any, prefix: str, suffix: str) -> list[str]:
    """Names of the Linear layers in ``denoiser`` starting with ``prefix`` and ending with ``suffix``: exact LoRA
    targets where a name pattern alone would also hit a layer peft cannot adapt (a SiLU, a ModuleList)."""
    return [name for name, module in unwrap(denoiser).named_modules()
            if name.startswith(prefix) and name.endswith(suffix) and isinstance(module, torch.nn.Linear)]
