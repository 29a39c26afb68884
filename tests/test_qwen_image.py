"""Qwen-Image on the built-in tiny pipeline: the template's 34 dropped tokens, 5-D latents with the VAE's
statistics, the loss as diffusers' recipe computes it, true CFG when sampling, exact resume, detection and
a CLI run from a local folder."""

from __future__ import annotations

import shutil

import pytest
from helpers import cli_train_from_a_copied_builtin, stop_resume_and_straight_loras

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_gui.config import build_config  # noqa: E402
from lora_gui.engine.families.builtin import ensure_builtin  # noqa: E402
from lora_gui.engine.families.detect import detect_family  # noqa: E402
from lora_gui.engine.families.registry import get_family  # noqa: E402
from lora_gui.engine.objectives import NoisedBatch  # noqa: E402

pytestmark = pytest.mark.slow
CAPTIONS = ("sks, a red square", "a blue circle on a white table, seen from above")


@pytest.fixture(scope="module")
def loaded():
    family = get_family("qwen-image")
    config = build_config(preset="qwen-image-cpu-demo")
    components = family.load(config.model, torch.device("cpu"), torch.float32, lambda event: None)
    return family, components, config


def test_the_template_prefix_is_the_34_tokens_the_pipeline_drops(loaded):
    _, components, _ = loaded
    tokenizer, template = components.tokenizers[0], components.extra["template"]
    assert components.extra["template_tokens"] == 34
    assert len(tokenizer(template.split("{}")[0], add_special_tokens=False).input_ids) == 34
    text = "héllo wörld, sks! 東京"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_latents_are_one_frame_normalised_by_the_vae_statistics(loaded):
    family, components, _ = loaded
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    vae = components.vae
    with torch.no_grad():
        mode = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()  # (1, 16, 1, 8, 8)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    expected = ((mode - mean) * std).squeeze(2)  # the recipe's own formula
    latents = family.encode_images(components, pixels)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert (latents - mode.squeeze(2)).abs().max() > 0.1  # the statistics are not 0 and 1: skipping them would show


def test_caption_embeddings_are_the_pipelines_padded_with_a_mask(loaded):
    family, components, _ = loaded
    with torch.no_grad():
        cached = family.encode_prompts(components, list(CAPTIONS))
        reference, mask = family.build_pipeline(components).encode_prompt(list(CAPTIONS), device=torch.device("cpu"))
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1]  # the captions differ in length, so padding and masks matter
    assert cached["prompt_embeds"].shape[1] == components.extra["max_sequence_length"]
    for row, length in enumerate(lengths):
        torch.testing.assert_close(cached["prompt_embeds"][row, :length], reference[row, :length])
        assert cached["prompt_mask"][row].sum() == length
        assert not cached["prompt_embeds"][row, length:].any()


