"""Choosing the device and precisions, and reading accelerator memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_gui.config import TrainingConfig
from lora_gui.engine.planner import TEXT_ENCODER_SHARE

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    weight_dtype: torch.dtype  # frozen base weights
    autocast_dtype: torch.dtype | None  # None: no autocast (full precision)

    @property
    def uses_grad_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16 and self.device.type == "cuda"

    def describe(self) -> str:
        autocast = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "off"
        weights = str(self.weight_dtype).replace("torch.", "")
        return f"{self.device.type.upper()}, weights {weights}, mixed precision {autocast}"


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "model.device is 'cuda' but PyTorch sees no CUDA GPU. Set model.device = 'auto' "
            "(or 'cpu'), or reinstall PyTorch with CUDA support."
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("model.device is 'mps' but Apple MPS is not available; set model.device = 'auto'.")
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _best_half(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def resolve_placement(config: TrainingConfig) -> Placement:
    device = pick_device(config.model.device)
    accelerator = device.type in ("cuda", "mps")
    if config.model.weight_dtype == "auto":
        weight_dtype = _best_half(device) if accelerator else torch.float32
    else:
        weight_dtype = _DTYPES[config.model.weight_dtype]
    precision = config.train.mixed_precision
    if precision == "auto":
        autocast = _best_half(device) if accelerator else None
    else:
        autocast = None if precision == "fp32" else _DTYPES[precision]
    if autocast == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU does not support bf16. Set train.mixed_precision = 'fp16' (or 'auto').")
    return Placement(device=device, weight_dtype=weight_dtype, autocast_dtype=autocast)


def autocast_context(placement: Placement):
    import contextlib

    if placement.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=placement.device.type, dtype=placement.autocast_dtype)


def memory_report(device: torch.device) -> dict[str, float]:
    """Allocated/peak/total memory in GiB on a CUDA device; empty elsewhere."""
    if device.type != "cuda":
        return {}
    gib = 1024**3
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "peak_gib": torch.cuda.max_memory_allocated(device) / gib,
        "total_gib": torch.cuda.get_device_properties(device).total_memory / gib,
    }


def free_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def text_encoder_device(text_encoders, device: torch.device, headroom: float = TEXT_ENCODER_SHARE) -> torch.device:
    """Where the text encoders run: the accelerator if they fit in ``headroom`` of its free memory, else the CPU.

    A large encoder (Flux's T5, about 9.5 GB in bf16) on a small GPU encodes on the CPU: slower, but
    captions are encoded once and cached.
    """
    if device.type != "cuda" or not text_encoders:
        return device
    on_device = sum(module_bytes([m]) for m in text_encoders if next(m.parameters()).device.type == "cuda")
    free, _ = torch.cuda.mem_get_info(device)
    needed = module_bytes(text_encoders) - on_device
    return device if needed <= free * headroom else torch.device("cpu")


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, side: int = 4096,
                           repeats: int = 10) -> float | None:
    """The accelerator's speed at large matrix products, measured now (TFLOP/s); None off CUDA.

    A training step's FLOPs divided by this is the least time the step can take."""
    import time

    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    left = torch.randn(side, side, device=device, dtype=dtype)
    right = torch.randn(side, side, device=device, dtype=dtype)
    torch.matmul(left, right)  # warm-up: kernel selection, clocks
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(left, right)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    del left, right
    return 2 * side**3 * repeats / seconds / 1e12
