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


class FlopCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.formulas = {**flop_registry, **{op: flop_registry[same] for op, same in SAME_WORK.items()}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out
