"""Turning exceptions into messages a person can act on."""

from __future__ import annotations

import traceback
from dataclasses import dataclass


class TrainingError(RuntimeError):
    """A failure with a message for people and, optionally, what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class StopRequested(Exception):  # noqa: N818 (a request, not an error)
    """Raised between units of work (files, batches, denoising steps) once a stop was asked for."""


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, paths: list[str]) -> None:
        files = ", ".join(paths) or "unknown files"
        super().__init__(
            f"The loss became NaN or infinite at step {step} (batch: {files}). No weights were updated "
            "with it and the last saved checkpoint is intact.",
            "Lower train.learning_rate, use train.mixed_precision = 'bf16' or 'fp32' instead of fp16, "
            "or check those images; then resume from the last checkpoint.",
        )


@dataclass(frozen=True)
class Explanation:
    message: str
    hint: str
    details: str


def explain(exc: BaseException) -> Explanation:
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, TrainingError):
        return Explanation(exc.message, exc.hint, details)
    from lora_gui.engine.checkpoint import is_disk_full

    if is_disk_full(exc):
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        return Explanation(
            f"The disk is full{where}: {exc}. Checkpoints saved so far are kept.",
            "Free space on the disk holding output.dir (or lower output.keep_last), then resume from the latest "
            "checkpoint.",
            details,
        )
    if _is_out_of_memory(exc):
        return Explanation(
            "The GPU ran out of memory. Checkpoints saved so far are kept.",
            "Pick the next smaller VRAM preset, or lower train.batch_size or dataset.resolution, turn on "
            "train.gradient_checkpointing, use an 8-bit optimizer, or set model.quantize; then resume.",
            details,
        )
    if isinstance(exc, (ValueError, FileNotFoundError, PermissionError)):
        return Explanation(str(exc), "", details)
    return Explanation(
        f"Training failed unexpectedly: {type(exc).__name__}: {exc}",
        "Checkpoints saved so far are kept; resume from the latest one after fixing the cause. "
        "If it keeps happening, report it with the details below.",
        details,
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "cuda error: out of memory" in text)
