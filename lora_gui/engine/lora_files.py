"""Write LoRA adapters to files: the kohya single file and the diffusers file, each atomically.

Two files come out of a run:

- the kohya format (``lora_unet_*``, ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*``,
  ``lora_transformer_*`` with ``.lora_down`` / ``.lora_up`` / ``.alpha``), which ComfyUI,
  A1111/Forge and diffusers' ``load_lora_weights`` read;
- the diffusers format written by the pipeline class's ``save_lora_weights``, with the adapter
  config in its metadata so an alpha different from the rank survives.

PiSSA/OLoRA adapters are converted back to an ordinary LoRA on the untouched base, as peft does:
``A' = [A; A0]``, ``B' = [B, -B0]``, rank and alpha doubled (same scale).

DoRA: the diffusers file is exact in diffusers. The kohya file carries peft's magnitude as
``dora_scale`` of shape ``(out, 1, ...)`` (output-axis DoRA, as LyCORIS ``wd_on_output`` writes it).
diffusers drops ``dora_scale`` keys from kohya files; ComfyUI applies them but, until its
output-axis fix lands, normalises by the base weight's norm instead of the adapted one (close
to, not exactly, the trained result); A1111 only knows input-axis DoRA.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.engine.lora import (
    BASE_MUTATING_INITS,
    INITIAL_FACTORS_ATTR,
    LORA_PARAM_MARKERS,
    LoraError,
    adapter_state,
)

if TYPE_CHECKING:
    import torch

    from lora_gui.config import LoraSection

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers and safetensors own these metadata keys; the caller's metadata may not replace them.
RESERVED_METADATA_KEYS = ("format", "lora_adapter_metadata")


@dataclass
class ExportedAdapter:
    """One module's adapter as it goes into files: peft keys without the adapter name."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    use_dora: bool
    target_modules: list[str]
    text_model_prefix: str = ""  # "text_model." for CLIP text encoders whose module names lack it


def export_adapters(
    modules: Mapping[str, torch.nn.Module], adapter_name: str = "default", dtype: torch.dtype | None = None,
    states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, ExportedAdapter]:
    """Each module's adapter as an ordinary LoRA on the original base (PiSSA/OLoRA converted)."""
    return {key: _export_adapter(key, module, adapter_name, dtype, None if states is None else dict(states[key]))
            for key, module in modules.items()}


def _export_adapter(key: str, module: torch.nn.Module, adapter_name: str, dtype, state=None) -> ExportedAdapter:
    import torch

    config = module.peft_config[adapter_name]
    state = adapter_state(module, adapter_name) if state is None else state
    rank, alpha = int(config.r), float(config.lora_alpha)
    if config.rank_pattern or config.alpha_pattern or config.use_rslora:
        raise LoraError(f"{key}: per-layer ranks/alphas and rsLoRA cannot be written to a kohya file.")
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights in BASE_MUTATING_INITS:
        state = _undo_base_mutation(key, module, state, adapter_name)
        rank, alpha = 2 * rank, 2 * alpha
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise LoraError(
            f"{key}: the LoRA weights contain NaN or Inf ({bad[0]} ...), so they were not saved. "
            "Resume from an earlier checkpoint with a lower learning rate."
        )
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    return ExportedAdapter(
        state=state,
        rank=rank,
        alpha=alpha,
        use_dora=bool(config.use_dora),
        target_modules=sorted(config.target_modules) if not isinstance(config.target_modules, str)
        else [config.target_modules],
        text_model_prefix=_text_model_prefix(module, state),
    )


def _undo_base_mutation(key: str, module, state: dict, adapter_name: str) -> dict:
    """PiSSA/OLoRA to plain LoRA: delta = s(BA - B0A0) = s [B, -B0] @ [A; A0]."""
    import torch

    initial = getattr(module, INITIAL_FACTORS_ATTR, {}).get(adapter_name)
    if initial is None:
        raise LoraError(
            f"{key}: this PiSSA/OLoRA adapter was not created by inject_lora, so its starting weights are "
            "unknown and it cannot be saved as a LoRA for the original model."
        )
    converted = {}
    for name, tensor in state.items():
        if ".lora_A." in name:
            converted[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0)
        elif ".lora_B." in name:
            converted[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1)
        else:  # DoRA magnitude: the adapted weight is the same, so it is too
            converted[name] = tensor
    return converted


def _text_model_prefix(module, state: Mapping[str, Any]) -> str:
    """Kohya names CLIP layers text_model.encoder...; recent transformers dropped text_model."""
    is_clip = type(module).__name__.startswith("CLIPText")
    if is_clip and not any(name.startswith("text_model.") for name in state):
        return "text_model."
    return ""


