"""The workspace's training runs as the run pickers list them: the live run first, then newest first, each
with what state it is in (live, paused, finished, stopped at a step, never checkpointed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_gui.engine.checkpoint import checkpoint_step, list_checkpoints
from lora_gui.ui.workspace import Workspace

LIVE_STATES = {"running": "live", "paused": "paused", "stopping": "stopping", "loading": "loading"}


@dataclass(frozen=True)
class RunEntry:
    folder: str  # workspace-relative, the value the pickers send
    status: str
    live: bool  # the app's active run

    @property
    def label(self) -> str:
        return f"{self.folder} · {self.status}"


def run_status(run_dir: Path, name: str | None) -> str:
    """A run that is not live, from its files: finished, stopped at its newest checkpoint, or neither."""
    checkpoints = list_checkpoints(run_dir)
    step = checkpoint_step(checkpoints[-1]) if checkpoints else None
    if name and (run_dir / f"{name}.safetensors").is_file():
        return f"finished at step {step}" if step is not None else "finished"
    if step is not None:
        return f"stopped at step {step}"
    return "no checkpoints"


def list_runs(workspace: Workspace, runner, snapshot=None) -> list[RunEntry]:
    """Every run folder under outputs/: the active run first, then the most recently changed. ``snapshot``:
    the runner's, when the caller has one (a copy costs a little); ``runner`` None: states from the files only
    (while the page is built; its load event lists them again)."""
    from lora_gui.ui.comparison import lora_name

    live = runner is not None and runner.is_active and runner.output_dir is not None
    active = Path(runner.output_dir).resolve() if live else None
    if active is not None and snapshot is None:
        snapshot = runner.snapshot()
    entries = []
    for folder in workspace.list_runs():
        path = workspace.root / folder
        if active is not None and path.resolve() == active:
            state = LIVE_STATES.get(snapshot.state, snapshot.state)
            status = f"{state} at step {snapshot.step}" if snapshot.step else state
            entries.append((True, float("inf"), RunEntry(folder, status, True)))
            continue
        entries.append((False, _changed(path), RunEntry(folder, run_status(path, lora_name(path)), False)))
    return [entry for _, _, entry in sorted(entries, key=lambda item: (item[0], item[1]), reverse=True)]


def _changed(path: Path) -> float:
    """When the run last wrote something it keeps (metrics, checkpoints, samples), else the folder's time."""
    times = [path.stat().st_mtime]
    for name in ("metrics.csv", "checkpoints", "samples", "config.toml"):
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            pass
    return max(times)


def choices(entries: list[RunEntry]) -> list[tuple[str, str]]:
    return [(entry.label, entry.folder) for entry in entries]
