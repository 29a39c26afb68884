"""model.family = "auto": the family told from a folder's model_index.json or a single file's tensor names."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

from lora_gui.config import build_config  # noqa: E402
from lora_gui.engine.families.builtin import ensure_builtin  # noqa: E402
from lora_gui.engine.families.detect import detect_family, with_detected_family  # noqa: E402
from lora_gui.engine.families.loading import ModelLoadError  # noqa: E402


def write_checkpoint(path, names):
    save_file({name: torch.zeros(1) for name in names}, str(path))
    return str(path)


LDM = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
       "first_stage_model.decoder.conv_in.weight"]
SINGLE_FILES = {
    "sd15": [*LDM, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
    "sdxl": [*LDM, "model.diffusion_model.label_emb.0.0.weight",
             "conditioner.embedders.1.model.token_embedding.weight"],
    "flux": ["img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
             "double_blocks.0.img_mod.lin.weight", "single_blocks.0.linear1.weight"],
    "flux2-klein": ["img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
                    "single_blocks.0.linear1.weight", "double_stream_modulation_img.lin.weight",
                    "double_stream_modulation_txt.lin.weight", "single_stream_modulation.lin.weight"],
    "flux2-dev": ["img_in.weight", "txt_in.weight", "guidance_in.in_layer.weight", "double_blocks.0.img_attn.qkv.weight",
                  "single_blocks.0.linear1.weight", "double_stream_modulation_img.lin.weight",
                  "double_stream_modulation_txt.lin.weight", "single_stream_modulation.lin.weight"],
    "qwen-image": ["model.diffusion_model.img_in.weight", "model.diffusion_model.txt_in.weight",
                   "model.diffusion_model.txt_norm.weight", "model.diffusion_model.transformer_blocks.0.img_mod.1.weight",
                   "model.diffusion_model.transformer_blocks.0.attn.to_q.weight"],
}


@pytest.mark.parametrize("family", sorted(SINGLE_FILES))
def test_single_files_by_tensor_names(family, tmp_path):
    path = write_checkpoint(tmp_path / f"{family}.safetensors", SINGLE_FILES[family])
    assert detect_family(path).family == family


def test_flux_names_under_comfyui_prefix_and_in_diffusers_layout(tmp_path):
    prefixed = write_checkpoint(tmp_path / "comfy.safetensors",
                                ["model.diffusion_model." + name for name in SINGLE_FILES["flux"]])
    assert detect_family(prefixed).family == "flux"
    diffusers_layout = write_checkpoint(tmp_path / "transformer.safetensors", [
        "x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.norm1.linear.weight", "single_transformer_blocks.0.attn.to_q.weight"])
    assert detect_family(diffusers_layout).family == "flux"


@pytest.mark.slow
@pytest.mark.parametrize(("builtin", "family"), [("builtin:tiny-sd15", "sd15"), ("builtin:tiny-sdxl", "sdxl"),
                                                 ("builtin:tiny-flux", "flux")])
def test_diffusers_folders_by_model_index(builtin, family, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(ensure_builtin(builtin), folder)
    detection = detect_family(str(folder))
    assert detection.family == family and "model_index.json" in detection.reason
    config = with_detected_family(build_config(overrides=["model.family=auto", f"model.base={folder}"]))
    assert config.model.family == family


def test_unknown_models_say_what_to_set(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ModelLoadError, match="WanPipeline model, which lora-gui does not train"):
        detect_family(str(other))
    stranger = write_checkpoint(tmp_path / "stranger.safetensors", ["encoder.layer.0.weight"])
    with pytest.raises(ModelLoadError, match="match no supported family.*set model.family"):
        detect_family(stranger)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        detect_family(str(broken))


def test_an_explicit_family_is_kept():
    config = build_config(overrides=["model.family=sdxl", "model.base=builtin:tiny-sd15"])
    assert with_detected_family(config) is config


@pytest.mark.slow
def test_training_with_auto_family_records_the_detected_one(tmp_path):
    from helpers import make_dataset, tiny_config

    from lora_gui.engine.checkpoint import list_checkpoints, load_checkpoint
    from lora_gui.engine.train import train
    from lora_gui.events import Status

    dataset = make_dataset(tmp_path / "images")
    folder = tmp_path / "base"
    shutil.copytree(ensure_builtin("builtin:tiny-sdxl"), folder)
    config = tiny_config("sdxl", dataset, tmp_path / "out", "model.family=auto", f"model.base={folder}",
                         "train.max_steps=1")
    seen = []
    result = train(config, lambda event: seen.append(event.text) if isinstance(event, Status) else None)
    assert result.status == "finished"
    assert any(text.startswith("model.family auto: Stable Diffusion XL") for text in seen)
    progress, _ = load_checkpoint(list_checkpoints(tmp_path / "out")[-1])
    assert progress["family"] == "sdxl"
    assert 'family = "sdxl"' in (tmp_path / "out" / "config.toml").read_text()
