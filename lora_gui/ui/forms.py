"""The config form, generated from the pydantic schema: field specs, components, and value conversion.

Everything except ``build_form`` is gradio-free, so the conversions are unit-testable.
Form values are keyed "section.key"; ``values_to_data`` turns them into the nested dict that
``validate_config`` checks, ``config_to_values`` goes the other way.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from lora_gui.config import ConfigError, TrainingConfig, field_bounds
from lora_gui.ui.checked import CheckedDropdown
from lora_gui.ui.workspace import OutsideWorkspace, Workspace

SECTION_TITLES = {"model": "Model", "dataset": "Dataset", "lora": "LoRA", "train": "Training",
                  "output": "Output", "sample": "Validation images"}
# Folded under "Advanced" in each section: rarely changed, or only for experts.
ADVANCED = {
    "model.revision", "model.components", "model.text_encoder_files", "model.vae_file", "model.weight_dtype", "model.device", "model.cache_dir",
    "dataset.bucket_step", "dataset.caption_extension", "dataset.keep_tokens", "dataset.cache_latents",
    "dataset.cache_text", "dataset.cache_dir", "dataset.num_workers",
    "lora.dropout", "lora.init", "lora.text_encoder_lr",
    "train.weight_decay", "train.offload_activations", "train.compile_blocks", "train.shard_model", "train.lr_cycles", "train.lr_power", "train.max_grad_norm", "train.mixed_precision",
    "train.prediction_type", "train.min_snr_gamma", "train.noise_offset", "train.timestep_sampling",
    "train.logit_mean", "train.logit_std", "train.flow_shift", "train.guidance",
    "output.keep_last", "output.tensorboard",
    "sample.negative_prompt", "sample.seed", "sample.width", "sample.height",
}
LABELS = {
    "model.base": "Base model", "model.text_encoder_files": "Text encoder files (one per line)",
    "model.vae_file": "VAE file", "model.weight_dtype": "Weight precision", "model.cache_dir": "Model cache folder",
    "dataset.dir": "Dataset folder", "dataset.cache_dir": "Cache folder", "lora.use_dora": "Use DoRA",
    "lora.init": "LoRA initialisation", "lora.targets": "Target layers", "lora.text_encoder_lr": "Text encoder LR",
    "train.learning_rate": "Learning rate", "train.lr_scheduler": "LR scheduler", "train.lr_cycles": "LR cycles",
    "train.lr_power": "LR power", "train.min_snr_gamma": "Min-SNR gamma", "output.dir": "Output folder",
    "output.save_every": "Save every N steps", "sample.every": "Sample every N steps",
    "sample.prompts": "Prompts (one per line)",
}
SLIDER_STEPS = {"dataset.caption_dropout": 0.01, "lora.dropout": 0.01, "sample.steps": 1,
                "sample.guidance_scale": 0.1}
FLOAT_STEPS = {"train.learning_rate": 1e-6, "lora.text_encoder_lr": 1e-6}
# Free-choice dropdowns: the choices depend on the family and the workspace (see base_choices).
CUSTOM_DROPDOWNS = {"model.base", "lora.targets"}
# Shown workspace-relative in the form, absolute in the config.
PATH_KEYS = ("dataset.dir", "output.dir", "dataset.cache_dir", "model.cache_dir", "model.vae_file")
MODEL_PATH_KEYS = ("model.base", "model.components")
MODEL_SUFFIXES = (".safetensors",)
MAX_LOCAL_MODELS = 200


@dataclass(frozen=True)
class FieldSpec:
    key: str
    kind: str  # dropdown, checkbox, number, slider, lines, text
    label: str
    info: str
    default: Any
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    optional: bool = False

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    @property
    def advanced(self) -> bool:
        return self.key in ADVANCED


@lru_cache(maxsize=1)
def field_specs() -> tuple[FieldSpec, ...]:
    specs = []
    for section, section_field in TrainingConfig.model_fields.items():
        for name, info in section_field.annotation.model_fields.items():
            specs.append(_spec(f"{section}.{name}", info))
    return tuple(specs)


def specs_by_key() -> dict[str, FieldSpec]:
    return {spec.key: spec for spec in field_specs()}


def _spec(key: str, info) -> FieldSpec:
    annotation, optional = _unwrap_optional(info.annotation)
    default = info.get_default(call_default_factory=True)
    label = LABELS.get(key, key.split(".")[1].replace("_", " ").capitalize())
    common = dict(key=key, label=label, info=info.description or "", default=default, optional=optional)
    if typing.get_origin(annotation) is Literal:
        return FieldSpec(kind="dropdown", choices=tuple(typing.get_args(annotation)), **common)
    if annotation is bool:
        return FieldSpec(kind="checkbox", **common)
    if annotation in (int, float):
        lower, upper = _bounds(info)
        kind = "slider" if key in SLIDER_STEPS else "number"
        return FieldSpec(kind=kind, minimum=lower, maximum=upper, integer=annotation is int, **common)
    if typing.get_origin(annotation) is list:
        return FieldSpec(kind="lines", **common)
    return FieldSpec(kind="dropdown" if key in CUSTOM_DROPDOWNS else "text", **common)


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if type(None) in args and typing.get_origin(annotation) is not Literal:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _bounds(info) -> tuple[float | None, float | None]:
    lower = upper = None
    for meta in info.metadata:
        for name in ("ge", "gt"):
            lower = getattr(meta, name, None) if getattr(meta, name, None) is not None else lower
        upper = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else upper
    return lower, upper


# ----------------------------------------------------------------------------- values <-> config


def to_form_value(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "lines":
        return "\n".join(value or [])
    if value is None and spec.kind in ("text", "dropdown"):
        return ""
    return value


def from_form_value(spec: FieldSpec, value: Any) -> Any:
    """One form value as the schema expects it; pydantic then checks types and bounds."""
    if spec.kind == "lines":
        if isinstance(value, str):
            return [line.strip() for line in value.splitlines() if line.strip()]
        return value if value is not None else []
    if isinstance(value, str) and spec.kind in ("text", "dropdown"):
        return None if spec.optional and not value.strip() else value.strip()
    if value is None and spec.kind in ("number", "slider") and not spec.optional:
        bounds = field_bounds(spec.key)
        raise ConfigError(f"{spec.key}: is empty; enter a number{f' ({bounds})' if bounds else ''}.")
    if isinstance(value, str) and spec.kind in ("number", "slider"):
        return value.strip() or None
    return value


def config_to_values(data: dict) -> dict[str, Any]:
    """A nested config dict (``model_dump``) to form values keyed "section.key"."""
    return {spec.key: to_form_value(spec, data[spec.section][spec.key.split(".")[1]]) for spec in field_specs()}


def values_to_data(values: dict[str, Any]) -> dict:
    """Form values keyed "section.key" to a nested dict; keys not given keep their defaults."""
    data: dict[str, dict] = {section: {} for section in TrainingConfig.model_fields}
    specs = specs_by_key()
    for key, value in values.items():
        if key not in specs:
            raise ConfigError(f"{key}: not a config key.")
        section, name = key.split(".")
        data[section][name] = from_form_value(specs[key], value)
    return data


# ----------------------------------------------------------------------------- paths


def absolute_paths(data: dict, workspace: Workspace) -> dict:
    """Workspace-relative form paths to absolute ones, refusing anything outside the workspace."""
    data = {section: dict(values) for section, values in data.items()}
    output = data["output"]
    if not str(output.get("dir") or "").strip():
        output["dir"] = f"outputs/{output.get('name') or 'my-lora'}"
    if not data["model"].get("cache_dir"):
        data["model"]["cache_dir"] = str(workspace.cache)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = data[section].get(name)
        if isinstance(value, str) and value.strip():
            data[section][name] = str(confined_path(key, value, workspace))
    outputs = workspace.outputs.resolve()
    if not Path(output["dir"]).is_relative_to(outputs):
        raise ConfigError(f"output.dir: {output['dir']} is not inside {outputs}. Use a folder such as "
                          "outputs/my-lora, so the app can show its samples and checkpoints.")
    for key in MODEL_PATH_KEYS:
        section, name = key.split(".")
        value = data[section].get(name)
        if isinstance(value, str) and is_local_model(value, workspace):
            data[section][name] = str(confined_path(key, value, workspace))
    data["model"]["merge_loras"] = [_confined_entry(entry, workspace) for entry in data["model"].get("merge_loras") or []]
    data["model"]["text_encoder_files"] = [
        str(confined_path("model.text_encoder_files", entry, workspace)) if isinstance(entry, str) else entry
        for entry in data["model"].get("text_encoder_files") or []]
    return data


def _confined_entry(entry: Any, workspace: Workspace) -> Any:
    """A model.merge_loras entry with its path made absolute inside the workspace (the scale kept)."""
    from lora_gui.engine.merge import parse_merge_entry

    if not isinstance(entry, str):
        return entry  # the schema refuses it with its own message
    parsed = parse_merge_entry(entry)
    path = confined_path("model.merge_loras", parsed.path, workspace)
    return str(path) if parsed.scale == 1.0 and parsed.path == entry.strip() else f"{path}:{parsed.scale:g}"


def relative_paths(values: dict[str, Any], workspace: Workspace) -> dict[str, Any]:
    """Form values with absolute paths inside the workspace shown relative to it."""
    shown = dict(values)
    for key in PATH_KEYS + MODEL_PATH_KEYS:
        value = shown.get(key)
        if isinstance(value, str) and value and Path(value).is_absolute():
            shown[key] = workspace.relative(Path(value))
    if shown.get("model.cache_dir") == workspace.relative(workspace.cache):
        shown["model.cache_dir"] = ""
    files = shown.get("model.text_encoder_files")
    if isinstance(files, str):
        shown["model.text_encoder_files"] = "\n".join(
            workspace.relative(Path(line)) if Path(line).is_absolute() else line for line in files.splitlines())
    merged = shown.get("model.merge_loras")
    if isinstance(merged, str):  # a lines field: one entry per line
        shown["model.merge_loras"] = "\n".join(_relative_entry(entry, workspace) for entry in merged.splitlines())
    return shown


def _relative_entry(entry: Any, workspace: Workspace) -> Any:
    from lora_gui.engine.merge import parse_merge_entry

    if not isinstance(entry, str):
        return entry
    parsed = parse_merge_entry(entry)
    if not Path(parsed.path).is_absolute():
        return entry
    path = workspace.relative(Path(parsed.path))
    return path if parsed.path == entry.strip() else f"{path}:{parsed.scale:g}"


def confined_path(key: str, value: str, workspace: Workspace) -> Path:
    """A form path made absolute; ConfigError (naming ``key``) when it leads out of the workspace (the dataset
    folder may also be in an extra dataset folder)."""
    try:
        return workspace.resolve_dataset(value) if key == "dataset.dir" else workspace.resolve(value)
    except (OutsideWorkspace, OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def is_local_model(text: str, workspace: Workspace) -> bool:
    """A path rather than a hub id or builtin: absolute, ./ ~ prefixed, a .safetensors file, or existing."""
    text = text.strip()
    if not text or text.startswith("builtin:"):
        return False
    if text.startswith((".", "~", "/", "\\")) or Path(text).is_absolute() or text.endswith(MODEL_SUFFIXES):
        return True
    try:
        return (workspace.root / text).exists()
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- model picker


def base_choices(family: str, workspace: Workspace) -> list[str]:
    return builtin_models(family) + list(hub_models(family)) + local_models(workspace)


def default_base(family: str, has_gpu: bool) -> str:
    """The family's first Hub model on a GPU, its built-in tiny model without one."""
    offered = hub_models(family) if has_gpu else ()
    return offered[0] if offered else builtin_models(family)[0]


