"""Flux.2 dev on the built-in tiny pipeline: the loss as diffusers' recipe computes it (guidance embedded),
captions through the processor's chat template without the processor, exact resume, detection, and a
CLI run from a local folder."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import cli_train_from_a_copied_builtin, flux2_original_layout, stop_resume_and_straight_loras

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_gui.config import build_config  # noqa: E402
from lora_gui.engine.families.builtin import ensure_builtin  # noqa: E402
from lora_gui.engine.families.detect import detect_family  # noqa: E402
from lora_gui.engine.families.loading import text_only_tokenizer  # noqa: E402
from lora_gui.engine.families.registry import get_family  # noqa: E402
from lora_gui.engine.objectives import NoisedBatch  # noqa: E402

pytestmark = pytest.mark.slow
CAPTIONS = ("sks, a red square", "a blue circle on a white table")


@pytest.fixture(scope="module")
def loaded():
    family = get_family("flux2-dev")
    config = build_config(preset="flux2-dev-cpu-demo")
    components = family.load(config.model, torch.device("cpu"), torch.float32, lambda event: None)
    return family, components, config


def test_the_hub_layout_needs_no_processor(loaded):
    """The tokenizer folder is a PixtralProcessor's (model_index.json says so); the processor needs torchvision,
    which this machine lacks, yet the text-only tokenizer encodes prompts through the processor's chat template."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from transformers import AutoProcessor

    _, components, _ = loaded
    folder = ensure_builtin("builtin:tiny-flux2-dev")
    assert json.loads((folder / "model_index.json").read_text())["tokenizer"] == ["transformers", "PixtralProcessor"]
    with pytest.raises(ImportError, match="[Tt]orchvision"):
        AutoProcessor.from_pretrained(folder / "tokenizer")

    tokenizer = components.tokenizers[0]
    messages = format_input(["sks, a red square"])
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)[0]
    assert rendered.startswith("<s>[SYSTEM_PROMPT]You are an AI") and rendered.endswith("[INST]sks, a red square[/INST]")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"][0]
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # the template is the processor's: the tokenizer saved in the folder has none of its own
    assert text_only_tokenizer(folder / "tokenizer").chat_template == (folder / "tokenizer" / "chat_template.jinja").read_text()


def test_loss_is_the_reference_recipes(loaded):
    """noisy = (1 - s) x0 + s noise, packed; transformer(timestep = s, guidance = train.guidance, stacked Mistral
    layers 10, 20, 30); unpacked; mean squared error against noise - x0."""
    from diffusers import Flux2Pipeline

    family, components, config = loaded
    assert config.train.guidance == 3.5  # the reference script's default
    generator = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(2, 64, 4, 4, generator=generator), torch.randn(2, 64, 4, 4, generator=generator)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        embeds = family.encode_prompts(components, list(CAPTIONS))
        pipeline = family.build_pipeline(components)
        prompt_embeds, text_ids = pipeline.encode_prompt(prompt=list(CAPTIONS), device=torch.device("cpu"),
                                                         max_sequence_length=components.extra["max_sequence_length"])
        torch.testing.assert_close(embeds["prompt_embeds"], prompt_embeds)
        assert prompt_embeds.shape[-1] == 3 * 16  # three stacked hidden states of the 16-wide Mistral
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        ids = Flux2Pipeline._prepare_latent_ids(noisy)
        packed = Flux2Pipeline._pack_latents(noisy)
        guidance = torch.full([2], 3.5)
        raw = components.denoiser(hidden_states=packed, timestep=sigmas, guidance=guidance,
                                  encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=ids,
                                  return_dict=False)[0]
        reference_prediction = Flux2Pipeline._unpack_latents_with_ids(raw[:, : packed.shape[1]], ids)
        target = noise - latents
        reference = ((reference_prediction - target) ** 2).reshape(2, -1).mean(1).mean()
        prediction = family.predict(components, noisy, sigmas * 1000, embeds, [], config.train)
        objective = family.make_objective(components, config.train)
        batch = NoisedBatch(noisy=noisy, timesteps=sigmas * 1000, target=target, weights=torch.ones(2))
        torch.testing.assert_close(prediction, reference_prediction, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(objective.loss(prediction, batch), reference)
        other_guidance = family.predict(components, noisy, sigmas * 1000, embeds, [],
                                        config.train.model_copy(update={"guidance": 1.0}))
        assert (other_guidance - prediction).abs().max() > 1e-4  # the guidance value reaches the model


def test_stop_then_resume_matches_a_straight_run_and_the_file_has_no_alpha(tmp_path):
    expected, actual, lora_path = stop_resume_and_straight_loras("flux2-dev", tmp_path, "lora.alpha=4")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    with safe_open(lora_path, "pt") as handle:
        names = list(handle.keys())
    assert names and all(name.startswith("transformer.") for name in names)
    assert not any(name.endswith(".alpha") for name in names)  # Flux.2 loaders refuse alpha keys


def test_detected_from_a_folder_and_from_a_transformer_file(loaded, tmp_path):
    _, components, _ = loaded
    folder = tmp_path / "dev"
    shutil.copytree(ensure_builtin("builtin:tiny-flux2-dev"), folder)
    assert detect_family(str(folder)).family == "flux2-dev"
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    save_file(state, str(tmp_path / "transformer.safetensors"))
    assert detect_family(str(tmp_path / "transformer.safetensors")).family == "flux2-dev"


def test_cli_trains_from_a_local_folder_with_the_family_detected(tmp_path):
    result = cli_train_from_a_copied_builtin("flux2-dev", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model.family auto: Flux.2 dev" in result.stderr


@pytest.mark.parametrize(("prefix", "dtype"), [("", torch.bfloat16), ("", torch.float8_e4m3fn),
                                               ("model.diffusion_model.", torch.bfloat16)])
def test_a_single_transformer_file_in_the_original_layout_loads(loaded, tmp_path, prefix, dtype):
    """The file ComfyUI users have (the diffusion model alone in Black Forest Labs' names, bf16 or fp8_e4m3fn,
    bare or under ComfyUI's prefix), with the text encoder and VAE from model.components."""
    family, components, _ = loaded
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    path = tmp_path / "flux2.safetensors"
    save_file({prefix + name: tensor.to(dtype) for name, tensor in flux2_original_layout(state).items()}, str(path))
    assert detect_family(str(path)).family == "flux2-dev"
    config = build_config(preset="flux2-dev-cpu-demo")
    model = config.model.model_copy(update={"base": str(path), "components": str(ensure_builtin(config.model.base))})
    loaded_state = family.load(model, torch.device("cpu"), torch.float32, lambda event: None).denoiser.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded_state[name], tensor.to(dtype).float(), atol=0, rtol=0)
