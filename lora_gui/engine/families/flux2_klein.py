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

from lora_gui.engine.families import flux2_common
from lora_gui.engine.families.base import Components, Conditioning, ModelFamily
from lora_gui.engine.families.builtin import is_builtin
from lora_gui.engine.families.common import fresh_scheduler, frozen_components
from lora_gui.engine.families.loading import load_pipeline
from lora_gui.engine.families.published_text_encoders import QWEN3_4B_CAUSAL, QWEN3_8B, PlannedTextEncoder
from lora_gui.engine.families.published_vaes import FLUX2_VAE
from lora_gui.engine.objectives import FlowMatchingObjective
from lora_gui.lazy import lazy_module

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

if TYPE_CHECKING:
    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.events import Emit

TEXT_LAYERS = (9, 18, 27)
CAPTION_TOKENS = 512
BUILTIN_CAPTION_TOKENS = 32


class Flux2KleinFamily(ModelFamily):
    name = "flux2-klein"
    label = "Flux.2 Klein"
    denoiser_key = "transformer"
    text_encoder_keys = ("text_encoder",)
    lora_target_presets = flux2_common.TARGET_PRESETS
    default_lora_targets = "attn"
    supports_text_encoder_lora = False
    default_resolution = 1024
    size_multiple = 16  # VAE factor 8 times the 2x2 patchify
    pipeline_class_name = "Flux2KleinPipeline"
    hub_models = ("black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-base-9B")
    planning_architectures = {
        repo: {"_class_name": "Flux2Transformer2DModel", "in_channels": 128, "num_layers": layers,
               "num_single_layers": single, "attention_head_dim": 128, "num_attention_heads": heads,
               "joint_attention_dim": joint, "mlp_ratio": 3.0, "guidance_embeds": False}
        for size, layers, single, heads, joint in (("4B", 5, 20, 24, 7680), ("9B", 8, 24, 32, 12288))
        for repo in (f"black-forest-labs/FLUX.2-klein-base-{size}", f"black-forest-labs/FLUX.2-klein-{size}")
    }
    planning_vae = FLUX2_VAE
    planning_text_encoders = {
        repo: (PlannedTextEncoder(QWEN3_8B if "9B" in repo else QWEN3_4B_CAUSAL, CAPTION_TOKENS),)
        for repo in planning_architectures}
    planning_block_counts = ("num_layers", "num_single_layers")
    default_components = "black-forest-labs/FLUX.2-klein-base-4B"
    # Flux.2 loaders refuse alpha keys: the single file has diffusers names with the scale folded in.
    single_file_lora_prefix = "transformer."
    single_file_folds_alpha = True

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        is_flux2, has_guidance = flux2_common.checkpoint_kind(tensor_names)
        return is_flux2 and not has_guidance

    def pipeline_class(self) -> type:
        return diffusers.Flux2KleinPipeline

    def lora_targets(self, preset: str, denoiser: Any = None) -> list[str]:
        return flux2_common.fitted_targets(super().lora_targets(preset, denoiser), denoiser)

    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        loaded = load_pipeline(model, diffusers.Flux2KleinPipeline, dtype, emit, denoiser_key=self.denoiser_key,
                               default_components=self.default_components,
                               single_file_part=("transformer", diffusers.Flux2Transformer2DModel),
                               strip_prefix="model.diffusion_model.")
        tokens = BUILTIN_CAPTION_TOKENS if is_builtin(model.base) else CAPTION_TOKENS
        return frozen_components(self, loaded, device, dtype, max_sequence_length=tokens,
                                 is_distilled=bool(loaded.pipe.config.get("is_distilled", False)))

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = components.text_encoders[0]
        embeds = diffusers.Flux2KleinPipeline._get_qwen3_prompt_embeds(
            encoder, components.tokenizers[0], list(captions), device=encoder.device,
            max_sequence_length=components.extra["max_sequence_length"], hidden_states_layers=TEXT_LAYERS,
        )
        return {"prompt_embeds": embeds}

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        return flux2_common.encode_latents(components.vae, pixels, components.weight_dtype)

    def make_objective(self, components: Components, train: TrainSection) -> FlowMatchingObjective:
        return flux2_common.objective(components, train)

    def planning_inputs(self, architecture: dict[str, Any], batch: int, height: int, width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Conditioning]]:
        return flux2_common.planning_inputs(architecture, batch, height, width, dtype, CAPTION_TOKENS)

    def predict(self, components: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: dict[str, torch.Tensor], conditioning: list[Conditioning], train: TrainSection) -> torch.Tensor:
        return flux2_common.predict(components.denoiser, noisy_latents, timesteps, embeds["prompt_embeds"],
                                    components.weight_dtype, train.guidance)

    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        common = {"device": device, "max_sequence_length": components.extra["max_sequence_length"],
                  "text_encoder_out_layers": TEXT_LAYERS}
        kwargs = {"prompt_embeds": pipeline.encode_prompt(prompt=prompt, **common)[0]}
        if guidance_scale > 1 and not components.extra["is_distilled"]:  # the pipeline's own condition for CFG
            kwargs["negative_prompt_embeds"] = pipeline.encode_prompt(prompt=negative_prompt or "", **common)[0]
        return kwargs

    def build_pipeline(self, components: Components) -> Any:
        pipe = diffusers.Flux2KleinPipeline(
            scheduler=fresh_scheduler(components.scheduler),
            vae=components.vae,
            text_encoder=components.pipeline_text_encoder(0),
            tokenizer=components.tokenizers[0],
            transformer=components.pipeline_denoiser(),
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
