"""SDXL: the SD UNet recipe with two CLIP text encoders and size/crop conditioning."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.base import Components, Conditioning
from lora_gui.engine.families.checkpoint_names import has_ldm_unet, has_sdxl_embeddings
from lora_gui.engine.families.common import clip_input_ids, fresh_scheduler
from lora_gui.engine.families.published_text_encoders import CLIP_G, CLIP_L, PlannedTextEncoder
from lora_gui.engine.families.published_vaes import SD_VAE
from lora_gui.engine.families.sd15 import SD15Family
from lora_gui.lazy import lazy_module

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

if TYPE_CHECKING:
    from lora_gui.config import TrainSection


class SDXLFamily(SD15Family):
    name = "sdxl"
    label = "Stable Diffusion XL"
    text_encoder_keys = ("text_encoder", "text_encoder_2")
    default_resolution = 1024
    default_components = "stabilityai/stable-diffusion-xl-base-1.0"
    pipeline_class_name = "StableDiffusionXLPipeline"
    hub_models = ("stabilityai/stable-diffusion-xl-base-1.0",)
    planning_architectures = {
        "stabilityai/stable-diffusion-xl-base-1.0": {
            "_class_name": "UNet2DConditionModel", "sample_size": 128, "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
    }
    planning_vae = SD_VAE
    planning_text_encoders = {repo: (PlannedTextEncoder(CLIP_L, 77), PlannedTextEncoder(CLIP_G, 77))
                              for repo in planning_architectures}
    # The lowest level's transformer depth (10), used by its down, middle and up blocks.
    planning_block_counts = ("transformer_layers_per_block[2]",)

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        return has_ldm_unet(tensor_names) and has_sdxl_embeddings(tensor_names)

    def pipeline_class(self) -> type:
        return diffusers.StableDiffusionXLPipeline

    def _load_overrides(self) -> dict[str, Any]:
        return {}

    def planning_inputs(self, architecture: dict[str, Any], batch: int, height: int, width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Conditioning]]:
        latents, embeds, conditioning = super().planning_inputs(architecture, batch, height, width, dtype)
        time_ids = 6 * architecture["addition_time_embed_dim"]
        pooled = architecture["projection_class_embeddings_input_dim"] - time_ids
        return latents, {**embeds, "pooled_prompt_embeds": torch.empty(batch, pooled, dtype=dtype)}, conditioning

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """Penultimate hidden states of both encoders side by side, and encoder 2's pooled projection."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
            output = encoder(clip_input_ids(tokenizer, captions, encoder), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's text_embeds
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def predict(self, components: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], conditioning: list[Conditioning], train: TrainSection) -> torch.Tensor:
        dtype = components.weight_dtype
        added = {
            "text_embeds": embeds["pooled_prompt_embeds"].to(dtype),
            "time_ids": time_ids(conditioning, noisy_latents.device, dtype),
        }
        return components.denoiser(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
            added_cond_kwargs=added, return_dict=False,
        )[0]

    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        guided = guidance_scale > 1.0
        positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None,
        )
        kwargs = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
        if guided:
            kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return kwargs

    def build_pipeline(self, components: Components) -> Any:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.pipeline_text_encoder(0),
            text_encoder_2=components.pipeline_text_encoder(1),
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=components.pipeline_denoiser(),
            scheduler=fresh_scheduler(components.scheduler),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def time_ids(conditioning: list[Conditioning], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning per sample: original size + crop top-left + target size, (height, width) order."""
    rows = [list(c.original_size) + list(c.crop_top_left) + list(c.target_size) for c in conditioning]
    return torch.tensor(rows, device=device, dtype=dtype)
