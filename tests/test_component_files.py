"""Text encoders and VAEs from single files, as ComfyUI users keep them, and the staged load: the text encoders
and the VAE fill the caches and leave memory before the denoiser loads.

The split files are written from the built-in tiny models in the layouts the released files use (no model
hub here): transformers names with ComfyUI's wrappers for the text encoders, the LDM / Black Forest Labs
layout for AutoencoderKL and Flux.2's VAE, Wan 2.1's layout for Qwen-Image's VAE.
"""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from helpers import ldm_vae_key, make_dataset, tiny_config
from safetensors.torch import load_file, save_file

from lora_gui.config import ConfigError, ModelSection, build_config
from lora_gui.engine.families.builtin import ensure_builtin
from lora_gui.engine.families.loading import ModelLoadError
from lora_gui.engine.families.registry import get_family
from lora_gui.events import Status, ignore_events

CPU = torch.device("cpu")


def folder_without(family: str, tmp_path: Path, parts: tuple[str, ...]) -> Path:
    """A copy of the built-in model's folder with the weights of ``parts`` deleted (so they can only come from
    the single files)."""
    folder = tmp_path / f"{family}-base"
    shutil.copytree(ensure_builtin(f"builtin:tiny-{family}"), folder)
    for part in parts:
        for weights in (folder / part).glob("*.safetensors"):
            weights.unlink()
    return folder


def text_encoder_file(family: str, target: Path, rename, dtype=torch.float32, drop: tuple[str, ...] = ()) -> Path:
    state = load_file(ensure_builtin(f"builtin:tiny-{family}") / "text_encoder" / "model.safetensors")
    save_file({rename(name): tensor.to(dtype).contiguous() for name, tensor in state.items()
               if not name.startswith(drop)}, target)
    return target


def ldm_vae_file(family: str, target: Path, folder: Path | None = None) -> Path:
    """The VAE in the original autoencoder layout (Flux.1's ae.safetensors; Flux.2's adds ``bn.*``)."""
    folder = folder or ensure_builtin(f"builtin:tiny-{family}")
    state = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    blocks = len(json.loads((folder / "vae" / "config.json").read_text())["down_block_types"])
    save_file({ldm_vae_key(name, blocks): tensor.contiguous() for name, tensor in state.items()}, target)
    return target


RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
            "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
            "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def wan_name(name: str) -> str:
    """A Qwen-Image VAE tensor name as Wan 2.1's release (and ComfyUI's qwen_image_vae.safetensors) names it."""
    coder, _, rest = name.partition(".")
    if coder in ("quant_conv", "post_quant_conv"):
        return ("conv1." if coder == "quant_conv" else "conv2.") + rest
    if rest.startswith("conv_in."):
        return f"{coder}.conv1.{rest[len('conv_in.'):]}"
    if rest.startswith("norm_out."):
        return f"{coder}.head.0.{rest[len('norm_out.'):]}"
    if rest.startswith("conv_out."):
        return f"{coder}.head.2.{rest[len('conv_out.'):]}"
    parts = rest.split(".")
    if parts[0] == "mid_block":
        tail = ".".join(parts[3:])
        if parts[1] == "attentions":
            return f"{coder}.middle.1.{tail}"
        return f"{coder}.middle.{2 * int(parts[2])}.{RESIDUAL[tail]}"
    if parts[0] == "down_blocks":
        tail = ".".join(parts[2:])
        return f"encoder.downsamples.{parts[1]}.{RESIDUAL.get(tail, tail)}"
    block = int(parts[1])
    if parts[2] == "upsamplers":
        return f"decoder.upsamples.{4 * block + 3}.{'.'.join(parts[4:])}"
    tail = ".".join(parts[4:])
    return f"decoder.upsamples.{4 * block + int(parts[3])}.{RESIDUAL[tail]}"


def full_structure_qwen_vae(folder: Path) -> None:
    """Give the copied Qwen-Image model a tiny VAE with the released one's block structure (two residual
    blocks per level), the structure Wan's layout encodes in its indices."""
    from diffusers import AutoencoderKLQwenImage

    config = json.loads((folder / "vae" / "config.json").read_text())
    torch.manual_seed(3)
    vae = AutoencoderKLQwenImage(base_dim=config["base_dim"], z_dim=config["z_dim"], dim_mult=config["dim_mult"],
                                 num_res_blocks=2, attn_scales=[], temperal_downsample=config["temperal_downsample"],
                                 latents_mean=config["latents_mean"], latents_std=config["latents_std"])
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae")