def test_loss_is_the_reference_recipes(loaded):
    """noisy = (1 - s) x0 + s noise as 5-D latents, permuted and packed; transformer(timestep = s, img_shapes,
    caption mask) on the pipeline's unpadded embeddings; unpacked; mean squared error against noise - x0."""
    from diffusers import QwenImagePipeline

    family, components, config = loaded
    generator = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        embeds = family.encode_prompts(components, list(CAPTIONS))
        prompt_embeds, prompt_mask = family.build_pipeline(components).encode_prompt(list(CAPTIONS),
                                                                                     device=torch.device("cpu"))
        # the recipe: 5-D latents (B, C, 1, h, w), noised, permuted to (B, 1, C, h, w) and packed
        x0, eps = latents.unsqueeze(2), noise.unsqueeze(2)
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1, 1) * eps
        packed = QwenImagePipeline._pack_latents(noisy.permute(0, 2, 1, 3, 4), 2, 16, 8, 8)
        raw = components.denoiser(hidden_states=packed, encoder_hidden_states=prompt_embeds,
                                  encoder_hidden_states_mask=prompt_mask, timestep=sigmas,
                                  img_shapes=[(1, 4, 4)] * 2, return_dict=False)[0]
        reference_prediction = QwenImagePipeline._unpack_latents(raw, 64, 64, 8)
        target = eps - x0
        reference = ((reference_prediction.float() - target.float()) ** 2).reshape(2, -1).mean(1).mean()

        prediction = family.predict(components, noisy.squeeze(2), sigmas * 1000, embeds, [], config.train)
        objective = family.make_objective(components, config.train)
        batch = NoisedBatch(noisy=noisy.squeeze(2), timesteps=sigmas * 1000, target=target.squeeze(2),
                            weights=torch.ones(2))
        torch.testing.assert_close(prediction, reference_prediction.squeeze(2), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(objective.loss(prediction, batch), reference, atol=1e-6, rtol=1e-5)


def test_sampling_uses_true_cfg_with_a_negative_prompt(loaded):
    from lora_gui.engine.sampling import SampleSettings, render

    family, components, config = loaded
    pipeline = family.build_pipeline(components)
    kwargs = family.sampling_prompt_kwargs(pipeline, components, "a photo of sks", "", 4.0, torch.device("cpu"))
    assert {"negative_prompt_embeds", "negative_prompt_embeds_mask"} <= kwargs.keys()
    assert family.guidance_kwargs(4.0) == {"true_cfg_scale": 4.0}
    unguided = family.sampling_prompt_kwargs(pipeline, components, "a photo of sks", "", 1.0, torch.device("cpu"))
    assert "negative_prompt_embeds" not in unguided

    def image(scale: float):
        settings = SampleSettings(prompts=("a photo of sks",), negative_prompt="", seed=3, steps=2,
                                  guidance_scale=scale, width=64, height=64)
        return torch.tensor(list(render(family, components, settings)[0].getdata()), dtype=torch.float32)

    assert (image(4.0) - image(1.0)).abs().max() > 1  # the negative branch changes the picture


def test_stop_then_resume_matches_a_straight_run_and_the_file_is_comfyuis(tmp_path):
    expected, actual, lora_path = stop_resume_and_straight_loras("qwen-image", tmp_path, "lora.alpha=4")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    with safe_open(lora_path, "pt") as handle:
        names = list(handle.keys())
    assert names and all(name.startswith("diffusion_model.transformer_blocks.") for name in names)
    assert any(name.endswith(".alpha") for name in names)


def test_detected_from_a_folder_and_from_a_transformer_file(loaded, tmp_path):
    _, components, _ = loaded
    folder = tmp_path / "qwen"
    shutil.copytree(ensure_builtin("builtin:tiny-qwen-image"), folder)
    assert detect_family(str(folder)).family == "qwen-image"
    state = {"model.diffusion_model." + name: tensor.contiguous()
             for name, tensor in components.denoiser.state_dict().items()}
    save_file(state, str(tmp_path / "qwen_image_bf16.safetensors"))
    assert detect_family(str(tmp_path / "qwen_image_bf16.safetensors")).family == "qwen-image"


def test_cli_trains_from_a_local_folder_with_the_family_detected(tmp_path):
    result = cli_train_from_a_copied_builtin("qwen-image", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model.family auto: Qwen-Image" in result.stderr


@pytest.mark.parametrize(("prefix", "dtype"), [("", torch.bfloat16), ("", torch.float8_e4m3fn),
                                               ("model.diffusion_model.", torch.bfloat16)])
def test_a_single_transformer_file_loads_with_the_rest_from_components(loaded, tmp_path, prefix, dtype):
    """The split files ComfyUI users have: the diffusion model alone (bf16, fp8_e4m3fn, or under ComfyUI's
    prefix), with the text encoder and VAE from model.components."""
    family, components, config = loaded
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    path = tmp_path / "qwen_image.safetensors"
    save_file({prefix + name: tensor.to(dtype) for name, tensor in state.items()}, str(path))
    model = config.model.model_copy(update={"base": str(path), "components": str(ensure_builtin(config.model.base))})
    from_file = family.load(model, torch.device("cpu"), torch.float32, lambda event: None)
    loaded_state = from_file.denoiser.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded_state[name], tensor.to(dtype).float(), atol=0, rtol=0)


def test_scaled_fp8_files_are_refused_with_what_to_use(loaded, tmp_path):
    from lora_gui.engine.families.loading import ModelLoadError

    family, components, config = loaded
    state = {name: tensor.to(torch.float8_e4m3fn) for name, tensor in components.denoiser.state_dict().items()}
    state["transformer_blocks.0.attn.to_q.scale_weight"] = torch.ones(1)
    path = tmp_path / "qwen_image_fp8_scaled.safetensors"
    save_file(state, str(path))
    model = config.model.model_copy(update={"base": str(path), "components": str(ensure_builtin(config.model.base))})
    with pytest.raises(ModelLoadError, match="fp8_scaled.*bf16 or plain fp8_e4m3fn"):
        family.load(model, torch.device("cpu"), torch.float32, lambda event: None)
