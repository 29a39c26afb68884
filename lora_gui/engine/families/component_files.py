"""Text encoders and VAEs from single .safetensors files, as ComfyUI users keep them in ``models/text_encoders``
and ``models/vae``; the configs (and tokenizers) come from ``model.components``.

Text-encoder files use the transformers names, with or without the wrappers multimodal models add
(``model.language_model.``, ``language_model.model.``); a file without the vision tower loads for text
encoding. VAE files may use the diffusers names, or the original layouts diffusers converts: the
LDM/Black Forest Labs autoencoder (SD, SDXL, Flux.1, Z-Image; Flux.2 with its batch-norm statistics)
and Wan 2.1's (Qwen-Image).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.loading import (
    ModelLoadError,
    load_part,
    part_class,
    refuse_pickle,
    refuse_scaled_fp8,
    text_encoder_keys,
)
from lora_gui.events import Status

if TYPE_CHECKING:
    import torch

    from lora_gui.config import ModelSection
    from lora_gui.events import Emit

# Module names of the parts text-only encoding never runs: a file may leave them out.
UNUSED_FOR_TEXT = ("lm_head.", "visual.", "vision_tower.", "multi_modal_projector.")
WRAPPER_PREFIXES = (("model.language_model.", ""), ("language_model.model.", ""), ("language_model.", ""),
                    ("model.visual.", "visual."), ("model.vision_tower.", "vision_tower."),
                    ("model.multi_modal_projector.", "multi_modal_projector."), ("model.", ""))
VAE_FILE_PREFIXES = ("first_stage_model.", "vae.")


def file_replaced_patterns(model: ModelSection) -> list[str]:
    """Download patterns of the parts that ``model.text_encoder_files`` / ``model.vae_file`` replace."""
    keys = ["text_encoder", "text_encoder_2"][:len(model.text_encoder_files)]
    if model.vae_file:
        keys.append("vae")
    return [f"{key}/*.safetensors" for key in keys]


def component_files(model: ModelSection, folder: Path, dtype: torch.dtype, emit: Emit) -> dict[str, Any]:
    """The parts that ``model.text_encoder_files`` and ``model.vae_file`` give, loaded with ``folder``'s configs."""
    keys = text_encoder_keys(folder)
    if len(model.text_encoder_files) > len(keys):
        raise ModelLoadError(f"model.text_encoder_files names {len(model.text_encoder_files)} files, but this model "
                             f"has {len(keys)} text encoder(s) ({', '.join(keys) or 'none'}). Give one file per text "
                             "encoder, in that order.")
    parts = _text_encoders_from_files(model, folder, keys, dtype, emit, "from {path}")
    if model.vae_file:
        emit(Status(f"Loading the VAE from {model.vae_file}"))
        parts["vae"] = load_vae_file(model.vae_file, part_class(folder, "vae"), folder / "vae", dtype)
    return parts


def text_encoders_from(model: ModelSection, folder: Path, dtype: torch.dtype, emit: Emit) -> dict[str, Any]:
    """The text encoders alone, from their files or the folder (to load them again after they were released)."""
    keys = text_encoder_keys(folder)
    encoders = _text_encoders_from_files(model, folder, keys, dtype, emit, "again")
    for key in keys[len(encoders):]:
        emit(Status(f"Loading the {key.replace('_', ' ')} again"))
        encoders[key] = load_part(part_class(folder, key), folder / key, dtype, "dtype")
    return encoders


def _text_encoders_from_files(model: ModelSection, folder: Path, keys: list[str], dtype: torch.dtype, emit: Emit,
                              how: str) -> dict[str, Any]:
    encoders = {}
    for key, path in zip(keys, model.text_encoder_files, strict=False):
        emit(Status(f"Loading the {key.replace('_', ' ')} {how.format(path=path)}"))
        encoders[key] = load_text_encoder_file(path, part_class(folder, key), folder / key, dtype)
    return encoders


def canonical_text_name(name: str) -> str:
    """A text encoder's tensor name without the wrappers that differ between transformers versions and files."""
    for prefix, replacement in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


def read_component_file(path: str, what: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    refuse_pickle(path)
    if not Path(path).is_file():
        raise ModelLoadError(f"The {what} file {path} does not exist. Check the path.")
    try:
        with safe_open(path, "pt") as handle:
            names = list(handle.keys())
            refuse_scaled_fp8(path, names)
            return {name: handle.get_tensor(name) for name in names}
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}). Download it "
                             "again or check that it is complete.") from exc


def upcast_fp8(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.dtype.is_floating_point and tensor.element_size() == 1 else tensor


def load_text_encoder_file(path: str, model_class: type, config_folder: Path, dtype: torch.dtype) -> Any:
    """``model_class`` (a transformers model) with its config from ``config_folder`` and its weights from ``path``."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_folder))
    with torch.device("meta"):
        wanted = list(model_class._from_config(config).state_dict())
    stored = read_component_file(path, "text encoder")
    by_canonical = {canonical_text_name(name): name for name in stored}
    state, missing = {}, []
    for name in wanted:
        found = by_canonical.get(canonical_text_name(name))
        if found is not None:
            state[name] = upcast_fp8(stored[found], dtype)
        elif not canonical_text_name(name).startswith(UNUSED_FOR_TEXT):
            missing.append(name)
    if missing:
        raise ModelLoadError(
            f"{path} is not a {model_class.__name__} like the one in {config_folder}: {len(missing)} of its "
            f"{len(wanted)} weights are missing (for example {', '.join(missing[:3])}). Use the text encoder file "
            "made for this model, or set model.components to the model it belongs to.")
    try:
        return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"Could not load {path} as a {model_class.__name__}: {type(exc).__name__}: {exc}. Use the "
                             "text encoder file made for this model (sizes must match model.components).") from exc


def load_vae_file(path: str, vae_class: type, config_folder: Path, dtype: torch.dtype) -> Any:
    """``vae_class`` (a diffusers autoencoder) with its config from ``config_folder`` and its weights from ``path``."""
    config = vae_class.load_config(str(config_folder))
    vae = vae_class.from_config(config)
    stored = read_component_file(path, "VAE")
    state = diffusers_vae_state(stored, vae, config)
    missing = sorted(set(vae.state_dict()) - set(state))
    if missing:
        raise ModelLoadError(
            f"{path} is not a {vae_class.__name__} like the one in {config_folder}: {len(missing)} weights are "
            f"missing (for example {', '.join(missing[:3])}). Use the VAE file made for this model, or set "
            "model.components to the model it belongs to.")
    try:
        vae.load_state_dict({name: upcast_fp8(state[name], dtype) for name in vae.state_dict()})
    except RuntimeError as exc:
        raise ModelLoadError(f"{path} does not fit the {vae_class.__name__} of {config_folder}: {exc}. Use the VAE "
                             "file made for this model.") from exc
    return vae.to(dtype)


def diffusers_vae_state(stored: dict, vae: Any, config: dict) -> dict:
    """The file's weights under the diffusers names of ``vae``, from whichever layout the file uses."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_wan_vae_to_diffusers

    state = {_without_vae_prefix(name): tensor for name, tensor in stored.items()}
    wanted = set(vae.state_dict())
    if wanted <= set(state):
        return state
    if "encoder.conv1.weight" in state:  # Wan 2.1's layout (Qwen-Image)
        return convert_wan_vae_to_diffusers(state)
    converted = convert_ldm_vae_checkpoint(state, config)
    converted.update({name: tensor for name, tensor in state.items() if name.startswith("bn.")})  # Flux.2
    return converted


def _without_vae_prefix(name: str) -> str:
    for prefix in VAE_FILE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name
