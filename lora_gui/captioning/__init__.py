"""Automatic captioning: one file per captioner behind the small interface in ``base``.

    captioner = get_captioner("blip", model=None)          # a Hub id or local folder; None = default
    summary = caption_dataset("data/dog", captioner, CaptionOptions(trigger="sks"), progress=print)

Bulk edits of existing captions are in ``lora_gui.captioning.bulk``.
"""

from lora_gui.captioning.base import Captioner, CaptionerError, unload_all_captioners
from lora_gui.captioning.registry import CaptionerInfo, captioner_names, get_captioner, list_captioners
from lora_gui.captioning.run import MODES, CaptionOptions, CaptionProgress, CaptionSummary, caption_dataset

__all__ = [
    "MODES",
    "CaptionOptions",
    "CaptionProgress",
    "CaptionSummary",
    "Captioner",
    "CaptionerError",
    "CaptionerInfo",
    "caption_dataset",
    "captioner_names",
    "get_captioner",
    "list_captioners",
    "unload_all_captioners",
]
