"""Flux.2 Klein on the built-in tiny pipeline: latents and loss as diffusers' recipe computes them,
exact resume, detection, the single file without alpha keys, and a CLI run from a local folder."""

from __future__ import annotations

import shutil

import pytest
from helpers import cli_train_from_a_copied_builtin, flux2_original_layout, stop_resume_and_straight_loras

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_gui.config import build_config  # noqa: E402
from lora_gui.engine.families.builtin import ensure_builtin  # noqa: E402
from lora_gui.engine.families.detect import detect_family  # noqa: E402
from lora_gui.engine.families.registry import get_family  # noqa: E402
from lora_gui.engine.objectives import NoisedBatch  # noqa: E402

pytestmark = pytest.mark.slow
CAPTIONS = ("sks, a red square", "a blue circle on a white table")


@pytest.fixture(scope="module")
def loaded():
    family = get_family("flux2-klein")
    config = build_config(preset="flux2-klein-cpu-demo")
    components = family.load(config.model, torch.device("cpu"), torch.float32, lambda event: None)
    return family, components


def test_latents_are_patchified_and_normalised_by_the_vae_statistics(loaded):
    family, components = loaded
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    vae = components.vae
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()  # (1, 16, 8, 8)
    b, c, h, w = mode.shape
    patches = mode.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    mean, var = vae.bn.running_mean.view(1, -1, 1, 1), vae.bn.running_var.view(1, -1, 1, 1)
    expected = (patches - mean) / torch.sqrt(var + vae.config.batch_norm_eps)
    latents = family.encode_images(components, pixels)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert (latents - patches).abs().max() > 0.1  # the statistics are not 0 and 1: skipping them would show


def test_loss_is_the_reference_recipes(loaded):
    """noisy = (1 - s) x0 + s noise, packed; transformer(timestep = s, guidance None, stacked caption layers);
    unpacked; mean squared error against noise - x0."""
    from diffusers import Flux2KleinPipeline

    family, components = loaded
    generator = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(2, 64, 4, 4, generator=generator), torch.randn(2, 64, 4, 4, generator=generator)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        embeds = family.encode_prompts(components, list(CAPTIONS))
        pipeline = family.build_pipeline(components)
        prompt_embeds, text_ids = pipeline.encode_prompt(prompt=list(CAPTIONS), device=torch.device("cpu"),
                                                         max_sequence_length=components.extra["max_sequence_length"])
        torch.testing.assert_close(embeds["prompt_embeds"], prompt_embeds)
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        ids = Flux2KleinPipeline._prepare_latent_ids(noisy)
        packed = Flux2KleinPipeline._pack_latents(noisy)
        raw = components.denoiser(hidden_states=packed, timestep=sigmas, guidance=None,
                                  encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=ids,
                                  return_dict=False)[0]
        reference_prediction = Flux2KleinPipeline._unpack_latents_with_ids(raw[:, : packed.shape[1]], ids)
        target = noise - latents
        reference = ((reference_prediction - target) ** 2).reshape(2, -1).mean(1).mean()
        prediction = family.predict(components, noisy, sigmas * 1000, embeds, [],
                                    build_config(preset="flux2-klein-cpu-demo").train)
        objective = family.make_objective(components, build_config(preset="flux2-klein-cpu-demo").train)
        batch = NoisedBatch(noisy=noisy, timesteps=sigmas * 1000, target=target, weights=torch.ones(2))
        torch.testing.assert_close(prediction, reference_prediction, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(objective.loss(prediction, batch), reference)


def test_stop_then_resume_matches_a_straight_run_and_the_file_has_no_alpha(tmp_path):
    expected, actual, lora_path = stop_resume_and_straight_loras("flux2-klein", tmp_path, "lora.alpha=4")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    with safe_open(lora_path, "pt") as handle:
        names = list(handle.keys())
    assert names and all(name.startswith("transformer.") for name in names)
    assert not any(name.endswith(".alpha") for name in names)  # Flux.2 loaders refuse alpha keys


def test_detected_from_a_folder_and_from_a_transformer_file(loaded, tmp_path):
    _, components = loaded
    folder = tmp_path / "klein"
    shutil.copytree(ensure_builtin("builtin:tiny-flux2-klein"), folder)
    assert detect_family(str(folder)).family == "flux2-klein"
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    save_file(state, str(tmp_path / "transformer.safetensors"))
    assert detect_family(str(tmp_path / "transformer.safetensors")).family == "flux2-klein"


def test_cli_trains_from_a_local_folder_with_the_family_detected(tmp_path):
    result = cli_train_from_a_copied_builtin("flux2-klein", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model.family auto: Flux.2 Klein" in result.stderr


@pytest.mark.parametrize(("prefix", "dtype"), [("", torch.bfloat16), ("", torch.float8_e4m3fn),
                                               ("model.diffusion_model.", torch.bfloat16)])
def test_a_single_transformer_file_in_the_original_layout_loads(loaded, tmp_path, prefix, dtype):
    """The file ComfyUI users have (the diffusion model alone in Black Forest Labs' names, bf16 or fp8_e4m3fn,
    bare or under ComfyUI's prefix), with the text encoder and VAE from model.components."""
    family, components = loaded
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    path = tmp_path / "flux2.safetensors"
    save_file({prefix + name: tensor.to(dtype) for name, tensor in flux2_original_layout(state).items()}, str(path))
    assert detect_family(str(path)).family == "flux2-klein"
    config = build_config(preset="flux2-klein-cpu-demo")
    model = config.model.model_copy(update={"base": str(path), "components": str(ensure_builtin(config.model.base))})
    loaded_state = family.load(model, torch.device("cpu"), torch.float32, lambda event: None).denoiser.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded_state[name], tensor.to(dtype).float(), atol=0, rtol=0)
