"""Nothing lost, nothing mixed: stop in every phase, one run per output folder, refused resumes, CLI reuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import make_dataset, tiny_config

from lora_gui.engine.checkpoint import list_checkpoints
from lora_gui.engine.errors import TrainingError
from lora_gui.engine.outputs import OutputFolderBusy, hold_output_folder
from lora_gui.engine.train import train
from lora_gui.events import Controls, Status

pytestmark = pytest.mark.slow


def stop_when(controls: Controls, marker: str, seen: list[str]):
    """An event handler that asks for a stop at the first status line starting with ``marker``."""

    def emit(event) -> None:
        if isinstance(event, Status):
            seen.append(event.text)
            if event.text.startswith(marker):
                controls.stop()

    return emit


@pytest.mark.parametrize(("marker", "unfinished"), [
    ("Checking dataset images", "Checking dataset images 6/6"),
    ("Caching latents", "Caching latents 6/6"),
    ("Caching text embeddings", "Caching text embeddings 6/6"),
])
def test_stop_during_set_up_ends_between_units_of_work(tmp_path, marker, unfinished):
    dataset = make_dataset(tmp_path / "images")
    config = tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=100000")
    controls, seen = Controls(), []
    result = train(config, stop_when(controls, marker, seen), controls)
    assert result.status == "stopped" and result.step == 0 and result.checkpoint is None
    assert any(text.startswith(marker) for text in seen)
    assert unfinished not in seen, "the stop waited for the whole phase"
    assert not any(text.startswith("Training") for text in seen)
    assert seen[-1].startswith("Stopped before training started")


def test_stop_while_sampling_saves_a_checkpoint_without_the_images(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    config = tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=100000", "sample.every=1",
                         "sample.steps=50")
    controls, seen = Controls(), []
    result = train(config, stop_when(controls, "Rendering", seen), controls)
    assert result.status == "stopped" and result.step == 1
    assert result.checkpoint and result.checkpoint.endswith("step-000001")
    assert not (tmp_path / "out" / "samples" / "step-000001").exists()


def test_one_live_run_per_output_folder(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    held = hold_output_folder(output)
    try:
        with pytest.raises(OutputFolderBusy, match=f"Another training run is writing into {output}"):
            train(tiny_config("sd15", dataset, output, "train.max_steps=2"))
    finally:
        held.release()
    assert train(tiny_config("sd15", dataset, output, "train.max_steps=2")).status == "finished"


def test_a_second_run_from_step_0_needs_overwrite(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    train(tiny_config("sd15", dataset, output, "train.max_steps=3", "output.save_every=1",
                      "output.keep_last=5"))
    lora = output / "my-lora.safetensors"
    before = lora.read_bytes() if lora.exists() else None
    with pytest.raises(TrainingError, match="a new run would mix with it"):
        train(tiny_config("sd15", dataset, output, "train.max_steps=2"))
    assert [p.name for p in list_checkpoints(output)] == ["step-000001", "step-000002", "step-000003"]
    if before is not None:
        assert lora.read_bytes() == before
    train(tiny_config("sd15", dataset, output, "train.max_steps=2"), overwrite=True)
    assert [p.name for p in list_checkpoints(output)] == ["step-000002"]


@pytest.mark.parametrize(("setting", "message"), [
    ("train.optimizer=lion", 'train.optimizer is "lion" but the checkpoint was trained with optimizer "adamw"'),
    ("lora.init=pissa", 'lora.init is "pissa" but the checkpoint was trained with init "default"'),
])
def test_resume_refuses_another_optimizer_or_init(tmp_path, setting, message):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    train(tiny_config("sd15", dataset, output, "train.max_steps=2", "train.optimizer=adamw"))
    checkpoint = list_checkpoints(output)[-1]
    with pytest.raises(TrainingError, match=message):
        train(tiny_config("sd15", dataset, output, "train.max_steps=4", "train.optimizer=adamw", setting),
              resume_from=checkpoint)


# ----------------------------------------------------------------------------- the CLI


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lora_gui", *args]


def cli_args(dataset, output, *extra: str) -> list[str]:
    return ["--preset", "sd15-cpu-demo", "--set", f"dataset.dir={dataset}", "--set", f"output.dir={output}",
            "--set", "sample.every=0", *extra]


def test_cli_refuses_a_reused_output_folder_and_a_concurrent_run(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    first = subprocess.run(cli("train", *cli_args(dataset, output, "--set", "train.max_steps=2")),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cli("train", *cli_args(dataset, output, "--set", "train.max_steps=2")),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "--resume latest" in again.stderr
    assert "Traceback" not in again.stderr

    long_run = subprocess.Popen(
        cli("train", *cli_args(dataset, output, "--set", "train.max_steps=100000", "--set", "output.save_every=0"),
            "--overwrite"), stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        seen, deadline = "", time.monotonic() + 180
        while time.monotonic() < deadline and "Training" not in seen:
            seen += long_run.stderr.readline()
        twin = subprocess.run(cli("train", *cli_args(dataset, output, "--set", "train.max_steps=2"), "--overwrite"),
                              capture_output=True, text=True, timeout=300)
        assert twin.returncode == 1 and "Another training run is writing into" in twin.stderr, twin.stderr
        assert long_run.poll() is None
    finally:
        long_run.send_signal(signal.SIGTERM)
        long_run.communicate(timeout=180)
    assert long_run.returncode == 3


def test_cli_second_ctrl_c_before_training_quits_at_once(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    process = subprocess.Popen(cli("train", *cli_args(dataset, tmp_path / "out", "--set", "train.max_steps=5")),
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen, deadline = "", time.monotonic() + 180
    while time.monotonic() < deadline and "Checking" not in seen:
        seen += process.stderr.readline()
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 3, stderr
    assert "Stopped before training started" in stderr and "Traceback" not in stderr
    assert not list_checkpoints(tmp_path / "out")


def test_cli_sample_with_a_truncated_lora_explains(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    config = tmp_path / "c.toml"
    assert subprocess.run(cli("init-config", str(config), *cli_args(dataset, output)), timeout=120).returncode == 0
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    result = subprocess.run(cli("sample", "--config", str(config), "--lora", str(broken)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr
    assert "broken.safetensors" in result.stderr and "safetensors" in result.stderr.lower()
