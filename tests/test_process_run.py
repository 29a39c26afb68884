"""A run in processes of its own (the app's runs on several GPUs): the event and command lines of
``lora-gui train --events``, and what the runner says when the processes fail. A run driven through them from
the Train tab: tests/test_ui_gpus.py."""

from __future__ import annotations

import sys

import pytest
from helpers import tiny_config

from lora_gui.event_lines import apply_command, command_line, event_line, parse_event
from lora_gui.events import (
    CheckpointSaved,
    Controls,
    Failed,
    Finished,
    Progress,
    SamplesReady,
    Status,
    Stopped,
)

WAIT_S = 300


def test_every_event_goes_through_a_line_and_back():
    events = [Status(text="Caching latents 3/20", current=3, total=20),
              Progress(step=4, max_steps=10, epoch=1, loss=0.25, lr=1e-4, sec_per_step=0.5, eta_seconds=3.0),
              SamplesReady(step=4, paths=("a.png", "b.png"), prompts=("one", "two")),
              CheckpointSaved(step=4, path="/out/checkpoints/step-000004"),
              Finished(step=10, lora_path="x.safetensors", diffusers_path="x.diffusers.safetensors"),
              Stopped(step=5, checkpoint=None), Failed(message="no images", hint="add some", details="trace")]
    for event in events:
        assert parse_event(event_line(event)) == event
    for other in ("Loading weights: 100%", '{"event": "Nonsense"}', '{"event": "Progress", "step": 1}', "{",
                  '{"event": "Status", "text": "x", "extra": 1}'[:20]):
        assert parse_event(other) is None


def test_commands_reach_the_controls_and_unknown_ones_are_ignored():
    controls = Controls()
    for line in (command_line("pause"), command_line("sample"), "not json\n", '{"command": "rm -rf"}\n', "[]\n"):
        apply_command(controls, line)
    assert controls.paused and controls.take_sample_request() and not controls.stop_requested
    apply_command(controls, command_line("continue"))
    apply_command(controls, command_line("stop"))
    assert not controls.paused and controls.stop_requested
    with pytest.raises(ValueError):
        command_line("format")


def test_a_run_that_fails_in_its_processes_says_why(tmp_path):
    from lora_gui.engine.runner import TrainingRunner

    empty = tmp_path / "empty"
    empty.mkdir()
    runner = TrainingRunner()
    runner.start(tiny_config("sd15", empty, tmp_path / "out"), processes=2)
    runner.wait(WAIT_S)
    snap = runner.snapshot()
    assert snap.state == "failed" and "image" in snap.error.message, snap.error  # the engine's own message

    crashing = TrainingRunner()  # processes that die without a word of JSON (a crash, the out-of-memory killer)
    crashing.launcher = lambda processes: [sys.executable, "-c", "import sys; print('CUDA error: boom'); sys.exit(7)"]
    crashing.start(tiny_config("sd15", empty, tmp_path / "out2"), processes=2)
    crashing.wait(WAIT_S)
    snap = crashing.snapshot()
    assert snap.state == "failed" and "exit code 7" in snap.error.message and "CUDA error: boom" in snap.error.details
