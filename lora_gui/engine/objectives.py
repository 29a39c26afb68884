"""Training objectives: how noise and timesteps are drawn, what the target is, how the loss is weighted.

``DiffusionObjective`` covers SD1.5/SDXL (epsilon and v-prediction on the scheduler's noise
schedule, min-SNR-gamma, noise offset); ``FlowMatchingObjective`` covers Flux (rectified flow).
All randomness comes from the generator passed in, so a resumed run draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor  # what the family feeds the denoiser
    target: torch.Tensor
    weights: torch.Tensor  # one loss weight per sample


class Objective(Protocol):
    def add_noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch: ...

    def loss(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor: ...


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Normal noise drawn on the generator's device, then moved: identical on CPU and GPU."""
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


class DiffusionObjective:
    """Epsilon or v-prediction on a DDPM noise schedule (SD1.5, SDXL)."""

    def __init__(self, scheduler_config: dict, prediction_type: str, min_snr_gamma: float = 0.0,
                 noise_offset: float = 0.0) -> None:
        from diffusers import DDPMScheduler

        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {prediction_type!r} is not supported; use epsilon or v_prediction")
        self.scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.noise_offset = noise_offset
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        self.snr = (alphas_cumprod / (1.0 - alphas_cumprod)).float()

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def add_noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        batch, channels = latents.shape[:2]
        noise = _randn(latents.shape, generator, latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * _randn((batch, channels, 1, 1), generator, latents)
        timesteps = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator,
                                  device=generator.device).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisedBatch(noisy=noisy, timesteps=timesteps, target=target, weights=self.loss_weights(timesteps))

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        if not self.min_snr_gamma:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        snr = self.snr.to(timesteps.device)[timesteps]
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)

    def loss(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        return weighted_mse(prediction, batch.target, batch.weights)


class FlowMatchingObjective:
    """Rectified flow: x_t = (1 - t) x_0 + t noise, target noise - x_0 (Flux)."""

    def __init__(self, sampling: str = "shift", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 3.0, num_train_timesteps: int = 1000) -> None:
        if sampling not in ("uniform", "logit_normal", "shift"):
            raise ValueError(f"timestep sampling {sampling!r} is not supported; use uniform, logit_normal or shift")
        self.sampling = sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps

    def sample_sigmas(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if self.sampling == "uniform":
            return torch.rand((batch,), generator=generator, device=generator.device)
        normal = torch.randn((batch,), generator=generator, device=generator.device)
        sigmas = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        if self.sampling == "shift":
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        return sigmas

    def add_noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        noise = _randn(latents.shape, generator, latents)
        sigmas = self.sample_sigmas(latents.shape[0], generator).to(latents.device)
        expanded = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        noisy = (1.0 - expanded) * latents + expanded * noise
        return NoisedBatch(
            noisy=noisy,
            timesteps=sigmas * self.num_train_timesteps,
            target=noise - latents,
            weights=torch.ones_like(sigmas, dtype=torch.float32),
        )

    def loss(self, prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        return weighted_mse(prediction, batch.target, batch.weights)
