"""Tensor-name tests for single-file checkpoints in the original (A1111/ComfyUI) UNet layout."""

from __future__ import annotations

from collections.abc import Collection


def has_ldm_unet(tensor_names: Collection[str]) -> bool:
    return any(name.startswith("model.diffusion_model.input_blocks.") for name in tensor_names)


def has_sdxl_embeddings(tensor_names: Collection[str]) -> bool:
    """SDXL's size/crop embedding (``label_emb``) or its two-encoder conditioner."""
    return any(name.startswith(("model.diffusion_model.label_emb.", "conditioner.embedders.")) for name in tensor_names)
