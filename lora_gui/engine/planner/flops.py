"""A FLOP count of the operations a traced step dispatches, with torch's own per-operation formulas.

torch's ``FlopCounterMode`` decomposes the operations it has no formula for into smaller ones, which
keeps extra intermediates alive and would change the memory trace; this mode runs every operation as
it comes and only adds up the FLOPs of those with a formula (matrix products, convolutions, attention).
The CPU flash-attention kernels the planner's fake tensors run count as the GPU's flash attention does.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
SAME_WORK = {
    aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: aten._scaled_dot_product_flash_attention_backward,
}


FORMULAS = {**flop_registry, **{op: flop_registry[same] for op, same in SAME_WORK.items()}}


def op_flops(func, args, kwargs, out) -> int:
    """The FLOPs of one dispatched operation (0 for those without a formula: elementwise, norms, copies)."""
    formula = FORMULAS.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


class FlopCount(TorchDispatchMode):
    """Counts on its own; the planner's ``LiveBytes`` counts the same in its own dispatch (one mode is faster)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.flops += op_flops(func, args, kwargs, out)
        return out
