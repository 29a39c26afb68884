"""``model.family = "auto"``: which family a base model is, from what it holds.

A diffusers folder (local, built-in or on the Hub) names its pipeline in ``model_index.json``; a
single ``.safetensors`` file is recognised by its tensor names. Each family says what it recognises
(``pipeline_class_name``, ``claims_checkpoint``), so a new family needs no change here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_gui.engine.families.builtin import is_builtin
from lora_gui.engine.families.loading import ModelLoadError, resolve_source
from lora_gui.engine.families.registry import family_class, family_for_builtin, family_names

AUTO = "auto"


@dataclass(frozen=True)
class Detection:
    family: str
    reason: str  # what gave it away, for the log


def detect_family(base: str, cache_dir: str | None = None, revision: str | None = None) -> Detection:
    """The family of ``model.base``; ModelLoadError (saying what to set) when it cannot be told."""
    if is_builtin(base):
        return Detection(family_for_builtin(base), f"{base} is a built-in model")
    source = resolve_source(base, cache_dir)
    if source.kind == "single_file":
        return _from_tensor_names(source.location)
    folder = Path(source.location) if source.kind == "folder" else _hub_model_index_folder(base, revision, cache_dir)
    return _from_model_index(folder / "model_index.json", base)


def with_detected_family(config, emit=None):
    """``config`` with ``model.family`` filled in when it is "auto" (unchanged otherwise)."""
    if config.model.family != AUTO:
        return config
    detection = detect_family(config.model.base, config.model.cache_dir, config.model.revision)
    if emit is not None:
        from lora_gui.events import Status

        label = family_class(detection.family).label
        emit(Status(f"model.family auto: {label} ({detection.reason})"))
    resolved = config.model_copy(deep=True)
    resolved.model.family = detection.family
    return resolved


def _from_model_index(path: Path, base: str) -> Detection:
    try:
        class_name = json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        raise ModelLoadError(f"{base}: its model_index.json cannot be read, so its family is unknown. "
                             f"Set model.family to one of {', '.join(family_names())}.") from None
    for name in family_names():
        if family_class(name).pipeline_class_name == class_name:
            return Detection(name, f"model_index.json names {class_name}")
    raise ModelLoadError(f"{base} is a {class_name} model, which lora-gui does not train. Supported pipelines: "
                         + ", ".join(family_class(name).pipeline_class_name for name in family_names()) + ".")


def _from_tensor_names(path: str) -> Detection:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            names = set(handle.keys())
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}).") from None
    claims = [name for name in family_names() if family_class(name).claims_checkpoint(names)]
    if len(claims) == 1:
        return Detection(claims[0], "its tensor names")
    known = ", ".join(family_names())
    if not claims:
        raise ModelLoadError(f"{path}: its tensor names match no supported family ({known}). If it is one of them, "
                             "set model.family (and model.components to a matching diffusers model).")
    raise ModelLoadError(f"{path}: its tensor names fit several families ({', '.join(claims)}); set model.family.")


def _hub_model_index_folder(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    """The folder holding the Hub repository's model_index.json (downloaded alone, a few hundred bytes)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "model_index.json", revision=revision, cache_dir=cache_dir)).parent
    except Exception as exc:  # offline, gated, missing: all say the same thing to the user
        raise ModelLoadError(f"Could not read {repo_id}'s model_index.json from the Hugging Face Hub to tell its "
                             f"family ({type(exc).__name__}). Set model.family, or check the id and the "
                             "connection.") from None
