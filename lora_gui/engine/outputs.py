"""A run's output folder: one live run at a time, and no silent mixing with an earlier run.

``hold_output_folder`` takes an exclusive OS lock on ``<output.dir>/.lora-gui.lock`` for the whole run:
a second run into the same folder (another app, another terminal) is refused while the first lives,
and the lock goes with the process, so a killed run never leaves a stale one behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lora_gui.engine.checkpoint import checkpoints_dir, list_checkpoints
from lora_gui.engine.errors import TrainingError

LOCK_NAME = ".lora-gui.lock"


class OutputFolderBusy(TrainingError):
    pass


class PreviousRunInTheWay(TrainingError):
    pass


def previous_run_problem(output_dir: Path, name: str) -> str | None:
    """Why starting from step 0 in ``output_dir`` would clobber an earlier run, or None."""
    output_dir = Path(output_dir)
    if (output_dir / f"{name}.safetensors").is_file():
        return f"{output_dir} already holds a finished LoRA ({name}.safetensors)"
    if list_checkpoints(output_dir):
        return f"{output_dir} holds checkpoints of an earlier run"
    return None


def clear_previous_run(output_dir: Path, name: str) -> None:
    """Overwrite: remove the earlier run's LoRA, checkpoints, samples and metrics (comparisons stay)."""
    output_dir = Path(output_dir)
    for folder in (checkpoints_dir(output_dir), output_dir / "samples"):
        shutil.rmtree(folder, ignore_errors=True)
    for file in (f"{name}.safetensors", f"{name}.diffusers.safetensors", "metrics.csv"):
        (output_dir / file).unlink(missing_ok=True)


def start_fresh(output_dir: Path, name: str, overwrite: bool) -> None:
    """Before step 0: refuse an output folder holding an earlier run, or clear it when ``overwrite``."""
    problem = previous_run_problem(output_dir, name)
    if problem is None:
        return
    if not overwrite:
        raise PreviousRunInTheWay(
            f"{problem}; a new run would mix with it.",
            "Continue it by resuming from its latest checkpoint, train again from step 0 with overwrite "
            "(deletes its LoRA, checkpoints, samples and metrics), or choose another output.dir.",
        )
    clear_previous_run(output_dir, name)


class OutputLock:
    """An exclusive lock on an output folder, held until ``release`` (or the process ends)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        if not _try_lock(handle):
            holder = _read_holder(handle)
            handle.close()
            raise OutputFolderBusy(
                f"Another training run is writing into {self.path.parent} ({holder}).",
                "Wait for it to finish or stop it, or choose another output.dir.",
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            _unlock(self._handle)
            self._handle.close()
            self._handle = None


def _read_holder(handle) -> str:
    try:
        handle.seek(0)
        return handle.read(100).strip() or "another process"
    except OSError:  # Windows locks are mandatory: the holder's byte cannot be read
        return "another process"


def hold_output_folder(output_dir: Path) -> OutputLock:
    return OutputLock(output_dir).acquire()


if os.name == "nt":
    import msvcrt

    def _try_lock(handle) -> bool:
        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(handle) -> None:
        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
else:
    import fcntl

    def _try_lock(handle) -> bool:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _unlock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
