"""Find and load a family's base model: built-in, local diffusers folder, single file or Hub id.

Every problem a person can fix becomes a ``ModelLoadError`` that says what happened and what
to do. Pickled checkpoints (.ckpt, .pt, .pth, .bin) are refused before they are opened.
Hub downloads (``hub.py``) report progress as ``Status`` events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.builtin import ensure_builtin, is_builtin
from lora_gui.events import Status

if TYPE_CHECKING:
    import torch

    from lora_gui.config import ModelSection
    from lora_gui.events import Emit

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# What a pipeline needs from a Hub repo: configs, tokenizers and safetensors weights in the
# component folders. Root-level files (often a second copy as one big checkpoint) are skipped.
WEIGHT_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.jinja", "*/*.safetensors"]
CONFIG_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.jinja"]
SKIPPED_PATTERNS = ["*.fp16*", "*.bf16*", "*non_ema*", "*.ema.*", "safety_checker/*"]


class ModelLoadError(ValueError):
    """The base model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder", "single_file" or "hub"
    location: str  # folder path, file path or Hub repo id


# ----------------------------------------------------------------------------- resolving


def resolve_source(base: str, cache_dir: str | None = None) -> ModelSource:
    """Decide what ``model.base`` names, without opening any weights."""
    base = base.strip()
    if not base:
        raise ModelLoadError("model.base is empty. Give a Hugging Face id, a diffusers folder, a .safetensors file "
                             "or a built-in model such as builtin:tiny-sd15.")
    if is_builtin(base):
        try:
            return ModelSource("folder", str(ensure_builtin(base, cache_dir)))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
    refuse_pickle(base)
    path = Path(base).expanduser()
    if path.is_dir():
        return ModelSource("folder", str(_check_diffusers_folder(path)))
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return ModelSource("single_file", str(path))
        raise ModelLoadError(f"{base} is not a model file lora-gui can read ({path.suffix or 'no extension'}). "
                             "Use a .safetensors checkpoint or a diffusers folder.")
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or _looks_like_path(base):
        raise ModelLoadError(f"model.base {base!r} does not exist. Check the path (and that the drive is mounted).")
    if HUB_ID.match(base):
        return ModelSource("hub", base)
    raise ModelLoadError(f"model.base {base!r} is not a built-in model, an existing file or folder, or a Hugging Face "
                         "id (owner/name, e.g. stabilityai/stable-diffusion-xl-base-1.0).")


def refuse_pickle(location: str) -> None:
    suffix = Path(location).suffix.lower()
    if suffix not in PICKLE_SUFFIXES:
        return
    target = Path(location).with_suffix(".safetensors").name
    raise ModelLoadError(
        f"{location}: {suffix} files are Python pickles, and opening one can run any code hidden inside it, so "
        "lora-gui does not load them. Convert it to .safetensors once, if you trust where it came from: in a Python "
        "shell run\n"
        "  import torch, safetensors.torch as st\n"
        f"  sd = torch.load({location!r}, map_location='cpu', weights_only=True)\n"
        "  sd = sd.get('state_dict', sd)\n"
        f"  st.save_file({{k: v.clone().contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, {target!r})\n"
        "(weights_only=True refuses to run code), or use the checkpoint converter of A1111/Forge or ComfyUI, or "
        "download the .safetensors version that most model pages offer. Then point model.base at the .safetensors file."
    )


def _check_diffusers_folder(path: Path) -> Path:
    if (path / "model_index.json").is_file():
        return path
    singles = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" It contains {', '.join(singles[:3])}: set model.base to one of those files instead." if singles else ""
    raise ModelLoadError(f"{path} is not a diffusers model folder (it has no model_index.json).{hint} A diffusers "
                         "folder has model_index.json plus unet/ or transformer/, vae/, text_encoder/ and so on.")


def _looks_like_path(text: str) -> bool:
    return "\\" in text or text.startswith((".", "/", "~")) or text.count("/") > 1 or bool(re.match(r"^[A-Za-z]:", text))


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedPipeline:
    """A base model's pipeline, where its weights came from, and how to load the parts kept out of memory.

    ``load_denoiser`` is set when the pipeline was loaded without its denoiser (it comes last, after the
    caches, so that system memory holds the text encoders and the denoiser one after the other);
    ``load_text_encoders`` loads the text encoders again after they were released.
    """

    pipe: Any
    source: str
    config_folder: Path
    denoiser_key: str | None = None
    load_denoiser: Callable[[], Any] | None = None
    load_text_encoders: Callable[[], dict[str, Any]] | None = None

    def denoiser_config(self) -> dict[str, Any]:
        if self.load_denoiser is None:
            return dict(getattr(self.pipe, self.denoiser_key).config)
        return json.loads((self.config_folder / self.denoiser_key / "config.json").read_text(encoding="utf-8"))


