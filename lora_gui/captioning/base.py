"""The captioner interface: load weights, caption a batch of images, unload.

Captioners are built by name through ``registry.get_captioner``. A captioner module imports
its heavy libraries (torch, transformers, onnxruntime) inside ``load``, so listing captioners
and starting the GUI stay fast.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.events import Emit, Status, ignore_events

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "fp16", "bf16", "fp32")

# GPU memory belongs to the process, so the record of which captioners hold it does too.
_LOADED: weakref.WeakSet[Captioner] = weakref.WeakSet()
_LOADED_LOCK = threading.Lock()


class CaptionerError(ValueError):
    """A captioner could not be built, loaded or run; the message says what to do."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


class Captioner(ABC):
    """Turns images into caption strings.

    Subclasses set the class attributes and implement ``_load``, ``_caption`` and ``_release``;
    the public ``load`` / ``caption`` / ``unload`` add the bookkeeping around them.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    default_model: ClassVar[str | None] = None
    default_batch_size: ClassVar[int] = 8
    needs_images: ClassVar[bool] = True  # False: ``caption`` works from the file paths alone
    needs_device: ClassVar[bool] = True  # False: no weights, so no device (and no torch import)

    def __init__(self, model: str | None = None, cache_dir: str | None = None) -> None:
        self.model = (model or self.default_model or "").strip()
        self.cache_dir = cache_dir
        self.placement: Placement | None = None
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self, device: str = "auto", dtype: str = "auto", progress: Emit = ignore_events) -> None:
        """Fetch the weights (Hub download with progress, or a local folder) and move them to ``device``."""
        if self.loaded:
            return
        placement = resolve_placement(device, dtype) if self.needs_device else None
        if placement is not None and self.model:
            where = placement.device.type.upper()
            progress(Status(f"Loading {self.name} captioner {self.model} on {where}"))
        self._load(placement, progress)
        self.placement, self._loaded = placement, True
        with _LOADED_LOCK:
            _LOADED.add(self)

    def caption(self, images: Sequence[Image.Image], paths: Sequence[str | Path] | None = None) -> list[str]:
        """One caption per image (``images`` may be empty when ``needs_images`` is False)."""
        if not self.loaded:
            self.load()
        paths = [Path(p) for p in paths or ()]
        count = len(images) if self.needs_images else len(paths)
        captions = self._caption(list(images), paths)
        if len(captions) != count:
            raise RuntimeError(f"{self.name} returned {len(captions)} captions for {count} images")
        return captions

    def unload(self) -> None:
        """Drop the weights and give their memory back (GPU memory included)."""
        if not self.loaded:
            return
        self._release()
        self.placement, self._loaded = None, False
        with _LOADED_LOCK:
            _LOADED.discard(self)
        free_memory()

    def settings(self) -> dict[str, Any]:
        """The choices that shape its captions; a resumed run must have the same ones."""
        return {key: value for key, value in vars(self).items()
                if not key.startswith("_") and key not in ("placement", "cache_dir")}

    def describe(self) -> str:
        return f"{self.name} ({self.model})" if self.model else self.name

    @abstractmethod
    def _load(self, placement: Placement | None, progress: Emit) -> None: ...

    @abstractmethod
    def _caption(self, images: list[Image.Image], paths: list[Path]) -> list[str]: ...

    @abstractmethod
    def _release(self) -> None:
        """Drop every reference to models and processors."""


def unload_all_captioners() -> int:
    """Unload every captioner still holding weights; the trainer calls this before it starts.

    Returns how many were unloaded. Safe to call at any time, from any thread.
    """
    with _LOADED_LOCK:
        loaded = list(_LOADED)
    for captioner in loaded:
        captioner.unload()
    free_memory()
    return len(loaded)


def free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # nothing to free if torch was never imported
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """CUDA with bf16 (fp16 on older cards) when there is a GPU, else the CPU in fp32."""
    import torch

    device, dtype = (device or "auto").strip().lower(), (dtype or "auto").strip().lower()
    if dtype not in DTYPES:
        raise CaptionerError(f"Unknown precision {dtype!r}: use one of {', '.join(DTYPES)}.")
    chosen = _pick_device(device, torch)
    if dtype == "auto":
        if chosen.type == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            dtype = "fp32"
    if chosen.type == "cpu" and dtype == "fp16":
        raise CaptionerError("fp16 does not work on the CPU: use fp32 (or 'auto') there.")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return Placement(chosen, torch_dtype)


def _pick_device(device: str, torch: Any) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise CaptionerError(f"Unknown device {device!r}: use auto, cuda, cuda:N, mps or cpu.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CaptionerError("The cuda device was asked for, but PyTorch sees no CUDA GPU. Use device 'auto' "
                             "(or 'cpu'), or install a CUDA build of PyTorch.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CaptionerError("The mps device was asked for, but Apple MPS is not available. Use device 'auto'.")
    return torch.device(device)
