"""Z-Image on the built-in tiny pipeline: prompt encoding and loss as diffusers' recipe computes them,
exact resume, detection, and a CLI run from a local folder."""

from __future__ import annotations

import shutil

import pytest
from helpers import cli_train_from_a_copied_builtin, stop_resume_and_straight_loras

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

from lora_gui.config import build_config  # noqa: E402
from lora_gui.engine.families.builtin import ensure_builtin  # noqa: E402
from lora_gui.engine.families.detect import detect_family  # noqa: E402
from lora_gui.engine.families.registry import get_family  # noqa: E402
from lora_gui.engine.objectives import NoisedBatch  # noqa: E402

pytestmark = pytest.mark.slow
CAPTIONS = ("sks, a red square", "a much longer caption about a blue circle on a white table")  # the pipeline edits lists it is given


@pytest.fixture(scope="module")
def loaded():
    family = get_family("zimage")
    config = build_config(preset="zimage-cpu-demo")
    components = family.load(config.model, torch.device("cpu"), torch.float32, lambda event: None)
    return family, components


def test_prompt_embeddings_are_the_pipelines(loaded):
    family, components = loaded
    pipeline = family.build_pipeline(components)
    expected, _ = pipeline.encode_prompt(list(CAPTIONS), device=torch.device("cpu"), do_classifier_free_guidance=False,
                                         max_sequence_length=components.extra["max_sequence_length"])
    with torch.no_grad():
        embeds = family.encode_prompts(components, CAPTIONS)
    for index, reference in enumerate(expected):
        mask = embeds["prompt_mask"][index].bool()
        assert int(mask.sum()) == reference.shape[0]
        torch.testing.assert_close(embeds["prompt_embeds"][index][mask], reference, atol=1e-5, rtol=1e-5)


def test_loss_is_the_reference_recipes(loaded):
    """The training script's loss: noisy = (1 - s) x0 + s noise, model(noisy, (1000 - t) / 1000, captions),
    prediction negated, mean squared error against noise - x0."""
    family, components = loaded
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    noise = torch.randn(2, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        embeds = family.encode_prompts(components, CAPTIONS)
        pipeline = family.build_pipeline(components)
        captions, _ = pipeline.encode_prompt(list(CAPTIONS), device=torch.device("cpu"), do_classifier_free_guidance=False,
                                             max_sequence_length=components.extra["max_sequence_length"])
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        timesteps = sigmas * 1000
        raw = components.denoiser(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions,
                                  return_dict=False)[0]
        reference_prediction = -torch.stack(raw).squeeze(2)
        target = noise - latents
        reference = ((reference_prediction.float() - target.float()) ** 2).reshape(2, -1).mean(1).mean()

        objective = family.make_objective(components, build_config(preset="zimage-cpu-demo").train)
        batch = NoisedBatch(noisy=noisy, timesteps=timesteps, target=target, weights=torch.ones(2))
        prediction = family.predict(components, noisy, timesteps, embeds, [], None)
        torch.testing.assert_close(prediction, reference_prediction, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(objective.loss(prediction, batch), reference)


def test_stop_then_resume_matches_a_straight_run(tmp_path):
    expected, actual, _ = stop_resume_and_straight_loras("zimage", tmp_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_detected_from_a_folder_and_from_a_transformer_file(loaded, tmp_path):
    _, components = loaded
    folder = tmp_path / "z-image"
    shutil.copytree(ensure_builtin("builtin:tiny-zimage"), folder)
    assert detect_family(str(folder)).family == "zimage"
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    save_file(state, str(tmp_path / "transformer.safetensors"))
    assert detect_family(str(tmp_path / "transformer.safetensors")).family == "zimage"
    save_file({f"model.diffusion_model.{name}": tensor for name, tensor in state.items()},
              str(tmp_path / "comfy.safetensors"))
    assert detect_family(str(tmp_path / "comfy.safetensors")).family == "zimage"


def test_cli_trains_from_a_local_folder_with_the_family_detected(tmp_path):
    result = cli_train_from_a_copied_builtin("zimage", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model.family auto: Z-Image" in result.stderr
    assert (tmp_path / "out" / "my-lora.safetensors").is_file()


def original_layout(state: dict) -> dict:
    """The transformer's weights as the original Z-Image release names them (fused q/k/v, ``out``, ``q_norm``):
    the inverse of diffusers' single-file conversion."""
    renames = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
               ".attention.norm_q.": ".attention.q_norm."}
    original = {}
    for name, tensor in state.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        if ".attention.to_q.weight" in name:
            parts = [state[name.replace("to_q", part)] for part in ("to_q", "to_k", "to_v")]
            original[name.replace("to_q", "qkv")] = torch.cat(parts, dim=0)
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        original[name] = tensor
    return original


@pytest.mark.parametrize(("prefix", "dtype"), [("", torch.bfloat16), ("model.diffusion_model.", torch.bfloat16),
                                               ("model.diffusion_model.", torch.float8_e4m3fn)])
def test_a_single_transformer_file_in_the_original_layout_loads(loaded, tmp_path, prefix, dtype):
    """The file ComfyUI users have (the diffusion model alone, original names, bf16 or fp8_e4m3fn), with the
    text encoder and VAE from model.components."""
    family, components = loaded
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    path = tmp_path / "z_image.safetensors"
    save_file({prefix + name: tensor.to(dtype) for name, tensor in original_layout(state).items()}, str(path))
    assert detect_family(str(path)).family == "zimage"
    config = build_config(preset="zimage-cpu-demo")
    model = config.model.model_copy(update={"base": str(path), "components": str(ensure_builtin(config.model.base))})
    loaded_state = family.load(model, torch.device("cpu"), torch.float32, lambda event: None).denoiser.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded_state[name], tensor.to(dtype).float(), atol=0, rtol=0)


def test_an_fp8_file_quantized_to_fp8_keeps_its_values_as_they_are(loaded, tmp_path):
    """ComfyUI's fp8_e4m3fn file with model.quantize = fp8: each layer stores the file's fp8 values (scale 1),
    not a rescaled second rounding of them, which is what a bf16 file's weights get."""
    from lora_gui.engine.quantize import quantize_denoiser

    family, components = loaded
    state = {name: tensor.contiguous() for name, tensor in components.denoiser.state_dict().items()}
    config = build_config(preset="zimage-cpu-demo")
    quantized = {}
    for dtype in (torch.float8_e4m3fn, torch.bfloat16):
        path = tmp_path / f"z_image_{dtype}.safetensors"
        save_file({name: tensor.to(dtype) for name, tensor in original_layout(state).items()}, str(path))
        model = config.model.model_copy(update={"base": str(path),
                                                "components": str(ensure_builtin(config.model.base))})
        denoiser = family.load(model, torch.device("cpu"), torch.bfloat16, lambda event: None).denoiser
        assert quantize_denoiser(denoiser, "fp8", torch.device("cpu")) > 0
        quantized[dtype] = {name: module.weight for name, module in denoiser.named_modules()
                            if type(module).__name__ == "QLinear"}
    for name, weight in quantized[torch.float8_e4m3fn].items():
        file_values = state[f"{name}.weight"].to(torch.float8_e4m3fn)
        assert torch.equal(weight._data.view(torch.uint8), file_values.view(torch.uint8)), name
        assert torch.equal(weight._scale, torch.ones_like(weight._scale)), name
    rescaled = quantized[torch.bfloat16]
    assert not all(torch.equal(w._scale, torch.ones_like(w._scale)) for w in rescaled.values())
