"""What quantized layers and optimizer states hold, for the planner: the same bytes as the real ones.

bitsandbytes and optimum-quanto kernels do not run on fake tensors, so a quantized Linear is planned
as a layer that stores its packed weight (and scales) and, in ``forward``, makes the full-size weight
in the compute dtype for the matmul, as both libraries' weight-only paths do. Optimizer states are
added as tensors of their real sizes after the backward pass.
"""

from __future__ import annotations

import math

import torch

# Bytes per weight element, and per output row (scales), of each weight-only format.
#  int8/fp8 (optimum-quanto): one byte per element, one bf16 scale per output row.
#  int4 (optimum-quanto qint4, groups of 128): half a byte, a bf16 scale and shift per group.
#  nf4 (bitsandbytes Linear4bit, blocks of 64, double-quantized statistics): half a byte, about one
#  byte per block of 64 for the statistics.
PACKED_BYTES_PER_ELEMENT = {"int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 128, "nf4": 0.5 + 1 / 64}
SCALE_BYTES_PER_ROW = {"int8": 2, "fp8": 2, "int4": 0, "nf4": 0}


class QuantizedLinearStandIn(torch.nn.Linear):
    """A Linear whose stored weight is the packed size of ``mode``; peft wraps it like any Linear."""

    def __init__(self, linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.compute_dtype = mode, compute_dtype
        packed = math.ceil(linear.weight.numel() * PACKED_BYTES_PER_ELEMENT[mode])
        packed += SCALE_BYTES_PER_ROW[mode] * linear.out_features
        self.weight = torch.nn.Parameter(torch.empty(packed, dtype=torch.uint8, device="meta"), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return DequantizedLinear.apply(x.to(self.compute_dtype), self.out_features, bias)


class DequantizedLinear(torch.autograd.Function):
    """x @ W.T + b with W made in the compute dtype for the matmul and dropped after it, in the forward and
    again in the backward pass (as bitsandbytes' and quanto's autograd functions do): nothing full-size is
    saved between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.in_features = x.shape[-1]
        weight = torch.empty(out_features, x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = torch.empty(grad.shape[-1], ctx.in_features, dtype=grad.dtype, device=grad.device)
        return grad @ weight, None, None


def stand_in_quantized_layers(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype,
                              keep: tuple[str, ...] | None = None) -> int:
    """Swap the Linear layers the real ``quantize_denoiser`` (or, with its ``keep``, ``quantize_text_encoder``)
    would quantize for stand-ins (meta device)."""
    from lora_gui.engine.quantize import KEEP_FULL_PRECISION, keeps_full_precision

    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not torch.nn.Linear or keeps_full_precision(full_name, keep or KEEP_FULL_PRECISION):
                continue
            setattr(parent, child_name, QuantizedLinearStandIn(child, mode, compute_dtype))
            count += 1
    return count


# Optimizer state per trainable element, bytes, for fp32 parameters. 8-bit states are blockwise
# (bitsandbytes: blocks of 256 with an fp32 absmax each); tensors under 4096 elements keep 32-bit states.
STATE_TENSORS = {"adamw": 2, "adamw8bit": 2, "lion": 1, "lion8bit": 1, "prodigy": 4}
EIGHT_BIT = {"adamw8bit", "lion8bit"}
EIGHT_BIT_MIN_ELEMENTS = 4096


def optimizer_state_bytes(optimizer: str, parameter: torch.Tensor) -> int:
    """Bytes of optimizer state for one trainable parameter."""
    numel = parameter.numel()
    if optimizer == "adafactor":  # factored second moment: a row and a column vector (or the whole for 1-D)
        rows, columns = (parameter.shape[0], parameter.numel() // parameter.shape[0]) if parameter.dim() > 1 else (numel, 0)
        return 4 * (rows + columns)
    states = STATE_TENSORS[optimizer]
    if optimizer in EIGHT_BIT and numel >= EIGHT_BIT_MIN_ELEMENTS:
        return states * (numel + 4 * math.ceil(numel / 256))
    return states * 4 * numel
