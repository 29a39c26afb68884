"""Qwen-Image (and Qwen-Image-2512): a 20B dual-stream transformer with a Qwen2.5-VL text encoder.

As diffusers' Qwen-Image training recipe computes it: latents come from the 5-D VAE (one frame),
normalised with its per-channel mean and std and packed 2x2; noisy = (1 - s) x0 + s noise; the
transformer gets s (the timestep / 1000), the packed grid sizes as ``img_shapes`` and the caption
mask, and predicts noise - x0. Latents are the VAE's mode (the recipe draws a sample; the mode is
its mean and keeps cached latents deterministic). Captions go through the pipeline's system
template; its first 34 tokens are dropped and the last hidden state of the rest, padded to a fixed
length with a mask, is the conditioning. Sampling uses true CFG with a negative prompt.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.base import Components, Conditioning, ModelFamily
from lora_gui.engine.families.builtin import is_builtin
from lora_gui.engine.families.common import (
    flow_matching_objective,
    fresh_scheduler,
    frozen_components,
    linear_layers,
    without_checkpoint_prefix,
)
from lora_gui.engine.families.loading import load_pipeline
from lora_gui.engine.families.published_text_encoders import QWEN25_VL_7B, PlannedTextEncoder
from lora_gui.engine.families.published_vaes import QWEN_IMAGE_VAE
from lora_gui.engine.objectives import FlowMatchingObjective
from lora_gui.lazy import lazy_module, no_grad

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

if TYPE_CHECKING:
    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.events import Emit

ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
CONTEXT = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FEED_FORWARD = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
MODULATION = "_mod.1"  # img_mod.1 and txt_mod.1: Linear layers, fitted to the model (img_mod.0 is a SiLU)
QWEN_TARGET_PRESETS = {
    "attn": ATTENTION,  # the reference recipe's targets
    "attn_ctx": ATTENTION + CONTEXT,
    "all": ATTENTION + CONTEXT + FEED_FORWARD + [MODULATION],
}
CAPTION_TOKENS = 512  # the pipeline's default when sampling; captions longer than this are cut
BUILTIN_CAPTION_TOKENS = 64  # the tiny tokenizer spends a token per byte of most words


class QwenImageFamily(ModelFamily):
    name = "qwen-image"
    label = "Qwen-Image"
    denoiser_key = "transformer"
    text_encoder_keys = ("text_encoder",)
    lora_target_presets = QWEN_TARGET_PRESETS
    default_lora_targets = "attn"
    supports_text_encoder_lora = False
    default_resolution = 1024
    size_multiple = 16  # VAE factor 8 times the 2x2 packing
    pipeline_class_name = "QwenImagePipeline"
    hub_models = ("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512")
    planning_architectures = {
        repo: {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64, "out_channels": 16,
               "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584}
        for repo in ("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512")
    }
    planning_vae = QWEN_IMAGE_VAE
    planning_text_encoders = {  # the caption after the chat template's 34 tokens
        repo: (PlannedTextEncoder(QWEN25_VL_7B, CAPTION_TOKENS + 34),) for repo in planning_architectures}
    planning_block_counts = ("num_layers",)
    default_components = "Qwen/Qwen-Image"
    # diffusers module names under ``diffusion_model.`` with an alpha per layer: ComfyUI maps them, and
    # diffusers' Qwen-Image loader converts them (folding the alpha in).
    single_file_lora_prefix = "diffusion_model."

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        names = {without_checkpoint_prefix(name) for name in tensor_names}
        return {"img_in.weight", "txt_in.weight", "txt_norm.weight"} <= names and any(
            name.startswith("transformer_blocks.") and ".img_mod." in name for name in names)

    def pipeline_class(self) -> type:
        return diffusers.QwenImagePipeline

    def lora_targets(self, preset: str, denoiser: Any = None) -> list[str]:
        targets = super().lora_targets(preset, denoiser)
        if MODULATION not in targets:
            return targets
        fitted = [target for target in targets if target != MODULATION]
        if denoiser is None:
            return fitted + ["img_mod.1", "txt_mod.1"]
        return fitted + linear_layers(denoiser, "transformer_blocks.", MODULATION)

    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        loaded = load_pipeline(model, diffusers.QwenImagePipeline, dtype, emit, denoiser_key=self.denoiser_key,
                               default_components=self.default_components,
                               single_file_part=("transformer", diffusers.QwenImageTransformer2DModel),
                               strip_prefix="model.diffusion_model.")
        tokens = BUILTIN_CAPTION_TOKENS if is_builtin(model.base) else CAPTION_TOKENS
        return frozen_components(self, loaded, device, dtype, max_sequence_length=tokens,
                                 template=loaded.pipe.prompt_template_encode,
                                 template_tokens=loaded.pipe.prompt_template_encode_start_idx)

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """The last hidden state after the template's prefix, padded to a fixed length (zeros) with its mask."""
        encoder, tokenizer = components.text_encoders[0], components.tokenizers[0]
        dropped, length = components.extra["template_tokens"], components.extra["max_sequence_length"]
        texts = [components.extra["template"].format(caption) for caption in captions]
        tokens = tokenizer(texts, padding="max_length", max_length=dropped + length, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-1]
        caption_mask = mask[:, dropped:]
        return {"prompt_embeds": hidden[:, dropped:] * caption_mask.unsqueeze(-1).to(hidden.dtype),
                "prompt_mask": caption_mask.to(hidden.dtype)}

    @no_grad
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents of one frame, (B, 16, H/8, W/8)."""
        vae = components.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mode()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return ((latents - mean) / std).squeeze(2).to(components.weight_dtype)

    def make_objective(self, components: Components, train: TrainSection) -> FlowMatchingObjective:
        return flow_matching_objective(components, train, patch=2)

    def planning_inputs(self, architecture: dict[str, Any], batch: int, height: int, width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Conditioning]]:
        latents = torch.empty(batch, architecture.get("out_channels", 16), height // 8, width // 8, dtype=dtype)
        embeds = torch.empty(batch, CAPTION_TOKENS, architecture["joint_attention_dim"], dtype=dtype)
        return latents, {"prompt_embeds": embeds, "prompt_mask": torch.ones(batch, CAPTION_TOKENS, dtype=torch.long)}, []

    def predict(self, components: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], conditioning: list[Conditioning], train: TrainSection) -> torch.Tensor:
        dtype = components.weight_dtype
        batch, channels, height, width = noisy_latents.shape
        packed = diffusers.QwenImagePipeline._pack_latents(noisy_latents.to(dtype), batch, channels, height, width)
        output = components.denoiser(
            hidden_states=packed, encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=embeds["prompt_mask"], timestep=(timesteps / 1000).to(dtype),
            img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False,
        )[0]
        return diffusers.QwenImagePipeline._unpack_latents(output, height * 8, width * 8, 8).squeeze(2)

    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        """The prompt and, for true CFG (a scale above 1), the negative prompt (" " when none is given), each
        with its mask (all ones where the pipeline returns none, so it knows the embeddings have no padding)."""
        length = components.extra["max_sequence_length"]

        def encoded(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, mask = pipeline.encode_prompt(text, device=device, max_sequence_length=length)
            return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask

        embeds, mask = encoded(prompt)
        kwargs = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if guidance_scale > 1:
            negative, negative_mask = encoded(negative_prompt or " ")
            kwargs.update(negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask)
        return kwargs

    def guidance_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        return {"true_cfg_scale": guidance_scale}

    def build_pipeline(self, components: Components) -> Any:
        pipe = diffusers.QwenImagePipeline(
            scheduler=fresh_scheduler(components.scheduler),
            vae=components.vae,
            text_encoder=components.pipeline_text_encoder(0),
            tokenizer=components.tokenizers[0],
            transformer=components.pipeline_denoiser(),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_kwargs(self, components: Components) -> dict[str, Any]:
        return {"max_sequence_length": components.extra["max_sequence_length"]}

