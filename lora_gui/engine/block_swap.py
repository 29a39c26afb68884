"""Block swap: the frozen weights of the denoiser's last N repeated blocks live in system memory and visit
the accelerator one block at a time, so a model larger than the card can train.

Each swapped block's frozen parameters keep a copy in system memory (pinned on CUDA). Before the block
runs, its weights are copied into one of ``SLOTS`` buffers on the accelerator and the parameters point
there; when a further swapped block needs the buffer, the block that used it longest ago goes back to
pointing at its system-memory copy (the weights are frozen, so nothing is copied back). LoRA weights
are trainable and stay on the accelerator.

It needs gradient checkpointing: without it autograd keeps every block's weights for the backward pass,
and a buffer could not be reused. With it, a block runs again just before its backward pass, which
loads it again; the chain of blocks runs in order, so its backward is over before an earlier block
needs the buffer.

Prefetch: the order in which blocks run repeats from step to step (forward in order, then the backward
pass's recomputation in reverse), so the block that followed the last two blocks last time is copied
while the current one computes. On CUDA the copy runs on a side stream that first waits for the work
already queued (the block whose buffer it overwrites has finished), and the block waits for its copy
before it runs. Elsewhere the copy is synchronous.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

SLOTS = 2  # buffers on the accelerator: the running block and the one before it


class BlockSwapError(ValueError):
    """Block swap cannot be used with this config; the message says what to change."""


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated transformer blocks in execution order (diffusers names their classes in
    ``_repeated_blocks``). None for UNets: they checkpoint a whole attention stack at once, so a block's
    buffer would be reused before its backward pass."""
    if "UNet" in type(denoiser).__name__:
        return []
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    return [module for module in denoiser.modules() if type(module).__name__ in names]


