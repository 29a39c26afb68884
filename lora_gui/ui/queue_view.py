"""The Train tab's run queue: adding the Config tab's run, moving and removing runs, and what the panel shows.
Plain functions (session, values) -> message, so tests call them directly; no gradio here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_gui.engine.outputs import previous_run_problem
from lora_gui.ui.run_queue import DONE_STATES, describe
from lora_gui.ui.run_start import StartRefused, confine_paths
from lora_gui.ui.workspace import clip

TABLE_HEADERS = ["#", "State", "Run", "Detail"]
STATE_MARKS = {"waiting": "… waiting", "running": "▶ running", "finished": "✓ finished", "failed": "✗ failed",
               "stopped": "■ stopped", "interrupted": "⚠ interrupted"}


@dataclass(frozen=True)
class QueuePanel:
    rows: list[list]
    choices: list[tuple[str, str]]
    status: str
    held: bool
    has_done: bool
    counts: dict[str, int]  # runs per state


def add_to_queue(session, config, processes: int = 1) -> str:
    """Queue ``config`` (the Config tab's, already valid) to train on ``processes`` GPUs behind what is waiting;
    refused with what to do."""
    checked = confine_paths(session.workspace, config)
    output = Path(checked.output.dir).resolve()
    workspace, queue = session.workspace, session.run_queue
    shown = workspace.relative(output)
    if any(_same_folder(workspace, folder, output) for folder in queue.output_dirs()):
        raise StartRefused(f"A queued run already trains into `{shown}`; change output.dir (or Name) on the Config "
                           "tab so each run has its own folder.")
    runner = session.runner
    if runner.is_active and runner.output_dir is not None and Path(runner.output_dir).resolve() == output:
        raise StartRefused(f"The run training now writes into `{shown}`; change output.dir on the Config tab.")
    problem = previous_run_problem(output, checked.output.name)
    if problem:
        raise StartRefused(f"{problem}. A queued run never deletes an earlier one: change output.dir on the Config "
                           "tab (or Name, which it follows).")
    queue.add(config, describe(config, shown, processes), processes)
    position = queue.waiting()
    if queue.held:
        return (f"Added to the queue ({position} waiting). The queue is held ({queue.hold_reason}): press Start "
                "queue to run it.")
    if runner.is_active:
        return f"Added to the queue ({position} waiting): it starts when the current run ends."
    return "Added to the queue: it starts now, as nothing else is training."


def _same_folder(workspace, text: str, folder: Path) -> bool:
    try:
        return workspace.resolve(text) == folder
    except ValueError:  # a queued folder that no longer resolves in the workspace names no folder
        return False


def move(session, entry_id, offset: int) -> str:
    session.run_queue.move(_entry_id(entry_id), offset)
    return "Moved up." if offset < 0 else "Moved down."


def remove(session, entry_id) -> str:
    entry = session.run_queue.remove(_entry_id(entry_id))
    return f"Removed from the queue: {entry.label} (nothing on disk was deleted)."


def clear_done(session) -> str:
    count = session.run_queue.clear_done()
    return f"Cleared {count} ended run(s) from the list (their folders are kept)." if count else "Nothing to clear."


def start_queue(session) -> str:
    queue = session.run_queue
    waiting = queue.waiting()
    queue.release()
    if not waiting:
        return "The queue runs: each run you add starts when the one before it ends (nothing is waiting now)."
    if session.runner.is_active:
        return f"The queue runs again: {waiting} run(s) start one after another when the current run ends."
    return f"The queue runs again: {waiting} run(s), one after another, starting now."


def hold_queue(session) -> str:
    session.run_queue.hold("you held it")
    return ("The queue is held: a run training now goes on; queued runs wait until you press Start queue, so you can "
            "line them up and order them first.")


def _entry_id(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StartRefused("Pick a run in the queue first.")
    return value


def panel(queue) -> QueuePanel:
    rows = queue.rows()
    table = [[row.position, STATE_MARKS.get(row.state, row.state), row.label, clip(row.detail, 300)] for row in rows]
    choices = [(f"#{row.position} {row.label} ({row.state})", row.id) for row in rows]
    waiting = sum(row.state == "waiting" for row in rows)
    if not rows and not queue.held:
        status = "The queue is empty. Set up a run on the Config tab and press **Add to queue** to line it up."
    elif queue.held and waiting:
        status = f"**Held** ({queue.hold_reason}): {waiting} waiting. Press **Start queue** to run them."
    elif queue.held:
        status = f"**Held** ({queue.hold_reason}): runs you add wait until you press **Start queue**."
    elif waiting:
        status = f"{waiting} waiting: each starts when the run before it ends."
    else:
        status = "Nothing waiting."
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    return QueuePanel(table, choices, status, queue.held, any(row.state in DONE_STATES for row in rows), counts)
