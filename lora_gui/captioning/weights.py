"""Where a captioner's weights come from: a local folder, or a Hugging Face Hub download with progress.

Downloads use the engine's helpers, so they report progress as ``Status`` events and turn Hub
errors (offline, gated, not found, disk full) into messages that say what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lora_gui.captioning.base import CaptionerError
from lora_gui.engine.families.hub import hub_errors, status_tqdm
from lora_gui.engine.families.loading import HUB_ID, ModelLoadError
from lora_gui.events import Emit, Status

# Configs, tokenizers and safetensors weights; pickled weights (.bin, .pt) are never fetched.
TRANSFORMERS_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
Check = Callable[[Path], None]


def model_folder(model: str, files: list[str], required: list[str], what: str, progress: Emit,
                 cache_dir: str | None = None, check: Check | None = None) -> Path:
    """The local folder holding ``model``: the folder itself, or the Hub download of the ``files`` patterns.

    ``required`` names files the folder must have; ``check`` (given the folder once its
    config.json is there) refuses a wrong kind of model before the big files download.
    """
    model = model.strip()
    if not model:
        raise CaptionerError(f"No model given for the {what}: give a Hugging Face id or a local folder.")
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path
        if check is not None and (folder / "config.json").is_file():
            check(folder)
    elif path.exists():
        raise CaptionerError(f"{model} is a file; give the folder that holds the {what} ({', '.join(required)}).")
    elif HUB_ID.match(model):
        folder = _download(model, files, progress, cache_dir, check)
    else:
        raise CaptionerError(f"The {what} {model!r} is neither an existing folder nor a Hugging Face id "
                             "(owner/name). Check the path, or that the drive is mounted.")
    _require(folder, model, required, what)
    return folder


def _download(repo_id: str, files: list[str], progress: Emit, cache_dir: str | None, check: Check | None) -> Path:
    import huggingface_hub

    progress(Status(f"Fetching {repo_id} from the Hugging Face Hub (kept in the cache after the first time)"))
    hub_cache = str(Path(cache_dir) / "hub") if cache_dir else None
    common = {"cache_dir": hub_cache, "tqdm_class": status_tqdm(progress, repo_id)}
    try:
        with hub_errors(repo_id, None, hub_cache):
            if check is not None:
                check(Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=["config.json"], **common)))
            folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=files, **common))
    except ModelLoadError as exc:
        raise CaptionerError(_for_captioners(str(exc))) from exc
    progress(Status(f"{repo_id} is ready"))
    return folder


def _for_captioners(message: str) -> str:
    """The engine's offline advice names diffusers models; a captioner needs its own kind of folder."""
    offline, advice = message.partition(" Check the internet connection")[:2]
    if not offline.startswith("Could not reach the Hugging Face Hub") or not advice:
        return message
    return (f"{offline} Check the internet connection and proxy settings, or give the folder of a copy already on "
            "this computer as the model.")


def _require(folder: Path, model: str, required: list[str], what: str) -> None:
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise CaptionerError(f"{model} does not look like a {what}: it has no {', '.join(missing)}. Check the "
                             "model id or folder (a download that was cut off can be repeated by deleting its "
                             "cache folder).")


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CaptionerError(f"{folder / 'config.json'} cannot be read ({exc}). The download may be incomplete: "
                             "delete the folder (or its cache entry) and try again.") from exc


def load_pretrained(load: Callable[[], object], folder: Path, what: str, hint: str) -> object:
    """Run a ``from_pretrained`` call, turning its failures into a ``CaptionerError`` with ``hint``."""
    try:
        return load()
    except MemoryError:
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            raise CaptionerError(f"Not enough GPU memory to load the {what}. Close other programs that use the "
                                 "GPU, pick a smaller captioner, or use device 'cpu'.") from exc
        raise CaptionerError(f"Could not load the {what} from {folder}: {type(exc).__name__}: {exc}. {hint}") from exc


def processor_kwargs() -> dict:
    """transformers 5 picks a torchvision image processor and warns when torchvision is missing: ask for PIL."""
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