class BlockSwap:
    """Keeps the frozen weights of ``blocks`` in ``storage`` and loads them into accelerator slots on use."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, storage: torch.device) -> None:
        self.device, self.storage = device, storage
        self.frozen = {id(block): [p for p in block.parameters() if not p.requires_grad] for block in blocks}
        self.stored: dict[int, list[torch.Tensor]] = {}
        for block in blocks:
            self.stored[id(block)] = [self._to_storage(p.data) for p in self.frozen[id(block)]]
            for parameter, stored in zip(self.frozen[id(block)], self.stored[id(block)], strict=True):
                parameter.data = stored
        self.slots: list[list[torch.Tensor]] = []  # buffers, grown to SLOTS as blocks are first loaded
        self.loaded: OrderedDict[int, int] = OrderedDict()  # block id -> slot, oldest first
        self.loads = 0  # copies into a slot: on demand or prefetched
        self.waits = 0  # blocks that had to be copied when they were about to run (not prefetched)
        self.following: dict[tuple[int, int], int] = {}  # (block before, block) -> the block that ran next
        self.recent: tuple[int, int] = (0, 0)  # the ids of the last two blocks that ran
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copied: dict[int, torch.cuda.Event] = {}  # prefetched block -> its copy's end on the side stream
        self.handles = [block.register_forward_pre_hook(self._before_block) for block in blocks]

    def _to_storage(self, tensor: torch.Tensor) -> torch.Tensor:
        stored = tensor.detach().to(self.storage, copy=True)
        return stored.pin_memory() if self.device.type == "cuda" and self.storage.type == "cpu" else stored

    def _before_block(self, block: torch.nn.Module, _inputs) -> None:
        key = id(block)
        self.following[self.recent] = key
        self.recent = (self.recent[1], key)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            copied = self.copied.pop(key, None)
            if copied is not None:
                torch.cuda.current_stream(self.device).wait_event(copied)
        else:
            self._load(key, self._free_slot(key, running=None))
            self.waits += 1
        self._prefetch(key)

    def _prefetch(self, running: int) -> None:
        """Copy the block expected next (see the module's docstring) into a slot the running block is not using."""
        expected = self.following.get(self.recent)
        if expected is None or expected in self.loaded:
            return
        slot = self._free_slot(expected, running)
        if slot is None:
            return
        if self.copy_stream is None:
            self._load(expected, slot)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self._load(expected, slot)
        copied = torch.cuda.Event()
        copied.record(self.copy_stream)
        self.copied[expected] = copied

    def _load(self, key: int, slot: int) -> None:
        for parameter, stored, buffer in zip(self.frozen[key], self.stored[key], self.slots[slot], strict=True):
            buffer.copy_(stored, non_blocking=True)
            parameter.data = buffer
        self.loaded[key] = slot
        self.loaded.move_to_end(key)
        self.loads += 1

    def _free_slot(self, key: int, running: int | None) -> int | None:
        """A buffer set shaped for this block: a free one, a new one (up to SLOTS per shape), or the one of the
        block used longest ago other than ``running`` (None when only the running block's is left)."""
        shapes = [(p.shape, p.dtype) for p in self.frozen[key]]
        same = [slot for slot, buffers in enumerate(self.slots) if [(b.shape, b.dtype) for b in buffers] == shapes]
        busy = set(self.loaded.values())
        free = [slot for slot in same if slot not in busy]
        if free:
            return free[0]
        if len(same) < SLOTS:
            self.slots.append([torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in shapes])
            return len(self.slots) - 1
        oldest = next((loaded for loaded, slot in self.loaded.items() if slot in same and loaded != running), None)
        if oldest is None:
            return None
        slot = self.loaded[oldest]
        self._unload(oldest)
        return slot

    def _unload(self, key: int) -> None:
        self.loaded.pop(key)
        copied = self.copied.pop(key, None)
        if copied is not None:  # a prefetch still copying into the slot: later copies into it wait for it
            torch.cuda.current_stream(self.device).wait_event(copied)
        for parameter, stored in zip(self.frozen[key], self.stored[key], strict=True):
            parameter.data = stored

    def resident_blocks(self) -> int:
        return len(self.loaded)


def config_problem(count: int, gradient_checkpointing: bool, quantize: str) -> str | None:
    """Why these settings cannot swap blocks (None when they can, or when count is 0)."""
    if count <= 0:
        return None
    if not gradient_checkpointing:
        return ("model.block_swap needs train.gradient_checkpointing = true (without it every block's weights "
                "stay on the GPU for the backward pass).")
    if quantize != "none":
        return ("model.block_swap does not work with model.quantize yet: set one of them to none (quantized "
                "weights are smaller, so try model.quantize first).")
    return None


def count_problem(count: int, available: int) -> str:
    """The message for more swapped blocks than the model has."""
    return f"model.block_swap = {count}, but the model has {available} repeated blocks. Set it to {available} or less."


def attach_block_swap(denoiser: torch.nn.Module, count: int, device: torch.device, gradient_checkpointing: bool,
                      quantize: str, storage: torch.device | None = None) -> BlockSwap | None:
    """Swap the last ``count`` repeated blocks and move the rest of the denoiser to ``device``; None when count
    is 0. Raises BlockSwapError with what to change."""
    if count <= 0:
        return None
    problem = config_problem(count, gradient_checkpointing, quantize)
    if problem:
        raise BlockSwapError(problem)
    blocks = repeated_blocks(denoiser)
    if not blocks:
        raise BlockSwapError(f"model.block_swap: {type(denoiser).__name__} has no repeated transformer blocks to "
                             "swap (SD1.5 and SDXL UNets do not). Set model.block_swap = 0.")
    if count > len(blocks):
        raise BlockSwapError(count_problem(count, len(blocks)))
    swap = BlockSwap(blocks[-count:], device, storage or torch.device("cpu"))
    _move_except(denoiser, device, {id(p) for parameters in swap.frozen.values() for p in parameters})
    return swap


def _move_except(module: torch.nn.Module, device: torch.device, kept: set[int]) -> None:
    """``module.to(device)`` for every parameter and buffer except those in ``kept`` (ids)."""
    for parameter in module.parameters():
        if id(parameter) not in kept:
            parameter.data = parameter.data.to(device)
    for child in module.modules():
        for name, buffer in list(child.named_buffers(recurse=False)):
            child.register_buffer(name, buffer.to(device), persistent=name not in child._non_persistent_buffers_set)
