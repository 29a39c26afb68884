"""Weight-only quantization of the frozen denoiser and text encoders: saves memory, not compute.

int8 / int4 / fp8 use optimum-quanto; nf4 swaps Linear layers for bitsandbytes' Linear4bit.
LoRA adapters train in full precision on top and load into the unquantized model afterwards.
"""

from __future__ import annotations

import torch

# Top-level modules kept in full precision: small, and sensitive to rounding (embeddings, the output
# projection). Matched on the first part of a layer's name only: a block's own proj_out is quantized.
KEEP_FULL_PRECISION = ("proj_out", "conv_out", "time_embedding", "time_text_embed", "norm_out", "x_embedder",
                       "context_embedder", "add_embedding")


def quantize_denoiser(denoiser: torch.nn.Module, mode: str, device: torch.device) -> int:
    """Quantize ``denoiser`` in place; returns how many Linear layers were quantized."""
    if mode == "none":
        return 0
    if mode == "nf4":
        return _to_nf4(denoiser, device)
    return _quanto(denoiser, mode)


# A causal language model's output head: unused for hidden states, and large.
TEXT_ENCODER_FULL_PRECISION = ("lm_head",)


def quantize_text_encoder(encoder: torch.nn.Module, mode: str, device: torch.device) -> int:
    """Quantize a frozen text encoder's Linear layers in place (int8 with optimum-quanto, or nf4)."""
    if mode == "none":
        return 0
    if mode == "nf4":
        return _to_nf4(encoder, device, keep=TEXT_ENCODER_FULL_PRECISION, option="model.quantize_text_encoders")
    return _quanto(encoder, mode, keep=TEXT_ENCODER_FULL_PRECISION, option="model.quantize_text_encoders")


def quantize_text_encoders_on_cpu(encoders: list[torch.nn.Module], mode: str) -> int:
    """Quantize each text encoder on the CPU (before it visits the accelerator); the number of layers quantized."""
    return sum(quantize_text_encoder(encoder, mode, torch.device("cpu")) for encoder in encoders)


def keeps_full_precision(layer_name: str, keep: tuple[str, ...] = KEEP_FULL_PRECISION) -> bool:
    """Whether the layer belongs to a top-level module that stays in full precision."""
    return layer_name.split(".", 1)[0] in keep


def _quanto(denoiser: torch.nn.Module, mode: str, keep: tuple[str, ...] = KEEP_FULL_PRECISION,
            option: str = "model.quantize") -> int:
    try:
        from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize
    except ImportError as exc:
        raise ValueError(
            f"{option} = {mode!r} needs optimum-quanto: run `pip install optimum-quanto`, "
            f"or set {option} = 'none'."
        ) from exc
    weights = {"int8": qint8, "int4": qint4, "fp8": qfloat8}[mode]
    exclude = [pattern for name in keep for pattern in (name, f"{name}.*")]
    quantize(denoiser, weights=weights, exclude=exclude)
    if mode == "fp8":
        keep_fp8_weights_as_stored(denoiser)
    freeze(denoiser)
    return sum(1 for m in denoiser.modules() if type(m).__name__ == "QLinear")


def keep_fp8_weights_as_stored(model: torch.nn.Module) -> int:
    """Before quanto freezes ``model``: each quantized layer whose weights are fp8 values already (read from an
    fp8_e4m3fn file, ComfyUI's) keeps those values with a scale of 1, instead of being rescaled and rounded a
    second time. Returns how many layers kept theirs."""
    from optimum.quanto import qfloat8
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    kept = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module).__name__ != "QLinear" or weight is None or weight.dim() != 2:
            continue
        stored = weight.detach().to(torch.float8_e4m3fn)
        if not torch.equal(stored.to(weight.dtype), weight.detach()):
            continue
        scale = torch.ones((weight.shape[0], 1), dtype=weight.dtype, device=weight.device)
        module.weight = torch.nn.Parameter(WeightQBytesTensor.create(qfloat8, 0, weight.size(), weight.stride(),
                                                                     stored, scale), requires_grad=False)
        kept += 1
    return kept


def _to_nf4(denoiser: torch.nn.Module, device: torch.device, keep: tuple[str, ...] = KEEP_FULL_PRECISION,
            option: str = "model.quantize") -> int:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError(f"{option} = 'nf4' needs bitsandbytes: `pip install bitsandbytes`.") from exc
    count = 0
    for parent_name, parent in list(denoiser.named_modules()):
        for child_name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not torch.nn.Linear or keeps_full_precision(full_name, keep):
                continue
            setattr(parent, child_name, _nf4_linear(bnb, child, device))
            count += 1
    # peft picks its 4-bit-aware LoRA layer when the model says it is loaded in 4 bit.
    denoiser.is_loaded_in_4bit = True
    return count


def _nf4_linear(bnb, linear: torch.nn.Linear, device: torch.device):
    compute_dtype = linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16
    quantized = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype, quant_type="nf4", device="cpu",
    )
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4"
    )
    if linear.bias is not None:
        quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized.to(device)