# ----------------------------------------------------------------------------- kohya format


def kohya_prefix(module_key: str, pipeline_class: type) -> str:
    if module_key == "unet":
        return "lora_unet_"
    if module_key == "transformer":
        return "lora_transformer_"
    if module_key == "text_encoder":
        two_encoders = "text_encoder_2" in inspect.signature(pipeline_class.__init__).parameters
        return "lora_te1_" if two_encoders else "lora_te_"
    if module_key == "text_encoder_2":
        return "lora_te2_"
    raise LoraError(f"No kohya LoRA name is known for the module {module_key!r}.")


def kohya_state_dict(exported: Mapping[str, ExportedAdapter], pipeline_class: type,
                     prefix: str | None = None, fold_alpha: bool = False) -> dict[str, torch.Tensor]:
    """The single file for ComfyUI/A1111/Forge: kohya names for UNet models, alpha-carrying diffusers names for Flux.

    diffusers reads ``lora_transformer_*`` Flux keys only for attention layers, while ComfyUI, Forge and
    diffusers all read ``transformer.<module>.lora_A/lora_B`` with a ``.alpha`` beside them, at any model size.
    ``prefix`` replaces the module key in front of diffusers names (a family's ``single_file_lora_prefix``);
    ``fold_alpha`` scales each down weight by alpha / rank and writes no alpha keys.
    """
    if prefix is not None:
        return _named_state_dict(exported, lambda key, path: f"{prefix}{path}", _DIFFUSERS_SUFFIXES, fold_alpha)
    if "transformer" in exported:
        return _named_state_dict(exported, lambda key, path: f"{key}.{path}", _DIFFUSERS_SUFFIXES)
    return _named_state_dict(
        exported, lambda key, path: kohya_prefix(key, pipeline_class) + path.replace(".", "_"), _KOHYA_SUFFIXES
    )


_KOHYA_SUFFIXES = {"lora_A": ".lora_down.weight", "lora_B": ".lora_up.weight"}
_DIFFUSERS_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}


def _named_state_dict(exported: Mapping[str, ExportedAdapter], layer_name, suffixes: dict[str, str],
                      fold_alpha: bool = False):
    """Every adapter tensor under ``layer_name(module_key, layer_path)`` plus a suffix, with an alpha per layer
    (or, with ``fold_alpha``, the down weights scaled by alpha / rank and no alpha)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for key, adapter in exported.items():
        for name, tensor in adapter.state.items():
            module_path, kind = _split_peft_key(name)
            layer = layer_name(key, adapter.text_model_prefix + module_path)
            if kind == "lora_A" and fold_alpha:
                tensors[layer + suffixes[kind]] = (tensor.float() * adapter.alpha / tensor.shape[0]).to(tensor.dtype)
            elif kind in suffixes:
                tensors[layer + suffixes[kind]] = tensor.contiguous()
            else:
                tensors[f"{layer}.dora_scale"] = _output_axis_dora_scale(tensor)
            if kind == "lora_A" and not fold_alpha:
                tensors[f"{layer}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return tensors


def _split_peft_key(name: str) -> tuple[str, str]:
    for kind in LORA_PARAM_MARKERS:
        marker = f".{kind}"
        if marker in name:
            return name.split(marker)[0], kind
    raise LoraError(f"Unexpected LoRA tensor {name!r}: only lora_A, lora_B and DoRA magnitudes can be saved.")


def _output_axis_dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """peft keeps (out,) for Linear and (1, out, 1, 1) for Conv; kohya/LyCORIS use (out, 1, ...)."""
    out_features = magnitude.numel()
    trailing = max(magnitude.dim() - 1, 1)
    return magnitude.reshape(out_features, *([1] * trailing)).contiguous()


def _kohya_metadata(exported: Mapping[str, ExportedAdapter], metadata: Mapping[str, str]) -> dict[str, str]:
    first = next(iter(exported.values()))
    info = {
        "ss_network_module": "lycoris.kohya" if first.use_dora else "networks.lora",
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": f"{first.alpha:g}",
    }
    if first.use_dora:
        info["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    return {**info, **metadata}


# ----------------------------------------------------------------------------- diffusers format


def diffusers_adapter_metadata(adapter: ExportedAdapter) -> dict[str, Any]:
    """The LoraConfig diffusers rebuilds on load; init is plain so loading never touches the base."""
    return {
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": adapter.target_modules,
        "use_dora": adapter.use_dora,
        "init_lora_weights": True,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _diffusers_save_kwargs(exported: Mapping[str, ExportedAdapter], pipeline_class: type) -> dict[str, Any]:
    accepted = inspect.signature(pipeline_class.save_lora_weights).parameters
    kwargs: dict[str, Any] = {}
    for key, adapter in exported.items():
        if f"{key}_lora_layers" not in accepted:
            raise LoraError(f"{pipeline_class.__name__} cannot save a LoRA for {key}; turn off its LoRA training.")
        kwargs[f"{key}_lora_layers"] = _diffusers_layers(key, adapter)
        kwargs[f"{key}_lora_adapter_metadata"] = diffusers_adapter_metadata(adapter)
    return kwargs


def _diffusers_layers(key: str, adapter: ExportedAdapter) -> dict[str, torch.Tensor]:
    """peft's keys; text encoders get the classic ``text_model.`` layout (older diffusers, ComfyUI).

    Text-encoder DoRA magnitudes are written as ``lora_magnitude_vector.weight``: transformers 5 maps
    plain ``lora_magnitude_vector`` to a name that does not exist and silently drops it, and peft's own
    loader reads both spellings.
    """
    if key in ("unet", "transformer"):
        return dict(adapter.state)
    layers = {}
    for name, tensor in adapter.state.items():
        if name.endswith(".lora_magnitude_vector"):
            name += ".weight"
        layers[adapter.text_model_prefix + name] = tensor
    return layers


def write_diffusers_file(
    exported: Mapping[str, ExportedAdapter], pipeline_class: type, path: Path, metadata: Mapping[str, str]
) -> None:
    """``save_lora_weights`` into a scratch folder, then add our metadata and move it into place."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".lora-save-", dir=path.parent))
    try:
        pipeline_class.save_lora_weights(
            scratch, weight_name=DIFFUSERS_WEIGHT_NAME, **_diffusers_save_kwargs(exported, pipeline_class)
        )
        written = scratch / DIFFUSERS_WEIGHT_NAME
        with safe_open(str(written), framework="pt") as handle:
            own_metadata = handle.metadata() or {}
        _atomic_save(load_file(str(written)), path, {**metadata, **own_metadata})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- saving


