"""One training step of a config on fake tensors, with live bytes and FLOPs counted."""

from __future__ import annotations

import time

import torch

from lora_gui.config import TrainingConfig
from lora_gui.engine.families.base import Components, ModelFamily
from lora_gui.engine.planner import MemoryPlan, PlanError
from lora_gui.engine.planner.architecture import build_on_meta, denoiser_config
from lora_gui.engine.planner.live_bytes import LiveBytes
from lora_gui.engine.planner.stand_ins import optimizer_state_bytes, stand_in_quantized_layers

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NOT_TRACED = (
    "caching latents and captions (VAE and text encoders; they leave the GPU before training starts)",
    "validation sampling",
)


def trace_training_step(config: TrainingConfig, cache_dir: str | None = None) -> MemoryPlan:
    started = time.perf_counter()
    family = _family(config, cache_dir)
    weight_dtype = DTYPES.get(config.model.weight_dtype, torch.bfloat16)  # auto: bf16 on a GPU
    compute_dtype = DTYPES.get(config.train.mixed_precision, torch.bfloat16)
    architecture = denoiser_config(family, config.model, cache_dir)
    denoiser = _adapted_denoiser(family, config, architecture, weight_dtype)
    tracker = LiveBytes()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        denoiser.to_empty(device="cpu")
        trainable = [p for p in denoiser.parameters() if p.requires_grad]
        _track_parameters(tracker, denoiser, trainable)
        if config.train.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        side = config.dataset.resolution
        with tracker:
            _forward_backward(tracker, family, config, denoiser, architecture, side, weight_dtype, compute_dtype)
            tracker.phase = "optimizer state"
            states = [torch.empty(optimizer_state_bytes(config.train.optimizer, p), dtype=torch.uint8)
                      for p in trainable]
            for state in states:
                tracker.track(state, "optimizer state")
    split = {name: tracker.peak_split.get(name, 0)
             for name in ("weights", "LoRA", "gradients", "optimizer state", "activations", "backward")}
    notes = NOT_TRACED + (("the text encoders' LoRA (lora.train_text_encoder)",) if config.lora.train_text_encoder else ())
    return MemoryPlan(family=family.name, resolution=side, batch_size=config.train.batch_size,
                      peak_bytes=tracker.peak, split=split,
                      seconds=time.perf_counter() - started, not_traced=notes)


def _family(config: TrainingConfig, cache_dir: str | None) -> ModelFamily:
    from lora_gui.engine.families.registry import get_family

    name = config.model.family
    if name == "auto":
        from lora_gui.engine.families.detect import detect_family

        try:
            name = detect_family(config.model.base, cache_dir, config.model.revision).family
        except ValueError as exc:
            raise PlanError(f"{exc} Set model.family to plan without the model at hand.") from None
    return get_family(name)


def _adapted_denoiser(family: ModelFamily, config: TrainingConfig, architecture: dict, weight_dtype):
    from lora_gui.engine.lora import inject_lora

    denoiser = build_on_meta(architecture).to(weight_dtype)
    if config.model.quantize != "none":
        stand_in_quantized_layers(denoiser, config.model.quantize, weight_dtype)
    lora = config.lora.model_copy(update={"init": "default"})  # PiSSA/OLoRA start from an SVD: same memory
    try:
        targets = family.lora_targets(config.lora.targets, denoiser)
        inject_lora({family.denoiser_key: denoiser}, {family.denoiser_key: targets}, lora)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return denoiser


def _track_parameters(tracker: LiveBytes, denoiser: torch.nn.Module, trainable: list) -> None:
    for parameter in denoiser.parameters():
        tracker.track(parameter, "LoRA" if parameter.requires_grad else "weights")
    for buffer in denoiser.buffers():
        tracker.track(buffer, "weights")
    for parameter in trainable:
        parameter.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, "gradients"))


def _forward_backward(tracker, family, config, denoiser, architecture, side, weight_dtype, compute_dtype) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = config.train.batch_size
    try:
        latents, embeds, conditioning = family.planning_inputs(architecture, batch, side, side, weight_dtype)
    except NotImplementedError:
        raise PlanError(f"The memory planner does not cover {family.label} yet.") from None
    components = Components(denoiser=denoiser, vae=None, text_encoders=[], tokenizers=[], scheduler=None,
                            source="planner", device=torch.device("cpu"), weight_dtype=weight_dtype)
    timesteps = torch.full((batch,), 500.0)
    autocast = torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast:
        prediction = family.predict(components, latents, timesteps, embeds, conditioning, config.train)
        loss = torch.nn.functional.mse_loss(prediction.float(), latents.float())
    del prediction
    tracker.phase = "backward"
    loss.backward()
