"""A run in processes of its own (the app's runs on several GPUs): two torchrun processes on the CPU (gloo)
followed through ``lora-gui train --events`` and driven through the runner's usual commands."""

from __future__ import annotations

import csv
import sys
import time

import pytest
from helpers import make_dataset, tiny_config

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


def wait_for(condition, runner, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        snap = runner.snapshot()
        assert time.monotonic() < deadline and (runner.is_active or condition()), f"{what}: {snap.state} {snap.log[-5:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_run_in_two_processes_is_driven_like_one_on_a_thread(tmp_path):
    from lora_gui.engine.runner import InOtherProcesses, TrainingRunner

    config = tiny_config("sd15", make_dataset(tmp_path / "images"), tmp_path / "out", "train.max_steps=100000",
                         "train.batch_size=1")
    runner = TrainingRunner()  # no CUDA here: its launcher is torchrun with gloo
    runner.start(config, processes=2)
    try:
        wait_for(lambda: runner.snapshot().step >= 2, runner, "two steps")
        with pytest.raises(InOtherProcesses, match="one GPU"):
            runner.submit(lambda family, components: None)
        runner.pause()
        wait_for(lambda: any(line.startswith("Paused at step") for line in runner.snapshot().log), runner, "pause")
        paused_at = runner.snapshot().step
        runner.sample_now()
        runner.save_now()
        wait_for(lambda: runner.snapshot().samples and runner.snapshot().checkpoints, runner, "sample and save")
        snap = runner.snapshot()
        assert snap.state == "paused" and snap.step == paused_at  # no step while paused
        assert snap.samples[-1].step == paused_at and snap.checkpoints[-1].endswith(f"step-{paused_at:06d}")
        runner.resume()
        wait_for(lambda: runner.snapshot().step > paused_at + 1, runner, "steps after continue")
    finally:
        runner.stop()
        runner.wait(WAIT_S)
    snap = runner.snapshot()
    assert snap.state == "stopped" and snap.error is None, snap.log[-5:]
    assert snap.checkpoints[-1].endswith(f"step-{snap.step:06d}") and len(snap.checkpoints) == 2
    with (tmp_path / "out" / "metrics.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(1, snap.step + 1))  # one line per step: one process writes
    assert [loss[0] for loss in snap.losses] == steps  # the plots got every step
    assert "Processes" not in " ".join(snap.log)


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
