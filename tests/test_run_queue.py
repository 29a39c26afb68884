"""The run queue: real tiny training runs one after another, a failed one not stopping it, Stop holding it, the
queue file surviving a restart of the app, and every command refusing what it cannot do."""

from __future__ import annotations

import json
import time

import pytest
from helpers import make_dataset, tiny_config

from lora_gui.ui import queue_view
from lora_gui.ui.run_queue import QUEUE_FILE, RunQueue
from lora_gui.ui.run_start import StartRefused
from lora_gui.ui.session import AppSession
from lora_gui.ui.workspace import Workspace

WAIT_S = 240


def queued_config(workspace, name: str, dataset: str = "datasets/shapes", steps: int = 2):
    config = tiny_config("sd15", workspace.datasets / "shapes", workspace.outputs / name, f"train.max_steps={steps}",
                         f"output.name={name}")
    config.dataset.dir, config.output.dir = dataset, f"outputs/{name}"
    return config


@pytest.fixture
def session(tmp_path):
    workspace = Workspace.create(tmp_path / "ws")
    make_dataset(workspace.datasets / "shapes")
    (workspace.datasets / "empty").mkdir()
    app = AppSession(workspace=workspace)
    yield app
    app.run_queue.close()
    app.runner.stop()
    app.runner.wait(60)


def wait_until_ended(session) -> list:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        rows = session.run_queue.rows()
        if rows and all(row.state not in ("waiting", "running") for row in rows) and not session.runner.is_active:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"the queue did not finish: {session.run_queue.rows()}")


def test_queued_runs_train_one_after_another_and_a_failed_run_does_not_stop_the_queue(session):
    workspace = session.workspace
    first = queue_view.add_to_queue(session, queued_config(workspace, "no-images", dataset="datasets/empty"))
    assert first.startswith("Added to the queue")
    second = queue_view.add_to_queue(session, queued_config(workspace, "second"))
    assert "waiting" in second or "starts now" in second
    rows = wait_until_ended(session)
    assert [(row.label.split(" ")[0], row.state) for row in rows] == [("no-images", "failed"), ("second", "finished")]
    assert "failed at step 0" in rows[0].detail and "finished at step 2" in rows[1].detail
    assert (workspace.outputs / "second" / "second.safetensors").is_file()
    assert not (workspace.outputs / "no-images" / "no-images.safetensors").exists()
    saved = json.loads((workspace.state / QUEUE_FILE).read_text())
    assert [entry["state"] for entry in saved["entries"]] == ["failed", "finished"]
    assert session.train_started_config.output.name == "second"  # the Train tab's error panel reads it
    panel = queue_view.panel(session.run_queue)
    assert panel.rows[1][1] == "✓ finished" and panel.has_done and panel.status == "Nothing waiting."
    assert queue_view.clear_done(session).startswith("Cleared 2") and session.run_queue.rows() == []


def test_stopping_a_queued_run_holds_the_queue_until_it_is_started_again(session):
    workspace = session.workspace
    queue_view.add_to_queue(session, queued_config(workspace, "long", steps=400))
    queue_view.add_to_queue(session, queued_config(workspace, "next"))
    deadline = time.monotonic() + WAIT_S
    while session.runner.snapshot().step < 1:
        assert time.monotonic() < deadline, "the first queued run did not start"
        time.sleep(0.1)
    session.runner.stop()
    session.runner.wait(WAIT_S)
    deadline = time.monotonic() + 10
    while session.run_queue.rows()[0].state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # longer than the worker's poll: it must not start the next run
    rows = session.run_queue.rows()
    assert [row.state for row in rows] == ["stopped", "waiting"] and not session.runner.is_active
    assert session.run_queue.held and "stopped" in queue_view.panel(session.run_queue).status
    assert "starting now" in queue_view.start_queue(session)
    rows = wait_until_ended(session)
    assert [row.state for row in rows] == ["stopped", "finished"]


def test_the_queue_is_kept_in_the_workspace_and_held_after_a_restart(session):
    workspace = session.workspace
    queue = session.run_queue
    queue_view.hold_queue(session)
    for name in ("a", "b", "c"):
        queue_view.add_to_queue(session, queued_config(workspace, name))
    ids = [row.id for row in queue.rows()]
    assert queue_view.move(session, ids[2], -1) == "Moved up."
    with pytest.raises(StartRefused, match="already first"):
        queue_view.move(session, ids[0], -1)
    queue_view.remove(session, ids[0])
    assert [row.label.split(" ")[0] for row in queue.rows()] == ["c", "b"]
    assert not session.runner.is_active  # held: nothing started
    data = json.loads((workspace.state / QUEUE_FILE).read_text())
    data["entries"][1]["state"] = "running"  # as if the app ended while "b" trained
    (workspace.state / QUEUE_FILE).write_text(json.dumps(data))
    restarted = RunQueue(workspace.state / QUEUE_FILE, session.runner, session.prepare_queued_run)
    rows = restarted.rows()
    assert [(row.label.split(" ")[0], row.state) for row in rows] == [("c", "waiting"), ("b", "interrupted")]
    assert "resume it from the Train tab" in rows[1].detail
    assert restarted.held and restarted.hold_reason == "the app was restarted"
    (workspace.state / QUEUE_FILE).write_text("{not json")
    emptied = RunQueue(workspace.state / QUEUE_FILE, session.runner, session.prepare_queued_run)
    assert emptied.rows() == [] and list(workspace.state.glob(f"{QUEUE_FILE}.unreadable-*"))


def test_queue_refusals_say_what_to_do(session):
    workspace = session.workspace
    queue_view.hold_queue(session)
    queue_view.add_to_queue(session, queued_config(workspace, "taken"))
    with pytest.raises(StartRefused, match="already trains into `outputs/taken`"):
        queue_view.add_to_queue(session, queued_config(workspace, "taken"))
    finished = workspace.outputs / "done"
    finished.mkdir()
    (finished / "done.safetensors").write_bytes(b"x")
    with pytest.raises(StartRefused, match="never deletes an earlier one"):
        queue_view.add_to_queue(session, queued_config(workspace, "done"))
    with pytest.raises(StartRefused, match="not a folder"):
        queue_view.add_to_queue(session, queued_config(workspace, "x", dataset="datasets/missing"))
    with pytest.raises(StartRefused, match="outside the workspace"):
        queue_view.add_to_queue(session, queued_config(workspace, "y", dataset="/etc"))
    for hostile in (None, "", 7, ["a"], "no-such-id"):
        with pytest.raises(StartRefused):
            queue_view.remove(session, hostile)
    entry = session.run_queue.rows()[0]
    queue_view.remove(session, entry.id)
    assert "nothing is waiting now" in queue_view.start_queue(session) and not session.run_queue.held
