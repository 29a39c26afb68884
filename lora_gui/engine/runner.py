"""Runs ``train`` on a background thread and keeps what a UI needs to show about it.

The runner owns the thread, the controls and a record of events; UIs poll ``snapshot()``.
It holds no module-level state, so several runners can live in one process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_gui.config import TrainingConfig
from lora_gui.engine.checkpoint import checkpoint_step
from lora_gui.engine.run_history import earlier_losses, earlier_samples
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

LOG_LIMIT = 2000


class RunAlreadyActive(RuntimeError):
    pass


@dataclass
class RunSnapshot:
    state: str = "idle"  # idle, running, paused, stopping, finished, stopped, failed
    step: int = 0
    max_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    sec_per_step: float | None = None
    eta_seconds: float | None = None
    status: str = ""
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # step, loss, lr
    samples: list[SamplesReady] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    result_path: str | None = None
    error: Failed | None = None
    processes: int = 1  # more than 1: the run trains in processes of its own, one per GPU


class TrainingRunner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._controls = Controls()
        self._snapshot = RunSnapshot()
        self.output_dir: Path | None = None
        # The app confines a run's dataset scan (links out of it are left out): the folder for a dataset folder.
        self.confine_to: Callable[[Path], Path] | None = None
        self._changes = 0  # counts events recorded; see version()
        self._versioned: RunSnapshot | None = None
        # The command starting N processes of ``-m lora_gui`` (a run on several GPUs); see cli_gpus.
        self.launcher: Callable[[int], list[str]] = default_launcher

    # ------------------------------------------------------------------ commands
    def start(self, config: TrainingConfig, resume_from: str | Path | None = None, overwrite: bool = False,
              on_end: Callable[[RunSnapshot], None] | None = None, processes: int = 1) -> None:
        """Train on the background thread; ``on_end`` gets the final snapshot on that thread when the run ends
        (finished, stopped or failed). With ``processes`` > 1 the thread follows a run in that many processes of
        its own (one per GPU), which the same commands drive."""
        with self._lock:
            if self.is_active:
                raise RunAlreadyActive("A training run is already in progress; stop it before starting another.")
            self._controls = Controls()
            step = checkpoint_step(Path(resume_from)) if resume_from is not None else None
            self._snapshot = RunSnapshot(state="running", max_steps=config.train.max_steps, step=step or 0,
                                         status=f"Resuming from step {step}" if step else "Starting",
                                         processes=max(1, processes))
            if step:  # the plots and the gallery show the whole run, the part before the checkpoint too
                prompts = tuple(prompt for prompt in config.sample.prompts if prompt.strip())
                self._snapshot.losses = earlier_losses(Path(config.output.dir), step)
                self._snapshot.samples = earlier_samples(Path(config.output.dir), step, prompts)
            self.output_dir = Path(config.output.dir)
            self._thread = threading.Thread(
                target=self._run, args=(config, resume_from, overwrite, on_end), name="lora-gui-training", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self.is_active:
                self._snapshot.state = "stopping"
        self._controls.stop()

    def pause(self) -> None:
        self._controls.pause()
        with self._lock:
            if self._snapshot.state == "running":
                self._snapshot.state = "paused"

    def resume(self) -> None:
        self._controls.resume()
        with self._lock:
            if self._snapshot.state == "paused":
                self._snapshot.state = "running"

    def sample_now(self) -> None:
        self._controls.sample_now()

    def save_now(self) -> None:
        self._controls.save_now()

    def submit(self, job):
        """Run ``job(family, components)`` on the training thread (at a step boundary or while paused)."""
        if not self.is_active:
            raise RuntimeError("No training run is active, so there is no model in memory to use.")
        if self._snapshot.processes > 1:
            raise InOtherProcesses(IN_OTHER_PROCESSES)
        return self._controls.submit(job)

    def wait(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.is_active

    # ------------------------------------------------------------------ queries
    @property
    def is_active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def version(self) -> tuple[int, str, bool]:
        """A token that differs whenever ``snapshot()`` would return something different; cheap (no copy).

        Pollers compare it with the token of what they last rendered and skip the work when it is
        equal, so many clients polling cost one render per change rather than one per poll.
        """
        with self._lock:
            if self._snapshot is not self._versioned:  # a new run replaced the snapshot
                self._versioned = self._snapshot
                self._changes += 1
            return self._changes, self._snapshot.state, self.is_active

    def snapshot(self) -> RunSnapshot:
        with self._lock:
            snap = self._snapshot
            return RunSnapshot(
                **{**snap.__dict__, "losses": list(snap.losses), "samples": list(snap.samples),
                   "checkpoints": list(snap.checkpoints), "log": list(snap.log)}
            )

    # ------------------------------------------------------------------ the thread
    def _run(self, config: TrainingConfig, resume_from, overwrite: bool, on_end) -> None:
        from contextlib import nullcontext

        from lora_gui.data.scan import confined_to
        from lora_gui.engine.train import train

        try:
            confine = None if self.confine_to is None else self.confine_to(Path(config.dataset.dir))
            if self._snapshot.processes > 1:
                self._run_in_processes(config, resume_from, overwrite, confine)
            else:
                with confined_to(confine) if confine is not None else nullcontext():
                    train(config, self._record, self._controls, resume_from=resume_from, overwrite=overwrite)
        except Exception:  # already reported through a Failed event
            pass
        finally:
            with self._lock:
                if self._snapshot.state in ("running", "paused", "stopping"):
                    self._snapshot.state = "failed" if self._snapshot.error else "stopped"
            if on_end is not None:
                on_end(self.snapshot())

    def _run_in_processes(self, config: TrainingConfig, resume_from, overwrite: bool, confine: Path | None) -> None:
        import tempfile

        from lora_gui.config import save_config
        from lora_gui.engine.process_run import ProcessRun, train_command

        processes = self._snapshot.processes
        self._record(Status(text=f"Starting {processes} training processes, one per GPU"))
        with tempfile.TemporaryDirectory(prefix="lora-gui-run-") as folder:
            config_file = Path(folder) / "config.toml"
            save_config(config, config_file)
            command = train_command(self.launcher(processes), config_file, resume_from, overwrite, confine)
            ProcessRun(command, self._record, self._controls).run()

    def _record(self, event: Event) -> None:
        with self._lock:
            _apply(self._snapshot, event)
            self._changes += 1


class InOtherProcesses(RuntimeError):
    """The run's model is in processes of its own: nothing can run on it from the app."""


