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

    def lines(self) -> list[str]:
        parts = ", ".join(f"{name} {size_text(size)}" for name, size in self.split.items()
                          if size and not name.startswith("system memory"))
        lines = [
            f"Training step, {self.family} at {self.resolution} px, batch {self.batch_size}: "
            f"peak {size_text(self.peak_bytes)} traced ({parts})",
            f"Allowance for the CUDA context and allocator (assumed, not traced): {size_text(self.allowance_bytes)}; "
            f"total {size_text(self.total_bytes)}",
        ]
        swapped = self.split.get("system memory (block swap)", 0)
        if swapped:
            lines.append(f"Block swap keeps {size_text(swapped)} of frozen weights in system memory")
        lines += [f"Not planned yet: {item}" for item in self.not_traced]
        lines.append(f"(traced in {self.seconds:.0f} s)")
        return lines


def size_text(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 1024**2:.1f} MiB"


def plan_memory(config: TrainingConfig, cache_dir: str | None = None, exact: bool = False) -> MemoryPlan:
    """Trace the config's training step; raises PlanError when it cannot. ``exact`` traces every block of a
    long stack instead of a few (slower; the same figures within a fraction of a percent)."""
    from lora_gui.engine.planner.trace import trace_training_step

    return trace_training_step(config, cache_dir, exact=exact)
