"""Data-parallel training over the processes a launcher started (``accelerate launch``, torchrun), through
Accelerate's process state: its process group (gloo on CPUs, NCCL on CUDA GPUs) and its reductions.

Every process walks the same global batches (``train.batch_size`` x processes samples each, in the order a
single process with that batch would take them) and trains on its own contiguous share. The noise and the
timesteps are drawn for the whole global batch on every process, so each keeps the same random state, and a
share's loss is weighted by its part of the batch: the summed gradients are those of one process training
on the global batch. Only the main process writes files or reports; the others wait where it works alone.
With train.shard_model the denoiser is sharded over the processes as well (``sharding.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from lora_gui.engine.launch_env import launch_from_environment


@dataclass(frozen=True)
class Share:
    """A process's part of a global batch: which of its positions, and its weight in the batch's mean loss."""

    positions: slice
    weight: float
    count: int  # samples in the global batch


@dataclass
class Distributed:
    world_size: int
    rank: int
    state: object  # accelerate.PartialState

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed | None:
        """The distributed run this process belongs to, or None when a launcher started one process."""
        if launch_from_environment().world_size <= 1:
            return None
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu")
        if state.num_processes <= 1:
            raise RuntimeError(
                f"The launcher started {launch_from_environment().world_size} processes, but Accelerate could not "
                f"join them into one run on {device.type}. Start one process, or check the launcher's settings.")
        return cls(state.num_processes, state.process_index, state)

    def wait_for_everyone(self) -> None:
        self.state.wait_for_everyone()

    def share(self, count: int) -> Share:
        """This process's contiguous part of ``count`` samples (sizes differ by at most one). A process left
        without a sample still runs the first one with weight 0, so every process takes the same steps."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        size = base + (1 if self.rank < extra else 0)
        if size == 0:
            return Share(slice(0, 1), 0.0, count)
        return Share(slice(start, start + size), size / count, count)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether any process says yes (a stop or a pause asked of one process holds for all,
        at the same step); one reduction for them all."""
        from accelerate.utils import reduce

        summed = reduce(torch.tensor([float(flag) for flag in flags], device=self.state.device), reduction="sum")
        return tuple(bool(value > 0) for value in summed.tolist())

    def sum_gradients(self, parameters: list[torch.Tensor], loss: torch.Tensor) -> float:
        """Sum every process's gradients and weighted loss in one reduction; returns the global batch's loss."""
        from accelerate.utils import reduce

        device = loss.device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([loss.detach().float().reshape(1).to(device)]
                         + [grad.detach().float().reshape(-1).to(device) for grad in grads])
        flat = reduce(flat, reduction="sum")
        offset = 1
        for parameter, grad in zip(parameters, grads, strict=True):
            size = grad.numel()
            parameter.grad = flat[offset:offset + size].view_as(grad).to(grad.dtype).clone()
            offset += size
        return float(flat[0].item())


def noised_share(objective, latents: torch.Tensor, generator: torch.Generator, share: Share):
    """``objective.add_noise`` drawn for the whole global batch (so every process keeps the same random state
    and each sample gets the noise a single process would give it), for this share."""
    whole = latents.new_zeros((share.count, *latents.shape[1:]))
    whole[share.positions] = latents
    noised = objective.add_noise(whole, generator)
    return replace(noised, **{field.name: getattr(noised, field.name)[share.positions]
                              for field in fields(noised)})
