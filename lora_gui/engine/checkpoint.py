"""Atomic, resumable checkpoints.

Layout: ``<output_dir>/checkpoints/step-000123/`` holding the LoRA file(s) written by the caller,
``training_state.pt`` (optimizer, scheduler, grad scaler, RNG and extra state dicts, loadable with
``weights_only=True``), ``progress.json`` and, written last, the ``COMPLETE`` marker with every
file's size and SHA-256, checked before a resume.

A checkpoint is written into ``step-000123.tmp-<random>`` and renamed into place once complete, so a
crash or Ctrl-C never leaves a folder that looks complete but is not. Older checkpoints are deleted
only after the new one is complete. Leftover temp folders are removed on the next save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lora_gui.config import TrainingConfig

CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
COMPLETE_MARKER = "COMPLETE"
FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER_DIR = re.compile(r"^step-\d+\.(tmp|old)-[0-9a-f]+$")

# (config key, progress key): settings a checkpoint's LoRA cannot change; they make up identity_hash().
IDENTITY_FIELDS = (
    ("model.family", "family"),
    ("model.base", "base"),
    ("lora.rank", "rank"),
    ("lora.alpha", "alpha"),
    ("lora.targets", "targets"),
    ("lora.use_dora", "use_dora"),
    ("lora.train_text_encoder", "train_text_encoder"),
)
# Settings the saved training state depends on: PiSSA/OLoRA change the base the LoRA was trained
# against, and another optimizer cannot take over the saved one's state.
RESUME_FIELDS = (
    ("lora.init", "init"),
    ("train.optimizer", "optimizer"),
    ("model.merge_loras", "merge_loras"),
)
DISK_MARGIN_BYTES = 16 * 1024**2


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message says what to do."""


class ResumeError(ValueError):
    """The checkpoint was trained with settings the current config contradicts."""


