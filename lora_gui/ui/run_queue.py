"""Runs lined up to train one after another (overnight, say), kept in the workspace so a restart loses none.

The queue starts its next waiting run whenever no run is training, unless it is held. A run that fails does
not stop it; a run the user stops holds it (so Stop never starts the next run by surprise); after a restart
of the app it is held if anything waits, and a run that was training when the app ended shows as
interrupted. A worker thread does the starting; it runs only while there is something waiting.
No gradio here: the Train tab shows ``rows()`` and calls the commands.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_gui.config import ConfigError, TrainingConfig, validate_config
from lora_gui.engine.runner import RunAlreadyActive, RunSnapshot, TrainingRunner
from lora_gui.ui.run_start import StartRefused

log = logging.getLogger("lora_gui.ui")
QUEUE_FILE = "queue.json"
MAX_QUEUE_FILE_BYTES = 20_000_000
MAX_ENTRIES = 200
WORKER_POLL_S = 1.0
WAITING, RUNNING = "waiting", "running"
DONE_STATES = ("finished", "failed", "stopped", "interrupted")


@dataclass
class QueuedRun:
    id: str
    config: dict  # the Config tab's config (model_dump, json mode) with its folders as the user wrote them
    label: str
    state: str = WAITING  # waiting, running, finished, failed, stopped, interrupted
    detail: str = ""
    added: float = field(default_factory=time.time)
    processes: int = 1  # the GPUs it trains on, one process each


@dataclass(frozen=True)
class QueueRow:
    position: int
    id: str
    state: str
    label: str
    detail: str


def describe(config: TrainingConfig, output_shown: str, processes: int = 1) -> str:
    gpus = f" · {processes} GPUs" if processes > 1 else ""
    return f"{config.output.name} → {output_shown} · {config.model.family} · {config.train.max_steps} steps{gpus}"


class RunQueue:
    """``prepare(config, processes)`` turns a queued config into the one to train (or raises ``StartRefused``)
    right before it starts; ``started(config)`` is told of each start (the app records it as the current run)."""

    def __init__(self, path: Path, runner: TrainingRunner, prepare: Callable[[TrainingConfig, int], TrainingConfig],
                 started: Callable[[TrainingConfig], None] = lambda config: None) -> None:
        self._path, self._runner, self._prepare, self._started = path, runner, prepare, started
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._changes = 0
        self._entries, self.held, self.hold_reason = self._read()

    # ------------------------------------------------------------------ what the UI shows
    def version(self) -> int:
        with self._lock:
            return self._changes

    def rows(self) -> list[QueueRow]:
        with self._lock:
            return [QueueRow(index + 1, entry.id, entry.state, entry.label, entry.detail)
                    for index, entry in enumerate(self._entries)]

    def waiting(self) -> int:
        with self._lock:
            return sum(entry.state == WAITING for entry in self._entries)

    def output_dirs(self, states: tuple[str, ...] = (WAITING, RUNNING)) -> list[str]:
        with self._lock:
            return [entry.config["output"]["dir"] for entry in self._entries if entry.state in states]

    # ------------------------------------------------------------------ commands
    def add(self, config: TrainingConfig, label: str, processes: int = 1) -> QueuedRun:
        entry = QueuedRun(id=secrets.token_hex(4), config=config.model_dump(mode="json"), label=label,
                          processes=processes)
        with self._lock:
            if sum(item.state in (WAITING, RUNNING) for item in self._entries) >= MAX_ENTRIES:
                raise StartRefused(f"The queue already holds {MAX_ENTRIES} runs; remove some first.")
            self._entries.append(entry)
            self._changed()
            self._start_worker()
        return entry

    def move(self, entry_id: str, offset: int) -> None:
        """Move a waiting run up (-1) or down (+1) among the waiting runs."""
        with self._lock:
            index = self._index(entry_id)
            if self._entries[index].state != WAITING:
                raise StartRefused("Only a waiting run can be moved.")
            waiting = [i for i, entry in enumerate(self._entries) if entry.state == WAITING]
            place = waiting.index(index) + offset
            if not 0 <= place < len(waiting):
                raise StartRefused("It is already " + ("first." if offset < 0 else "last."))
            other = waiting[place]
            self._entries[index], self._entries[other] = self._entries[other], self._entries[index]
            self._changed()

    def remove(self, entry_id: str) -> QueuedRun:
        with self._lock:
            index = self._index(entry_id)
            if self._entries[index].state == RUNNING:
                raise StartRefused("That run is training now: stop it on the Train tab first.")
            entry = self._entries.pop(index)
            self._changed()
            return entry

    def clear_done(self) -> int:
        with self._lock:
            before = len(self._entries)
            self._entries = [entry for entry in self._entries if entry.state not in DONE_STATES]
            if len(self._entries) != before:
                self._changed()
            return before - len(self._entries)

    def hold(self, reason: str = "held") -> None:
        with self._lock:
            self.held, self.hold_reason = True, reason
            self._changed()

    def release(self) -> None:
        with self._lock:
            self.held, self.hold_reason = False, ""
            self._changed()
            self._start_worker()

    def close(self) -> None:
        """Stop the worker (tests; the app's worker ends with the process)."""
        with self._lock:
            self.held, self.hold_reason = True, "closed"
        self._wake.set()
        worker = self._worker
        if worker is not None:
            worker.join()

    def _index(self, entry_id: object) -> int:
        for index, entry in enumerate(self._entries):
            if entry.id == entry_id:
                return index
        raise StartRefused("That run is no longer in the queue; the list is refreshed.")

    # ------------------------------------------------------------------ the worker
    def _start_worker(self) -> None:
        """Under the lock: a worker when there is something to start and none runs."""
        if self._worker is None and not self.held and any(entry.state == WAITING for entry in self._entries):
            self._worker = threading.Thread(target=self._work, name="lora-gui-queue", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if self.held or not any(entry.state == WAITING for entry in self._entries):
                    self._worker = None
                    return
            if self._runner.is_active:
                self._runner.wait(WORKER_POLL_S)
                continue
            self._start_next()
            self._wake.wait(WORKER_POLL_S)
            self._wake.clear()

    def _start_next(self) -> None:
        with self._lock:
            entry = next((item for item in self._entries if item.state == WAITING), None)
            if entry is None or self.held:
                return
            entry.state, entry.detail = RUNNING, "starting"
            self._changed()
        try:
            config = self._prepare(validate_config(entry.config), entry.processes)
            self._runner.start(config, on_end=lambda snap: self._ended(entry, snap), processes=entry.processes)
        except RunAlreadyActive:  # a run was started by hand in between: wait for it
            self._set(entry, WAITING, "")
            return
        except (StartRefused, ConfigError) as exc:
            self._set(entry, "failed", f"not started: {exc}")
            return
        except Exception as exc:  # a bug must not end the queue or lose its entries
            log.exception("The queue could not start a run")
            self._set(entry, "failed", f"not started: {exc.__class__.__name__}: {exc}")
            return
        self._set(entry, RUNNING, "training")
        self._started(config)

    def _ended(self, entry: QueuedRun, snap: RunSnapshot) -> None:
        if snap.state == "finished":
            self._set(entry, "finished", f"finished at step {snap.step}")
        elif snap.state == "failed":
            message = snap.error.message if snap.error else "failed"
            self._set(entry, "failed", f"failed at step {snap.step}: {message}")
        else:
            self._set(entry, "stopped", f"stopped at step {snap.step}")
            with self._lock:
                if any(item.state == WAITING for item in self._entries):
                    self.held, self.hold_reason = True, "you stopped a queued run"
                    self._changed()
        self._wake.set()

    def _set(self, entry: QueuedRun, state: str, detail: str) -> None:
        with self._lock:
            entry.state, entry.detail = state, detail
            self._changed()

    # ------------------------------------------------------------------ the file
    def _changed(self) -> None:
        """Under the lock: count the change and write the queue (atomically; a disk problem is logged)."""
        self._changes += 1
        data = {"held": self.held, "hold_reason": self.hold_reason,
                "entries": [asdict(entry) for entry in self._entries]}
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
            temporary.replace(self._path)
        except OSError as exc:
            log.warning("Could not write the run queue to %s: %s", self._path, exc)

    def _read(self) -> tuple[list[QueuedRun], bool, str]:
        """The queue as the last app process left it. A run it was training is interrupted; anything waiting
        is held until the user starts the queue again. An unreadable file is set aside, not overwritten."""
        try:
            if self._path.stat().st_size > MAX_QUEUE_FILE_BYTES:
                raise ValueError("too large")
            data = json.loads(self._path.read_text(encoding="utf-8"))
            entries = [_entry(item) for item in data["entries"]]
        except FileNotFoundError:
            return [], False, ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            kept = self._path.with_name(f"{self._path.name}.unreadable-{int(time.time())}")
            log.warning("The run queue %s could not be read (%s); it was kept as %s and the queue starts empty.",
                        self._path, exc, kept.name)
            try:
                self._path.replace(kept)
            except OSError:
                pass
            return [], False, ""
        for entry in entries:
            if entry.state == RUNNING:
                entry.state = "interrupted"
                entry.detail = "the app ended while it trained; resume it from the Train tab's run picker"
        held = any(entry.state == WAITING for entry in entries)
        return entries, held, "the app was restarted" if held else ""


def _entry(item: dict) -> QueuedRun:
    if not isinstance(item, dict) or not isinstance(item.get("config"), dict):
        raise ValueError("an entry is not a queued run")
    return QueuedRun(id=str(item["id"]), config=item["config"], label=str(item.get("label", "")),
                     state=str(item.get("state", WAITING)), detail=str(item.get("detail", "")),
                     added=float(item.get("added", 0.0)), processes=max(1, int(item.get("processes", 1))))