IN_OTHER_PROCESSES = ("This run trains on several GPUs, in processes of their own: its weights in memory can be "
                      "tested only in a run on one GPU. Press Save now and test that checkpoint once the run has "
                      "ended or stopped.")


def default_launcher(processes: int) -> list[str]:
    from lora_gui.cli_gpus import cuda_gpus, launcher_command

    return launcher_command(processes, cuda=cuda_gpus() > 0)


def _apply(snap: RunSnapshot, event: Event) -> None:
    if isinstance(event, Progress):
        snap.step, snap.max_steps, snap.epoch = event.step, event.max_steps, event.epoch
        snap.loss, snap.lr = event.loss, event.lr
        snap.sec_per_step, snap.eta_seconds = event.sec_per_step, event.eta_seconds
        snap.losses.append((event.step, event.loss, event.lr))
        return
    if isinstance(event, Status):
        snap.status = event.text
        if event.total is None or event.current in (1, event.total):  # counters log their ends only
            _log(snap, event.text)
    elif isinstance(event, SamplesReady):
        snap.samples.append(event)
    elif isinstance(event, CheckpointSaved):
        snap.checkpoints.append(event.path)
    elif isinstance(event, Finished):
        snap.state, snap.result_path, snap.step = "finished", event.lora_path, event.step
        _log(snap, f"Finished at step {event.step}: {event.lora_path}")
    elif isinstance(event, Stopped):
        snap.state, snap.step = "stopped", event.step
    elif isinstance(event, Failed):
        snap.state, snap.error = "failed", event
        _log(snap, f"Error: {event.message}" + (f" What to do: {event.hint}" if event.hint else ""))


def _log(snap: RunSnapshot, line: str) -> None:
    if snap.log and snap.log[-1] == line:
        return
    snap.log.append(line)
    del snap.log[:-LOG_LIMIT]
