"""Typed events out of the training engine and the controls that go into it.

The engine calls ``emit(event)``; it polls ``Controls`` at each step boundary. Neither side
knows about the GUI, so the same engine serves the CLI, the GUI and scripts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    time: float = field(default_factory=time.time, kw_only=True)


@dataclass(frozen=True)
class Status(Event):
    """A line of human-readable progress ("Caching latents 3/20")."""

    text: str
    current: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class Progress(Event):
    step: int
    max_steps: int
    epoch: int
    loss: float
    lr: float
    sec_per_step: float
    eta_seconds: float


@dataclass(frozen=True)
class SamplesReady(Event):
    step: int
    paths: tuple[str, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointSaved(Event):
    step: int
    path: str


@dataclass(frozen=True)
class Finished(Event):
    step: int
    lora_path: str
    diffusers_path: str


@dataclass(frozen=True)
class Stopped(Event):
    """The user stopped the run; ``checkpoint`` can be resumed from."""

    step: int
    checkpoint: str | None


@dataclass(frozen=True)
class Failed(Event):
    message: str
    hint: str = ""
    details: str = ""


Emit = Callable[[Event], None]


def ignore_events(_event: Event) -> None:
    return None


class Controls:
    """Requests from the user to a running training loop, applied at the next step boundary.

    Safe to call from any thread; repeated requests are harmless.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._sample = threading.Event()
        self._save = threading.Event()
        self._lock = threading.Lock()
        self._jobs: queue.Queue[tuple[Callable[..., Any], Future]] = queue.Queue()

    # -- requests (any thread)
    def stop(self) -> None:
        self._stop.set()
        self._running.set()  # a paused run must wake up to stop

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def sample_now(self) -> None:
        self._sample.set()

    def save_now(self) -> None:
        self._save.set()

    def submit(self, job: Callable[..., Any]) -> Future:
        """Run ``job(family, components)`` on the training thread, with the model in memory.

        Jobs run at the next step boundary or while paused, so they never race the optimizer.
        """
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def run_jobs(self, *context: Any) -> None:
        """Training thread: run every submitted job with the given context."""
        while True:
            try:
                job, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job(*context))
            except BaseException as exc:  # the submitter gets the error, training goes on
                future.set_exception(exc)

    def cancel_jobs(self, reason: str) -> None:
        """The run is ending: jobs nobody will run fail with ``reason``."""
        while True:
            try:
                _, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(reason))

    # -- queries (training thread)
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def take_sample_request(self) -> bool:
        return self._take(self._sample)

    def take_save_request(self) -> bool:
        return self._take(self._save)

    def wait_while_paused(self, poll_seconds: float = 0.2, on_idle: Callable[[], None] | None = None) -> None:
        while not self._running.wait(timeout=poll_seconds):
            if on_idle is not None:
                on_idle()

    def _take(self, flag: threading.Event) -> bool:
        with self._lock:
            was_set = flag.is_set()
            flag.clear()
            return was_set
