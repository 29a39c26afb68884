"""What would make a run that does not fit a card fit, worked out from its plan."""

from __future__ import annotations

from lora_gui.config import TrainingConfig
from lora_gui.engine.planner import ALLOWANCE_BYTES, ALLOWANCE_FRACTION, GIB, HEADROOM, MemoryPlan

GENERIC = ("Lower dataset.resolution or train.batch_size, turn on train.gradient_checkpointing, set model.quantize "
           "(int8 or nf4), or pick a smaller preset (`lora-gui presets`).")


def fitting_advice(config: TrainingConfig, plan: MemoryPlan, card_gib: float, cache_dir: str | None = None) -> str:
    """For a plan over the card: the block swap count that fits it with HEADROOM to spare (the planner's own
    figures, see ``planner/swap.py``) where block swap applies, then the general remedies."""
    swap = _block_swap_line(config, plan, card_gib, cache_dir)
    return f"{swap} {GENERIC}" if swap else GENERIC


def _block_swap_line(config: TrainingConfig, plan: MemoryPlan, card_gib: float, cache_dir: str | None) -> str | None:
    import torch

    from lora_gui.engine.block_swap import config_problem
    from lora_gui.engine.planner import PlanError
    from lora_gui.engine.planner.architecture import denoiser_config
    from lora_gui.engine.planner.swap import block_sizes, fewest_blocks_to_fit
    from lora_gui.engine.planner.trace import DTYPES, SAMPLING, _family

    if config.model.block_swap > 0 or config_problem(1, config.train.gradient_checkpointing, config.model.quantize):
        return None
    try:
        family = _family(config, cache_dir)
        sizes = block_sizes(denoiser_config(family, config.model, cache_dir),
                            DTYPES.get(config.model.weight_dtype, torch.bfloat16))
    except PlanError:
        return None
    if not sizes:  # UNets have no repeated blocks to swap
        return None
    device_peaks = [plan.phases.get("training step", plan.peak_bytes), plan.phases.get(SAMPLING, 0)]
    budget = int((1 - HEADROOM) * card_gib * GIB)
    count = fewest_blocks_to_fit(sizes, device_peaks, [plan.phases.get("caching latents", 0)],
                                 lambda peak: peak + ALLOWANCE_BYTES + int(ALLOWANCE_FRACTION * peak), budget)
    if count is None:
        return (f"Even with every one of its {len(sizes)} blocks swapped (model.block_swap) it needs more than "
                f"{int(100 * (1 - HEADROOM))}% of a {card_gib:g} GB card.")
    return (f"model.block_swap = {count} (of {len(sizes)} blocks) fits it with {int(100 * HEADROOM)}% to spare, "
            "streaming those blocks' weights from system memory (slower steps).")
