"""The text encoders in the plan: encoding the captions into the cache, and training their LoRA.

Each encoder is built at full size on the meta device from its transformers config (the base folder's, a
Hub download already in the local cache, or the family's table of published encoders), in the run's weight
dtype and ``model.quantize_text_encoders``, and one batch of captions at the family's token count runs
through all of them on fake tensors while ``LiveBytes`` counts (attention as on a GPU: flash SDPA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from lora_gui.config import TrainingConfig
from lora_gui.engine.families.base import ModelFamily
from lora_gui.engine.families.published_text_encoders import PlannedTextEncoder
from lora_gui.engine.planner.live_bytes import LiveBytes
from lora_gui.engine.planner.stand_ins import optimizer_state_bytes, stand_in_quantized_layers

TEXT_ENCODERS = "text encoders"


class TextEncoderPlan(NamedTuple):
    weights: int  # every encoder's weights, as they sit on the device together
    caching_peak: int  # weights and the activations of encoding one batch of captions
    training: int  # with lora.train_text_encoder: weights, LoRA, its gradients, optimizer state, saved activations


def planned_text_encoders(family: ModelFamily, config: TrainingConfig,
                          cache_dir: str | None = None) -> list[PlannedTextEncoder] | None:
    """The base's text encoders in order, with the family's token counts; None when unknown."""
    from lora_gui.engine.families.loading import ModelLoadError, resolve_source
    from lora_gui.engine.planner.architecture import _hub_cached_config

    model = config.model
    published = family.planning_text_encoders.get(model.base.strip())
    typical = published or next(iter(family.planning_text_encoders.values()), ())
    for base in (model.base, model.components):
        if not base:
            continue
        try:
            source = resolve_source(base.strip(), cache_dir)
        except ModelLoadError:
            continue
        found = []
        if source.kind == "folder":
            found = [json.loads(path.read_text(encoding="utf-8"))
                     for path in sorted(Path(source.location).glob("text_encoder*/config.json"))]
        elif source.kind == "hub" and typical:
            keys = ["text_encoder"] + [f"text_encoder_{index}" for index in range(2, len(typical) + 1)]
            found = [_hub_cached_config(source.location, key, model.revision) for key in keys]
            found = found if all(found) else []
        if found:
            tokens = [entry.tokens for entry in typical] or [77] * len(found)
            return [PlannedTextEncoder(config_json, tokens[min(index, len(tokens) - 1)])
                    for index, config_json in enumerate(found)]
    return list(published) if published else None


def build_text_encoder(config_json: dict, dtype: torch.dtype, quantize: str):
    """The transformers model of ``config_json`` on the meta device (quantized layers as stand-ins)."""
    import transformers
    from transformers import AutoConfig

    from lora_gui.engine.planner import PlanError
    from lora_gui.engine.quantize import TEXT_ENCODER_FULL_PRECISION

    settings = {key: value for key, value in config_json.items() if key != "architectures"}
    name = (config_json.get("architectures") or [""])[0]
    model_class = getattr(transformers, name, None)
    if model_class is None or "model_type" not in settings:
        raise PlanError(f"The text encoder class {name!r} is not in this transformers version.")
    with torch.device("meta"):
        encoder = model_class._from_config(AutoConfig.for_model(**settings))
    encoder = encoder.to(dtype).requires_grad_(False)
    if quantize != "none":
        stand_in_quantized_layers(encoder, quantize, dtype, keep=TEXT_ENCODER_FULL_PRECISION)
    return encoder.eval()


def plan_text_encoders(family: ModelFamily, config: TrainingConfig, cache_dir: str | None = None,
                       dtype: torch.dtype = torch.bfloat16) -> TextEncoderPlan | None:
    """The text encoders' weights and peaks (None when their configs are unknown)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    encoders = planned_text_encoders(family, config, cache_dir)
    if not encoders:
        return None
    batch = config.train.batch_size
    training = config.lora.train_text_encoder and family.supports_text_encoder_lora
    built = [build_text_encoder(entry.config, dtype, config.model.quantize_text_encoders) for entry in encoders]
    with FakeTensorMode(allow_non_fake_inputs=True):
        for encoder in built:
            materialize(encoder)
        tracker = LiveBytes()
        for encoder in built:
            for tensor in (*encoder.parameters(), *encoder.buffers()):
                tracker.track(tensor, TEXT_ENCODERS)
        weights = tracker.total
        with tracker, torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            outputs = [_encode(encoder, batch, entry.tokens) for encoder, entry in zip(built, encoders, strict=True)]
        del outputs
        caching_peak = tracker.peak
    trained = _training_bytes(family, config, encoders, dtype) if training else 0
    return TextEncoderPlan(weights, caching_peak, trained)


def materialize(module: torch.nn.Module) -> torch.nn.Module:
    """``module.to_empty(device="cpu")`` inside a fake mode, keeping shared weights shared (``to_empty`` gives
    each owner of a tied embedding its own copy)."""
    made: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for name, parameter in owner._parameters.items():
            if parameter is not None and id(parameter) not in made:
                made[id(parameter)] = torch.nn.Parameter(torch.empty_like(parameter, device="cpu"),
                                                         requires_grad=parameter.requires_grad)
            if parameter is not None:
                owner._parameters[name] = made[id(parameter)]
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                owner._buffers[name] = made.setdefault(id(buffer), torch.empty_like(buffer, device="cpu"))
    return module


def _encode(encoder, batch: int, tokens: int):
    """Captions padded to ``tokens``: with a mask that the encoders expand for attention (fake tensors hide
    whether it is all ones, and padded captions are not)."""
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    return encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)


def _training_bytes(family: ModelFamily, config: TrainingConfig, encoders: list[PlannedTextEncoder],
                    dtype: torch.dtype) -> int:
    """What the text encoders add to a training step with their LoRA: weights, LoRA, optimizer state, and at
    once the activations their backward pass needs and the LoRA gradients (an upper bound: on the device the
    gradients come when the denoiser's activations are already gone)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_gui.engine.lora import inject_lora

    built = [build_text_encoder(entry.config, dtype, "none") for entry in encoders]
    modules = {f"text_encoder_{index}": encoder for index, encoder in enumerate(built)}
    inject_lora(modules, dict.fromkeys(modules, family.text_encoder_lora_targets),
                config.lora.model_copy(update={"init": "default"}))
    batch = config.train.batch_size
    with FakeTensorMode(allow_non_fake_inputs=True):
        tracker = LiveBytes()
        trainable = []
        for encoder in built:
            materialize(encoder).train()
            for parameter in encoder.parameters():
                tracker.track(parameter, "LoRA" if parameter.requires_grad else TEXT_ENCODERS)
                if parameter.requires_grad:
                    trainable.append(parameter)
                    parameter.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, "gradients"))
        with tracker:
            outputs = [_encode(encoder, batch, entry.tokens).last_hidden_state
                       for encoder, entry in zip(built, encoders, strict=True)]
            sum(output.float().mean() for output in outputs).backward()
    return tracker.peak + sum(optimizer_state_bytes(config.train.optimizer, parameter) for parameter in trainable)
