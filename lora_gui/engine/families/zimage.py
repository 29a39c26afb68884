"""Z-Image (Base and Turbo): a single-stream flow-matching transformer with a Qwen3 text encoder.

As diffusers' Z-Image training recipe computes it: latents are the VAE's mode, shifted and scaled;
noisy = (1 - s) x0 + s noise; the transformer gets the timestep as (1000 - t) / 1000 = 1 - s and
predicts x0 - noise, so its output is negated to compare with the target noise - x0. Captions go
through the chat template (thinking on); the second-to-last hidden state of their real tokens is
the conditioning (the padding is kept out with a mask).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.base import Components, Conditioning, ModelFamily
from lora_gui.engine.families.builtin import is_builtin
from lora_gui.engine.families.common import (
    encode_vae_latents,
    flow_matching_objective,
    fresh_scheduler,
    frozen_components,
    linear_layers,
    without_checkpoint_prefix,
)
from lora_gui.engine.families.loading import load_pipeline
from lora_gui.engine.families.published_text_encoders import QWEN3_4B, PlannedTextEncoder
from lora_gui.engine.families.published_vaes import FLUX_VAE
from lora_gui.engine.objectives import FlowMatchingObjective
from lora_gui.lazy import lazy_module

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

if TYPE_CHECKING:
    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.events import Emit

ATTENTION = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
FEED_FORWARD = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
ZIMAGE_TARGET_PRESETS = {
    "attn": ATTENTION,
    "attn_ff": ATTENTION + FEED_FORWARD,
    "all": ATTENTION + FEED_FORWARD + ["adaLN_modulation.0"],
}
CAPTION_TOKENS = 512  # what the pipeline reads at most
BUILTIN_CAPTION_TOKENS = 32


class ZImageFamily(ModelFamily):
    name = "zimage"
    label = "Z-Image"
    denoiser_key = "transformer"
    text_encoder_keys = ("text_encoder",)
    lora_target_presets = ZIMAGE_TARGET_PRESETS
    default_lora_targets = "attn_ff"
    supports_text_encoder_lora = False
    default_resolution = 1024
    size_multiple = 16  # VAE factor 8 times the transformer's 2x2 patches
    pipeline_class_name = "ZImagePipeline"
    hub_models = ("Tongyi-MAI/Z-Image", "Tongyi-MAI/Z-Image-Turbo")
    planning_architectures = {
        repo: {"_class_name": "ZImageTransformer2DModel", "in_channels": 16, "dim": 3840, "n_layers": 30,
               "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560}
        for repo in ("Tongyi-MAI/Z-Image", "Tongyi-MAI/Z-Image-Turbo")
    }
    planning_vae = FLUX_VAE
    planning_text_encoders = {repo: (PlannedTextEncoder(QWEN3_4B, CAPTION_TOKENS),) for repo in planning_architectures}
    planning_block_counts = ("n_layers",)
    default_components = "Tongyi-MAI/Z-Image"
    # The single LoRA file: diffusers module names under ``diffusion_model.`` with an alpha per layer, which
    # ComfyUI reads and diffusers converts (a ``transformer.`` prefix next to alphas loads nothing there).
    single_file_lora_prefix = "diffusion_model."

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        names = {without_checkpoint_prefix(name) for name in tensor_names}
        return "cap_embedder.1.weight" in names and any(name.startswith("noise_refiner.") for name in names) and any(
            name.startswith("context_refiner.") for name in names)

    def pipeline_class(self) -> type:
        return diffusers.ZImagePipeline

    def lora_targets(self, preset: str, denoiser: Any = None) -> list[str]:
        """The preset's patterns; with the model at hand, ``adaLN_modulation.0`` becomes the Linear layers of
        that name only (the final layer's is a SiLU, which takes no LoRA)."""
        targets = super().lora_targets(preset, denoiser)
        if denoiser is None or "adaLN_modulation.0" not in targets:
            return targets
        fitted = [target for target in targets if target != "adaLN_modulation.0"]
        return fitted + linear_layers(denoiser, "", "adaLN_modulation.0")

    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        loaded = load_pipeline(model, diffusers.ZImagePipeline, dtype, emit, denoiser_key=self.denoiser_key,
                               default_components=self.default_components,
                               single_file_part=("transformer", diffusers.ZImageTransformer2DModel))
        tokens = BUILTIN_CAPTION_TOKENS if is_builtin(model.base) else CAPTION_TOKENS
        return frozen_components(self, loaded, device, dtype, max_sequence_length=tokens)

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """The second-to-last hidden state of every caption token, padded to a fixed length, with its mask."""
        encoder, tokenizer = components.text_encoders[0], components.tokenizers[0]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
                 for caption in captions]
        tokens = tokenizer(texts, padding="max_length", max_length=components.extra["max_sequence_length"],
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device).bool()
        hidden = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden, "prompt_mask": mask.to(hidden.dtype)}

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        return encode_vae_latents(components.vae, pixels).to(components.weight_dtype)

    def make_objective(self, components: Components, train: TrainSection) -> FlowMatchingObjective:
        return flow_matching_objective(components, train, patch=2)

    def planning_inputs(self, architecture: dict[str, Any], batch: int, height: int, width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Conditioning]]:
        """Captions at the longest the pipeline reads, all tokens real (no mask: fake tensors have no values)."""
        latents = torch.empty(batch, architecture.get("in_channels", 16), height // 8, width // 8, dtype=dtype)
        return latents, {"prompt_embeds": torch.empty(batch, CAPTION_TOKENS, architecture["cap_feat_dim"],
                                                      dtype=dtype)}, []

    def predict(self, components: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], conditioning: list[Conditioning], train: TrainSection) -> torch.Tensor:
        dtype = components.weight_dtype
        frames = list(noisy_latents.to(dtype).unsqueeze(2).unbind(0))  # (C, 1, H, W) per image
        hidden = embeds["prompt_embeds"].to(dtype)
        masks = embeds.get("prompt_mask")  # absent: every token is real (the memory planner's captions)
        captions = list(hidden) if masks is None else [row[mask.bool()] for row, mask in zip(hidden, masks, strict=True)]
        output = components.denoiser(frames, ((1000 - timesteps) / 1000).to(dtype), captions, return_dict=False)[0]
        return -torch.stack(output).squeeze(2)

    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        guided = guidance_scale > 0  # Z-Image guides whenever the scale is above zero
        positive, negative = pipeline.encode_prompt(
            prompt, device=device, do_classifier_free_guidance=guided, negative_prompt=negative_prompt or None,
            max_sequence_length=components.extra["max_sequence_length"],
        )
        kwargs = {"prompt_embeds": positive}
        if guided:
            kwargs["negative_prompt_embeds"] = negative
        return kwargs

    def build_pipeline(self, components: Components) -> Any:
        pipe = diffusers.ZImagePipeline(
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

    def distillation_warning(self, components: Components) -> str | None:
        if "turbo" not in str(components.source).lower():
            return None
        return ("this base looks like Z-Image-Turbo, a step-distilled model: a LoRA trained on it directly tends to "
                "wear its 8-step sampling down. Train on Z-Image (Base), or fuse a Turbo training adapter first "
                "with model.merge_loras.")