def assert_same_weights(loaded, reference, cast=None):
    left, right = loaded.state_dict(), reference.state_dict()
    shared = [name for name in right if name in left]
    assert len(shared) >= len(right) - 2  # at most a tied lm_head is left out
    for name in shared:
        expected = right[name] if cast is None else right[name].to(cast).to(right[name].dtype)
        assert torch.equal(left[name], expected), name


def load(family: str, **model) -> object:
    return get_family(family).load(ModelSection(family=family, **model), CPU, torch.float32, ignore_events)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_zimage_text_encoder_and_vae_files_in_comfyuis_layout_load(tmp_path, dtype):
    """Z-Image's qwen_3_4b.safetensors names its weights model.layers.* (transformers' Qwen3Model has no
    ``model.``); its VAE is Flux.1's ae.safetensors in the original layout. fp8 files are upcast."""
    base = folder_without("zimage", tmp_path, ("text_encoder", "vae"))
    encoder = text_encoder_file("zimage", tmp_path / "qwen_3_4b.safetensors", lambda name: f"model.{name}", dtype)
    vae = ldm_vae_file("zimage", tmp_path / "ae.safetensors")
    components = load("zimage", base=str(base), text_encoder_files=[str(encoder)], vae_file=str(vae))
    reference = load("zimage", base=str(ensure_builtin("builtin:tiny-zimage")))  # same caption length
    assert_same_weights(components.text_encoders[0], reference.text_encoders[0],
                        cast=None if dtype == torch.float32 else dtype)
    assert_same_weights(components.vae, reference.vae)
    if dtype == torch.float32:
        family, captions = get_family("zimage"), ["sks, a red square"]
        with torch.no_grad():
            ours, theirs = family.encode_prompts(components, captions), family.encode_prompts(reference, captions)
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


@pytest.mark.slow
def test_qwen_image_text_only_encoder_file_and_wan_layout_vae_load(tmp_path):
    """ComfyUI's Qwen2.5-VL file uses the older model.layers / visual. names; a text-only file (no vision
    tower) still encodes captions exactly. The VAE file is in Wan 2.1's layout."""
    base = folder_without("qwen-image", tmp_path, ("text_encoder",))
    full_structure_qwen_vae(base)
    diffusers_vae = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    vae = tmp_path / "qwen_image_vae.safetensors"
    save_file({wan_name(name): tensor.contiguous() for name, tensor in diffusers_vae.items()}, vae)
    (base / "vae" / "diffusion_pytorch_model.safetensors").unlink()

    def legacy(name: str) -> str:
        return name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")

    encoder = text_encoder_file("qwen-image", tmp_path / "qwen_2.5_vl.safetensors", legacy,
                                drop=("model.visual.", "visual."))
    components = load("qwen-image", base=str(base), text_encoder_files=[str(encoder)], vae_file=str(vae))
    assert all(torch.equal(components.vae.state_dict()[name], tensor) for name, tensor in diffusers_vae.items())
    reference = load("qwen-image", base=str(ensure_builtin("builtin:tiny-qwen-image")))
    family, captions = get_family("qwen-image"), ["sks, a red square", "a blue circle"]
    with torch.no_grad():
        ours, theirs = family.encode_prompts(components, captions), family.encode_prompts(reference, captions)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


@pytest.mark.slow
def test_flux2_vae_file_in_the_original_layout_keeps_its_batch_norm_statistics(tmp_path):
    base = folder_without("flux2-klein", tmp_path, ("vae",))
    vae = ldm_vae_file("flux2-klein", tmp_path / "flux2-vae.safetensors")
    components = load("flux2-klein", base=str(base), vae_file=str(vae))
    reference = load("flux2-klein", base="builtin:tiny-flux2-klein")
    assert_same_weights(components.vae, reference.vae)
    assert torch.equal(components.vae.bn.running_var, reference.vae.bn.running_var)


