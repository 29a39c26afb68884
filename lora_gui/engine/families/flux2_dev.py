"""Flux.2 dev: Flux.2's guidance-distilled 32B transformer with a Mistral-Small-3.1 text encoder.

As diffusers' Flux.2 training recipe computes it (latents, objective and prediction in
``flux2_common``): the guidance value goes into the transformer's guidance embedding. Captions go
through the processor's chat template with Flux.2's system prompt; hidden states 10, 20 and 30 are
stacked per token, padded to 512 tokens (the transformer sees the padding, as in sampling). The Hub
folder ships its tokenizer as a PixtralProcessor, which needs torchvision: the tokenizer is loaded
alone with the processor's chat template.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families import flux2_common
from lora_gui.engine.families.base import Components, Conditioning, ModelFamily
from lora_gui.engine.families.builtin import is_builtin
from lora_gui.engine.families.common import fresh_scheduler, frozen_components
from lora_gui.engine.families.loading import load_pipeline
from lora_gui.engine.families.published_text_encoders import MISTRAL_SMALL_31, PlannedTextEncoder
from lora_gui.engine.families.published_vaes import FLUX2_VAE
from lora_gui.engine.objectives import FlowMatchingObjective
from lora_gui.lazy import lazy_module

torch = lazy_module("torch")
diffusers = lazy_module("diffusers")

if TYPE_CHECKING:
    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.events import Emit

TEXT_LAYERS = (10, 20, 30)
CAPTION_TOKENS = 512
BUILTIN_CAPTION_TOKENS = 256  # the system prompt alone is about 160 tokens in the tiny byte-level tokenizer


class Flux2DevFamily(ModelFamily):
    name = "flux2-dev"
    label = "Flux.2 dev"
    denoiser_key = "transformer"
    text_encoder_keys = ("text_encoder",)
    lora_target_presets = flux2_common.TARGET_PRESETS
    default_lora_targets = "attn"
    supports_text_encoder_lora = False
    default_resolution = 1024
    size_multiple = 16  # VAE factor 8 times the 2x2 patchify
    pipeline_class_name = "Flux2Pipeline"
    hub_models = ("black-forest-labs/FLUX.2-dev",)
    planning_architectures = {
        "black-forest-labs/FLUX.2-dev": {
            "_class_name": "Flux2Transformer2DModel", "in_channels": 128, "num_layers": 8, "num_single_layers": 48,
            "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360, "mlp_ratio": 3.0,
            "guidance_embeds": True},
    }
    planning_vae = FLUX2_VAE
    planning_text_encoders = {repo: (PlannedTextEncoder(MISTRAL_SMALL_31, CAPTION_TOKENS),)
                              for repo in planning_architectures}
    samples_with_cfg = False  # embedded guidance
    planning_block_counts = ("num_layers", "num_single_layers")
    default_components = "black-forest-labs/FLUX.2-dev"
    # Flux.2 loaders refuse alpha keys: the single file has diffusers names with the scale folded in.
    single_file_lora_prefix = "transformer."
    single_file_folds_alpha = True

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        is_flux2, has_guidance = flux2_common.checkpoint_kind(tensor_names)
        return is_flux2 and has_guidance

    def pipeline_class(self) -> type:
        return diffusers.Flux2Pipeline

    def lora_targets(self, preset: str, denoiser: Any = None) -> list[str]:
        return flux2_common.fitted_targets(super().lora_targets(preset, denoiser), denoiser)

    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        loaded = load_pipeline(model, diffusers.Flux2Pipeline, dtype, emit, denoiser_key=self.denoiser_key,
                               default_components=self.default_components,
                               single_file_part=("transformer", diffusers.Flux2Transformer2DModel),
                               strip_prefix="model.diffusion_model.", text_only_tokenizers=("tokenizer",))
        tokens = BUILTIN_CAPTION_TOKENS if is_builtin(model.base) else CAPTION_TOKENS
        return frozen_components(self, loaded, device, dtype, max_sequence_length=tokens)

    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = components.text_encoders[0]
        embeds = diffusers.Flux2Pipeline._get_mistral_3_small_prompt_embeds(
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
        """Only the prompt: dev's guidance is embedded, so it takes no negative prompt."""
        embeds, _ = pipeline.encode_prompt(prompt=prompt, device=device,
                                           max_sequence_length=components.extra["max_sequence_length"],
                                           text_encoder_out_layers=TEXT_LAYERS)
        return {"prompt_embeds": embeds}

    def build_pipeline(self, components: Components) -> Any:
        pipe = diffusers.Flux2Pipeline(
            scheduler=fresh_scheduler(components.scheduler),
            vae=components.vae,
            text_encoder=components.pipeline_text_encoder(0),
            tokenizer=components.tokenizers[0],
            transformer=components.pipeline_denoiser(),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_kwargs(self, components: Components) -> dict[str, Any]:
        return {"max_sequence_length": components.extra["max_sequence_length"],
                "text_encoder_out_layers": TEXT_LAYERS}