def save_lora_files(
    pipeline_class: type,
    modules: Mapping[str, torch.nn.Module],
    lora_cfg: LoraSection,
    kohya_path: str | os.PathLike,
    diffusers_path: str | os.PathLike,
    metadata: Mapping[str, str],
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    single_file_prefix: str | None = None,
    single_file_folds_alpha: bool = False,
    states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> tuple[Path, Path]:
    """Write the kohya/ComfyUI/A1111 file and the diffusers file, each atomically.

    ``states``: each module's adapter weights as ``lora_state_dicts`` gives them, when they are not to be read
    from the modules (a sharded run gathers them first).

    ``diffusers_path`` is a ``.safetensors`` file or a folder (then ``pytorch_lora_weights.safetensors``
    inside it). ``dtype`` converts the saved weights (e.g. torch.float16); None keeps them as trained.
    """
    _check_metadata(metadata)
    if not modules:
        raise LoraError("There is no LoRA to save: no module was given.")
    _check_matches_config(modules, lora_cfg, adapter_name)
    exported = export_adapters(modules, adapter_name, dtype, states)
    kohya_file = Path(kohya_path)
    diffusers_file = Path(diffusers_path)
    if diffusers_file.suffix != ".safetensors":
        diffusers_file = diffusers_file / DIFFUSERS_WEIGHT_NAME
    _atomic_save(kohya_state_dict(exported, pipeline_class, single_file_prefix, single_file_folds_alpha), kohya_file,
                 _kohya_metadata(exported, metadata))
    write_diffusers_file(exported, pipeline_class, diffusers_file, metadata)
    return kohya_file, diffusers_file


def _check_metadata(metadata: Mapping[str, str]) -> None:
    not_text = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if not_text:
        raise TypeError(f"LoRA file metadata must map strings to strings; convert {not_text} with str() first.")
    reserved = [key for key in metadata if key in RESERVED_METADATA_KEYS]
    if reserved:
        raise LoraError(f"The metadata keys {reserved} are reserved by safetensors/diffusers; rename them.")


def _check_matches_config(modules, lora_cfg: LoraSection, adapter_name: str) -> None:
    for key, module in modules.items():
        config = module.peft_config[adapter_name]
        if (config.r, float(config.lora_alpha), bool(config.use_dora)) != (
            lora_cfg.rank, float(lora_cfg.alpha), lora_cfg.use_dora
        ):
            raise LoraError(
                f"{key}: the adapter was injected with rank {config.r}, alpha {config.lora_alpha}, "
                f"DoRA {config.use_dora}, but the config now says rank {lora_cfg.rank}, alpha {lora_cfg.alpha}, "
                f"DoRA {lora_cfg.use_dora}; save with the config the run was started with."
            )


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata=dict(metadata))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def read_lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})

