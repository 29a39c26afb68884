"""Training objectives: how noise and timesteps are drawn, what the target is, how the loss is weighted.

``DiffusionObjective`` covers SD1.5/SDXL (epsilon and v-prediction on the scheduler's noise
schedule, min-SNR-gamma, noise offset); ``FlowMatchingObjective`` covers Flux (rectified flow).
All randomness comes from the generator passed in, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from lora_gui.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")



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


@dataclass(frozen=True)
class ResolutionShift:
    """The shift a flow-matching pipeline derives from the image size: exp(mu), with mu linear in the
    number of image tokens between (base_seq_len, base_shift) and (max_seq_len, max_shift).

    ``patch`` is how many latent pixels per side make one token (2 for Flux.1's 2x2 packing).
    """

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    patch: int = 2

    @classmethod
    def from_scheduler_config(cls, config, patch: int = 2) -> ResolutionShift:
        """The values a pipeline reads from its scheduler's config (with the pipelines' defaults)."""
        read = config.get if hasattr(config, "get") else (lambda key, default: getattr(config, key, default))
        return cls(int(read("base_image_seq_len", 256)), int(read("max_image_seq_len", 4096)),
                   float(read("base_shift", 0.5)), float(read("max_shift", 1.15)), patch)

    def image_seq_len(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // self.patch) * (latent_width // self.patch)

    def mu(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_seq_len

    def shift(self, latent_height: int, latent_width: int) -> float:
        return math.exp(self.mu(self.image_seq_len(latent_height, latent_width)))


@dataclass(frozen=True)
class EmpiricalFlux2Shift(ResolutionShift):
    """Flux.2's shift: the pipelines' empirical mu for the image's tokens at ``steps`` sampling steps.

    Flux.2's latents are already patchified, so each latent pixel is one token (``patch`` 1).
    """

    patch: int = 1
    steps: int = 50

    def mu(self, image_seq_len: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len, self.steps)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchingObjective:
    """Rectified flow: x_t = (1 - t) x_0 + t noise, target noise - x_0 (Flux).

    Timesteps: ``uniform``; ``logit_normal``; ``shift`` (logit-normal, shifted by the fixed ``shift``);
    ``resolution_shift`` (logit-normal, shifted by the shift the pipeline uses for the batch's image size).
    """

    SAMPLINGS = ("uniform", "logit_normal", "shift", "resolution_shift")

    def __init__(self, sampling: str = "shift", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 3.0, num_train_timesteps: int = 1000,
                 resolution_shift: ResolutionShift | None = None) -> None:
        if sampling not in self.SAMPLINGS:
            raise ValueError(f"timestep sampling {sampling!r} is not supported; use one of {', '.join(self.SAMPLINGS)}")
        self.sampling = sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self.resolution_shift = resolution_shift or ResolutionShift()

    def sample_sigmas(self, batch: int, generator: torch.Generator,
                      latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.sampling == "uniform":
            return torch.rand((batch,), generator=generator, device=generator.device)
        normal = torch.randn((batch,), generator=generator, device=generator.device)
        sigmas = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        if self.sampling == "shift":
            sigmas = shift_sigmas(sigmas, self.shift)
        elif self.sampling == "resolution_shift":
            if latent_size is None:
                raise ValueError("resolution_shift needs the latents' size")
            sigmas = shift_sigmas(sigmas, self.resolution_shift.shift(*latent_size))
        return sigmas

    def add_noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        noise = _randn(latents.shape, generator, latents)
        sigmas = self.sample_sigmas(latents.shape[0], generator, tuple(latents.shape[-2:])).to(latents.device)
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
