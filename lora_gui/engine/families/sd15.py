"""Stable Diffusion 1.5: a UNet on 4-channel latents, conditioned on one CLIP text encoder."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.base import Components, Conditioning, ModelFamily
from lora_gui.engine.families.checkpoint_names import has_ldm_unet, has_sdxl_embeddings
from lora_gui.engine.families.common import (
    clip_input_ids,
    encode_vae_latents,
    fresh_scheduler,
    frozen_components,
)
from lora_gui.engine.families.loading import load_pipeline
from lora_gui.engine.families.published_text_encoders import CLIP_L, PlannedTextEncoder
from lora_gui.engine.families.published_vaes import SD_VAE
from lora_gui.engine.objectives import DiffusionObjective
from lora_gui.lazy import lazy_module

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

if TYPE_CHECKING:
    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.events import Emit

_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_FF = ["ff.net.0.proj", "ff.net.2"]
# proj_in/proj_out are 1x1 convolutions in SD1.5 and Linear layers in SDXL; peft adapts both.
SD_TARGET_PRESETS: dict[str, list[str]] = {
    "attn": _ATTN,
    "attn_ff": _ATTN + _FF,
    "all_linear": _ATTN + _FF + ["proj_in", "proj_out", "time_emb_proj"],
}


class SD15Family(ModelFamily):
    name = "sd15"
    label = "Stable Diffusion 1.5"
    denoiser_key = "unet"
    text_encoder_keys = ("text_encoder",)
    lora_target_presets = SD_TARGET_PRESETS
    default_lora_targets = "attn_ff"
    default_resolution = 512
    size_multiple = 8
    # Configs, VAE and text encoder used with a single-file checkpoint when model.components is empty.
    default_components = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    pipeline_class_name = "StableDiffusionPipeline"
    hub_models = ("stable-diffusion-v1-5/stable-diffusion-v1-5",)
    planning_architectures = {
        "stable-diffusion-v1-5/stable-diffusion-v1-5": {
            "_class_name": "UNet2DConditionModel", "sample_size": 64, "cross_attention_dim": 768,
            "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        },
    }
    planning_vae = SD_VAE
    planning_text_encoders = {repo: (PlannedTextEncoder(CLIP_L, 77),) for repo in planning_architectures}
    caption_tokens = 77  # CLIP's context, per text encoder

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        """An original-layout (A1111/ComfyUI) UNet checkpoint without SDXL's extra embeddings."""
        return has_ldm_unet(tensor_names) and not has_sdxl_embeddings(tensor_names)

    def pipeline_class(self) -> type:
        return diffusers.StableDiffusionPipeline

    def planning_inputs(self, architecture: dict[str, Any], batch: int, height: int, width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Conditioning]]:
        latents = torch.empty(batch, architecture.get("in_channels", 4), height // 8, width // 8, dtype=dtype)
        embeds = {"prompt_embeds": torch.empty(batch, self.caption_tokens, architecture["cross_attention_dim"],
                                               dtype=dtype)}
        return latents, embeds, [Conditioning((height, width), (0, 0), (height, width))] * batch

    def _load_overrides(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        loaded = load_pipeline(model, self.pipeline_class(), dtype, emit, denoiser_key=self.denoiser_key,
                                     default_components=self.default_components, **self._load_overrides())
        return frozen_components(self, loaded, device, dtype)

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = components.text_encoders[0]
        ids = clip_input_ids(components.tokenizers[0], captions, encoder)
        return {"prompt_embeds": encoder(ids)[0]}

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        return encode_vae_latents(components.vae, pixels).to(components.weight_dtype)

    def make_objective(self, components: Components, train: TrainSection) -> DiffusionObjective:
        config = dict(components.scheduler.config)
        prediction = train.prediction_type
        if prediction == "auto":
            prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"The model's scheduler predicts {prediction!r}, which training does not support. Set "
                             "train.prediction_type to epsilon or v_prediction.")
        return DiffusionObjective(config, prediction, min_snr_gamma=train.min_snr_gamma,
                                  noise_offset=train.noise_offset)

    def predict(self, components: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], conditioning: list[Conditioning], train: TrainSection) -> torch.Tensor:
        dtype = components.weight_dtype
        return components.denoiser(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        guided = guidance_scale > 1.0
        positive, negative = pipeline.encode_prompt(prompt, device, 1, guided, negative_prompt or None)
        kwargs = {"prompt_embeds": positive}
        if guided:
            kwargs["negative_prompt_embeds"] = negative
        return kwargs

    def build_pipeline(self, components: Components) -> Any:
        pipe = diffusers.StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.pipeline_text_encoder(0),
            tokenizer=components.tokenizers[0],
            unet=components.pipeline_denoiser(),
            scheduler=fresh_scheduler(components.scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
