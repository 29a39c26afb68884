"""One training step of a config on fake tensors, with live bytes and FLOPs counted."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from lora_gui.config import TrainingConfig
from lora_gui.engine.families.base import Components, ModelFamily
from lora_gui.engine.planner import MemoryPlan, PlanError
from lora_gui.engine.planner.architecture import build_on_meta, denoiser_config, vae_config
from lora_gui.engine.planner.live_bytes import LiveBytes
from lora_gui.engine.planner.stand_ins import optimizer_state_bytes, stand_in_quantized_layers
from lora_gui.engine.planner.text_encoders import TEXT_ENCODERS, plan_text_encoders

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAMPLING = "validation sampling"
AFTER_SAMPLING = "resident while decoding"  # what stays on the device while the VAE decodes (no activations)
STEP_PHASES = ("activations", "backward", "optimizer state")


SWAPPED = "system memory (block swap)"
OFFLOADED = "system memory (offloaded activations)"
CAPTIONS = "caching captions"  # the text encoders encoding the captions; on the CPU when they do not fit
CATEGORIES = ("weights", "LoRA", "gradients", "optimizer state", "activations", "backward", "VAE", TEXT_ENCODERS,
              SAMPLING, SWAPPED, OFFLOADED)
# Repeated blocks are traced at these counts and the rest follows linearly (see _extrapolated).
BASE_BLOCKS = 1


class StepTrace(NamedTuple):
    phases: dict[str, tuple[int, dict]]  # phase: (most bytes live at once, their split at that moment)
    flops: int  # forward and backward of one micro-batch (with checkpointing's second forward)


def trace_training_step(config: TrainingConfig, cache_dir: str | None = None, exact: bool = False) -> MemoryPlan:
    started = time.perf_counter()
    family = _family(config, cache_dir)
    architecture = denoiser_config(family, config.model, cache_dir)
    counts = {key: count for key in family.planning_block_counts
              if (count := block_count(architecture, key)) > BASE_BLOCKS + 1}
    whole = exact or not counts
    vae = vae_config(family, config.model, cache_dir)
    if whole:
        traced = trace_step(family, config, architecture)
    elif config.model.block_swap > 0:  # traced without swap, then the swapped blocks' sizes (planner/swap.py)
        unswapped = config.model_copy(update={"model": config.model.model_copy(update={"block_swap": 0})})
        traced = _extrapolated(family, unswapped, architecture, counts)
        traced = _with_blocks_swapped(traced, config, architecture)
    else:
        traced = _extrapolated(family, config, architecture, counts)
    caching, decoding = _vae_peaks(config, family, vae)
    text = plan_text_encoders(family, config, cache_dir, DTYPES.get(config.model.weight_dtype, torch.bfloat16))
    if text is not None and text.training:
        traced = _with_text_encoder_training(traced, text.training)
    step_peak, step_split = max((traced.phases[name] for name in STEP_PHASES if name in traced.phases),
                                key=lambda item: item[0])
    resident, resident_split = traced.phases[AFTER_SAMPLING]
    candidates = {name: traced.phases[name] for name in (*STEP_PHASES, SAMPLING) if name in traced.phases}
    if decoding:
        candidates["decoding"] = (resident + decoding, {**resident_split, "VAE": decoding})
    phases = {"training step": step_peak,
              SAMPLING: max(candidates.get(SAMPLING, (0, {}))[0], candidates.get("decoding", (0, {}))[0]),
              "caching latents": caching, CAPTIONS: text.caching_peak if text and not text.training else 0}
    peak, split = max(candidates.values(), key=lambda item: item[0])
    notes = ("the text encoders (no config for this base)",) if text is None else ()
    notes += ("the VAE (no config for this base)",) if vae is None else ()
    if caching > peak:
        peak, split = caching, {**dict.fromkeys(CATEGORIES, 0), "VAE": caching}
    return MemoryPlan(family=family.name, resolution=config.dataset.resolution, batch_size=config.train.batch_size,
                      peak_bytes=peak, split=split, seconds=time.perf_counter() - started, not_traced=notes,
                      step_flops=traced.flops * config.train.gradient_accumulation,
                      max_steps=config.train.max_steps, phases=phases, step_split=step_split,
                      text_encoder_bytes=text.weights if text else 0,
                      text_encoders_train=bool(text and text.training))


def _with_text_encoder_training(traced: StepTrace, training: int) -> StepTrace:
    """With lora.train_text_encoder the text encoders, their LoRA and its state stay on the device all run long
    (``planner/text_encoders.py``): added to every phase."""
    return StepTrace({phase: (peak + training, {**split, TEXT_ENCODERS: split[TEXT_ENCODERS] + training})
                      for phase, (peak, split) in traced.phases.items()}, traced.flops)


def trace_step(family: ModelFamily, config: TrainingConfig, architecture: dict) -> StepTrace:
    """For each phase of one training step of this architecture (forward, backward, optimizer) and of the
    validation sampling that follows (the denoiser without gradients, CFG's two batches), the most bytes live at
    once and their split at that moment; what stays resident while the VAE then decodes (``AFTER_SAMPLING``);
    and the step's FLOPs (counted by ``LiveBytes`` with ``flops.op_flops``). The VAE is traced once on its own (``_vae_peaks``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight_dtype = DTYPES.get(config.model.weight_dtype, torch.bfloat16)  # auto: bf16 on a GPU
    compute_dtype = DTYPES.get(config.train.mixed_precision, torch.bfloat16)
    denoiser = _adapted_denoiser(family, config, architecture, weight_dtype)
    tracker = LiveBytes(off_device=frozenset({SWAPPED, OFFLOADED}))
    with FakeTensorMode(allow_non_fake_inputs=True):
        denoiser.to_empty(device="cpu")
        trainable = [p for p in denoiser.parameters() if p.requires_grad]
        if config.train.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        _swap_blocks(tracker, config, denoiser)
        _track_parameters(tracker, denoiser, trainable)
        denoiser.train()
        side = config.dataset.resolution
        with tracker:
            tracker.count_flops = True
            _forward_backward(tracker, family, config, denoiser, architecture, side, weight_dtype, compute_dtype)
            tracker.count_flops = False
            tracker.phase = "optimizer state"
            states = [torch.empty(optimizer_state_bytes(config.train.optimizer, p), dtype=torch.uint8)
                      for p in trainable]
            for state in states:
                tracker.track(state, "optimizer state")
            for parameter in trainable:
                parameter.grad = None  # the optimizer's zero_grad, before the images are rendered
            tracker.phase = SAMPLING
            _sampling(tracker, family, config, denoiser, architecture, weight_dtype, compute_dtype)
            resident = (tracker.total, dict(tracker.live))
    phases = {phase: (peak, {name: split.get(name, 0) for name in CATEGORIES})
              for phase, (peak, split) in tracker.phase_peaks.items()}
    phases[AFTER_SAMPLING] = (resident[0], {name: resident[1].get(name, 0) for name in CATEGORIES})
    return StepTrace(phases, tracker.flops)


def _extrapolated(family: ModelFamily, config: TrainingConfig, architecture: dict,
                  counts: dict[str, int]) -> StepTrace:
    """A model with long stacks of identical blocks, traced with BASE_BLOCKS of each kind and with one more of
    each kind in turn: what one more block adds to each phase's peak (its weights, LoRA, gradients, optimizer
    state and saved activations, and its FLOPs) is added for every further block. Tests check it against
    whole-model traces."""
    small = with_block_counts(architecture, {key: BASE_BLOCKS for key in counts})
    base = trace_step(family, config, small)
    phases = {phase: (peak, dict(split)) for phase, (peak, split) in base.phases.items()}
    flops = base.flops
    for key, count in counts.items():
        more = trace_step(family, config, with_block_counts(small, {key: BASE_BLOCKS + 1}))
        extra = count - BASE_BLOCKS
        for phase, (peak, split) in phases.items():
            extra_peak, extra_split = more.phases[phase]
            base_peak, base_split = base.phases[phase]
            phases[phase] = (peak + extra * (extra_peak - base_peak),
                             {name: split[name] + extra * (extra_split[name] - base_split[name])
                              for name in CATEGORIES})
        flops += extra * (more.flops - base.flops)
    return StepTrace(phases, flops)


def _with_blocks_swapped(traced: StepTrace, config: TrainingConfig, architecture: dict) -> StepTrace:
    """A trace without block swap, changed as swapping model.block_swap blocks changes it: their frozen weights
    go to system memory, SLOTS buffers per block shape come onto the accelerator (counted as weights)."""
    from lora_gui.engine.block_swap import config_problem, count_problem
    from lora_gui.engine.planner.swap import block_sizes, swap_sizes

    count = config.model.block_swap
    problem = config_problem(count, config.train.gradient_checkpointing, config.model.quantize)
    sizes = block_sizes(architecture, DTYPES.get(config.model.weight_dtype, torch.bfloat16))
    if problem is None and count > len(sizes):
        problem = count_problem(count, len(sizes))
    if problem:
        raise PlanError(problem)
    swap = swap_sizes(sizes, count)
    phases = {}
    for phase, (peak, split) in traced.phases.items():
        phases[phase] = (peak - swap.saved, {**split, "weights": split["weights"] - swap.saved,
                                             SWAPPED: split[SWAPPED] + swap.swapped})
    return StepTrace(phases, traced.flops)


def block_count(architecture: dict, key: str) -> int:
    """``architecture[key]``, or an entry of a list: ``"name[2]"`` (0 when absent or not a count)."""
    name, _, index = key.partition("[")
    value = architecture.get(name)
    if index:
        position = int(index.rstrip("]"))
        value = value[position] if isinstance(value, list | tuple) and len(value) > position else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def with_block_counts(architecture: dict, counts: dict[str, int]) -> dict:
    """A copy of the config with these counts (keys as in ``block_count``)."""
    changed = dict(architecture)
    for key, count in counts.items():
        name, _, index = key.partition("[")
        if index:
            values = list(changed[name])
            values[int(index.rstrip("]"))] = count
            changed[name] = values
        else:
            changed[name] = count
    return changed


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


def _swap_blocks(tracker: LiveBytes, config: TrainingConfig, denoiser: torch.nn.Module) -> None:
    """model.block_swap as training does it; the swapped weights count in system memory, not on the GPU."""
    from lora_gui.engine.block_swap import BlockSwapError, attach_block_swap

    try:
        swap = attach_block_swap(denoiser, config.model.block_swap, torch.device("cpu"),
                                 config.train.gradient_checkpointing, config.model.quantize)
    except BlockSwapError as exc:
        raise PlanError(str(exc)) from None
    for stored in (swap.stored.values() if swap else ()):
        for tensor in stored:
            tracker.track(tensor, SWAPPED)


def _track_parameters(tracker: LiveBytes, denoiser: torch.nn.Module, trainable: list) -> None:
    for parameter in denoiser.parameters():  # swapped weights keep their category
        tracker.track(parameter, "LoRA" if parameter.requires_grad else "weights", move=False)
    for buffer in denoiser.buffers():
        tracker.track(buffer, "weights", move=False)
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
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast, _offloading(tracker, config):
        prediction = family.predict(components, latents, timesteps, embeds, conditioning, config.train)
        loss = torch.nn.functional.mse_loss(prediction.float(), latents.float())
    del prediction
    tracker.phase = "backward"
    loss.backward()


def _offloading(tracker: LiveBytes, config: TrainingConfig):
    """train.offload_activations as training does it: the saved tensors it would copy to system memory count
    there, and each comes back to the device as a new tensor when the backward pass needs it."""
    from contextlib import nullcontext

    from lora_gui.engine.activation_offload import worth_offloading

    if not config.train.offload_activations:
        return nullcontext()

    def pack(tensor: torch.Tensor):
        if not worth_offloading(tensor):
            return tensor
        stored = tensor.clone()
        tracker.track(stored, OFFLOADED)
        return (stored,)

    def unpack(packed):
        return packed if isinstance(packed, torch.Tensor) else packed[0].clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def sample_size(config: TrainingConfig, family: ModelFamily) -> tuple[int, int]:
    """(height, width) of the validation images, as sampling snaps them."""
    multiple, side = family.size_multiple, config.dataset.resolution

    def snap(value: int) -> int:
        return max(multiple, (value or side) // multiple * multiple)

    return snap(config.sample.height), snap(config.sample.width)


def sampling_batch(family: ModelFamily, config: TrainingConfig) -> int:
    """The denoiser's batch per validation image: a conditional and an unconditional one with true CFG."""
    return 2 if family.samples_with_cfg and config.sample.guidance_scale > 1 else 1


def _sampling(tracker, family, config, denoiser, architecture, weight_dtype, compute_dtype) -> None:
    """One denoising step without gradients at the validation size (two batches with true CFG), with the
    training state still on the device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    height, width = sample_size(config, family)
    batch = sampling_batch(family, config)
    latents, embeds, conditioning = family.planning_inputs(architecture, batch, height, width, weight_dtype)
    components = Components(denoiser=denoiser, vae=None, text_encoders=[], tokenizers=[], scheduler=None,
                            source="planner", device=torch.device("cpu"), weight_dtype=weight_dtype)
    autocast = torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    denoiser.eval()
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast:
        family.predict(components, latents, torch.full((batch,), 500.0), embeds, conditioning, config.train)
    del latents, embeds


def _vae_built(architecture: dict, dtype):
    """The VAE on the fake device (built before a tracker starts: tracked tensors cannot be swapped in place)."""
    vae = build_on_meta(architecture)
    for module in vae.modules():  # set one by one: module.to() would swap tensors the fake mode already tracks
        for name, parameter in module.named_parameters(recurse=False):
            module._parameters[name] = torch.nn.Parameter(torch.empty(parameter.shape, dtype=dtype), requires_grad=False)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype if not buffer.is_floating_point()
                                                else dtype)
    return vae.eval()


def _track_vae(tracker: LiveBytes, vae) -> None:
    for tensor in (*vae.parameters(), *vae.buffers()):
        tracker.track(tensor, "VAE")


def _vae_latents(vae, batch: int, height: int, width: int, dtype) -> torch.Tensor:
    channels = vae.config.get("z_dim") or vae.config.get("latent_channels")
    if "z_dim" in vae.config:  # Qwen-Image's video VAE: one frame
        return torch.empty(batch, channels, 1, height // 8, width // 8, dtype=dtype)
    return torch.empty(batch, channels, height // 8, width // 8, dtype=dtype)


def _vae_peaks(config: TrainingConfig, family: ModelFamily, vae_architecture: dict | None) -> tuple[int, int]:
    """The VAE's own peaks: encoding a batch of training images into the latent cache (before the denoiser
    loads), and decoding a validation image (weights and activations, added to what sampling leaves resident)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if vae_architecture is None:
        return 0, 0
    dtype = DTYPES.get(config.model.weight_dtype, torch.bfloat16)
    side, batch = config.dataset.resolution, config.train.batch_size
    height, width = sample_size(config, family)
    peaks = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        vae = _vae_built(vae_architecture, dtype)
        for run in ("encode", "decode"):
            tracker = LiveBytes()
            _track_vae(tracker, vae)
            with tracker, torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                if run == "encode":
                    shape = (batch, 3, 1, side, side) if "z_dim" in vae.config else (batch, 3, side, side)
                    vae.encode(torch.empty(shape, dtype=dtype)).latent_dist.mode()
                else:
                    vae.decode(_vae_latents(vae, 1, height, width, dtype))
            peaks.append(tracker.peak)
    return peaks[0], peaks[1]