@pytest.mark.slow
def test_component_files_that_do_not_fit_say_what_to_do(tmp_path):
    vae = ldm_vae_file("zimage", tmp_path / "ae.safetensors")
    with pytest.raises(ModelLoadError, match=r"is not a Qwen3Model like the one in .*weights are missing"):
        load("zimage", base="builtin:tiny-zimage", text_encoder_files=[str(vae)])
    encoder = text_encoder_file("zimage", tmp_path / "te.safetensors", lambda name: name)
    with pytest.raises(ModelLoadError, match="names 2 files, but this model has 1 text encoder"):
        load("zimage", base="builtin:tiny-zimage", text_encoder_files=[str(encoder), str(encoder)])
    with pytest.raises(ModelLoadError, match="is not a AutoencoderKL like the one in"):
        load("zimage", base="builtin:tiny-zimage", vae_file=str(encoder))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load("zimage", base="builtin:tiny-zimage", vae_file=str(tmp_path / "missing.safetensors"))
    scaled = tmp_path / "te_fp8_scaled.safetensors"
    save_file({"model.norm.weight": torch.ones(4), "model.layers.0.mlp.up_proj.scale_weight": torch.ones(1)}, scaled)
    with pytest.raises(ModelLoadError, match="fp8_scaled"):
        load("zimage", base="builtin:tiny-zimage", text_encoder_files=[str(scaled)])
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        build_config(preset="zimage-cpu-demo", overrides=[f"model.vae_file={tmp_path / 'vae.ckpt'}"])


def live(class_name: str, besides: frozenset[int] = frozenset()) -> int:
    """How many objects of that class are alive, leaving out those in ``besides`` (ids): building a built-in
    model can leave one behind in a frame the test's log capture keeps."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj).__name__ == class_name and id(obj) not in besides)


def alive_ids(class_name: str) -> frozenset[int]:
    gc.collect()
    return frozenset(id(obj) for obj in gc.get_objects() if type(obj).__name__ == class_name)


@pytest.mark.slow
def test_staged_load_releases_the_text_encoder_before_the_denoiser_loads_and_samples_without_it(tmp_path):
    """System memory holds the text encoder, then the transformer, not both: when the transformer starts
    loading no Qwen3 text encoder is alive; validation images still render from the cached prompts."""
    dataset = make_dataset(tmp_path / "images")
    ensure_builtin("builtin:tiny-zimage")
    before = {name: alive_ids(name) for name in ("Qwen3Model", "ZImageTransformer2DModel")}
    alive_at_denoiser_load = []

    def watch(event):
        if isinstance(event, Status) and event.text == "Loading the transformer":
            alive_at_denoiser_load.append(tuple(live(name, before[name]) for name in before))

    from lora_gui.engine.train import train

    config = tiny_config("zimage", dataset, tmp_path / "out", "train.max_steps=2", "sample.every=2")
    result = train(config, watch)
    assert result.status == "finished"
    assert alive_at_denoiser_load == [(0, 0)]
    assert len(list((tmp_path / "out" / "samples").rglob("*.png"))) >= 1


@pytest.mark.slow
def test_released_text_encoders_load_again_from_their_files_when_a_prompt_needs_them(tmp_path):
    base = folder_without("zimage", tmp_path, ("text_encoder",))
    encoder = text_encoder_file("zimage", tmp_path / "qwen_3_4b.safetensors", lambda name: f"model.{name}")
    components = load("zimage", base=str(base), text_encoder_files=[str(encoder)])
    family, captions = get_family("zimage"), ["sks, a red square"]
    with torch.no_grad():
        before = family.encode_prompts(components, captions)
    released = weakref.ref(components.text_encoders[0])
    assert components.release_text_encoders() and not components.text_encoders_loaded
    gc.collect()
    assert components.pipeline_text_encoder(0) is None and released() is None
    with torch.no_grad():
        after = family.encode_prompts(components, captions)  # loads them again from the file
    assert components.text_encoders_loaded and all(torch.equal(before[k], after[k]) for k in before)
    assert not components.text_encoders[0].training and not any(p.requires_grad for p in
                                                                 components.text_encoders[0].parameters())
