"""Silencing library messages that are expected here and only alarm people.

transformers says it falls back to Pillow image processors when torchvision is absent (we install
no torchvision on purpose); bitsandbytes says an optional CPU kernel package is missing; diffusers warns
about casting a model whose list of modules to keep in float32 is empty.
"""

from __future__ import annotations

import logging

EXPECTED_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "bitsandbytes.backends.cpu.ops": "from kernels-community",
    "diffusers.models.modeling_utils": "should be kept in float32: []",  # names no module: nothing to keep
}


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
