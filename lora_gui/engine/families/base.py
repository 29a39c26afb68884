"""The small interface every model family implements.

The generic training loop, the caches, LoRA saving and sampling talk to a family only
through this interface. Adding a family is one new file, one line in ``registry.py`` and
a preset.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch

    from lora_gui.config import ModelSection, TrainSection
    from lora_gui.engine.objectives import Objective
    from lora_gui.events import Emit


class Components:
    """A loaded base model: what a family needs to train and to sample.

    The denoiser may load on first use (``denoiser_loader``), so that the text encoders and the VAE fill the
    caches before it takes up memory; the text encoders may be released once every caption is cached
    (``release_text_encoders``) and load again, through ``text_encoder_loader``, when something needs them.
    """

    def __init__(self, denoiser: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any], scheduler: Any,
                 source: str, device: Any = None, weight_dtype: Any = None, extra: dict[str, Any] | None = None,
                 denoiser_loader: Callable[[], Any] | None = None,
                 text_encoder_loader: Callable[[], list[Any]] | None = None) -> None:
        self._denoiser = denoiser  # UNet2DConditionModel or a transformer
        self.vae = vae
        self._text_encoders: list[Any] | None = text_encoders
        self.tokenizers = tokenizers
        self.scheduler = scheduler  # the model's own scheduler (noise schedule, sampling)
        self.source = source  # resolved local folder or file the weights came from
        self.device = device  # torch.device
        self.weight_dtype = weight_dtype  # torch.dtype of the frozen weights
        self.extra = extra if extra is not None else {}
        self.denoiser_loader = denoiser_loader
        self.text_encoder_loader = text_encoder_loader

    def replaced(self, **changes: Any) -> Components:
        """A shallow copy with some parts replaced (a LoRA-wrapped denoiser, other text encoders)."""
        clone = copy.copy(self)
        for name, value in changes.items():
            setattr(clone, name, value)
        return clone

    @property
    def denoiser(self) -> Any:
        if self._denoiser is None and self.denoiser_loader is not None:
            self._denoiser, self.denoiser_loader = self.denoiser_loader(), None
        return self._denoiser

    @denoiser.setter
    def denoiser(self, module: Any) -> None:
        self._denoiser, self.denoiser_loader = module, None

    @property
    def denoiser_loaded(self) -> bool:
        return self._denoiser is not None

    def ensure_denoiser(self) -> Any:
        """The denoiser, loaded first if it was not yet."""
        return self.denoiser

    def pipeline_denoiser(self) -> Any:
        """The plain denoiser for a pipeline, or None while it is not loaded (a pipeline that only encodes
        prompts does not need it)."""
        from lora_gui.engine.families.common import unwrap

        return unwrap(self._denoiser) if self._denoiser is not None else None

    @property
    def text_encoders(self) -> list[Any]:
        if self._text_encoders is None:
            self._text_encoders = self.text_encoder_loader()
        return self._text_encoders

    @text_encoders.setter
    def text_encoders(self, modules: list[Any]) -> None:
        self._text_encoders = modules

    @property
    def text_encoders_loaded(self) -> bool:
        return self._text_encoders is not None

    def ensure_text_encoders(self) -> list[Any]:
        """The text encoders, loaded again first if they were released."""
        return self.text_encoders

    def release_text_encoders(self) -> bool:
        """Let the text encoders go from memory (they load again when used); False when they cannot come back."""
        if self.text_encoder_loader is None:
            return False
        self._text_encoders = None
        return True

    def pipeline_text_encoder(self, index: int) -> Any:
        """Text encoder ``index`` for a sampling pipeline, or None while released (prompts come encoded)."""
        from lora_gui.engine.families.common import unwrap

        return unwrap(self._text_encoders[index]) if self._text_encoders is not None else None


@dataclass
class Conditioning:
    """Per-sample facts about how an image was prepared (SDXL's size/crop conditioning)."""

    original_size: tuple[int, int]  # (height, width) of the image before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket


class ModelFamily(ABC):
    name: ClassVar[str]
    label: ClassVar[str]
    # Attribute on the diffusers pipeline and prefix in LoRA files: "unet" or "transformer".
    denoiser_key: ClassVar[str]
    # Pipeline attributes of the text encoders, in order ("text_encoder", "text_encoder_2").
    text_encoder_keys: ClassVar[tuple[str, ...]]
    # Target presets: name -> module-name patterns given to peft's ``target_modules``.
    lora_target_presets: ClassVar[dict[str, list[str]]]
    default_lora_targets: ClassVar[str]
    text_encoder_lora_targets: ClassVar[list[str]] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    supports_text_encoder_lora: ClassVar[bool] = True
    default_resolution: ClassVar[int] = 512
    # Image sides must be multiples of this (VAE downsampling times packing).
    size_multiple: ClassVar[int] = 8
    # ``_class_name`` in a diffusers folder's model_index.json: how model.family = "auto" knows a folder.
    pipeline_class_name: ClassVar[str]
    # Hugging Face ids the model picker offers (the first is the default on a GPU).
    hub_models: ClassVar[tuple[str, ...]] = ()
    # The single LoRA file's key prefix when it uses diffusers module names (None: the kohya layout), and
    # whether its alpha is folded into the weights instead of stored (for loaders that refuse alpha keys).
    single_file_lora_prefix: ClassVar[str | None] = None
    single_file_folds_alpha: ClassVar[bool] = False
    # The denoiser's published diffusers config per Hub id, for the memory planner without a download.
    planning_architectures: ClassVar[dict[str, dict[str, Any]]] = {}
    # Keys of that config that count identical blocks (the planner traces a few and adds the rest).
    planning_block_counts: ClassVar[tuple[str, ...]] = ()
    # The published VAE config of the family's models (the planner traces its encoding and decoding).
    planning_vae: ClassVar[dict[str, Any]] = {}
    # The published text encoders per Hub id (``published_text_encoders.PlannedTextEncoder``: config, tokens).
    planning_text_encoders: ClassVar[dict[str, tuple]] = {}
    # Whether validation sampling runs the denoiser on a conditional and an unconditional batch (true CFG).
    samples_with_cfg: ClassVar[bool] = True

    @classmethod
    def claims_checkpoint(cls, tensor_names: Collection[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is this family's (for model.family = "auto")."""
        return False

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class for this family."""

    @abstractmethod
    def load(self, model: ModelSection, device: torch.device, dtype: torch.dtype, emit: Emit) -> Components:
        """Load the base model (hub id, local folder, single file or builtin) onto ``device``."""

    @abstractmethod
    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text embeddings for a batch of captions, each tensor with the batch as its first dim.

        Called under ``torch.no_grad()`` unless a text-encoder LoRA is being trained.
        """

    @abstractmethod
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Latents, scaled (and shifted) as the denoiser expects, for pixels in [-1, 1] (B, 3, H, W)."""

    @abstractmethod
    def make_objective(self, components: Components, train: TrainSection) -> Objective:
        """The training objective: how noise, timesteps, targets and loss weights are drawn."""

    @abstractmethod
    def predict(
        self,
        components: Components,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: dict[str, torch.Tensor],
        conditioning: list[Conditioning],
        train: TrainSection,
    ) -> torch.Tensor:
        """The denoiser's prediction in the same layout as ``noisy_latents``."""

    @abstractmethod
    def build_pipeline(self, components: Components) -> Any:
        """A diffusers pipeline over the (possibly LoRA-wrapped) components, for sampling."""

    @abstractmethod
    def sampling_prompt_kwargs(self, pipeline: Any, components: Components, prompt: str, negative_prompt: str,
                               guidance_scale: float, device: Any) -> dict[str, Any]:
        """Prompt embeddings as the pipeline's ``__call__`` takes them, computed on ``device`` (where the text encoders are)."""

    def planning_inputs(self, architecture: dict[str, Any], batch: int, height: int, width: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Conditioning]]:
        """Empty latents, caption embeddings and conditioning shaped as ``predict`` gets them in training,
        for a denoiser with this config (the memory planner runs them on fake tensors)."""
        raise NotImplementedError

    def distillation_warning(self, components: Components) -> str | None:
        """What to know when the loaded base is a distilled model (None when it is not)."""
        return None

    def guidance_kwargs(self, guidance_scale: float) -> dict[str, Any]:
        """How the family's pipeline takes the sampling guidance scale."""
        return {"guidance_scale": guidance_scale}

    def sample_kwargs(self, components: Components) -> dict[str, Any]:
        """Extra keyword arguments the family's pipeline needs when sampling."""
        return {}

    def lora_targets(self, preset: str, denoiser: Any = None) -> list[str]:
        """peft ``target_modules`` for a preset; given the loaded ``denoiser`` a family may fit them to its size."""
        if preset == "auto":
            preset = self.default_lora_targets
        if preset not in self.lora_target_presets:
            known = ", ".join(self.lora_target_presets)
            raise ValueError(f"lora.targets: {preset!r} is not a target preset for {self.label}. Choose one of: {known}")
        return self.lora_target_presets[preset]

    def trainable_modules(self, components: Components, train_text_encoder: bool) -> dict[str, Any]:
        """Modules that receive LoRA adapters, keyed by their pipeline attribute name."""
        modules = {self.denoiser_key: components.denoiser}
        if train_text_encoder and self.supports_text_encoder_lora:
            modules.update(dict(zip(self.text_encoder_keys, components.text_encoders, strict=False)))
        return modules
