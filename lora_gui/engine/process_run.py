"""A training run in processes of its own (several GPUs: one process each, through a launcher), followed
through the event lines of ``lora-gui train --events`` and driven by command lines on its stdin.

The caller gets the same events as from ``train`` on a thread, and drives the run through the same
``Controls``: pause, continue, sample now, save now and stop are passed on as the user asks for them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from lora_gui.event_lines import command_line, parse_event
from lora_gui.events import Controls, Emit, Failed, Finished, Stopped

FORWARD_POLL_S = 0.1
TAIL_LINES = 60


def train_command(launcher: list[str], config_file: Path, resume_from: str | Path | None, overwrite: bool,
                  dataset_root: Path | None) -> list[str]:
    """The launcher running ``train --events`` on a saved config (the app has checked it already)."""
    from argparse import Namespace

    from lora_gui.cli_gpus import train_arguments

    return [*launcher, *train_arguments(Namespace(
        config=str(config_file), preset=None, overrides=[], overwrite=overwrite, no_plan=True, events=True,
        resume=None if resume_from is None else str(resume_from),
        dataset_root=None if dataset_root is None else str(dataset_root)))]


class ProcessRun:
    def __init__(self, command: list[str], emit: Emit, controls: Controls) -> None:
        self.command, self.emit, self.controls = command, emit, controls
        self.ended = False  # a Finished, Stopped or Failed event came
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)  # the processes' last lines of other output

    def run(self) -> int:
        """Start the processes and follow them until they end; returns their exit code."""
        try:
            process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, bufsize=1)
        except OSError as exc:
            self.emit(Failed(message=f"Could not start the training processes: {exc}",
                             hint="Check that the app's Python environment is complete (./launch.sh installs it)."))
            return 1
        done = threading.Event()
        readers = [threading.Thread(target=self._read_output, args=(process.stderr,), daemon=True),
                   threading.Thread(target=self._forward_commands, args=(process, done), daemon=True)]
        for thread in readers:
            thread.start()
        for line in process.stdout:
            self._take(line)
        code = process.wait()
        done.set()
        for thread in readers:
            thread.join(timeout=5)
        if not self.ended:
            self.emit(Failed(
                message=f"The training processes ended (exit code {code}) before the run finished, stopped or "
                        "reported an error.",
                hint="Their last lines are under Error details; the terminal that runs the app shows all of them.",
                details="\n".join(self.tail)))
        return code

    def _take(self, line: str) -> None:
        event = parse_event(line.rstrip("\n"))
        if event is None:
            self._keep(line)
            return
        self.ended = self.ended or isinstance(event, Finished | Stopped | Failed)
        self.emit(event)

    def _keep(self, line: str) -> None:
        sys.stderr.write(line)  # the app's terminal shows what the processes print
        if line.strip():
            self.tail.append(line.rstrip("\n"))

    def _read_output(self, stream) -> None:
        for line in stream:
            self._keep(line)

    def _forward_commands(self, process: subprocess.Popen, done: threading.Event) -> None:
        """Pass the user's requests on as command lines, each once, until the processes end."""
        controls, paused, stopping = self.controls, False, False
        while not done.wait(FORWARD_POLL_S):
            commands = []
            if controls.stop_requested and not stopping:
                stopping = True
                commands.append("stop")
            elif controls.paused != paused and not stopping:
                paused = controls.paused
                commands.append("pause" if paused else "continue")
            if controls.take_sample_request():
                commands.append("sample")
            if controls.take_save_request():
                commands.append("save")
            for command in commands:
                try:
                    process.stdin.write(command_line(command))
                    process.stdin.flush()
                except (BrokenPipeError, ValueError, OSError):
                    return

