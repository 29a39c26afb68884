"""The one typed configuration schema, shared by the CLI, the presets and the GUI form.

Layering: defaults, then a preset (sparse), then the user's file, then ``--set`` overrides.
Every field carries a one-line description that the GUI shows as help text.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_gui.engine.families.registry import family_names

FAMILIES = family_names()
# Keys users' files and scripts depend on: renaming one needs a migration.
PUBLIC_KEYS = (
    "model.family", "model.base", "dataset.dir", "dataset.resolution", "lora.rank", "lora.alpha",
    "train.max_steps", "train.batch_size", "train.learning_rate", "train.seed", "output.dir", "output.name",
    "output.save_every", "sample.every", "sample.prompts",
)
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A config problem a person can fix; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info) -> Any:
        """pydantic reads true as 1; a number field given true/false is a mistake worth naming."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in _NUMBER_TYPES:
            raise ValueError(f"expected a number, not {str(value).lower()}")
        return value


_NUMBER_TYPES = (int, float, int | None, float | None)
MAX_ECHOED_CHARS = 120


class ModelSection(Section):
    family: Literal[("auto", *FAMILIES)] = Field(  # type: ignore[valid-type]
        "sd15", description=f"Model family: {', '.join(FAMILIES)} (the README lists the models of each); auto: "
                            "told from the base (a folder's model_index.json, a single file's tensor names)."
    )
    base: str = Field(
        "builtin:tiny-sd15",
        description="Base model: a Hugging Face id, a local diffusers folder, a single-file .safetensors, or builtin:tiny-*.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    components: str | None = Field(
        None,
        description="For a single-file checkpoint: hub id or local folder providing the VAE, text encoders and configs.",
    )
    text_encoder_files: list[str] = Field(
        default_factory=list, max_length=2,
        description="Text encoders as single .safetensors files (ComfyUI's models/text_encoders), one per text encoder "
                    "in order (Flux.1: CLIP-L, then T5); their configs come from the base or model.components.",
    )
    vae_file: str | None = Field(
        None, description="The VAE as a single .safetensors file (ComfyUI's models/vae, or diffusers' layout); its "
                          "config comes from the base or model.components.",
    )
    weight_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Precision of the frozen base weights (auto: bf16 on GPUs that support it, else fp32)."
    )
    quantize: Literal["none", "int8", "int4", "fp8", "nf4"] = Field(
        "none", description="Quantize the frozen denoiser to save memory: int8/int4/fp8 (optimum-quanto) or nf4 (bitsandbytes, best on CUDA)."
    )
    quantize_text_encoders: Literal["none", "int8", "nf4"] = Field(
        "none", description="Quantize the frozen text encoders, which only encode the captions once (and the "
                            "validation prompts): int8 (optimum-quanto) or nf4 (bitsandbytes); saves memory on small "
                            "cards, the embeddings change slightly. Not with lora.train_text_encoder."
    )
    block_swap: int = Field(
        0, ge=0, le=200, description="Block swap: the frozen weights of the denoiser's last N transformer blocks stay "
                                     "in system memory and visit the GPU one block at a time (slower; for models "
                                     "larger than the card). Needs gradient checkpointing; not with quantize.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train: auto picks CUDA, then Apple MPS, then CPU."
    )
    cache_dir: str | None = Field(None, description="Where downloaded and built-in models are stored.")
    merge_loras: list[str] = Field(
        default_factory=list, max_length=16,
        description="LoRA .safetensors files fused into the base before training, each 'path' or 'path:scale' "
                    "(a distilled model's training adapter, or a style to train on top of).",
    )

    @field_validator("text_encoder_files")
    @classmethod
    def _text_encoder_files(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            _require_safetensors(entry)
        return entries

    @field_validator("vae_file")
    @classmethod
    def _vae_file(cls, entry: str | None) -> str | None:
        if entry is not None and not entry.strip():
            return None
        if entry is not None:
            _require_safetensors(entry)
        return entry

    @field_validator("merge_loras")
    @classmethod
    def _merge_entries(cls, entries: list[str]) -> list[str]:
        from lora_gui.engine.merge import parse_merge_entry

        for entry in entries:
            path = parse_merge_entry(entry).path
            if not path.lower().endswith(".safetensors"):
                raise ValueError(f"{_echo(entry)} is not a .safetensors file (write 'path' or 'path:scale')")
        return entries


class DatasetSection(Section):
    dir: str = Field("", description="Folder of images with same-name .txt captions (or images/ + captions/).")
    resolution: int = Field(512, ge=64, le=4096, description="Training resolution; buckets keep about this many pixels.")
    bucketing: bool = Field(True, description="Group images into aspect-ratio buckets instead of square crops.")
    bucket_step: int = Field(64, ge=8, le=256, description="Bucket sides are multiples of this many pixels.")
    repeats: int = Field(1, ge=1, le=1000, description="How often each image is seen per epoch (a folder named '5_name' repeats 5x).")
    caption_extension: str = Field(".txt", description="File extension of caption files.")
    trigger_word: str = Field("", description="Word that activates the LoRA; stored in the file's metadata.")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of training a sample with an empty caption.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags each time a caption is used.")
    keep_tokens: int = Field(1, ge=0, le=100, description="Leading tags kept in place when shuffling (e.g. the trigger).")
    cache_latents: bool = Field(True, description="Encode images once and keep the latents on disk.")
    cache_text: bool = Field(True, description="Encode captions once and keep the embeddings on disk.")
    cache_dir: str | None = Field(None, description="Where latent and text caches live (default: <output.dir>/cache).")
    num_workers: int = Field(0, ge=0, le=32, description="Background threads loading the next training batches while a step runs (0: each batch is loaded when it is needed).")


class LoraSection(Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (dimension): capacity of the adapter.")
    alpha: float = Field(16.0, gt=0.0, le=4096.0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, le=0.9, description="Dropout on the LoRA path during training.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): often better quality, slower.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="How LoRA weights start: default (B=0), gaussian, pissa or olora."
    )
    targets: str = Field(
        "auto",
        description="Layers to adapt: auto (the family's default), SD: attn, attn_ff, all_linear; Flux: mmdit, all, all+ffs, context, tiny, nano.",
    )
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder(s) (SD1.5 and SDXL).")
    text_encoder_lr: float | None = Field(
        None, gt=0.0, le=1.0, description="Learning rate for the text-encoder LoRA (empty: same as the denoiser)."
    )


class TrainSection(Section):
    max_steps: int = Field(1000, ge=1, le=10_000_000, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, le=256, description="Images per step (per accumulation micro-batch).")
    gradient_accumulation: int = Field(1, ge=1, le=256, description="Micro-batches summed before each optimizer step.")
    learning_rate: float = Field(1e-4, gt=0.0, le=10.0, description="Peak learning rate (Prodigy: use 1.0).")
    optimizer: Literal["adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "prodigy"] = Field(
        "adamw", description="Optimizer; the 8-bit ones save memory."
    )
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="Decoupled weight decay.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule over the run.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Steps of linear warm-up at the start.")
    lr_cycles: int = Field(1, ge=1, le=100, description="Restarts for cosine_with_restarts.")
    lr_power: float = Field(1.0, gt=0.0, le=10.0, description="Power of the polynomial schedule.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1000.0, description="Clip gradients to this norm (0 disables).")
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Autocast precision (auto: bf16 on supporting GPUs, else fp32)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (about 30% slower).")
    compile_blocks: bool = Field(
        False, description="torch.compile the denoiser's repeated blocks (regional compilation): faster steps once "
                           "the first steps have compiled them (a minute or more). Needs a C++ compiler on a CPU.")
    offload_activations: bool = Field(
        False, description="Activation offloading: what the backward pass needs from the forward pass waits in system "
                           "memory instead of GPU memory (slower: every step copies it out and back). Instead of "
                           "gradient checkpointing, not with it.")
    shard_model: bool = Field(
        False, description="Several GPUs: shard the denoiser's weights, its LoRA and the optimizer state over them "
                           "with FSDP2, so each GPU holds 1/N of them (for a model that does not fit one GPU; "
                           "slower than plain data parallel). Ignored in a run of one process.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data order, noise and LoRA initialisation.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="SD1.5/SDXL target; auto reads it from the model's scheduler."
    )
    min_snr_gamma: float = Field(0.0, ge=0.0, le=100.0, description="Min-SNR loss weighting gamma (0 disables; 5 is common).")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="Noise offset for darker/brighter images (0.05 is common).")
    timestep_sampling: Literal["uniform", "logit_normal", "shift", "resolution_shift"] = Field(
        "shift", description="Flow-matching families (Flux, Z-Image, Flux.2, Qwen-Image): how training timesteps are "
                             "drawn (resolution_shift: shifted as the family's pipeline shifts them for each batch's "
                             "image size; shift: by the fixed flow_shift; uniform: as diffusers' recipes draw them)."
    )
    logit_mean: float = Field(0.0, ge=-5.0, le=5.0, description="Flow matching: mean of the logit-normal timestep density.")
    logit_std: float = Field(1.0, gt=0.0, le=5.0, description="Flow matching: standard deviation of the logit-normal density.")
    flow_shift: float = Field(3.0, gt=0.0, le=100.0, description="Flow matching: shift applied with timestep_sampling=shift.")
    guidance: float = Field(1.0, ge=0.0, le=100.0, description="Flux.1 dev and Flux.2 dev: guidance value fed to the model's guidance embedding while training.")


    @model_validator(mode="after")
    def _offloading_or_checkpointing(self) -> TrainSection:
        if self.offload_activations and self.gradient_checkpointing:
            raise ValueError("offload_activations and gradient_checkpointing both save activation memory, and do "
                             "not combine (checkpointed blocks keep their inputs on the GPU): turn one of them off")
        return self

class OutputSection(Section):
    dir: str = Field("outputs/my-lora", description="Folder for the LoRA, checkpoints, samples and metrics.")
    name: str = Field("my-lora", min_length=1, max_length=200, description="File name of the final LoRA (no extension).")
    save_every: int = Field(500, ge=0, le=10_000_000, description="Save a resumable checkpoint every N steps (0: only at the end).")
    keep_last: int = Field(3, ge=1, le=1000, description="How many checkpoints to keep.")
    tensorboard: bool = Field(False, description="Also write TensorBoard logs.")

    @field_validator("name")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if any(ch in value for ch in '/\\:*?"<>|') or value.startswith("."):
            raise ValueError("must be a plain file name without / \\ : * ? \" < > | or a leading dot")
        return value


class SampleSection(Section):
    every: int = Field(250, ge=0, le=10_000_000, description="Render validation images every N steps (0: only at the end).")
    prompts: list[str] = Field(default_factory=lambda: ["a photo"], description="Validation prompts, one per line.")
    negative_prompt: str = Field("", description="Negative prompt for validation images (SD1.5, SDXL; Qwen-Image, whose true CFG uses one when guidance > 1).")
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="Seed for validation images (the same for every step).")
    steps: int = Field(20, ge=1, le=200, description="Denoising steps per validation image.")
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0, description="Guidance scale for validation images.")
    width: int = Field(0, ge=0, le=4096, description="Validation image width (0: training resolution).")
    height: int = Field(0, ge=0, le=4096, description="Validation image height (0: training resolution).")


class TrainingConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection, description="Base model.")
    dataset: DatasetSection = Field(default_factory=DatasetSection, description="Training images and captions.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The adapter being trained.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")
    sample: SampleSection = Field(default_factory=SampleSection, description="Validation images.")

    def identity_hash(self) -> str:
        """Hash of the settings that make a LoRA incompatible with another (family, base, rank, targets)."""
        key = {
            "family": self.model.family,
            "base": self.model.base,
            "rank": self.lora.rank,
            "alpha": self.lora.alpha,
            "targets": self.lora.targets,
            "use_dora": self.lora.use_dora,
            "train_text_encoder": self.lora.train_text_encoder,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def full_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- layering


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``section.key=value`` to a nested dict; the value is read as TOML/JSON when it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, for example --set lora.rank=32")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {text!r}: the key needs a section, for example lora.rank or train.max_steps")
    value = _parse_scalar(raw.strip())
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def _parse_scalar(raw: str) -> Any:
    if raw == "":
        return ""
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        return _toml_loads(f"v = {raw}")["v"]
    except Exception:
        return raw


def _toml_loads(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def _yaml_loads(text: str) -> Any:
    """YAML without aliases: a config never needs them, and nested aliases expand exponentially."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise ConfigError("YAML aliases (*name) are not allowed in config files; write the values out.")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Create one with `lora-gui init-config {path}`.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (it is not UTF-8); choose a .toml, .yaml or .json config.") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = _toml_loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _yaml_loads(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # syntax errors from any of the three parsers
        raise ConfigError(f"{path} is not valid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections such as [model] and [train]")
    return data


def preset_path(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(_preset_files()) or "none"
        raise ConfigError(f"Unknown preset {name!r}. Known presets: {known}")
    return path


def list_presets() -> list[str]:
    """The presets that can be applied (not those of tiers a family cannot fit: ``unavailable_presets``)."""
    unavailable = unavailable_presets()
    return [name for name in _preset_files() if name not in unavailable]


def unavailable_presets() -> dict[str, str]:
    """Family tiers that cannot train on their card, each with the reason (``unavailable`` in its file)."""
    reasons = {name: read_config_file(PRESETS_DIR / f"{name}.toml").get("preset", {}).get("unavailable")
               for name in _preset_files()}
    return {name: reason for name, reason in reasons.items() if reason}


def _preset_files() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str) -> dict:
    data = read_config_file(preset_path(name))
    reason = data.pop("preset", {}).get("unavailable")  # the table describes the preset; it is not config
    if reason:
        raise ConfigError(f"Preset {name} does not fit its card: {reason}")
    return data


def preset_description(name: str) -> dict:
    return read_config_file(preset_path(name)).get("preset", {})


def build_config(
    file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    data: dict | None = None,
) -> TrainingConfig:
    layered: dict = {}
    if preset:
        layered = deep_merge(layered, load_preset(preset))
    if file:
        layered = deep_merge(layered, read_config_file(file))
    if data:
        layered = deep_merge(layered, data)
    for override in overrides or []:
        layered = deep_merge(layered, parse_override(override))
    return validate_config(layered)


def validate_config(data: dict) -> TrainingConfig:
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    lines = ["The configuration has problems:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        lines.append(f"  - {key}: {_describe_error(error, key)}")
    return "\n".join(lines)


def _describe_error(error: dict, key: str) -> str:
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown key{_suggestion(key)}"
    bounds = field_bounds(key)
    allowed = f" (allowed: {bounds})" if bounds else ""
    if kind == "literal_error":
        return f"{_echo(got)} is not one of the allowed values{allowed}"
    return f"{error['msg'].rstrip('.')}; got {_echo(got)}{allowed}"


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_ECHOED_CHARS else f"{text[:MAX_ECHOED_CHARS]}... ({len(text)} characters)"


def _suggestion(key: str) -> str:
    parts = key.split(".")
    if len(parts) == 1:
        options = list(TrainingConfig.model_fields)
    else:
        section = TrainingConfig.model_fields.get(parts[0])
        options = list(section.annotation.model_fields) if section else []
    close = difflib.get_close_matches(parts[-1], options, n=1)
    hint = f"; did you mean {'.'.join(parts[:-1] + close)!r}?" if close else ""
    valid = f" Valid keys here: {', '.join(options)}." if options else ""
    return hint + valid


def field_bounds(key: str) -> str:
    """A readable statement of what a field accepts, such as '1 to 1024' or 'adamw, lion'."""
    info = field_info(key)
    if info is None:
        return ""
    lower = upper = None
    for meta in info.metadata:
        lower = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else lower
        lower = getattr(meta, "gt", None) if getattr(meta, "gt", None) is not None else lower
        upper = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else upper
    choices = getattr(info.annotation, "__args__", None)
    if choices and all(isinstance(c, str) for c in choices):
        return ", ".join(choices)
    if lower is not None and upper is not None:
        strict = any(getattr(m, "gt", None) is not None for m in info.metadata)
        return f"{'more than ' if strict else ''}{lower} to {upper}"
    return ""


def field_info(key: str):
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in TrainingConfig.model_fields:
        return None
    section_cls = TrainingConfig.model_fields[parts[0]].annotation
    return section_cls.model_fields.get(parts[1])


# ----------------------------------------------------------------------------- saving


def config_to_dict(config: TrainingConfig, sparse: bool = False) -> dict:
    data = config.model_dump(mode="json")
    if sparse:
        defaults = TrainingConfig().model_dump(mode="json")
        data = {
            section: {k: v for k, v in values.items() if defaults[section].get(k) != v}
            for section, values in data.items()
        }
        data = {section: values for section, values in data.items() if values}
    return _drop_none(data)


def _drop_none(data: dict) -> dict:
    return {
        k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in data.items() if v is not None
    }


def dump_config(config: TrainingConfig, fmt: str = "toml", sparse: bool = False) -> str:
    data = config_to_dict(config, sparse=sparse)
    if fmt == "toml":
        import tomli_w

        return tomli_w.dumps(data)
    if fmt in ("yaml", "yml"):
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    if fmt == "json":
        return json.dumps(data, indent=2)
    raise ConfigError(f"Unknown config format {fmt!r}; use toml, yaml or json")


def save_config(config: TrainingConfig, path: str | Path, sparse: bool = False) -> Path:
    path = Path(path)
    text = dump_config(config, fmt=path.suffix.lower().lstrip(".") or "toml", sparse=sparse)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _require_safetensors(path: str) -> None:
    if not path.strip().lower().endswith((".safetensors", ".sft")):
        raise ValueError(f"{_echo(path)} is not a .safetensors file")
