"""Flux.2 Klein (4B and 9B): Flux.2's transformer with a Qwen3 text encoder; train the base models.

As the Klein pipeline and diffusers' Flux.2 training recipe compute it: latents are the VAE's mode,
patchified 2x2 and normalised with the VAE's batch-norm statistics; noisy = (1 - s) x0 + s noise;
the transformer gets s as its timestep and predicts noise - x0. Captions go through the chat
template (thinking off); hidden states 9, 18 and 27 are stacked per token, padded to a fixed length
(no mask reaches the transformer, so training and sampling use the same length).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

from lora_gui.engine.families.base import Components, Conditioning, ModelFamily
from lora_gui.engine.families.builtin import is_builtin
from lora_gui.engine.families.common import (
    flow_matching_objective,
    fresh_scheduler,
    frozen_components,
    linear_layers,
    unwrap,
)
from lora_gui.engine.families.loading import load_pipeline
from lora_gui.engine.objectives import FlowMatchingObjective

if TYPE_CHECKING:
    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.events import Emit

ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj"]
# The single-stream blocks' output projection: a plain Linear named attn.to_out, while the dual-stream
# blocks' attn.to_out is a ModuleList; fitted to the loaded model's Linear layers of that name.
SINGLE_OUT = "single_transformer_blocks.attn.to_out"
CONTEXT = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FEED_FORWARD = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
KLEIN_TARGET_PRESETS = {
    "attn": ATTENTION + [SINGLE_OUT],
    "all": ATTENTION + [SINGLE_OUT] + CONTEXT + FEED_FORWARD,
}
TEXT_LAYERS = (9, 18, 27)
CAPTION_TOKENS = 512
BUILTIN_CAPTION_TOKENS = 32
MODULATIONS = ("double_stream_modulation_img.", "single_stream_modulation.")


class Flux2KleinFamily(ModelFamily):
    name = "flux2-klein"
    label = "Flux.2 Klein"
    denoiser_key = "transformer"
    text_encoder_keys = ("text_encoder",)
    lora_target_presets = KLEIN_TARGET_PRESETS
    default_lora_targets = "attn"
    supports_text_encoder_lora = False
    default_resolution = 1024
    size_multiple = 16  # VAE factor 8 times the 2x2 patchify
    pipeline_class_name = "Flux2KleinPipeline"
    hub_models = ("black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-base-9B")
    default_components = "black-forest-labs/FLUX.2-klein-base-4B"
    # Flux.2 loaders refuse alpha keys: the single file has diffusers names with the scale folded in.
    single_file_lora_prefix = "transformer."
    single_file_folds_alpha = True

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        names = {name.removeprefix("model.diffusion_model.").removeprefix("diffusion_model.") for name in tensor_names}
        has_modulation = all(any(name.startswith(prefix) for name in names) for prefix in MODULATIONS)
        has_guidance = any(name.startswith(("guidance_in.", "time_guidance_embed.guidance_embedder.")) for name in names)
        return has_modulation and not has_guidance

    def pipeline_class(self) -> type:
        return Flux2KleinPipeline

    def lora_targets(self, preset: str, denoiser: Any = None) -> list[str]:
        targets = super().lora_targets(preset, denoiser)
        if SINGLE_OUT not in targets:
            return targets
        fitted = [target for target in targets if target != SINGLE_OUT]
        if denoiser is None:  # the single-stream outputs can only be named with the model at hand
            return fitted
        return fitted + linear_layers(denoiser, "single_transformer_blocks.", ".attn.to_out")

    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        pipe, source = load_pipeline(model, Flux2KleinPipeline, dtype, emit, default_components=self.default_components,
                                     single_file_part=("transformer", Flux2Transformer2DModel))
        tokens = BUILTIN_CAPTION_TOKENS if is_builtin(model.base) else CAPTION_TOKENS
        return frozen_components(self, pipe, source, device, dtype, max_sequence_length=tokens,
                                 is_distilled=bool(pipe.config.get("is_distilled", False)))

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = components.text_encoders[0]
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            encoder, components.tokenizers[0], list(captions), device=encoder.device,
            max_sequence_length=components.extra["max_sequence_length"], hidden_states_layers=TEXT_LAYERS,
        )
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = Flux2KleinPipeline._patchify_latents(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                               latents.dtype)
        return ((latents - mean) / std).to(components.weight_dtype)

    def make_objective(self, components: Components, train: TrainSection) -> FlowMatchingObjective:
        if train.timestep_sampling == "resolution_shift":
            raise ValueError("train.timestep_sampling: resolution_shift is not available for Flux.2 yet (its "
                             "pipeline's shift also depends on the step count); use uniform, logit_normal or shift.")
        return flow_matching_objective(components, train, patch=None)

    def predict(self, components: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], conditioning: list[Conditioning], train: TrainSection) -> torch.Tensor:
        dtype, device = components.weight_dtype, noisy_latents.device
        prompt_embeds = embeds["prompt_embeds"].to(dtype)
        image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy_latents).to(device)
        packed = Flux2KleinPipeline._pack_latents(noisy_latents.to(dtype))
        guidance = None
        if unwrap(components.denoiser).config.guidance_embeds:
            guidance = torch.full((noisy_latents.shape[0],), float(train.guidance), device=device, dtype=torch.float32)
        output = components.denoiser(
            hidden_states=packed, encoder_hidden_states=prompt_embeds, timestep=(timesteps / 1000).to(dtype),
            img_ids=image_ids, txt_ids=Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(device),
            guidance=guidance, return_dict=False,
        )[0]
        return Flux2KleinPipeline._unpack_latents_with_ids(output[:, : packed.shape[1]], image_ids)

    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        common = {"device": device, "max_sequence_length": components.extra["max_sequence_length"],
                  "text_encoder_out_layers": TEXT_LAYERS}
        kwargs = {"prompt_embeds": pipeline.encode_prompt(prompt=prompt, **common)[0]}
        if guidance_scale > 1 and not components.extra["is_distilled"]:  # the pipeline's own condition for CFG
            kwargs["negative_prompt_embeds"] = pipeline.encode_prompt(prompt=negative_prompt or "", **common)[0]
        return kwargs

    def build_pipeline(self, components: Components) -> Any:
        pipe = Flux2KleinPipeline(
            scheduler=fresh_scheduler(components.scheduler),
            vae=components.vae,
            text_encoder=unwrap(components.text_encoders[0]),
            tokenizer=components.tokenizers[0],
            transformer=unwrap(components.denoiser),
            is_distilled=components.extra["is_distilled"],
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_kwargs(self, components: Components) -> dict[str, Any]:
        return {"max_sequence_length": components.extra["max_sequence_length"],
                "text_encoder_out_layers": TEXT_LAYERS}

    def distillation_warning(self, components: Components) -> str | None:
        if not components.extra["is_distilled"]:
            return None
        return ("this base is a distilled Flux.2 Klein (4-step) model: LoRAs trained on it directly tend to come out "
                "grey. Train on the base model (FLUX.2-klein-base-4B or -9B), or fuse a training adapter first with "
                "model.merge_loras.")
