"""Each objective against the formulas in diffusers' own training utilities, on a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from lora_gui.engine.objectives import DiffusionObjective, FlowMatchingObjective

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def fixed_batch():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    prediction = torch.randn(4, 4, 8, 8, generator=generator)
    return latents, prediction


def reference_sd_loss(latents, prediction, prediction_type, gamma, offset, seed):
    """The diffusers train_text_to_image recipe, drawing noise in the same order as the objective."""
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    if not gamma:
        return noisy, timesteps, target, F.mse_loss(prediction, target, reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(prediction, target, reduction="none").mean(dim=[1, 2, 3]) * weights
    return noisy, timesteps, target, loss.mean()


def check_sd(prediction_type, gamma, offset):
    latents, prediction = fixed_batch()
    objective = DiffusionObjective(SD_SCHEDULE, prediction_type, min_snr_gamma=gamma, noise_offset=offset)
    batch = objective.add_noise(latents, torch.Generator().manual_seed(5))
    noisy, timesteps, target, expected = reference_sd_loss(latents, prediction, prediction_type, gamma, offset, 5)
    torch.testing.assert_close(batch.timesteps, timesteps)
    torch.testing.assert_close(batch.noisy, noisy)
    torch.testing.assert_close(batch.target, target)
    torch.testing.assert_close(objective.loss(prediction, batch), expected)


def test_epsilon_loss_matches_diffusers():
    check_sd("epsilon", 0.0, 0.0)


def test_v_prediction_loss_matches_diffusers():
    check_sd("v_prediction", 0.0, 0.0)


def test_min_snr_gamma_matches_diffusers_for_epsilon_and_v():
    check_sd("epsilon", 5.0, 0.0)
    check_sd("v_prediction", 5.0, 0.0)


def test_noise_offset_is_added_per_channel():
    check_sd("epsilon", 0.0, 0.1)


def test_flow_matching_matches_sd3_flux_recipe():
    latents, prediction = fixed_batch()
    objective = FlowMatchingObjective(sampling="logit_normal", logit_mean=0.0, logit_std=1.0)
    batch = objective.add_noise(latents, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=generator)
    u = compute_density_for_timestep_sampling("logit_normal", 4, logit_mean=0.0, logit_std=1.0,
                                              generator=generator)
    sigmas = u.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.timesteps, u * 1000)
    torch.testing.assert_close(batch.noisy, (1.0 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(batch.target, noise - latents)
    expected = torch.mean(((prediction - (noise - latents)) ** 2).reshape(4, -1), 1).mean()
    torch.testing.assert_close(objective.loss(prediction, batch), expected)


def test_shifted_sampling_moves_timesteps_towards_noise():
    plain = FlowMatchingObjective(sampling="logit_normal").sample_sigmas(4096, torch.Generator().manual_seed(1))
    shifted = FlowMatchingObjective(sampling="shift", shift=3.0).sample_sigmas(4096, torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.mean() > plain.mean()


def test_uniform_sampling_is_uniform():
    sigmas = FlowMatchingObjective(sampling="uniform").sample_sigmas(20000, torch.Generator().manual_seed(2))
    assert 0.0 <= sigmas.min() and sigmas.max() <= 1.0
    assert abs(sigmas.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("pixels", [(512, 512), (1024, 1024), (768, 1344)])
def test_resolution_shift_is_the_flux_pipelines_shift(pixels):
    """The shift equals exp(mu) as FluxPipeline computes mu, and the sigmas the scheduler's dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from lora_gui.engine.objectives import ResolutionShift

    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
              "use_dynamic_shifting": True}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    latent_h, latent_w = pixels[0] // 8, pixels[1] // 8
    image_seq_len = (latent_h // 2) * (latent_w // 2)  # FluxPipeline: latents.shape[1] after 2x2 packing
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    shifting = ResolutionShift.from_scheduler_config(scheduler.config, patch=2)
    assert shifting.shift(latent_h, latent_w) == pytest.approx(math.exp(mu))

    objective = FlowMatchingObjective(sampling="resolution_shift", resolution_shift=shifting)
    drawn = objective.sample_sigmas(64, torch.Generator().manual_seed(5), (latent_h, latent_w))
    plain = FlowMatchingObjective(sampling="logit_normal").sample_sigmas(64, torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, scheduler.time_shift(mu, 1.0, plain))


@pytest.mark.parametrize(("pixels", "steps"), [((512, 512), 50), ((1024, 1024), 50), ((1024, 1024), 28),
                                               ((1536, 1536), 50)])
def test_flux2_resolution_shift_is_the_flux2_pipelines_empirical_shift(pixels, steps):
    """Flux.2's pipelines take mu from the image's token count and the step count (compute_empirical_mu); its
    latents are patchified before packing, so every latent pixel is one token."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from lora_gui.engine.objectives import EmpiricalFlux2Shift

    latent_h, latent_w = pixels[0] // 16, pixels[1] // 16  # after the VAE's 8x and the 2x2 patchify
    mu = compute_empirical_mu(image_seq_len=latent_h * latent_w, num_steps=steps)
    assert EmpiricalFlux2Shift(steps=steps).shift(latent_h, latent_w) == pytest.approx(math.exp(mu))