def load_pipeline(
    model: ModelSection,
    pipeline_class: type,
    dtype: torch.dtype,
    emit: Emit,
    *,
    default_components: str,
    denoiser_key: str | None = None,
    single_file_part: tuple[str, type] | None = None,
    source: ModelSource | None = None,
    text_only_tokenizers: tuple[str, ...] = (),
    strip_prefix: str | None = None,
    **overrides: Any,
) -> LoadedPipeline:
    """Load ``model.base`` as ``pipeline_class``, without the part named ``denoiser_key`` where the source allows
    (the result's ``load_denoiser`` loads it); ``model.text_encoder_files`` and ``model.vae_file`` replace
    those parts.

    ``single_file_part`` = (attribute, model class) means a single file holds only that part
    (Flux's transformer); the rest then comes from ``model.components``. ``text_only_tokenizers`` names
    pipeline parts saved as multimodal processors that are loaded as their tokenizer alone;
    ``strip_prefix`` a prefix single files may carry that the part's loader does not remove.
    """
    from lora_gui.engine.families.component_files import (
        component_files,
        file_replaced_patterns,
        text_encoders_from,
    )
    from lora_gui.engine.families.hub import download_snapshot

    source = source or resolve_source(model.base, model.cache_dir)
    emit(Status(f"Loading base model {model.base}"))
    if source.kind in ("hub", "folder"):
        folder = (download_snapshot(source.location, model.revision, model.cache_dir, emit,
                                    skip=[*SKIPPED_PATTERNS, *file_replaced_patterns(model)])
                  if source.kind == "hub" else Path(source.location))
        deferred = {denoiser_key: None} if denoiser_key else {}
        parts = component_files(model, folder, dtype, emit)
        pipe = _with_text_tokenizers(pipeline_class, folder, dtype, {**overrides, **deferred, **parts},
                                     text_only_tokenizers)
        load_denoiser = (lambda: _denoiser_from_folder(folder, denoiser_key, dtype)) if denoiser_key else None
        return LoadedPipeline(pipe, str(folder) if source.kind == "hub" else source.location, folder, denoiser_key,
                              load_denoiser, lambda: text_encoders_from(model, folder, dtype, emit))
    spec = model.components or default_components
    if single_file_part is None:
        with _explain_components(spec, "its configs and tokenizers"):
            config = components_folder(spec, model.cache_dir, emit, CONFIG_PATTERNS, SKIPPED_PATTERNS)
        parts = component_files(model, config, dtype, emit)
        pipe = _from_single_file(pipeline_class, source.location, config, dtype, {**overrides, **parts})
        return LoadedPipeline(pipe, source.location, config, denoiser_key)
    name, part_class = single_file_part
    refuse_scaled_fp8(source.location, _tensor_names(source.location))  # before anything loads
    skipped = [*SKIPPED_PATTERNS, f"{name}/*.safetensors", *file_replaced_patterns(model)]
    with _explain_components(spec, f"everything but the {name} (VAE, text encoders, configs)"):
        config = components_folder(spec, model.cache_dir, emit, WEIGHT_PATTERNS, skipped)
    parts = component_files(model, config, dtype, emit)
    pipe = _with_text_tokenizers(pipeline_class, config, dtype, {**overrides, name: None, **parts},
                                 text_only_tokenizers)

    def load_part() -> Any:
        emit(Status(f"Loading the {name} from {source.location}"))
        return _from_single_file(part_class, source.location, config, dtype, {"subfolder": name}, strip_prefix)

    return LoadedPipeline(pipe, source.location, config, name, load_part,
                          lambda: text_encoders_from(model, config, dtype, emit))


def text_encoder_keys(folder: Path) -> list[str]:
    """The pipeline's text-encoder parts in order (text_encoder, text_encoder_2)."""
    return sorted(key for key, value in _model_index(folder).items()
                  if key.startswith("text_encoder") and isinstance(value, list) and value[0] is not None)


def _model_index(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/model_index.json is missing or unreadable ({exc}). Use a complete diffusers "
                             "model folder.") from exc


def part_class(folder: Path, key: str) -> type:
    import importlib

    library, class_name = _model_index(folder)[key][:2]
    return getattr(importlib.import_module(library), class_name)


def _denoiser_from_folder(folder: Path, key: str, dtype: torch.dtype) -> Any:
    return load_part(part_class(folder, key), folder / key, dtype, next(iter(_dtype_kwarg(dtype))))


def load_part(model_class: type, folder: Path, dtype: torch.dtype, dtype_name: str) -> Any:
    try:
        return model_class.from_pretrained(str(folder), **{dtype_name: dtype})
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Could not load {folder} as a {model_class.__name__}: {type(exc).__name__}: {exc}. "
                             "Check that the model folder is complete.") from exc


def _with_text_tokenizers(pipeline_class: type, folder: Path, dtype: torch.dtype, overrides: dict,
                          text_only_tokenizers: tuple[str, ...]) -> Any:
    """The pipeline from ``folder``, with the named parts loaded as text-only tokenizers (diffusers would check
    them against the processor class the folder names, so they are left out of its loading and set after)."""
    tokenizers = {name: text_only_tokenizer(folder / name) for name in text_only_tokenizers}
    pipe = _from_folder(pipeline_class, folder, dtype, {**dict.fromkeys(tokenizers), **overrides})
    for name, tokenizer in tokenizers.items():
        setattr(pipe, name, tokenizer)
    return pipe


