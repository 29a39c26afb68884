"""BLIP: short natural-language captions ("a woman sitting on a bench in a park")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.captioning.base import Captioner, CaptionerError, Placement
from lora_gui.captioning.hf import load_model_and_processor
from lora_gui.events import Emit

if TYPE_CHECKING:
    from PIL import Image

# BLIP-large often starts with a made-up word ("arafed woman ..."), a known quirk of its training data.
_ARTIFACT = re.compile(r"\b(an? )?(?:arafed|araffe|arafe)\s+", re.IGNORECASE)
_HINT = ("Use a BLIP captioning model such as Salesforce/blip-image-captioning-base or "
         "Salesforce/blip-image-captioning-large, or a folder saved from one with save_pretrained.")


class BlipCaptioner(Captioner):
    name = "blip"
    label = "BLIP base: short sentences, fast"
    default_model = "Salesforce/blip-image-captioning-base"
    default_batch_size = 16

    def __init__(self, model: str | None = None, *, max_new_tokens: int = 40, num_beams: int = 3,
                 cache_dir: str | None = None) -> None:
        super().__init__(model, cache_dir)
        if max_new_tokens < 1 or num_beams < 1:
            raise CaptionerError("max_new_tokens and num_beams must be at least 1.")
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self._network: Any = None
        self._processor: Any = None

    def _load(self, placement: Placement, progress: Emit) -> None:
        self._network, self._processor = load_model_and_processor(
            self.model, self.cache_dir, placement, progress, what="BLIP captioning model",
            model_types={"blip"}, classes=_classes, hint=_HINT)

    def _caption(self, images: list[Image.Image], paths: list[Path]) -> list[str]:
        import torch

        device, dtype = self.placement.device, self.placement.dtype
        pixels = self._processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
        with torch.inference_mode():
            ids = self._network.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens,
                                         num_beams=self.num_beams)
        texts = self._processor.batch_decode(ids, skip_special_tokens=True)
        return [_ARTIFACT.sub(lambda m: "a " if m.group(1) else "", text).strip() for text in texts]

    def _release(self) -> None:
        self._network = self._processor = None


class BlipLargeCaptioner(BlipCaptioner):
    name = "blip-large"
    label = "BLIP large: short sentences, more accurate than base"
    default_model = "Salesforce/blip-image-captioning-large"
    default_batch_size = 8


def _classes() -> tuple[type, type]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    return BlipForConditionalGeneration, BlipProcessor