def builtin_models(family: str) -> list[str]:
    from lora_gui.engine.families.builtin import BUILTIN_MODELS, BUILTIN_PREFIX

    return [BUILTIN_PREFIX + name for name, fam in BUILTIN_MODELS.items() if fam == family]


def hub_models(family: str) -> tuple[str, ...]:
    from lora_gui.engine.families.registry import family_class

    return family_class(family).hub_models


def family_labels() -> str:
    """Every family's label, joined for the page's intro ("A, B and C")."""
    from lora_gui.engine.families.registry import family_class, family_names

    labels = [family_class(name).label for name in family_names()]
    return ", ".join(labels[:-1]) + f" and {labels[-1]}" if len(labels) > 1 else labels[0]


def local_models(workspace: Workspace) -> list[str]:
    """Single-file checkpoints and diffusers folders under <workspace>/models, workspace-relative."""
    root = workspace.root / "models"
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.safetensors") if len(p.relative_to(root).parts) <= 3]
    found += [p.parent for p in root.rglob("model_index.json") if len(p.relative_to(root).parts) <= 3]
    return sorted(workspace.relative(p) for p in found[:MAX_LOCAL_MODELS])


@lru_cache(maxsize=8)
def target_choices(family: str) -> tuple[str, ...]:
    """"auto" plus the family's LoRA target presets (imports the family module: torch, diffusers)."""
    from lora_gui.engine.families.registry import family_class

    return ("auto", *family_class(family).lora_target_presets)


