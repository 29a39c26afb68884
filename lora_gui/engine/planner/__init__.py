"""The memory planner: runs the config's real training step on fake tensors and counts live bytes.

The denoiser is built at full size from its architecture (``architecture.py``) on the meta device,
with the config's weight dtype, quantization (``stand_ins``), LoRA targets, rank and gradient
checkpointing; then one forward pass through the family's own ``predict``, the loss, the backward
pass and the optimizer's states run on fake tensors (shapes only, no memory, no arithmetic) while
``LiveBytes`` counts every storage that is alive. Attention runs the flash kernel, as on a GPU with
PyTorch's SDPA: the score matrix is never materialised. It takes seconds on a CPU.

What it does not trace yet is listed in ``MemoryPlan.not_traced``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_gui.config import TrainingConfig

GIB = 1024**3
# Not traced: the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's rounding. An
# allowance, not a measurement, shown as such until bench/ measures it on a GPU.
ALLOWANCE_BYTES = int(0.75 * GIB)
ALLOWANCE_FRACTION = 0.05
HEADROOM = 0.10  # presets must keep this much of the card free in the plan
TEXT_ENCODER_SHARE = 0.85  # of the free memory, for the text encoders to go on the GPU (devices.text_encoder_device)


class PlanError(ValueError):
    """The planner cannot plan this config; the message says why and what to do."""


@dataclass(frozen=True)
class MemoryPlan:
    family: str
    resolution: int
    batch_size: int
    peak_bytes: int  # traced: the most tensor bytes alive at once during the step
    split: dict[str, int]  # the categories at that moment
    seconds: float  # how long the trace took
    not_traced: tuple[str, ...] = field(default=())
    step_flops: int = 0  # one optimizer step's forward and backward passes, as traced
    max_steps: int = 0
    phases: dict[str, int] = field(default_factory=dict)  # the peak of each phase of the run
    step_split: dict[str, int] = field(default_factory=dict)  # the categories at the training step's peak
    text_encoder_bytes: int = 0  # the text encoders' weights (0: not planned)
    text_encoders_train: bool = False  # lora.train_text_encoder: they stay on the device, counted in the step

    @property
    def allowance_bytes(self) -> int:
        return ALLOWANCE_BYTES + int(ALLOWANCE_FRACTION * self.peak_bytes)

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.allowance_bytes

    def headroom(self, card_gib: float) -> float:
        """The fraction of the card left free (negative: it does not fit)."""
        return 1.0 - self.total_bytes / (card_gib * GIB)

    def verdict(self, card_gib: float) -> str:
        need = self.total_bytes / GIB
        if need <= card_gib:
            return f"fits a {card_gib:g} GB card with {card_gib - need:.1f} GiB to spare"
        return f"needs {need:.1f} GiB: {need - card_gib:.1f} GiB more than a {card_gib:g} GB card has"

    def captions_on_gpu(self, card_gib: float) -> bool:
        """Whether the trainer encodes the captions on this card: when the text encoders' weights fit in 85% of
        its free memory (``devices.text_encoder_device``), here the card less the allowance."""
        return self.text_encoder_bytes <= TEXT_ENCODER_SHARE * (card_gib * GIB - ALLOWANCE_BYTES)

    def caption_line(self, card_gib: float | None = None) -> str | None:
        """Where the captions are encoded, and what that takes."""
        if not self.text_encoder_bytes or self.text_encoders_train:
            return None
        size = (f"the text encoders take {size_text(self.phases.get('caching captions', 0))} while they encode "
                f"(weights {size_text(self.text_encoder_bytes)})")
        if card_gib is None:
            return (f"Caption encoding (once, before the denoiser loads): {size}; on a GPU with less free memory "
                    "they run on the CPU (slower, once: the embeddings are cached).")
        if self.captions_on_gpu(card_gib):
            return f"Captions are encoded on the {card_gib:g} GB card (once, before the denoiser loads): {size}."
        return (f"Captions are encoded on the CPU (slower, once: the embeddings are cached): {size}, more than a "
                f"{card_gib:g} GB card can hold. model.quantize_text_encoders (int8 or nf4) makes them smaller.")

    def lines(self) -> list[str]:
        parts = ", ".join(f"{name} {size_text(size)}" for name, size in self.split.items()
                          if size and not name.startswith("system memory"))
        phases = ", ".join(f"{name} {size_text(size)}" + (" (GPU or CPU)" if name == "caching captions" else "")
                           for name, size in self.phases.items() if size)
        lines = [
            f"{self.family} at {self.resolution} px, batch {self.batch_size}: peak {size_text(self.peak_bytes)} traced "
            f"({parts})",
            *([f"Peaks by phase: {phases}"] if phases else []),
            f"Allowance for the CUDA context and allocator (assumed, not traced): {size_text(self.allowance_bytes)}; "
            f"total {size_text(self.total_bytes)}",
        ]
        swapped = self.step_split.get("system memory (block swap)", 0)
        if swapped:
            lines.append(f"Block swap keeps {size_text(swapped)} of frozen weights in system memory")
        offloaded = self.step_split.get("system memory (offloaded activations)", 0)
        if offloaded:
            lines.append(f"Activation offloading keeps {size_text(offloaded)} in system memory at the training step's "
                         "peak")
        lines += [f"Not planned yet: {item}" for item in self.not_traced]
        lines.append(f"(traced in {self.seconds:.0f} s)")
        return lines


    def time_line(self, tflops: float | None) -> str:
        """The least time a step takes at ``tflops`` (the card's measured matrix speed; None: not measured)."""
        work = f"One training step computes {self.step_flops / 1e12:.2f} TFLOP (traced)"
        if not tflops:
            return f"{work}; run the plan on the GPU itself for a time, or see the speed on the Train tab."
        seconds = self.step_flops / (tflops * 1e12)
        return (f"{work}: at this GPU's measured matrix speed ({tflops:.0f} TFLOP/s) at least {seconds:.2f} s per step, "
                f"{duration_text(seconds * self.max_steps)} for {self.max_steps} steps. Real steps are slower "
                "(attention, memory-bound layers, data); the Train tab shows the measured speed after the first steps.")


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def size_text(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 1024**2:.1f} MiB"


def plan_memory(config: TrainingConfig, cache_dir: str | None = None, exact: bool = False) -> MemoryPlan:
    """Trace the config's training step; raises PlanError when it cannot. ``exact`` traces every block of a
    long stack instead of a few (slower; the same figures within a fraction of a percent)."""
    from lora_gui.engine.planner.trace import trace_training_step

    return trace_training_step(config, cache_dir, exact=exact)
