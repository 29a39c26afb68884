"""Silencing library messages that are expected here and only alarm people.

transformers says it falls back to Pillow image processors when torchvision is absent (we install
no torchvision on purpose); bitsandbytes says an optional CPU kernel package is missing; diffusers warns
about casting a model whose list of modules to keep in float32 is empty; diffusers says a LoRA file has no
text-encoder weights, and peft that a model holds several adapters (the Test tab's comparisons).
"""

from __future__ import annotations

import logging
import re
import warnings

EXPECTED_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "bitsandbytes.backends.cpu.ops": "from kernels-community",
    "diffusers.models.modeling_utils": "should be kept in float32: []",  # names no module: nothing to keep
    # The Test tab loads LoRA files into a pipeline; a file without text-encoder weights is the usual case.
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
    "diffusers.loaders.peft": "No LoRA keys associated to",
}
# Python warnings (not log records) expected here: the Test tab compares several LoRAs in one model.
EXPECTED_WARNINGS = ("Already found a `peft_config` attribute in the model",)


class _DropMessagesContaining(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_expected_noise() -> None:
    """Drop the expected messages at their source loggers; everything else still shows. Idempotent."""
    for name, fragment in EXPECTED_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessagesContaining) for f in logger.filters):
            logger.addFilter(_DropMessagesContaining(fragment))
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))
