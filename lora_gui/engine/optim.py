"""Optimizers and learning-rate schedules, chosen by name from lookup tables.

Heavy packages (torch, bitsandbytes, prodigyopt, transformers, diffusers) are imported only when a
builder runs, so importing this module is cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lora_gui.config import TrainSection

# Params below this size keep 32-bit state in bitsandbytes; the probe must be big enough to take the 8-bit path.
_BNB_PROBE_NUMEL = 4096


def build_optimizer(param_groups: list[dict], train: TrainSection) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``; a group's own ``"lr"`` overrides ``train.learning_rate``."""
    builder = OPTIMIZERS.get(train.optimizer)
    if builder is None:
        known = ", ".join(OPTIMIZERS)
        raise ValueError(f"train.optimizer = {train.optimizer!r} is not known; choose one of: {known}")
    # Copies, because optimizers fill in defaults in place; lists, because params may be a generator.
    groups = [{**group, "params": list(group["params"])} for group in param_groups]
    return builder(groups, train)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The effective learning rate of the first param group (Prodigy-style optimizers: d * lr)."""
    group = optimizer.param_groups[0]
    return float(group.get("d", 1.0) * group["lr"])


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection):
    """A per-optimizer-step schedule (diffusers' get_scheduler) with warm-up over ``train.warmup_steps``."""
    name = SCHEDULERS.get(train.lr_scheduler)
    if name is None:
        known = ", ".join(SCHEDULERS)
        raise ValueError(f"train.lr_scheduler = {train.lr_scheduler!r} is not known; choose one of: {known}")
    if train.warmup_steps > 0 and train.warmup_steps >= train.max_steps:
        raise ValueError(
            f"train.warmup_steps ({train.warmup_steps}) must be less than train.max_steps ({train.max_steps}); "
            "lower train.warmup_steps"
        )
    if name == "constant" and train.warmup_steps > 0:
        name = "constant_with_warmup"  # warmup_steps promises a warm-up whatever the schedule
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
        num_cycles=train.lr_cycles,
        power=train.lr_power,
    )


# ----------------------------------------------------------------------------- optimizer builders


def _import(module: str, package: str, train: TrainSection) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken native library raising anything
        raise ValueError(
            f"train.optimizer = {train.optimizer!r} needs the {package} package, which could not be loaded "
            f"({exc}). Install it (pip install {package}) or set train.optimizer = 'adamw'."
        ) from exc


def _adamw(groups: list[dict], train: TrainSection):
    import torch

    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay, **fused_kwargs(groups))


def fused_kwargs(groups: list[dict]) -> dict[str, Any]:
    """``fused=True`` (one kernel for every parameter's update) when all parameters are floating-point CUDA
    tensors; otherwise torch's default (its multi-tensor ``foreach`` implementation where it can)."""
    params = [p for group in groups for p in group["params"]]
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def _bitsandbytes(class_name: str) -> Callable:
    def build(groups: list[dict], train: TrainSection):
        optim_cls = getattr(_import("bitsandbytes.optim", "bitsandbytes", train), class_name)
        _probe_bitsandbytes(optim_cls, groups, train)
        return optim_cls(groups, lr=train.learning_rate, weight_decay=train.weight_decay)

    return build


def _probe_bitsandbytes(optim_cls: type, groups: list[dict], train: TrainSection) -> None:
    """One step on a throwaway tensor, so an unsupported device fails now with advice, not mid-run."""
    import torch

    device = _first_param(groups).device
    try:
        probe = torch.nn.Parameter(torch.zeros(_BNB_PROBE_NUMEL, device=device))
        probe.grad = torch.ones_like(probe)
        optim_cls([probe], lr=1e-3).step()
    except Exception as exc:
        raise ValueError(
            f"train.optimizer = {train.optimizer!r} (bitsandbytes) does not run on {device.type} here ({exc}). "
            "Set train.optimizer = 'adamw' (or 'adafactor' to save memory)."
        ) from exc


def _first_param(groups: list[dict]):
    for group in groups:
        for param in group["params"]:
            return param
    raise ValueError("There are no trainable parameters: the LoRA adapter was not added to any layer.")


def _adafactor(groups: list[dict], train: TrainSection):
    optimization = _import("transformers.optimization", "transformers", train)
    return optimization.Adafactor(
        groups,
        lr=train.learning_rate,
        weight_decay=train.weight_decay,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )


def _prodigy(groups: list[dict], train: TrainSection):
    prodigyopt = _import("prodigyopt", "prodigyopt", train)
    return prodigyopt.Prodigy(
        groups,
        lr=train.learning_rate,
        weight_decay=train.weight_decay,
        decouple=True,
        safeguard_warmup=train.warmup_steps > 0,
    )


OPTIMIZERS: dict[str, Callable[[list[dict], TrainSection], Any]] = {
    "adamw": _adamw,
    "adamw8bit": _bitsandbytes("AdamW8bit"),
    "lion": _bitsandbytes("Lion"),
    "lion8bit": _bitsandbytes("Lion8bit"),
    "adafactor": _adafactor,
    "prodigy": _prodigy,
}

# Our names to diffusers' scheduler names.
SCHEDULERS: dict[str, str] = {
    "constant": "constant",
    "constant_with_warmup": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
}
