"""Block swap in the plan, from the sizes of the blocks rather than a trace of every block.

Swapping changes one thing on the accelerator: the frozen weights of the last N repeated blocks leave it,
and ``SLOTS`` buffers per block shape take their place (``engine/block_swap.py``). Activations, LoRA,
gradients and optimizer state are those of the same run without swap, so a plan without swap (traced a
few blocks deep) plus these sizes gives the swapped plan; a test checks it against a trace of every block.
The same sizes give the smallest count that fits a card.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from lora_gui.engine.block_swap import SLOTS, repeated_blocks
from lora_gui.engine.planner.architecture import build_on_meta


class SwapSizes(NamedTuple):
    swapped: int  # frozen weight bytes of the swapped blocks, kept in system memory
    slots: int  # bytes of the slot buffers on the accelerator

    @property
    def saved(self) -> int:
        return self.swapped - self.slots


def block_sizes(architecture: dict, weight_dtype: torch.dtype) -> list[tuple[tuple, int]]:
    """For each repeated block in execution order: (its weights' shapes, its weight bytes)."""
    model = build_on_meta(architecture).to(weight_dtype)
    sizes = []
    for block in repeated_blocks(model):
        parameters = list(block.parameters())
        shapes = tuple((tuple(p.shape), p.dtype) for p in parameters)
        sizes.append((shapes, sum(p.numel() * p.element_size() for p in parameters)))
    return sizes


def swap_sizes(sizes: list[tuple[tuple, int]], count: int) -> SwapSizes:
    """What swapping the last ``count`` blocks moves off the accelerator, and the buffers it adds."""
    swapped = sizes[len(sizes) - count:] if count > 0 else []
    per_shape = Counter(shapes for shapes, _ in swapped)
    size_of = dict(swapped)
    return SwapSizes(sum(size for _, size in swapped),
                     sum(min(blocks, SLOTS) * size_of[shapes] for shapes, blocks in per_shape.items()))


def fewest_blocks_to_fit(sizes: list[tuple[tuple, int]], device_peaks: list[int], other_peaks: list[int],
                         total_for_peak, budget: int) -> int | None:
    """The smallest swap count whose plan fits ``budget`` bytes (None when swapping every block does not).

    ``device_peaks``: the phases' peaks that hold the denoiser's weights (training step, sampling);
    ``other_peaks``: those that do not (latent caching); ``total_for_peak``: the peak plus its allowance.
    """
    for count in range(len(sizes) + 1):
        saved = swap_sizes(sizes, count).saved
        peak = max([peak - saved for peak in device_peaks] + other_peaks)
        if total_for_peak(peak) <= budget:
            return count
    return None
