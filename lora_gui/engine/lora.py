"""LoRA adapters: inject into the denoiser and text encoders, train, checkpoint and resume.

Writing the adapter files is in ``lora_gui.engine.lora_files``; checking that a loader applies a
written file is in ``lora_gui.engine.lora_verify``.

PiSSA and OLoRA start from the largest directions of the base weights and subtract them from
the base (``W_res = W - scale * B0 @ A0``). ``inject_lora`` keeps ``A0`` and ``B0`` on the module
(``INITIAL_FACTORS_ATTR``) so the saved files can be converted back to an ordinary LoRA on the
untouched base. Inside this process the base stays ``W_res``, so switching the adapter off shows
``W_res``, not the original model. Resuming re-injects (recomputing the same ``A0``, ``B0`` and
``W_res`` from the base, deterministically) and then loads the trained factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lora_gui.config import LoraSection

PEFT_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
BASE_MUTATING_INITS = ("pissa", "olora")
LORA_PARAM_MARKERS = ("lora_A", "lora_B", "lora_magnitude_vector")
# Where inject_lora keeps PiSSA/OLoRA's starting factors on the module (not a buffer: never saved).
INITIAL_FACTORS_ATTR = "_lora_gui_initial_factors"


class LoraError(ValueError):
    """A LoRA problem a person can fix; the message says how."""


# ----------------------------------------------------------------------------- inject


def lora_config(lora: LoraSection, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_dora=lora.use_dora,
        init_lora_weights=PEFT_INITS[lora.init],
        target_modules=list(target_modules),
    )


def inject_lora(
    modules: Mapping[str, torch.nn.Module],
    targets: Mapping[str, list[str]],
    lora: LoraSection,
    adapter_name: str = "default",
) -> None:
    """Add a LoRA adapter to every module; afterwards only the LoRA weights train (in fp32)."""
    for key, module in modules.items():
        if key not in targets:
            raise LoraError(f"No LoRA target layers given for {key!r}; pass targets for every module.")
        module.requires_grad_(False)
        _add_adapter(key, module, lora_config(lora, targets[key]), adapter_name)
        _train_only_adapter(module, adapter_name)
        _keep_lora_in_fp32(module)
        if lora.init in BASE_MUTATING_INITS:
            initial = getattr(module, INITIAL_FACTORS_ATTR, {})
            setattr(module, INITIAL_FACTORS_ATTR, {**initial, adapter_name: adapter_state(module, adapter_name)})


def _add_adapter(key: str, module: torch.nn.Module, config, adapter_name: str) -> None:
    init = config.init_lora_weights
    try:
        add_peft_adapter(module, config, adapter_name)
    except (TypeError, ValueError) as exc:
        if isinstance(init, str) and init in BASE_MUTATING_INITS:
            raise LoraError(
                f"lora.init={init!r} could not start the LoRA on {key}: {exc}. PiSSA and OLoRA work only on "
                "plain (not quantized) Linear layers: set lora.init to default or gaussian, or choose targets "
                "without convolutions, or set model.quantize to none."
            ) from exc
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise LoraError(
                f"lora.targets: none of the layers {sorted(config.target_modules)} exist in {key}; "
                "choose another target preset."
            ) from exc
        raise


def add_peft_adapter(module: torch.nn.Module, config, adapter_name: str) -> None:
    """Inject a fresh adapter with peft itself and make it the active one.

    Not through ``add_adapter`` of diffusers/transformers models: transformers refuses it unless peft is
    newer than its own minimum (transformers 5.24 wants peft 0.22, which no index has), while peft's
    injection works with every version. The module ends up as those libraries leave it: the config in
    ``module.peft_config`` and ``_hf_peft_config_loaded`` set, so their pipelines' adapter calls see it.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if adapter_name in (getattr(module, "peft_config", None) or {}):
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    config.base_model_name_or_path = None
    inject_adapter_in_model(config, module, adapter_name=adapter_name)
    module._hf_peft_config_loaded = True
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter(adapter_name)


def _is_lora_param(name: str, adapter_name: str) -> bool:
    return any(f"{marker}.{adapter_name}" in name for marker in LORA_PARAM_MARKERS)


def _train_only_adapter(module: torch.nn.Module, adapter_name: str) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_(_is_lora_param(name, adapter_name))


def _keep_lora_in_fp32(module: torch.nn.Module) -> None:
    import torch

    if any(p.requires_grad and p.dtype != torch.float32 for p in module.parameters()):
        from diffusers.training_utils import cast_training_params

        cast_training_params(module, dtype=torch.float32)


def lora_parameters(modules: Mapping[str, torch.nn.Module]) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable LoRA parameters of each module, for one optimizer param group per module."""
    return {key: [p for p in module.parameters() if p.requires_grad] for key, module in modules.items()}


# ----------------------------------------------------------------------------- resume


def adapter_state(module: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """One module's adapter weights under peft's keys (without the adapter name), as CPU copies."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=adapter_name)
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def lora_state_dicts(
    modules: Mapping[str, torch.nn.Module], adapter_name: str = "default"
) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter weights of every module (CPU copies), for checkpoints."""
    return {key: adapter_state(module, adapter_name) for key, module in modules.items()}


def load_lora_state(
    modules: Mapping[str, torch.nn.Module],
    state: Mapping[str, Mapping[str, torch.Tensor]],
    adapter_name: str = "default",
) -> None:
    """Put checkpointed adapter weights back, exactly; any key or shape mismatch is an error."""
    from peft.utils import set_peft_model_state_dict

    if set(state) != set(modules):
        raise LoraError(
            f"The checkpoint has LoRA weights for {sorted(state)} but this run trains {sorted(modules)}. "
            "Resume with the same lora.train_text_encoder setting, or start a new run."
        )
    for key, module in modules.items():
        expected = adapter_state(module, adapter_name)
        _check_same_layout(key, expected, state[key])
        result = set_peft_model_state_dict(module, dict(state[key]), adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if _is_lora_param(k, adapter_name)]
        if unexpected:
            raise LoraError(f"{key}: checkpoint LoRA weights did not fit the model: {unexpected[:5]}")


def _check_same_layout(key: str, expected: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing or extra or reshaped:
        details = "; ".join(
            f"{label}: {names[:3]}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", extra), ("different shape", reshaped))
            if names
        )
        raise LoraError(
            f"The checkpoint's LoRA for {key} does not match this run ({details}). It was made with other "
            "lora.rank / lora.targets / lora.use_dora settings or another base model: resume with those, "
            "or start a new run."
        )
