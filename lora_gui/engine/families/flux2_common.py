"""What Flux.2 dev and Flux.2 Klein share: the transformer's LoRA targets, its latents and its prediction.

As diffusers' Flux.2 pipelines and training recipes compute it: latents are the VAE's mode, patchified
2x2 and normalised with the VAE's batch-norm statistics; noisy = (1 - s) x0 + s noise; the transformer
gets s (the timestep / 1000) and predicts noise - x0. Only dev has a guidance embedding.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from lora_gui.engine.families.common import linear_layers, unwrap, without_checkpoint_prefix
from lora_gui.lazy import lazy_module, no_grad

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj"]
# The single-stream blocks' output projection: a plain Linear named attn.to_out, while the dual-stream
# blocks' attn.to_out is a ModuleList; fitted to the loaded model's Linear layers of that name.
SINGLE_OUT = "single_transformer_blocks.attn.to_out"
CONTEXT = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FEED_FORWARD = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
TARGET_PRESETS = {
    "attn": ATTENTION + [SINGLE_OUT],
    "all": ATTENTION + [SINGLE_OUT] + CONTEXT + FEED_FORWARD,
}
MODULATIONS = ("double_stream_modulation_img.", "single_stream_modulation.")
GUIDANCE = ("guidance_in.", "time_guidance_embed.guidance_embedder.")
# The sampling step count the resolution shift assumes (Flux.2's shift also depends on it): the pipelines' default.
SHIFT_STEPS = 50


def checkpoint_kind(tensor_names: Collection[str]) -> tuple[bool, bool]:
    """(is a Flux.2 transformer, has a guidance embedding) from a single file's tensor names."""
    names = {without_checkpoint_prefix(name) for name in tensor_names}
    is_flux2 = all(any(name.startswith(prefix) for name in names) for prefix in MODULATIONS)
    return is_flux2, any(name.startswith(GUIDANCE) for name in names)


def fitted_targets(targets: list[str], denoiser: Any) -> list[str]:
    """``targets`` with the single-stream output projection named exactly (only with the model at hand)."""
    if SINGLE_OUT not in targets:
        return targets
    fitted = [target for target in targets if target != SINGLE_OUT]
    if denoiser is None:
        return fitted
    return fitted + linear_layers(denoiser, "single_transformer_blocks.", ".attn.to_out")


@no_grad
def encode_latents(vae: Any, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The VAE's mode, patchified 2x2 and normalised with its batch-norm running statistics."""
    latents = diffusers.Flux2Pipeline._patchify_latents(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return ((latents - mean) / std.to(latents.device, latents.dtype)).to(dtype)


def planning_inputs(architecture: dict[str, Any], batch: int, height: int, width: int, dtype: torch.dtype,
                    caption_tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    """Empty patchified latents (VAE /8, then 2x2) and caption embeddings as training feeds ``predict``."""
    latents = torch.empty(batch, architecture.get("in_channels", 128), height // 16, width // 16, dtype=dtype)
    embeds = torch.empty(batch, caption_tokens, architecture["joint_attention_dim"], dtype=dtype)
    return latents, {"prompt_embeds": embeds}, []


def predict(denoiser: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
            dtype: torch.dtype, guidance: float) -> torch.Tensor:
    """The transformer's prediction for patchified latents, unpacked to their layout."""
    device = noisy_latents.device
    prompt_embeds = prompt_embeds.to(dtype)
    image_ids = diffusers.Flux2Pipeline._prepare_latent_ids(noisy_latents).to(device)
    packed = diffusers.Flux2Pipeline._pack_latents(noisy_latents.to(dtype))
    guidance_input = None
    if unwrap(denoiser).config.guidance_embeds:
        guidance_input = torch.full((noisy_latents.shape[0],), float(guidance), device=device, dtype=torch.float32)
    output = denoiser(
        hidden_states=packed, encoder_hidden_states=prompt_embeds, timestep=(timesteps / 1000).to(dtype),
        img_ids=image_ids, txt_ids=diffusers.Flux2Pipeline._prepare_text_ids(prompt_embeds).to(device),
        guidance=guidance_input, return_dict=False,
    )[0]
    # The inverse of _pack_latents for a full grid: what the pipeline's _unpack_latents_with_ids does by
    # scattering along the ids, without reading their values (the memory planner runs this on fake tensors).
    batch, channels, height, width = noisy_latents.shape
    return output[:, : packed.shape[1]].reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def objective(components: Any, train: Any) -> Any:
    """Rectified flow; ``resolution_shift`` follows the pipelines' empirical shift at SHIFT_STEPS steps."""
    from lora_gui.engine.objectives import EmpiricalFlux2Shift, FlowMatchingObjective

    return FlowMatchingObjective(
        train.timestep_sampling, logit_mean=train.logit_mean, logit_std=train.logit_std, shift=train.flow_shift,
        num_train_timesteps=components.scheduler.config.num_train_timesteps,
        resolution_shift=EmpiricalFlux2Shift(steps=SHIFT_STEPS),
    )
