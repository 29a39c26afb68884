"""Engine events and run commands as newline-delimited JSON, for a run in another process.

``lora-gui train --events`` writes one JSON object per event on stdout and reads one command per line on
stdin (``{"command": "pause"}``; pause, continue, sample, save, stop). The app starts runs on several GPUs
this way and follows them through the same events as a run on its own thread.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, fields
from typing import IO

from lora_gui.events import (
    CheckpointSaved,
    Controls,
    Event,
    Failed,
    Finished,
    Progress,
    SamplesReady,
    Status,
    Stopped,
)

EVENT_TYPES = {cls.__name__: cls for cls in (Status, Progress, SamplesReady, CheckpointSaved, Finished, Stopped,
                                             Failed)}
COMMANDS = ("pause", "continue", "sample", "save", "stop")


def event_line(event: Event) -> str:
    return json.dumps({"event": type(event).__name__, **asdict(event)})


def parse_event(line: str) -> Event | None:
    """The event a line holds, or None for any other line (a launcher's or a library's output)."""
    if not line.startswith('{"event"'):
        return None
    try:
        data = json.loads(line)
        cls = EVENT_TYPES[data.pop("event")]
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    for name in ("paths", "prompts"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    try:
        return cls(**values)
    except TypeError:
        return None


def command_line(command: str) -> str:
    if command not in COMMANDS:
        raise ValueError(f"unknown run command {command!r}; one of {', '.join(COMMANDS)}")
    return json.dumps({"command": command}) + "\n"


def apply_command(controls: Controls, line: str) -> None:
    try:
        command = json.loads(line).get("command")
    except (ValueError, AttributeError):
        return
    actions = {"pause": controls.pause, "continue": controls.resume, "sample": controls.sample_now,
               "save": controls.save_now, "stop": controls.stop}
    if command in actions:
        actions[command]()


def follow_commands(stream: IO[str], controls: Controls) -> threading.Thread:
    """Apply the commands read from ``stream`` on a daemon thread. The stream closing means the program that
    drove the run is gone: the run stops and saves a checkpoint."""

    def read() -> None:
        for line in stream:
            apply_command(controls, line)
        controls.stop()

    thread = threading.Thread(target=read, name="lora-gui-run-commands", daemon=True)
    thread.start()
    return thread


class EventWriter:
    """``emit`` for ``train``: each event as one flushed line on ``stream``."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.stream.write(event_line(event) + "\n")
            self.stream.flush()
