"""Rough peak-VRAM and time estimates for a config: arithmetic on published sizes, no model loading.

These are estimates, not measurements. Every constant lives in the tables below with its source;
``bench/train_step.py`` measures the real numbers on a GPU, and the tables should follow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_gui.config import TrainingConfig

GIB = 1024**3


@dataclass(frozen=True)
class FamilyCosts:
    denoiser_b: float  # parameters of the UNet / transformer, billions
    text_encoders_b: tuple[float, ...]  # parameters per text encoder, billions
    text_tokens: tuple[int, ...]  # tokens each text encoder reads per caption
    vae_b: float
    # LoRA parameters per unit of rank, millions, per target preset (counted from the published
    # layer shapes: rank * (in + out) for every adapted Linear).
    lora_m_per_rank: dict[str, float]
    text_encoder_lora_m_per_rank: float  # q/k/v/out of every text-encoder layer; 0: not supported
    default_targets: str  # what "auto" means (mirrors the family classes)
    base_resolution: int
    # Saved activations at batch 1 and base_resolution, bf16 with SDPA, GiB:
    # (without, with gradient checkpointing). Counted as ~18 saved tensors of tokens x width per
    # transformer block plus fp32 norm upcasts; rough, to be replaced by bench/ measurements.
    activations_gib: tuple[float, float]
    sampling_gib: float  # inference activations + VAE decode of one validation image at base_resolution
    # Forward TFLOPs per sample = fixed + scaled * (pixels / base pixels). DESIGN.md (torch flop
    # counter): SD1.5 512 px 0.80; SDXL 1024 px 6.76; Flux 512 px 21.5 and 1024 px 74.4, whose two
    # points give a fixed part (the 512 text tokens) of 3.87 and a pixel part of 70.53.
    forward_tflop_fixed: float
    forward_tflop_scaled: float


# Parameter counts: SD1.5 UNet 860M, CLIP-L 123M, VAE 84M; SDXL UNet 2.57B, CLIP-L + OpenCLIP-G 695M;
# Flux transformer 11.9B, CLIP-L + T5-XXL encoder 4.76B (model cards / diffusers configs).
FAMILY_COSTS: dict[str, FamilyCosts] = {
    "sd15": FamilyCosts(
        denoiser_b=0.860, text_encoders_b=(0.123,), text_tokens=(77,), vae_b=0.084,
        lora_m_per_rank={"attn": 0.199, "attn_ff": 0.374, "all_linear": 0.470},
        text_encoder_lora_m_per_rank=0.074, default_targets="attn_ff", base_resolution=512,
        activations_gib=(2.0, 0.5), sampling_gib=1.0, forward_tflop_fixed=0.0, forward_tflop_scaled=0.80,
    ),
    "sdxl": FamilyCosts(
        denoiser_b=2.567, text_encoders_b=(0.123, 0.695), text_tokens=(77, 77), vae_b=0.084,
        lora_m_per_rank={"attn": 1.451, "attn_ff": 2.616, "all_linear": 2.694},
        text_encoder_lora_m_per_rank=0.401, default_targets="attn_ff", base_resolution=1024,
        activations_gib=(6.0, 1.0), sampling_gib=3.0, forward_tflop_fixed=0.0, forward_tflop_scaled=6.76,
    ),
    "flux": FamilyCosts(
        denoiser_b=11.90, text_encoders_b=(0.123, 4.76), text_tokens=(77, 512), vae_b=0.084,
        lora_m_per_rank={"mmdit": 1.167, "all": 1.634, "all+ffs": 4.086, "context": 0.467,
                         "tiny": 0.037, "nano": 0.018},
        text_encoder_lora_m_per_rank=0.0, default_targets="all", base_resolution=1024,
        activations_gib=(30.0, 2.2), sampling_gib=3.5, forward_tflop_fixed=3.87, forward_tflop_scaled=70.53,
    ),
}

# Bytes per frozen weight. Quantization applies to the denoiser only; int4/nf4 keep scales and a
# few full-precision layers, hence ~0.55 rather than 0.5.
WEIGHT_BYTES = {"auto": 2.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}  # auto: bf16 on GPUs
QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "int4": 0.55, "nf4": 0.55}
# Per trainable (LoRA) parameter: fp32 weight 4 + fp32 gradient 4 + optimizer state below.
LORA_PARAM_AND_GRAD_BYTES = 8.0
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,  # two fp32 moments
    "adamw8bit": 2.0,  # two 8-bit moments (bitsandbytes)
    "lion": 4.0,  # one fp32 moment
    "lion8bit": 1.0,
    "adafactor": 4.0,  # factored second moment plus first moment, roughly
    "prodigy": 16.0,  # Adam moments plus Prodigy's s and x0 copies
}
CUDA_CONTEXT_GIB = 0.6  # CUDA context, cuBLAS/cuDNN workspaces
DORA_ACTIVATION_FACTOR = 1.3  # DoRA keeps weight norms and an extra product per layer (rough)

STEP_FORWARD_MULTIPLE = (2.2, 3.2)  # forward + backward of a LoRA step (DESIGN.md): (plain, checkpointing)
MODEL_FLOPS_UTILIZATION = 0.16  # published SDXL/Flux LoRA runs reach ~16-17% of peak (DESIGN.md)
OVERHEAD_SECONDS_PER_MICRO_BATCH = 0.05  # kernel launches, Python, optimizer: what dominates at batch 1
SAMPLING_OVERHEAD_SECONDS_PER_IMAGE = 0.5  # pipeline setup, VAE decode, moving encoders back
DEFAULT_GPU_TFLOPS = 100.0
# Peak dense bf16 tensor TFLOP/s (vendor datasheets; T4 and V100: fp16). First match wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("gh200", 989.0), ("b200", 2250.0),
    ("a100", 312.0), ("a800", 312.0), ("l40s", 362.0), ("l40", 181.0), ("rtx 6000 ada", 364.0), ("a6000", 155.0),
    ("a10g", 70.0), ("a10", 125.0), ("l4", 121.0), ("t4", 65.0), ("v100", 125.0),
    ("5090", 209.0), ("4090", 165.0), ("4080", 97.0), ("4070", 58.0), ("4060", 30.0),
    ("3090", 71.0), ("3080", 59.0), ("3070", 40.0), ("3060", 25.0),
)
# Built-in tiny models on CPU (DESIGN.md): 20 steps at batch 2, 64 px, on 2 cores took ~3 s
# (SD1.5/SDXL) and ~0.5 s (Flux): seconds per sample at 64 px.
TINY_CPU_SECONDS_PER_SAMPLE = {"sd15": 0.075, "sdxl": 0.075, "flux": 0.0125}
TINY_MODEL_GIB = 0.1


@dataclass(frozen=True)
class Estimate:
    peak_vram_gib: float  # during training steps
    seconds_per_step: float
    total_minutes: float  # steps plus validation images
    notes: list[str]
    fits: bool | None  # None: no GPU to compare with
    breakdown: dict[str, float] = field(default_factory=dict)  # GiB per part of the training peak
    sampling_gib: float = 0.0  # while rendering validation images
    loading_gib: float = 0.0  # while loading, before quantization


def gpu_peak_tflops(name: str | None) -> float:
    lowered = (name or "").lower()
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in lowered:
            return tflops
    return DEFAULT_GPU_TFLOPS


def has_estimate(family: str) -> bool:
    return family in FAMILY_COSTS and family in TINY_CPU_SECONDS_PER_SAMPLE


def estimate(config: TrainingConfig, gpu_total_gib: float | None, gpu_name: str | None) -> Estimate:
    costs = FAMILY_COSTS[config.model.family]
    tiny = config.model.base.startswith("builtin:")
    parts = _tiny_memory(config) if tiny else training_memory(config, costs)
    peak = sum(parts.values())
    sampling = peak if tiny else sampling_memory(config, costs)
    loading = peak if tiny else loading_memory(config, costs)
    if tiny and gpu_total_gib is None:
        step, sampling_seconds = _tiny_cpu_seconds(config), 0.0
    else:
        tflops = gpu_peak_tflops(gpu_name) * MODEL_FLOPS_UTILIZATION
        step = 0.0 if tiny else step_seconds(config, costs, tflops)
        step += OVERHEAD_SECONDS_PER_MICRO_BATCH * config.train.gradient_accumulation
        sampling_seconds = 0.0 if tiny else sampling_seconds_total(config, costs, tflops)
    total_minutes = (config.train.max_steps * step + sampling_seconds) / 60
    fits = None if gpu_total_gib is None else peak <= gpu_total_gib
    notes = _notes(config, tiny, gpu_total_gib, gpu_name, peak, sampling, loading)
    return Estimate(round(peak, 2), step, total_minutes, notes, fits,
                    {k: round(v, 2) for k, v in parts.items()}, round(sampling, 2), round(loading, 2))


# ----------------------------------------------------------------------------- memory


def pixel_ratio(resolution: int, costs: FamilyCosts) -> float:
    return (resolution / costs.base_resolution) ** 2


def text_encoders_on_gpu(config: TrainingConfig) -> bool:
    trains_encoder = config.lora.train_text_encoder and config.model.family != "flux"
    return not config.dataset.cache_text or config.dataset.shuffle_tags or trains_encoder


def lora_params(config: TrainingConfig, costs: FamilyCosts) -> float:
    targets = costs.default_targets if config.lora.targets == "auto" else config.lora.targets
    per_rank = costs.lora_m_per_rank.get(targets, costs.lora_m_per_rank[costs.default_targets])
    if config.lora.train_text_encoder:
        per_rank += costs.text_encoder_lora_m_per_rank
    return per_rank * 1e6 * config.lora.rank


def training_memory(config: TrainingConfig, costs: FamilyCosts) -> dict[str, float]:
    model, train = config.model, config.train
    weight_bytes = WEIGHT_BYTES[model.weight_dtype]
    denoiser_bytes = QUANT_BYTES.get(model.quantize, weight_bytes)
    state_bytes = LORA_PARAM_AND_GRAD_BYTES + OPTIMIZER_STATE_BYTES[train.optimizer]
    activations = costs.activations_gib[int(train.gradient_checkpointing)] * train.batch_size
    activations *= pixel_ratio(config.dataset.resolution, costs)
    if config.lora.use_dora:
        activations *= DORA_ACTIVATION_FACTOR
    encoders = sum(costs.text_encoders_b) * 1e9 * weight_bytes / GIB if text_encoders_on_gpu(config) else 0.0
    vae = 0.0 if config.dataset.cache_latents else costs.vae_b * 1e9 * weight_bytes / GIB
    return {
        "denoiser weights": costs.denoiser_b * 1e9 * denoiser_bytes / GIB,
        "text encoders": encoders,
        "VAE": vae,
        "LoRA + optimizer": lora_params(config, costs) * state_bytes / GIB,
        "activations": activations,
        "CUDA context": CUDA_CONTEXT_GIB,
    }


def sampling_memory(config: TrainingConfig, costs: FamilyCosts) -> float:
    """Validation images: the VAE joins the training state; prompts were encoded while caching, so the
    text encoders stay off the GPU unless they are there anyway."""
    parts = training_memory(config, costs)
    weight_bytes = WEIGHT_BYTES[config.model.weight_dtype]
    width = config.sample.width or config.dataset.resolution
    height = config.sample.height or config.dataset.resolution
    resident = sum(parts.values()) - parts["activations"] - parts["VAE"]
    vae = costs.vae_b * 1e9 * weight_bytes / GIB
    return resident + vae + costs.sampling_gib * width * height / costs.base_resolution**2


def loading_memory(config: TrainingConfig, costs: FamilyCosts) -> float:
    """While the caches fill: the text encoders and VAE are on the GPU; the denoiser joins only afterwards."""
    weight_bytes = WEIGHT_BYTES[config.model.weight_dtype]
    others_b = sum(costs.text_encoders_b) + costs.vae_b
    return others_b * weight_bytes * 1e9 / GIB + CUDA_CONTEXT_GIB


def _tiny_memory(config: TrainingConfig) -> dict[str, float]:
    return {"built-in tiny model": TINY_MODEL_GIB, "CUDA context": CUDA_CONTEXT_GIB}


# ----------------------------------------------------------------------------- time


def forward_tflop(costs: FamilyCosts, width: int, height: int) -> float:
    return costs.forward_tflop_fixed + costs.forward_tflop_scaled * width * height / costs.base_resolution**2


def step_seconds(config: TrainingConfig, costs: FamilyCosts, tflops_per_s: float) -> float:
    """Compute time of one optimizer step (without the fixed per-step overhead)."""
    res = config.dataset.resolution
    samples = config.train.batch_size * config.train.gradient_accumulation
    flop = forward_tflop(costs, res, res) * STEP_FORWARD_MULTIPLE[int(config.train.gradient_checkpointing)]
    if text_encoders_on_gpu(config):  # encoding captions every step: 2 FLOPs per parameter per token
        flop += sum(2 * p * 1e9 * t for p, t in zip(costs.text_encoders_b, costs.text_tokens, strict=True)) / 1e12
    return flop * samples / tflops_per_s


def sampling_seconds_total(config: TrainingConfig, costs: FamilyCosts, tflops_per_s: float) -> float:
    sample = config.sample
    events = (config.train.max_steps // sample.every if sample.every else 0) + 1  # +1: at the end
    width = sample.width or config.dataset.resolution
    height = sample.height or config.dataset.resolution
    guidance_passes = 2 if config.model.family != "flux" and sample.guidance_scale > 1 else 1
    per_image = forward_tflop(costs, width, height) * sample.steps * guidance_passes / tflops_per_s
    return events * len(sample.prompts) * (per_image + SAMPLING_OVERHEAD_SECONDS_PER_IMAGE)


def _tiny_cpu_seconds(config: TrainingConfig) -> float:
    samples = config.train.batch_size * config.train.gradient_accumulation
    per_sample = TINY_CPU_SECONDS_PER_SAMPLE[config.model.family]
    return per_sample * samples * (config.dataset.resolution / 64) ** 2


# ----------------------------------------------------------------------------- notes


def _notes(config: TrainingConfig, tiny: bool, gpu_gib: float | None, gpu_name: str | None,
           peak: float, sampling: float, loading: float) -> list[str]:
    notes = []
    if tiny:
        notes.append("Built-in tiny model: runs anywhere, a CPU included; steps take a fraction of a second "
                     "and a run takes seconds to minutes. It is for trying the workflow, not for real LoRAs.")
    elif gpu_gib is None:
        notes.append("No GPU detected: the memory and time are for a GPU (time for a ~100 TFLOP/s card). "
                     "Training a full-size model on a CPU would take days.")
    elif gpu_name and gpu_peak_tflops(gpu_name) == DEFAULT_GPU_TFLOPS:
        notes.append(f"{gpu_name} is not in the speed table; time assumes ~{DEFAULT_GPU_TFLOPS:.0f} TFLOP/s.")
    if config.model.device == "cpu" and not tiny:
        notes.append("model.device is cpu: the GPU will not be used, and training will be very slow.")
    if gpu_gib is not None and not tiny:
        notes += _memory_warnings(config, gpu_gib, peak, sampling, loading)
    if config.model.quantize != "none":
        notes.append("Quantization saves memory, not time: steps are no faster (often a little slower).")
    return notes


def _memory_warnings(config: TrainingConfig, gpu_gib: float, peak: float, sampling: float,
                     loading: float) -> list[str]:
    notes = []
    if peak > gpu_gib:
        notes.append(f"Training needs about {peak:.1f} GiB but the GPU has {gpu_gib:.1f} GiB: choose a smaller "
                     "preset, or enable gradient checkpointing, lower the batch size or resolution, or quantize.")
    if sampling > gpu_gib:
        notes.append(f"Rendering validation images needs about {sampling:.1f} GiB: this may run out of memory "
                     "then; lower sample.width/height or turn sampling off (sample.every = 0).")
    if loading > gpu_gib:
        notes.append(f"The text encoders need about {loading:.1f} GiB, more than this GPU has: captions will be "
                     "encoded on the CPU once (a slower start, then cached).")
    return notes
