"""Downloads from the Hugging Face Hub: only the files a pipeline needs, progress as ``Status`` events, and
every failure a person can fix as a ``ModelLoadError`` that says what to do."""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.engine.families.loading import SKIPPED_PATTERNS, WEIGHT_PATTERNS, ModelLoadError
from lora_gui.events import Status

if TYPE_CHECKING:
    from lora_gui.events import Emit


def download_snapshot(repo_id: str, revision: str | None, cache_dir: str | None, emit: Emit,
                      allow: list[str] | None = None, skip: list[str] | None = None) -> Path:
    """Download (or find in the cache) the files a pipeline needs, reporting progress.

    model_index.json comes first; only the component folders it names are fetched, so extra
    folders some repos carry (ONNX exports, spare VAEs) are not downloaded.
    """
    import huggingface_hub

    emit(Status(f"Fetching {repo_id} from the Hugging Face Hub (kept in the cache after the first time)"))
    hub_cache = str(Path(cache_dir) / "hub") if cache_dir else None
    common = {"revision": revision, "cache_dir": hub_cache, "tqdm_class": status_tqdm(emit, repo_id)}
    with hub_errors(repo_id, revision, hub_cache):
        index = huggingface_hub.snapshot_download(repo_id, allow_patterns=["model_index.json"], **common)
        patterns = _component_patterns(repo_id, Path(index), allow or WEIGHT_PATTERNS)
        ignore = skip if skip is not None else SKIPPED_PATTERNS
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore, **common)
    emit(Status(f"{repo_id} is ready"))
    return Path(folder)


def _component_patterns(repo_id: str, folder: Path, allow: list[str]) -> list[str]:
    """``*/x`` patterns narrowed to the component folders that model_index.json names."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelLoadError(
            f"{repo_id} on the Hugging Face Hub is not a diffusers model (it has no readable model_index.json). If the "
            "repo offers a single .safetensors checkpoint, download that file and set model.base to its path."
        ) from None
    parts = [name for name, value in index.items() if isinstance(value, list) and value[0] is not None]
    patterns = [p for p in allow if not p.startswith("*/")]
    return patterns + [f"{part}/{p[2:]}" for part in parts for p in allow if p.startswith("*/")]


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into messages that say what to do."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError as exc:
        raise ModelLoadError(
            f"{repo_id} is a gated model: its licence must be accepted before it can be downloaded. Open "
            f"https://huggingface.co/{repo_id}, log in and accept the terms there, then give lora-gui your access "
            "token: run `huggingface-cli login` (or `hf auth login`), or set the HF_TOKEN environment variable, and "
            "start again."
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise ModelLoadError(f"{repo_id} has no revision {revision!r}. Fix model.revision (a branch, tag or commit) "
                             "or leave it empty for the main branch.") from exc
    except errors.RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"{repo_id} was not found on the Hugging Face Hub. Check the id (owner/name, e.g. "
            "stabilityai/stable-diffusion-xl-base-1.0). If it is a private model, log in with `huggingface-cli login` "
            "or set HF_TOKEN. For a model already on this computer, give its folder or .safetensors path instead."
        ) from exc
    except OSError as exc:
        if isinstance(exc, errors.HfHubHTTPError) or not _is_network_error(exc, errors):
            raise ModelLoadError(_other_hub_problem(repo_id, exc, cache_dir)) from exc
        raise ModelLoadError(_offline_message(repo_id, exc)) from exc
    except Exception as exc:
        if not _is_network_error(exc, errors):
            raise
        raise ModelLoadError(_offline_message(repo_id, exc)) from exc


def _is_network_error(exc: BaseException, errors: Any) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return True
    return type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


def _offline_message(repo_id: str, exc: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    why = "offline mode is on (HF_HUB_OFFLINE is set)" if offline else f"{type(exc).__name__}: {exc}"
    return (f"Could not reach the Hugging Face Hub to fetch {repo_id} ({why}), and it is not complete in the local "
            "cache. Check the internet connection and proxy settings, or use a model already on this computer: a "
            "diffusers folder, a single .safetensors file, or a built-in model such as builtin:tiny-sd15.")


def _other_hub_problem(repo_id: str, exc: OSError, cache_dir: str | None) -> str:
    where = cache_dir or "the Hugging Face cache (HF_HOME)"
    if exc.errno == errno.ENOSPC:
        return f"Ran out of disk space while downloading {repo_id} into {where}. Free space or set model.cache_dir " \
               "to a drive with more room."
    if isinstance(exc, PermissionError):
        return f"Cannot write the download of {repo_id} into {where}: {exc}. Set model.cache_dir to a folder you " \
               "can write to."
    return (f"Downloading {repo_id} from the Hugging Face Hub failed: {type(exc).__name__}: {exc}. A 401/403 means "
            "you need to log in (`huggingface-cli login` or HF_TOKEN); a 5xx error usually passes, so try again later.")


def status_tqdm(emit: Emit, label: str) -> type:
    """A tqdm class that reports progress as ``Status`` events instead of drawing bars.

    huggingface_hub updates it from download threads, so ``emit`` must be thread-safe.
    """
    from tqdm import tqdm

    class StatusTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs.setdefault("mininterval", 0.5)
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            total = int(self.total) if self.total else None
            emit(Status(f"Downloading {label}: {self._describe(total)}", current=int(self.n), total=total))
            return True

        def _describe(self, total: int | None) -> str:
            if self.unit == "B":
                done = tqdm.format_sizeof(self.n, "B", 1000)
                return f"{done} of {tqdm.format_sizeof(total, 'B', 1000)}" if total else done
            counted = f"{int(self.n)} of {total}" if total else str(int(self.n))
            return f"{self.desc or 'files'} {counted}".strip()

    return StatusTqdm
