"""The full-size denoiser architecture a config trains, built on the meta device (no weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_gui.config import ModelSection
from lora_gui.engine.families.base import ModelFamily


def denoiser_config(family: ModelFamily, model: ModelSection, cache_dir: str | None = None) -> dict[str, Any]:
    """The denoiser's diffusers config: from a local or built-in folder, a Hub download already in the local
    cache, or the family's table of published architectures."""
    from lora_gui.engine.planner import PlanError

    found = part_config(family.denoiser_key, family.planning_architectures.get(model.base.strip()), model, cache_dir)
    if found is None:
        raise PlanError(f"The planner does not know the architecture of {model.base.strip()!r}. Give model.base as "
                        "a diffusers folder (or, for a single file, model.components), or one of: "
                        f"{', '.join(family.planning_architectures) or 'none yet'}.")
    return found


def vae_config(family: ModelFamily, model: ModelSection, cache_dir: str | None = None) -> dict[str, Any] | None:
    """The VAE's diffusers config, found as the denoiser's is (the family's published VAE as the table)."""
    from lora_gui.engine.planner import PlanError

    try:
        return part_config("vae", dict(family.planning_vae) or None, model, cache_dir)
    except PlanError:
        return dict(family.planning_vae) or None


def part_config(subfolder: str, known: dict[str, Any] | None, model: ModelSection,
                cache_dir: str | None) -> dict[str, Any] | None:
    from lora_gui.engine.families.loading import ModelLoadError, resolve_source
    from lora_gui.engine.planner import PlanError

    base = model.base.strip()
    try:
        source = resolve_source(base, cache_dir)
    except ModelLoadError as exc:
        if known is not None:
            return dict(known)
        raise PlanError(str(exc)) from None
    if source.kind == "folder":
        return _read_config(Path(source.location) / subfolder / "config.json")
    if source.kind == "hub":
        cached = _hub_cached_config(source.location, subfolder, model.revision)
        if cached is not None:
            return cached
    if known is not None:
        return dict(known)
    if source.kind == "single_file" and model.components:
        return part_config(subfolder, known, model.model_copy(update={"base": model.components, "components": None}),
                           cache_dir)
    return None


def build_on_meta(config: dict[str, Any]):
    """The diffusers model class named by ``_class_name``, at full size, without memory."""
    import diffusers
    import torch

    class_name = config.get("_class_name")
    model_class = getattr(diffusers, str(class_name), None)
    if model_class is None:
        from lora_gui.engine.planner import PlanError

        raise PlanError(f"The model class {class_name!r} is not in this diffusers version.")
    with torch.device("meta"):
        return model_class.from_config(config)


def _read_config(path: Path) -> dict[str, Any]:
    from lora_gui.engine.planner import PlanError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"Could not read the model config {path}: {exc}") from None


def _hub_cached_config(repo_id: str, subfolder: str, revision: str | None) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, f"{subfolder}/config.json", revision=revision or None)
    return _read_config(Path(found)) if isinstance(found, str) else None
