"""Flux.1 dev and schnell: a rectified-flow transformer on packed 16-channel latents.

Text comes from CLIP (pooled) and T5 (per token). Flux dev also takes a guidance value;
schnell has no guidance embedding. The variant is read from the transformer's config.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.base import Components, Conditioning, ModelFamily
from lora_gui.engine.families.builtin import is_builtin
from lora_gui.engine.families.common import (
    clip_input_ids,
    encode_vae_latents,
    flow_matching_objective,
    fresh_scheduler,
    frozen_components,
    unwrap,
)
from lora_gui.engine.families.loading import ModelLoadError, load_pipeline, resolve_source
from lora_gui.engine.families.published_text_encoders import CLIP_L, T5_XXL, PlannedTextEncoder
from lora_gui.engine.families.published_vaes import FLUX_VAE
from lora_gui.engine.objectives import FlowMatchingObjective
from lora_gui.lazy import lazy_module

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

if TYPE_CHECKING:
    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.events import Emit

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
FLUX_SINGLE_BLOCKS = 38  # single-stream blocks in FLUX.1; "tiny" and "nano" name blocks by index
BUILTIN_T5_TOKENS = 32

_IMAGE_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_CONTEXT_ATTN = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
# SimpleTuner's --flux_lora_target presets, as peft suffixes of FluxTransformer2DModel module names.
FLUX_TARGET_PRESETS: dict[str, list[str]] = {
    "mmdit": _IMAGE_ATTN,
    "all": _IMAGE_ATTN + _CONTEXT_ATTN,
    "all+ffs": _IMAGE_ATTN + _CONTEXT_ATTN + _FEED_FORWARD,
    "context": _CONTEXT_ATTN,
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}
_SINGLE_BLOCK = re.compile(r"^single_transformer_blocks\.(\d+)\.")


class FluxFamily(ModelFamily):
    name = "flux"
    label = "Flux.1"
    denoiser_key = "transformer"
    text_encoder_keys = ("text_encoder", "text_encoder_2")
    lora_target_presets = FLUX_TARGET_PRESETS
    default_lora_targets = "all"
    supports_text_encoder_lora = False
    default_resolution = 1024
    size_multiple = 16  # VAE factor 8 times 2x2 patch packing
    pipeline_class_name = "FluxPipeline"
    hub_models = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
    planning_architectures = {
        repo: {"_class_name": "FluxTransformer2DModel", "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
               "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "pooled_projection_dim": 768, "guidance_embeds": guidance}
        for repo, guidance in (("black-forest-labs/FLUX.1-dev", True), ("black-forest-labs/FLUX.1-schnell", False))
    }
    planning_vae = FLUX_VAE
    planning_text_encoders = {
        repo: (PlannedTextEncoder(CLIP_L, 77), PlannedTextEncoder(T5_XXL, 512 if architecture["guidance_embeds"] else 256))
        for repo, architecture in planning_architectures.items()}
    samples_with_cfg = False  # embedded guidance (dev) or none (schnell)
    planning_block_counts = ("num_layers", "num_single_layers")

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        """A transformer in Black Forest Labs' naming (optionally under ``model.diffusion_model.``), or in diffusers'."""
        bfl = {name.removeprefix("model.diffusion_model.") for name in tensor_names}
        if {"img_in.weight", "txt_in.weight"} <= bfl:  # Flux.2 has no per-block modulation (img_mod)
            return "double_blocks.0.img_mod.lin.weight" in bfl and any(name.startswith("single_blocks.") for name in bfl)
        return {"x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.norm1.linear.weight"} <= set(
            tensor_names)

    def pipeline_class(self) -> type:
        return diffusers.FluxPipeline

    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        source = resolve_source(model.base, model.cache_dir)
        schnell_file = source.kind == "single_file" and not single_file_has_guidance(source.location)
        loaded = load_pipeline(
            model, diffusers.FluxPipeline, dtype, emit, source=source, denoiser_key=self.denoiser_key,
            default_components=FLUX_SCHNELL if schnell_file else FLUX_DEV,
            single_file_part=("transformer", diffusers.FluxTransformer2DModel),
        )
        variant = "dev" if loaded.denoiser_config().get("guidance_embeds") else "schnell"
        tokens = max_sequence_length(model.base, variant, loaded.pipe.tokenizer_2)
        return frozen_components(self, loaded, device, dtype, variant=variant, max_sequence_length=tokens)

    def lora_targets(self, preset: str, denoiser: Any = None) -> list[str]:
        """Block-indexed presets (tiny, nano) are moved to the same relative depth in a smaller model."""
        targets = super().lora_targets(preset)
        config = getattr(unwrap(denoiser), "config", None) if denoiser is not None else None
        count = getattr(config, "num_single_layers", None)
        if not count:
            return targets
        fitted = [_fit_single_block(target, count) for target in targets]
        return list(dict.fromkeys(fitted))

    def planning_inputs(self, architecture: dict[str, Any], batch: int, height: int, width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Conditioning]]:
        latents = torch.empty(batch, architecture.get("in_channels", 64) // 4, height // 8, width // 8, dtype=dtype)
        tokens = planned_caption_tokens(architecture)
        embeds = {"prompt_embeds": torch.empty(batch, tokens, architecture.get("joint_attention_dim", 4096), dtype=dtype),
                  "pooled_prompt_embeds": torch.empty(batch, architecture.get("pooled_projection_dim", 768), dtype=dtype)}
        return latents, embeds, [Conditioning((height, width), (0, 0), (height, width))] * batch

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP's pooled output and T5's hidden states, as FluxPipeline.encode_prompt computes them."""
        clip, t5 = components.text_encoders
        clip_tokenizer, t5_tokenizer = components.tokenizers
        pooled = clip(clip_input_ids(clip_tokenizer, captions, clip), output_hidden_states=False).pooler_output
        t5_ids = t5_tokenizer(captions, padding="max_length", max_length=components.extra["max_sequence_length"],
                              truncation=True, return_tensors="pt").input_ids
        hidden = t5(t5_ids.to(t5.device), output_hidden_states=False)[0]
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        return encode_vae_latents(components.vae, pixels).to(components.weight_dtype)

    def distillation_warning(self, components: Components) -> str | None:
        if components.extra.get("variant") != "schnell":
            return None
        return ("this base is step-distilled (like FLUX.1-schnell): a LoRA trained on it directly tends to wear "
                "its few-step sampling down. Train on a base model (FLUX.1-dev), or fuse a training adapter for "
                "this model first with model.merge_loras.")

    def make_objective(self, components: Components, train: TrainSection) -> FlowMatchingObjective:
        return flow_matching_objective(components, train, patch=2)

    def predict(self, components: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], conditioning: list[Conditioning], train: TrainSection) -> torch.Tensor:
        dtype, device = components.weight_dtype, noisy_latents.device
        batch, _, height, width = noisy_latents.shape
        prompt_embeds = embeds["prompt_embeds"].to(dtype)
        guidance = None
        if unwrap(components.denoiser).config.guidance_embeds:
            guidance = torch.full((batch,), float(train.guidance), device=device, dtype=torch.float32)
        packed = components.denoiser(
            hidden_states=pack_latents(noisy_latents.to(dtype)),
            timestep=(timesteps / 1000).to(dtype),
            guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(height // 2, width // 2, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(packed, height, width)

    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        embeds, pooled, _ = pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, device=device,
            max_sequence_length=components.extra["max_sequence_length"],
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def build_pipeline(self, components: Components) -> Any:
        pipe = diffusers.FluxPipeline(
            scheduler=fresh_scheduler(components.scheduler),
            vae=components.vae,
            text_encoder=components.pipeline_text_encoder(0),
            tokenizer=components.tokenizers[0],
            text_encoder_2=components.pipeline_text_encoder(1),
            tokenizer_2=components.tokenizers[1],
            transformer=components.pipeline_denoiser(),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_kwargs(self, components: Components) -> dict[str, Any]:
        return {"max_sequence_length": components.extra["max_sequence_length"]}


def planned_caption_tokens(architecture: dict[str, Any]) -> int:
    """T5 tokens per caption for a transformer of this config (dev has the guidance embedding)."""
    return 512 if architecture.get("guidance_embeds") else 256


def max_sequence_length(base: str, variant: str, t5_tokenizer: Any) -> int:
    """T5 tokens per caption: 512 for dev, 256 for schnell (as BFL trained them); short for built-in models."""
    if is_builtin(base):
        return BUILTIN_T5_TOKENS
    return min(512 if variant == "dev" else 256, int(t5_tokenizer.model_max_length))


def single_file_has_guidance(path: str) -> bool:
    """Whether a Flux checkpoint file has a guidance embedding (dev) or not (schnell); reads only key names."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return any("guidance_in." in key or "guidance_embedder." in key for key in handle.keys())
    except Exception as exc:  # safetensors raises its own error type for damaged headers
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({exc}). It may be an incomplete "
                             "download: download it again.") from exc


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) to (B, H/2 * W/2, C * 4): 2x2 patches as tokens, like FluxPipeline._pack_latents."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    batch, _, features = packed.shape
    latents = packed.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, features // 4, height, width)


def latent_image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (0, row, col) of each packed token, like FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3).to(dtype)


def _fit_single_block(target: str, count: int) -> str:
    match = _SINGLE_BLOCK.match(target)
    if not match or int(match.group(1)) < count:
        return target
    index = min(count - 1, round(int(match.group(1)) * count / FLUX_SINGLE_BLOCKS))
    return _SINGLE_BLOCK.sub(f"single_transformer_blocks.{index}.", target)
