"""The background runner and its controls, on the built-in tiny SD1.5 model."""

from __future__ import annotations

import time

import pytest
from helpers import make_dataset, tiny_config

from lora_gui.engine.runner import RunAlreadyActive, TrainingRunner


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


@pytest.mark.slow
def test_pause_sample_save_resume_and_stop(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    config = tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=100000")
    runner = TrainingRunner()
    runner.start(config)
    with pytest.raises(RunAlreadyActive):
        runner.start(config)

    wait_for(lambda: runner.snapshot().step >= 2)
    runner.pause()
    paused_at = wait_for(lambda: runner.snapshot().status.startswith("Paused") and runner.snapshot().step)
    runner.sample_now()
    runner.save_now()
    snap = wait_for(lambda: (s := runner.snapshot()).samples and s.checkpoints and s)
    assert snap.state == "paused" and snap.step == paused_at  # no training while paused
    assert snap.samples[-1].step == paused_at
    assert snap.checkpoints[-1].endswith(f"step-{paused_at:06d}")

    runner.resume()
    wait_for(lambda: runner.snapshot().step >= paused_at + 2)
    runner.stop()
    assert runner.wait(timeout=120)
    final = runner.snapshot()
    assert final.state == "stopped"
    assert final.checkpoints[-1].endswith(f"step-{final.step:06d}")
    assert [s for s, _, _ in final.losses] == list(range(1, final.step + 1))
    assert any("Stopped" in line for line in final.log)

    runner.start(tiny_config("sd15", dataset, tmp_path / "out2", "train.max_steps=2"))  # a new run may start
    assert runner.wait(timeout=120)
    assert runner.snapshot().state == "finished"


def test_failed_run_reports_message_and_allows_a_new_start(tmp_path):
    runner = TrainingRunner()
    runner.start(tiny_config("sd15", tmp_path / "missing", tmp_path / "out"))
    assert runner.wait(timeout=60)
    snap = runner.snapshot()
    assert snap.state == "failed"
    assert "missing" in snap.error.message
    assert any(line.startswith("Error:") for line in snap.log)


def test_two_runners_do_not_share_state():
    first, second = TrainingRunner(), TrainingRunner()
    first.pause()
    assert second.snapshot().state == "idle"
    assert first._controls is not second._controls


@pytest.mark.slow
def test_jobs_run_on_the_training_thread_with_the_model_in_memory(tmp_path):
    import threading

    dataset = make_dataset(tmp_path / "images")
    runner = TrainingRunner()
    runner.start(tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=100000"))
    wait_for(lambda: runner.snapshot().step >= 1)
    runner.pause()
    wait_for(lambda: runner.snapshot().status.startswith("Paused"))
    step = runner.snapshot().step
    future = runner.submit(lambda family, components: (threading.current_thread().name, family.name,
                                                       type(components.denoiser).__name__))
    assert future.result(timeout=60) == ("lora-gui-training", "sd15", "UNet2DConditionModel")
    failing = runner.submit(lambda family, components: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=60)
    assert runner.snapshot().step == step and runner.snapshot().state == "paused"  # still paused, still alive
    runner.stop()
    assert runner.wait(timeout=120)
    with pytest.raises(RuntimeError, match="No training run"):
        runner.submit(lambda family, components: None)


def test_a_resume_shows_its_step_at_once_and_sampling_does_not_linger(tmp_path):
    from lora_gui.engine.checkpoint import list_checkpoints
    from lora_gui.engine.train import train

    dataset = make_dataset(tmp_path / "images")
    first = tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=2", "output.save_every=1", "sample.every=1")
    train(first)
    checkpoint = list_checkpoints(tmp_path / "out")[0]
    runner = TrainingRunner()
    resumed = tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=3", "sample.every=1")
    runner.start(resumed, resume_from=checkpoint)
    started = runner.snapshot()
    assert started.step == 1 and started.status == "Resuming from step 1"  # not "step 0 / 3" while it loads
    assert [step for step, _, _ in started.losses] == [1]  # the plot starts with the run's first part
    assert [event.step for event in started.samples] == [1]  # so does the gallery (step 2 was abandoned)
    assert started.samples[0].prompts == ("sks, a red square",)
    wait_for(lambda: not runner.is_active)
    finished = runner.snapshot()
    assert finished.state == "finished" and [step for step, _, _ in finished.losses] == [1, 2, 3]
    assert any("Validation images of step 2 saved" in line for line in finished.log)