# ----------------------------------------------------------------------------- finding


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest step first; temp and incomplete folders are skipped."""
    return _complete_in(checkpoints_dir(output_dir))


def _complete_in(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted((path for path in parent.iterdir() if path.is_dir() and is_complete(path)), key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    config: TrainingConfig,
    write_lora: Callable[[Path], Any],
    training_state: dict,
    keep_last: int | None = None,
    data_position: dict | None = None,
) -> Path:
    """Write ``step-NNNNNN`` atomically, then prune older ones beyond ``keep_last`` (default: the config's)."""
    parent = checkpoints_dir(output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(parent)
    final = parent / checkpoint_name(step)
    if not is_complete(final):  # a second request for a saved step is a no-op
        check_weights_only_loadable(training_state)
        check_free_space(parent, estimated_checkpoint_bytes(parent, training_state))
        progress = make_progress(step, epoch, batch_in_epoch, config)
        progress.update(data_position or {})  # processes, global_batch, samples_in_epoch (see cursor_at)
        _write_atomically(final, progress, training_state, write_lora)
    prune_checkpoints(parent, config.output.keep_last if keep_last is None else keep_last, step)
    return final


def make_progress(step: int, epoch: int, batch_in_epoch: int, config: TrainingConfig) -> dict:
    progress = {
        "format": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "identity_hash": config.identity_hash(),
        "config_hash": config.full_hash(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    progress.update({name: _config_value(config, key) for key, name in IDENTITY_FIELDS + RESUME_FIELDS})
    return progress


def _write_atomically(final: Path, progress: dict, training_state: dict, write_lora: Callable) -> None:
    temp = final.with_name(f"{final.name}.tmp-{secrets.token_hex(4)}")
    try:
        _write_contents(temp, progress, training_state, write_lora)
        _move_into_place(temp, final)
    except Exception as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if is_disk_full(exc):
            raise CheckpointError(
                f"The disk is full: checkpoint {final} could not be written. Free space on the disk holding "
                f"{final.parent} (about {_megabytes(estimated_checkpoint_bytes(final.parent, training_state))} "
                "are needed) or lower output.keep_last; earlier checkpoints are untouched."
            ) from None
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"Could not save checkpoint {final}: {exc}. Check that {final.parent} is writable; earlier "
                "checkpoints are untouched."
            ) from exc
        raise
    except BaseException:  # includes Ctrl-C: drop the partial folder, keep the older checkpoints
        shutil.rmtree(temp, ignore_errors=True)
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC as an OSError, or as the text of safetensors' and torch's own write errors."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left on device" in text or "disk quota exceeded" in text or (
        "inline_container" in text and "unexpected pos" in text)


def tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def estimated_checkpoint_bytes(parent: Path, training_state: dict) -> int:
    """The size of the newest saved checkpoint, or, for the first one, the state plus two LoRA files."""
    saved = _complete_in(parent) if parent.is_dir() else []
    if saved:
        size = sum(path.stat().st_size for path in saved[-1].rglob("*") if path.is_file())
    else:
        size = tensor_bytes(training_state) + 2 * tensor_bytes(training_state.get("extra", {}).get("lora", {}))
    return size + DISK_MARGIN_BYTES


def check_free_space(parent: Path, needed: int) -> None:
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise CheckpointError(
            f"Not enough disk space to save a checkpoint in {parent}: about {_megabytes(needed)} are needed and "
            f"{_megabytes(free)} are free. Free space on that disk or lower output.keep_last; earlier "
            "checkpoints are untouched."
        )


def _megabytes(size: int) -> str:
    return f"{size / 1024**2:,.0f} MB" if size < 10 * 1024**3 else f"{size / 1024**3:,.1f} GB"


def _write_contents(folder: Path, progress: dict, training_state: dict, write_lora: Callable) -> None:
    import torch

    folder.mkdir()
    write_lora(folder)
    if not any(folder.iterdir()):
        raise CheckpointError(f"write_lora wrote no files into {folder}; the checkpoint would have no LoRA.")
    torch.save(training_state, folder / TRAINING_STATE_FILE)
    (folder / PROGRESS_FILE).write_text(json.dumps(progress, indent=2), encoding="utf-8")
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    marker = folder / COMPLETE_MARKER
    marker.write_text(json.dumps({"step": progress["step"], "files": files}, indent=2), encoding="utf-8")
    _fsync_file(marker)
    _fsync_dir(folder)


def _move_into_place(temp: Path, final: Path) -> None:
    stale = None
    if final.exists():  # an incomplete folder of that name (not written by this module): set it aside
        stale = _set_aside(final)
    os.replace(temp, final)
    _fsync_dir(final.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _set_aside(path: Path) -> Path:
    """Rename to an ignored ``.old-`` name first, so a half-deleted folder never looks complete."""
    aside = path.with_name(f"{path.name}.old-{secrets.token_hex(4)}")
    os.replace(path, aside)
    return aside


def prune_checkpoints(parent: Path, keep_last: int, newest_step: int) -> None:
    """Delete complete checkpoints older than ``newest_step`` so that ``keep_last`` remain (newest included)."""
    older = [path for path in _complete_in(parent) if checkpoint_step(path) < newest_step]
    excess = len(older) - (max(keep_last, 1) - 1)
    for path in older[: max(excess, 0)]:
        shutil.rmtree(_set_aside(path), ignore_errors=True)


def remove_leftovers(parent: Path) -> None:
    """Delete temp and set-aside folders that an interrupted save or prune left behind."""
    for path in parent.iterdir():
        if path.is_dir() and _LEFTOVER_DIR.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "r+b") as handle:  # write access: Windows cannot flush a read-only handle
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; NTFS journals the rename anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_LOADABLE_LEAVES = (int, float, bool, str, bytes, type(None))


def check_weights_only_loadable(value: Any, where: str = "training_state") -> None:
    """Raise TypeError naming the entry that ``torch.load(weights_only=True)`` would refuse."""
    import torch

    if isinstance(value, (torch.Tensor, torch.dtype, torch.device, torch.Size)) or type(value) in _LOADABLE_LEAVES:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            check_weights_only_loadable(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_weights_only_loadable(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which torch.load(weights_only=True) "
        "refuses; store tensors, numbers, strings, lists and dicts only."
    )


# ----------------------------------------------------------------------------- training state


def make_training_state(optimizer, lr_scheduler, scaler=None, rng: dict | None = None,
                        optimizer_state: dict | None = None, **extra: dict) -> dict:
    """The bundle saved as training_state.pt: state dicts plus RNG states and any extra dicts
    (``optimizer_state``: the optimizer's, when it is not ``optimizer.state_dict()``, gathered from shards)."""
    return {
        "format": FORMAT_VERSION,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "extra": extra,
    }


def restore_training_state(training_state: dict, optimizer, lr_scheduler, scaler=None) -> None:
    """Load optimizer, scheduler and scaler state (build them from the config first, as for a new run)."""
    optimizer.load_state_dict(training_state["optimizer"])
    lr_scheduler.load_state_dict(training_state["lr_scheduler"])
    if scaler is not None and training_state.get("grad_scaler"):
        scaler.load_state_dict(training_state["grad_scaler"])


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, numpy, torch CPU/CUDA/MPS and the named generators' states, as plain tensors and tuples."""
    import torch

    state: dict = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy_state = _numpy_rng_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    state["generators"] = {name: gen.get_state() for name, gen in (generators or {}).items()}
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> list[str]:
    """Restore what ``capture_rng_state`` saved; returns the names that could not be restored here."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    missed = []
    if "numpy" in state and not _set_numpy_rng_state(state["numpy"]):
        missed.append("numpy")
    if "cuda" in state:
        if torch.cuda.is_available():
            for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(device_state, index)
        else:
            missed.append("cuda")
    if "mps" in state:
        if torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"])
        else:
            missed.append("mps")
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name in saved:
            gen.set_state(saved[name])
        else:
            missed.append(name)
    return missed


def _numpy_rng_state() -> dict | None:
    try:
        import numpy as np
    except ImportError:
        return None
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_rng_state(saved: dict) -> bool:
    try:
        import numpy as np
    except ImportError:
        return False
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))
    return True


# ----------------------------------------------------------------------------- loading and resuming


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """``(progress, training_state)`` of a complete, intact checkpoint; tensors are loaded onto the CPU."""
    import torch

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; {_alternative(path)}")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete (it was interrupted while saving); {_alternative(path)}"
        )
    problem = checkpoint_damage(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged ({problem}); {_alternative(path)}")
    try:
        progress = json.loads((path / PROGRESS_FILE).read_text(encoding="utf-8"))
        training_state = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception:  # written before checksums, and damaged since: the loaders' texts would mislead
        raise CheckpointError(f"checkpoint {path} is damaged (its files cannot be read); "
                              f"{_alternative(path)}") from None
    return progress, training_state


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (sizes and SHA-256 from its marker), or None."""
    try:
        expected = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE_MARKER} marker cannot be read"
    for name, entry in expected.items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("sha256"))
        file = path / name
        actual = file.stat().st_size if file.is_file() else None
        if actual is None:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, expected {size}"
        if digest is not None and file_digest(file) != digest:
            return f"{name} does not match its checksum"
    return None


def _alternative(path: Path) -> str:
    parent = path.parent
    output_dir = parent.parent if parent.name == CHECKPOINTS_DIR else parent
    others = [found for found in list_checkpoints(output_dir) if found.resolve() != path.resolve()]
    intact = next((found for found in reversed(others) if checkpoint_damage(found) is None), None)
    if intact is not None:
        return f"resume from {intact} instead (the newest intact one)"
    return f"there is no complete checkpoint in {checkpoints_dir(output_dir)}; start the run without resuming"


def check_resume_compatible(progress: dict, config: TrainingConfig) -> None:
    """Raise ResumeError naming every LoRA-shaping setting that differs from the checkpoint's."""
    if progress.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise ResumeError("The checkpoint was written by a newer lora-gui; update lora-gui to resume it.")
    problems = [
        f"{key} is {_show(_config_value(config, key))} but the checkpoint was trained with "
        f"{name} {_show(progress[name])}; set {key} = {_show(progress[name])}"
        for key, name in IDENTITY_FIELDS + RESUME_FIELDS
        if name in progress and progress[name] != _config_value(config, key)
    ]
    saved_hash = progress.get("identity_hash")
    if not problems and saved_hash is not None and saved_hash != config.identity_hash():
        problems.append("the LoRA settings (family, base, rank, alpha, targets, DoRA, text encoder) differ")
    if len(problems) == 1:
        raise ResumeError(f"{problems[0]} or start a new run in another output folder.")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ResumeError(
            f"The checkpoint was trained with other settings:\n{listed}\n"
            "Set them back, or start a new run in another output folder."
        )


def _config_value(config: TrainingConfig, key: str) -> Any:
    section, field = key.split(".")
    return getattr(getattr(config, section), field)


def _show(value: Any) -> str:
    return json.dumps(value)  # TOML-like: "attn", true, 16