# ----------------------------------------------------------------------------- components


def build_form(values: dict[str, Any], base_options: list[str], target_options: list[str]) -> dict:
    """Accordions of components, one per section, advanced fields folded; returns {key: component}."""
    import gradio as gr

    components = {}
    for section, title in SECTION_TITLES.items():
        specs = [s for s in field_specs() if s.section == section]
        with gr.Accordion(title, open=True):
            _rows([s for s in specs if not s.advanced], components, values, base_options, target_options)
            advanced = [s for s in specs if s.advanced]
            if advanced:
                with gr.Accordion(f"Advanced {title.lower()} settings", open=False):
                    _rows(advanced, components, values, base_options, target_options)
    return components


FIELDS_PER_ROW = 3


def _rows(specs: list[FieldSpec], components: dict, values: dict, base_options, target_options) -> None:
    """Fields side by side, a few per row; multi-line fields get a row of their own."""
    import gradio as gr

    row: list[FieldSpec] = []
    groups: list[list[FieldSpec]] = []
    for spec in specs:
        if spec.kind == "lines":
            groups += [row, [spec]] if row else [[spec]]
            row = []
            continue
        row.append(spec)
        if len(row) == FIELDS_PER_ROW:
            groups.append(row)
            row = []
    if row:
        groups.append(row)
    for group in groups:
        with gr.Row(equal_height=True):
            for spec in group:
                components[spec.key] = make_component(spec, values[spec.key], base_options, target_options)


def make_component(spec: FieldSpec, value: Any, base_options: list[str], target_options: list[str]):
    import gradio as gr

    from lora_gui.ui.checked import CheckedNumber, CheckedSlider

    common = dict(label=spec.label, info=spec.info, value=value)
    if spec.key in CUSTOM_DROPDOWNS:
        options = base_options if spec.key == "model.base" else target_options
        return CheckedDropdown(choices=with_value(options, value), allow_custom_value=True, **common)
    if spec.kind == "dropdown":
        return CheckedDropdown(choices=list(spec.choices), **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "slider":
        return CheckedSlider(minimum=spec.minimum, maximum=spec.maximum, step=SLIDER_STEPS[spec.key], **common)
    if spec.kind == "number":
        step = 1 if spec.integer else FLOAT_STEPS.get(spec.key, 0.001)
        return CheckedNumber(minimum=spec.minimum, maximum=spec.maximum, precision=0 if spec.integer else None,
                         step=step, **common)
    if spec.kind == "lines":
        return gr.Textbox(lines=3, max_lines=12, **common)
    return gr.Textbox(**common)


def with_value(options: list[str], value: Any) -> list[str]:
    return list(options) + ([value] if isinstance(value, str) and value and value not in options else [])
