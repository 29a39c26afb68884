"""train.shard_model: the denoiser sharded over the processes of a distributed run with FSDP2 (PyTorch's
``fully_shard``, what Accelerate's FSDP2 plugin applies; the plugin itself engages only on GPUs, this works on
gloo too), so each process holds 1/N of its frozen weights, its LoRA and the optimizer state.

Each repeated transformer block (for UNets each down, middle and up stack) is one sharded unit, the rest of the
denoiser one more; a unit's weights are gathered for its forward and backward pass and freed after. Gradients
are summed, not averaged (each process's loss is already weighted by its share of the global batch).

Files stay those of a single process: before anything is written, every process joins in gathering the full
LoRA and optimizer state (``full``), and the main process writes them as one process would. A checkpoint
resumes sharded or not, on any number of processes: its state is loaded whole and then sharded (``shard_like``).
"""

from __future__ import annotations

import torch

from lora_gui.engine.block_swap import repeated_blocks


def config_problem(config, uses_grad_scaler: bool) -> str:
    """Why train.shard_model cannot be used with this config ("" when it can); ``uses_grad_scaler``: the run's
    placement trains in fp16 with a gradient scaler."""
    model, lora, train = config.model, config.lora, config.train
    clashes = [
        (lora.train_text_encoder, "lora.train_text_encoder (the text encoders are not sharded)"),
        (model.quantize != "none", f"model.quantize = {model.quantize} (quantized layers cannot be sharded)"),
        (model.block_swap > 0, "model.block_swap (sharding already spreads the weights)"),
        (lora.init not in ("default", "gaussian"), f"lora.init = {lora.init} (it changes the sharded base weights)"),
        (train.optimizer.endswith("8bit"), f"train.optimizer = {train.optimizer} (its 8-bit states cannot be sharded)"),
        (train.compile_blocks, "train.compile_blocks"),
        (uses_grad_scaler, "fp16 mixed precision (its gradient scaler would skip steps on some processes only)"),
    ]
    named = [name for clash, name in clashes if clash]
    return f"train.shard_model cannot be used with {', '.join(named)}." if named else ""


def shard_units(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = repeated_blocks(denoiser)
    if blocks:
        return blocks
    stacks = [*getattr(denoiser, "down_blocks", []), getattr(denoiser, "mid_block", None),
              *getattr(denoiser, "up_blocks", [])]
    return [stack for stack in stacks if stack is not None]


def shard_denoiser(denoiser: torch.nn.Module, device: torch.device, processes: int) -> int:
    """Shard ``denoiser`` in place over the ``processes`` of the run; returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes,))
    units = shard_units(denoiser)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)
    for module in [*units, denoiser]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)
    return len(units) + 1


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(value):
    """``value`` with every sharded tensor gathered whole (a collective: every process calls it, in the same
    order), through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {key: full(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(full(item) for item in value)
    if is_sharded(value):
        return value.full_tensor()
    return value


def shard_like(value: torch.Tensor, parameter) -> torch.Tensor:
    """A whole tensor shaped like ``parameter`` sharded as it is (scalars, such as Adam's step, stay whole)."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(parameter) or not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
        return value
    return distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a whole state: each parameter's state sharded as the parameter is."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if state:
                for key, value in state.items():
                    state[key] = shard_like(value, parameter)
