"""Activation offloading: the tensors autograd saves for the backward pass wait in system memory.

The model's own weights (and views of them) stay where they are, since they are in memory anyway,
and so do small tensors, whose copies would cost more than they save. On CUDA the copies go to pinned
memory without blocking, and come back when the backward pass needs them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

SMALLEST_OFFLOADED_BYTES = 1 << 20


def is_weight(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, torch.nn.Parameter) or isinstance(getattr(tensor, "_base", None), torch.nn.Parameter)


def worth_offloading(tensor: torch.Tensor) -> bool:
    """Not a weight, not small, and the whole of its storage (so the copy frees it all and, laid out as the
    original, gives the backward pass the same numbers)."""
    size = tensor.numel() * tensor.element_size()
    return not is_weight(tensor) and size >= SMALLEST_OFFLOADED_BYTES and tensor.untyped_storage().nbytes() == size


def offloaded_activations(enabled: bool, device: torch.device) -> AbstractContextManager:
    """Saved tensors go to system memory while this is active (a no-op when not ``enabled``)."""
    if not enabled:
        return nullcontext()
    pin = device.type == "cuda"

    def copy_out(tensor: torch.Tensor) -> torch.Tensor:
        stored = torch.empty_like(tensor, device="cpu", pin_memory=pin)  # same strides
        return stored.copy_(tensor, non_blocking=pin)

    def pack(tensor: torch.Tensor):
        if not worth_offloading(tensor):
            return tensor
        return tensor.device, copy_out(tensor)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        where, stored = packed
        return stored.to(where, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
