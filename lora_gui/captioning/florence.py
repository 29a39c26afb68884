"""Florence-2: detailed natural-language captions, through transformers' built-in Florence-2 support.

The original microsoft/Florence-2-* repos need trust_remote_code and pickled weights; the
florence-community/* conversions load with the built-in classes and safetensors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.captioning.base import Captioner, CaptionerError, Placement
from lora_gui.captioning.hf import load_model_and_processor
from lora_gui.events import Emit

if TYPE_CHECKING:
    from PIL import Image

TASKS = {"caption": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "more_detailed": "<MORE_DETAILED_CAPTION>"}
# "The image shows a cat ..." -> "a cat ...": the opening words say nothing a LoRA can learn from.
_PREAMBLE = re.compile(r"^(?:in this image,?|the image (?:shows|is|depicts|features)|this image (?:shows|is|depicts)"
                       r"|this is)\s+", re.IGNORECASE)
_HINT = ("Use florence-community/Florence-2-base or florence-community/Florence-2-large (the versions converted "
         "for transformers' built-in Florence-2 support), or a folder saved from one with save_pretrained.")


class FlorenceCaptioner(Captioner):
    name = "florence2"
    label = "Florence-2 base: detailed sentences"
    default_model = "florence-community/Florence-2-base"
    default_batch_size = 8

    def __init__(self, model: str | None = None, *, detail: str = "detailed", max_new_tokens: int = 256,
                 num_beams: int = 3, drop_preamble: bool = True, cache_dir: str | None = None) -> None:
        super().__init__(model, cache_dir)
        if detail not in TASKS:
            raise CaptionerError(f"Unknown Florence-2 detail level {detail!r}: use one of {', '.join(TASKS)}.")
        if max_new_tokens < 1 or num_beams < 1:
            raise CaptionerError("max_new_tokens and num_beams must be at least 1.")
        self.task = TASKS[detail]
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.drop_preamble = drop_preamble
        self._network: Any = None
        self._processor: Any = None

    def _load(self, placement: Placement, progress: Emit) -> None:
        self._network, self._processor = load_model_and_processor(
            self.model, self.cache_dir, placement, progress, what="Florence-2 model",
            model_types={"florence2"}, classes=_classes, hint=_HINT)

    def _caption(self, images: list[Image.Image], paths: list[Path]) -> list[str]:
        import torch

        device, dtype = self.placement.device, self.placement.dtype
        inputs = self._processor(text=[self.task] * len(images), images=images, return_tensors="pt")
        with torch.inference_mode():
            ids = self._network.generate(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device),
                pixel_values=inputs["pixel_values"].to(device, dtype),
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
            )
        texts = [text.strip() for text in self._processor.batch_decode(ids, skip_special_tokens=True)]
        return [_drop_preamble(text) if self.drop_preamble else text for text in texts]

    def _release(self) -> None:
        self._network = self._processor = None


class FlorenceLargeCaptioner(FlorenceCaptioner):
    name = "florence2-large"
    label = "Florence-2 large: detailed sentences, more accurate than base"
    default_model = "florence-community/Florence-2-large"
    default_batch_size = 4


def _drop_preamble(text: str) -> str:
    stripped = _PREAMBLE.sub("", text, count=1)
    return stripped if stripped else text


def _classes() -> tuple[type, type]:
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    return Florence2ForConditionalGeneration, Florence2Processor
