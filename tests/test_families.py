"""Model families on the built-in tiny models, and every way of naming a base model.

The Hugging Face Hub cannot be reached from the test machines, so every Hub path here runs
against mocks of ``huggingface_hub.snapshot_download``; local folders, built-in models and
single-file checkpoints are loaded for real.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ldm_vae_key

from lora_gui.config import FAMILIES as CONFIG_FAMILIES
from lora_gui.config import ModelSection, TrainSection
from lora_gui.engine.families.base import Conditioning
from lora_gui.engine.families.builtin import ensure_builtin
from lora_gui.engine.families.loading import ModelLoadError, ModelSource, resolve_source
from lora_gui.engine.families.registry import family_for_builtin, family_names, get_family
from lora_gui.events import Status, ignore_events

CPU = torch.device("cpu")
CASES = {
    "sd15": ("sd15", "builtin:tiny-sd15"),
    "sdxl": ("sdxl", "builtin:tiny-sdxl"),
    "flux": ("flux", "builtin:tiny-flux"),
    "flux-schnell": ("flux", "builtin:tiny-flux-schnell"),
}
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "flux": 16, "flux-schnell": 16}
PRESETS = [(case, preset) for case in ("sd15", "sdxl", "flux")
           for preset in get_family(CASES[case][0]).lora_target_presets]


@pytest.fixture(scope="module")
def loaded():
    """Each tiny model is loaded once per module: ``loaded(case) -> (family, components)``."""
    cache: dict = {}

    def load(case: str):
        if case not in cache:
            name, base = CASES[case]
            family = get_family(name)
            cache[case] = family, family.load(ModelSection(family=name, base=base), CPU, torch.float32, ignore_events)
        return cache[case]

    return load


def with_lora(module, targets):
    from peft import LoraConfig, inject_adapter_in_model

    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), copy.deepcopy(module))


def lora_grads(module) -> list[torch.Tensor]:
    return [p.grad for name, p in module.named_parameters() if "lora_" in name and p.grad is not None]


def conditioning(batch: int, size: int = 64) -> list[Conditioning]:
    return [Conditioning((size + 16 * i, size), (8 * i, 0), (size, size)) for i in range(batch)]


def prediction_loss(family, components, captions=("a red square", "a blue circle")):
    pixels = torch.rand(len(captions), 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_images(components, pixels)
    embeds = family.encode_prompts(components, list(captions))
    batch = family.make_objective(components, TrainSection()).add_noise(latents, torch.Generator().manual_seed(1))
    prediction = family.predict(components, batch.noisy, batch.timesteps, embeds, conditioning(len(captions)),
                                TrainSection())
    return prediction, latents, embeds


# ----------------------------------------------------------------------------- registry


def test_registry_knows_every_config_family_and_explains_unknown_names():
    assert set(family_names()) == set(CONFIG_FAMILIES)
    for name in family_names():
        family = get_family(name)
        assert family.name == name and family.lora_target_presets
    with pytest.raises(ValueError, match="sd15, sdxl, flux"):
        get_family("sd3")
    assert family_for_builtin("builtin:tiny-flux-schnell") == "flux"


# ----------------------------------------------------------------------------- naming a base model


def test_resolve_source_tells_folders_files_and_hub_ids_apart(tmp_path):
    assert resolve_source("builtin:tiny-sd15").kind == "folder"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    assert resolve_source(str(folder)) == ModelSource("folder", str(folder))
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert resolve_source(str(single)).kind == "single_file"
    assert resolve_source("stabilityai/stable-diffusion-xl-base-1.0").kind == "hub"

    not_diffusers = tmp_path / "loose"
    not_diffusers.mkdir()
    (not_diffusers / "anime.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model_index.json.*anime.safetensors"):
        resolve_source(str(not_diffusers))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="Hugging Face id"):
        resolve_source("not a model id")
    with pytest.raises(ModelLoadError, match="Built-in models"):
        resolve_source("builtin:tiny-sd99")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickled_checkpoints_are_refused_before_they_are_opened(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickled checkpoint was opened"))
    for base in (str(path), str(tmp_path / f"missing{suffix}")):
        with pytest.raises(ModelLoadError) as caught:
            get_family("sd15").load(ModelSection(base=base), CPU, torch.float32, ignore_events)
        message = str(caught.value)
        assert "run any code" in message and "weights_only=True" in message and ".safetensors" in message


# ----------------------------------------------------------------------------- the Hub, mocked


def _hub_errors():
    from unittest.mock import MagicMock

    import httpx
    from huggingface_hub import errors

    response = MagicMock()
    return [
        (errors.GatedRepoError("gated", response=response), ["licence", "huggingface-cli login", "HF_TOKEN"]),
        (errors.RepositoryNotFoundError("404", response=response), ["not found", "owner/name"]),
        (errors.RevisionNotFoundError("no rev", response=response), ["revision 'v9'", "model.revision"]),
        (errors.LocalEntryNotFoundError("not cached"), ["Could not reach", "builtin:tiny-sd15"]),
        (errors.OfflineModeIsEnabled("offline"), ["Could not reach", "local"]),
        (httpx.ConnectError("connection refused"), ["Could not reach", "internet connection"]),
    ]


@pytest.mark.parametrize("index", range(6))
def test_hub_failures_become_messages_that_say_what_to_do(monkeypatch, index):
    import huggingface_hub

    error, phrases = _hub_errors()[index]

    def failing_download(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_download)
    model = ModelSection(family="sdxl", base="someone/some-model", revision="v9")
    with pytest.raises(ModelLoadError) as caught:
        get_family("sdxl").load(model, CPU, torch.float32, ignore_events)
    for phrase in phrases:
        assert phrase in str(caught.value)


def test_hub_download_reports_progress_then_loads_the_snapshot(monkeypatch, tmp_path):
    import huggingface_hub

    folder = ensure_builtin("builtin:tiny-sd15")
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        with kwargs["tqdm_class"](total=3_000_000, unit="B", desc="Downloading bytes", mininterval=0) as bar:
            bar.update(1_000_000)
            bar.update(2_000_000)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    events = []
    model = ModelSection(base="someone/sd15-model", revision="main", cache_dir=str(tmp_path))
    components = get_family("sd15").load(model, CPU, torch.float32, events.append)

    assert [kwargs["allow_patterns"] for _, kwargs in calls][0] == ["model_index.json"]
    repo_id, kwargs = calls[-1]
    assert repo_id == "someone/sd15-model" and kwargs["revision"] == "main"
    assert kwargs["cache_dir"] == str(tmp_path / "hub")
    assert {"unet/*.safetensors", "tokenizer/*.json", "model_index.json"} <= set(kwargs["allow_patterns"])
    assert not any(p.endswith((".ckpt", ".bin")) or p.startswith("*") for p in kwargs["allow_patterns"])
    assert "safety_checker/*" in kwargs["ignore_patterns"]
    progress = [e for e in events if isinstance(e, Status) and e.total == 3_000_000]
    assert progress[-1].current == 3_000_000 and "someone/sd15-model" in progress[-1].text
    assert components.source == str(folder)


def test_hub_repo_without_model_index_is_explained(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a diffusers model.*single .safetensors"):
        get_family("sd15").load(ModelSection(base="someone/checkpoint-only"), CPU, torch.float32, ignore_events)


# ----------------------------------------------------------------------------- local folders and single files


def test_local_folder_loads_and_a_family_mismatch_is_explained():
    sd15 = get_family("sd15")
    folder = ensure_builtin("builtin:tiny-sd15")
    components = sd15.load(ModelSection(base=str(folder)), CPU, torch.float32, ignore_events)
    assert components.source == str(folder)
    assert not any(p.requires_grad for p in components.denoiser.parameters())
    assert not components.denoiser.training
    with pytest.raises(ModelLoadError, match='model.family = "sdxl"'):
        sd15.load(ModelSection(base="builtin:tiny-sdxl"), CPU, torch.float32, ignore_events)


def test_single_file_sd15_checkpoint_in_original_layout_loads(tmp_path, loaded):
    sd15, reference = loaded("sd15")
    checkpoint = write_ldm_checkpoint(ensure_builtin("builtin:tiny-sd15"), tmp_path / "tiny-sd15.safetensors")
    model = ModelSection(base=str(checkpoint), components="builtin:tiny-sd15")
    components = sd15.load(model, CPU, torch.float32, ignore_events)
    assert components.source == str(checkpoint)
    for name in ("denoiser", "vae"):
        assert_same_weights(getattr(components, name), getattr(reference, name))
    assert_same_weights(components.text_encoders[0], reference.text_encoders[0])


def test_single_file_without_local_components_says_what_is_missing(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    def offline(*args, **kwargs):
        raise errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    checkpoint = tmp_path / "anything.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model.components.*stable-diffusion-v1-5.*local diffusers folder"):
        get_family("sd15").load(ModelSection(base=str(checkpoint)), CPU, torch.float32, ignore_events)


def test_single_file_flux_transformer_takes_the_rest_from_components(tmp_path, loaded):
    flux, reference = loaded("flux-schnell")
    source = ensure_builtin("builtin:tiny-flux-schnell") / "transformer" / "diffusion_pytorch_model.safetensors"
    checkpoint = Path(shutil.copy(source, tmp_path / "flux-schnell-transformer.safetensors"))
    model = ModelSection(family="flux", base=str(checkpoint), components="builtin:tiny-flux-schnell")
    components = flux.load(model, CPU, torch.float32, ignore_events)
    assert components.extra["variant"] == "schnell"
    assert_same_weights(components.denoiser, reference.denoiser)
    assert_same_weights(components.vae, reference.vae)


def test_damaged_flux_single_file_is_explained(tmp_path):
    damaged = tmp_path / "flux-dev.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00not json")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        get_family("flux").load(ModelSection(family="flux", base=str(damaged)), CPU, torch.float32, ignore_events)


def assert_same_weights(a, b):
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[key], right[key]) for key in left)


# ----------------------------------------------------------------------------- the family hooks


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_encodings_and_prediction_have_the_right_shapes(case, loaded):
    family, components = loaded(case)
    prediction, latents, embeds = prediction_loss(family, components)
    assert latents.shape == (2, LATENT_CHANNELS[case], 8, 8)
    assert prediction.shape == latents.shape
    assert embeds["prompt_embeds"].shape[0] == 2
    if case != "sd15":
        assert embeds["pooled_prompt_embeds"].shape[0] == 2
    pixels = torch.zeros(1, 3, 64, 64)
    assert torch.equal(family.encode_images(components, pixels), family.encode_images(components, pixels))


@pytest.mark.slow
def test_float16_vae_that_asks_for_it_encodes_in_float32_and_stays_float16():
    sd15 = get_family("sd15")
    components = sd15.load(ModelSection(base="builtin:tiny-sd15"), CPU, torch.float16, ignore_events)
    assert components.vae.config.force_upcast
    latents = sd15.encode_images(components, torch.rand(1, 3, 64, 64) * 2 - 1)
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    assert components.vae.dtype == torch.float16 and components.denoiser.dtype == torch.float16


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sdxl", "flux"])
def test_prompt_embeddings_match_the_diffusers_pipeline(case, loaded):
    family, components = loaded(case)
    pipe = family.build_pipeline(components)
    captions = ["a red square", "sks, a cat on a mat"]
    ours = family.encode_prompts(components, captions)
    if case == "sdxl":
        theirs = pipe.encode_prompt(captions, device=CPU, do_classifier_free_guidance=False)
        expected = {"prompt_embeds": theirs[0], "pooled_prompt_embeds": theirs[2]}
    else:
        theirs = pipe.encode_prompt(captions, prompt_2=None, device=CPU, max_sequence_length=32)
        expected = {"prompt_embeds": theirs[0], "pooled_prompt_embeds": theirs[1]}
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "preset"), PRESETS)
def test_every_lora_preset_matches_layers_that_get_gradients(case, preset, loaded):
    family, components = loaded(case)
    targets = family.lora_targets(preset, components.denoiser)
    adapted = components.replaced(denoiser=with_lora(components.denoiser, targets))
    prediction, _, _ = prediction_loss(family, adapted)
    prediction.float().pow(2).mean().backward()
    grads = lora_grads(adapted.denoiser)
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sd15", "sdxl"])
def test_text_encoder_lora_receives_gradients_through_encode_prompts(case, loaded):
    family, components = loaded(case)
    encoders = [with_lora(encoder, family.text_encoder_lora_targets) for encoder in components.text_encoders]
    prediction, _, _ = prediction_loss(family, components.replaced(text_encoders=encoders))
    prediction.float().pow(2).mean().backward()
    assert all(any(g.abs().sum() > 0 for g in lora_grads(encoder)) for encoder in encoders)
    assert not get_family("flux").supports_text_encoder_lora


def test_flux_block_presets_fit_a_smaller_transformer(loaded):
    flux, components = loaded("flux")
    assert flux.lora_targets("nano") == ["single_transformer_blocks.7.proj_out"]
    assert flux.lora_targets("nano", components.denoiser) == ["single_transformer_blocks.0.proj_out"]
    assert flux.lora_targets("tiny", components.denoiser) == [
        "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]
    with pytest.raises(ValueError, match="mmdit"):
        flux.lora_targets("attn")


@pytest.mark.slow
@pytest.mark.parametrize(("case", "expected"), [("flux", 3.5), ("flux-schnell", None)])
def test_flux_dev_gets_guidance_and_schnell_does_not(case, expected, loaded):
    family, components = loaded(case)
    seen = capture_kwargs(components.denoiser, lambda: family.predict(
        components, torch.randn(1, 16, 8, 8), torch.tensor([500.0]), family.encode_prompts(components, ["a cat"]),
        conditioning(1), TrainSection(guidance=3.5)))
    assert components.extra["variant"] == ("dev" if expected else "schnell")
    assert seen["timestep"].item() == pytest.approx(0.5)
    if expected is None:
        assert seen["guidance"] is None
    else:
        assert seen["guidance"].tolist() == [expected]


@pytest.mark.slow
def test_sdxl_time_ids_come_from_each_samples_conditioning(loaded):
    family, components = loaded("sdxl")
    cond = [Conditioning((512, 384), (16, 0), (64, 64)), Conditioning((64, 96), (0, 8), (64, 64))]
    embeds = family.encode_prompts(components, ["a", "b"])
    seen = capture_kwargs(components.denoiser, lambda: family.predict(
        components, torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), embeds, cond, TrainSection()))
    assert seen["added_cond_kwargs"]["time_ids"].tolist() == [[512, 384, 16, 0, 64, 64], [64, 96, 0, 8, 64, 64]]
    assert torch.equal(seen["added_cond_kwargs"]["text_embeds"], embeds["pooled_prompt_embeds"])


def capture_kwargs(module, run) -> dict:
    seen: dict = {}
    handle = module.register_forward_pre_hook(lambda _m, _args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen


def test_objectives_follow_the_scheduler_and_the_config(loaded):
    sd15, components = loaded("sd15")
    assert sd15.make_objective(components, TrainSection()).prediction_type == "epsilon"
    assert sd15.make_objective(components, TrainSection(prediction_type="v_prediction")).prediction_type == \
        "v_prediction"
    flux, flux_components = loaded("flux")
    objective = flux.make_objective(flux_components, TrainSection(timestep_sampling="logit_normal", flow_shift=2.0))
    assert (objective.sampling, objective.shift) == ("logit_normal", 2.0)


def test_flux_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    from lora_gui.engine.families.flux import latent_image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    expected = FluxPipeline._prepare_latent_image_ids(2, 3, 5, CPU, torch.float32)
    assert torch.equal(latent_image_ids(3, 5, CPU, torch.float32), expected)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_with_a_lora_renders_a_tiny_image(case, loaded):
    family, components = loaded(case)
    targets = family.lora_targets(next(iter(family.lora_target_presets)), components.denoiser)
    pipe = family.build_pipeline(components.replaced(denoiser=with_lora(components.denoiser, targets)))
    image = pipe(prompt="a red square", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), **family.sample_kwargs(components)).images[0]
    assert image.size == (64, 64)
    assert family.size_multiple == (16 if case.startswith("flux") else 8)


# ----------------------------------------------------------------------------- an A1111-style checkpoint

# diffusers' converter reads original (LDM) key names; this writes them from a tiny diffusers folder.
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _ldm_unet_key(key: str, per_block: int, has_attention: set[int]) -> str:
    head, leaf = key.rsplit(".", 1)
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{leaf}"
    kind, *rest = key.split(".")
    if kind == "mid_block":
        tail = ".".join(rest[2:])
        return f"middle_block.{2 * int(rest[1])}.{_rename(tail, _RESNET)}" if rest[0] == "resnets" else \
            f"middle_block.1.{tail}"
    block, part, tail = int(rest[0]), rest[1], ".".join(rest[3:])
    stride = per_block + 1
    if part == "downsamplers":
        return f"input_blocks.{(block + 1) * stride}.0.op.{'.'.join(rest[4:])}"
    if part == "upsamplers":
        slot = 2 if block in has_attention else 1
        return f"output_blocks.{block * stride + per_block}.{slot}.conv.{'.'.join(rest[4:])}"
    index = 1 + block * stride + int(rest[2]) if kind == "down_blocks" else block * stride + int(rest[2])
    prefix = "input_blocks" if kind == "down_blocks" else "output_blocks"
    return f"{prefix}.{index}.0.{_rename(tail, _RESNET)}" if part == "resnets" else f"{prefix}.{index}.1.{tail}"


def write_ldm_checkpoint(folder: Path, target: Path) -> Path:
    from safetensors.torch import load_file, save_file

    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    per_block = json.loads((folder / "unet" / "config.json").read_text())["layers_per_block"]
    has_attention = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    blocks = len(json.loads((folder / "vae" / "config.json").read_text())["down_block_types"])
    clip = load_file(folder / "text_encoder" / "model.safetensors")
    merged = {f"model.diffusion_model.{_ldm_unet_key(k, per_block, has_attention)}": v for k, v in unet.items()}
    merged.update({f"first_stage_model.{ldm_vae_key(k, blocks)}": v for k, v in vae.items()})
    merged.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else f"text_model.{k}"): v
                   for k, v in clip.items()})
    save_file({k: v.contiguous() for k, v in merged.items()}, target)
    return target