def text_only_tokenizer(folder: Path) -> Any:
    """The tokenizer of a processor folder without the processor, whose image side can need torchvision.

    Text-only prompts go through the processor's chat template: it is read from the folder
    (``chat_template.jinja``, ``chat_template.json`` or ``processor_config.json``) and set on the tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"Could not load the tokenizer in {folder}: {type(exc).__name__}: {exc}. Check that the "
                             "model folder is complete (tokenizer.json and tokenizer_config.json).") from exc
    template = processor_chat_template(folder)
    if template:
        tokenizer.chat_template = template
    return tokenizer


def processor_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        try:
            template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, str) and template:
            return template
    return None


def components_folder(spec: str, cache_dir: str | None, emit: Emit, allow: list[str], skip: list[str]) -> Path:
    """The local folder behind ``model.components``: built-in, local diffusers folder or Hub id."""
    from lora_gui.engine.families.hub import download_snapshot

    try:
        source = resolve_source(spec, cache_dir)
    except ModelLoadError as exc:
        raise ModelLoadError(f"model.components: {exc}") from None
    if source.kind == "folder":
        return Path(source.location)
    if source.kind == "hub":
        return download_snapshot(source.location, None, cache_dir, emit, allow=allow, skip=skip)
    raise ModelLoadError(f"model.components must be a diffusers folder or a Hugging Face id that provides the VAE, "
                         f"text encoders and configs, not a single file ({spec}).")


@contextmanager
def _explain_components(spec: str, what: str) -> Iterator[None]:
    try:
        yield
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"A single-file checkpoint needs a matching diffusers model for {what}; model.components names it "
            f"({spec}). {exc} To avoid the download, set model.components to a local diffusers folder of the same "
            "model type."
        ) from exc


def _from_folder(pipeline_class: type, folder: Path, dtype: torch.dtype, overrides: dict) -> Any:
    _check_pipeline_class(folder, pipeline_class)
    try:
        return pipeline_class.from_pretrained(str(folder), use_safetensors=True, **_dtype_kwarg(dtype), **overrides)
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"Could not load {folder} as a {pipeline_class.__name__}: {type(exc).__name__}: {exc}. Check that "
            "model.family matches this model and that the folder is complete (safetensors weights in every "
            "component folder); if it came from the Hub, deleting its cache folder makes it download again."
        ) from exc


def _from_single_file(model_class: type, path: str, config: Path, dtype: torch.dtype, overrides: dict,
                      strip_prefix: str | None = None) -> Any:
    """``strip_prefix``: a prefix the file's names may carry that the model class's loader does not remove
    (ComfyUI's ``model.diffusion_model.``); such a file is read and passed with the prefix removed."""
    names = _tensor_names(path)
    refuse_scaled_fp8(path, names)
    source: Any = path
    if strip_prefix and names and all(name.startswith(strip_prefix) for name in names):
        from safetensors.torch import load_file

        source = {name[len(strip_prefix):]: tensor for name, tensor in load_file(path).items()}
    try:
        return model_class.from_single_file(source, config=str(config), local_files_only=True, **_dtype_kwarg(dtype),
                                            **overrides)
    except MemoryError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"Could not load {path} as a {model_class.__name__} checkpoint: {type(exc).__name__}: {exc}. Check that "
            f"model.family matches the checkpoint and that model.components ({config}) is the same kind of model "
            "(its configs, VAE and text encoders are used with the file)."
        ) from exc


def _tensor_names(path: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}). Download it "
                             "again or check that it is complete.") from exc


def refuse_scaled_fp8(path: str, names: list[str]) -> None:
    """ComfyUI's "fp8_scaled" files store each weight divided by a scale kept beside it; read as plain fp8 the
    weights would be wrong, so they are refused until they are supported."""
    if any(name.endswith((".scale_weight", ".weight_scale")) for name in names):
        raise ModelLoadError(f"{path} is an fp8_scaled checkpoint (its weights are stored with separate scales), "
                             "which lora-gui cannot read yet. Use the model's bf16 or plain fp8_e4m3fn file instead.")


def _check_pipeline_class(folder: Path, pipeline_class: type) -> None:
    try:
        found = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return  # diffusers reports unreadable folders itself
    from lora_gui.engine.families.registry import family_class, family_names

    known = {family_class(name).pipeline_class_name: name for name in family_names()}
    wanted = pipeline_class.__name__
    if found != wanted and found in known and wanted in known:
        raise ModelLoadError(f"{folder} holds a {found} model (family {known[found]}), but model.family "
                             f"is {known[wanted]}. Set model.family = \"{known[found]}\" (or \"auto\").")


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """Recent diffusers renamed ``torch_dtype`` to ``dtype`` and warn about the old name."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def place_frozen(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A base-model part that is never trained directly: no gradients, eval mode, on device."""
    module.requires_grad_(False)
    module.eval()
    module.to(device)
    if getattr(module, "dtype", dtype) != dtype:
        module.to(dtype=dtype)
    return module
