"""The `lora-gui` CLI end to end: train with a progress bar, SIGTERM saves a checkpoint, sample renders a grid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import make_dataset
from PIL import Image

pytestmark = pytest.mark.slow


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lora_gui", *args]


def common(dataset, output) -> list[str]:
    return ["--preset", "sd15-cpu-demo", "--set", f"dataset.dir={dataset}", "--set", f"output.dir={output}",
            "--set", "output.name=cli-lora", "--set", "sample.every=0", "--set", "sample.steps=2"]


def test_train_then_sample_grid(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    config = tmp_path / "my.toml"
    assert subprocess.run(cli("init-config", str(config), *common(dataset, output)[:2],
                              "--set", f"dataset.dir={dataset}", "--set", f"output.dir={output}",
                              "--set", "output.name=cli-lora", "--set", "sample.steps=2",
                              "--set", "train.max_steps=4", "--set", "sample.every=0"),
                          capture_output=True, text=True, timeout=120).returncode == 0

    result = subprocess.run(cli("train", str(config)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4/4" in result.stderr  # the progress bar reached the end
    assert "requires torchvision" not in result.stderr and "kernels-community" not in result.stderr
    lora = output / "cli-lora.safetensors"
    assert lora.is_file() and (output / "cli-lora.diffusers.safetensors").is_file()

    grid = tmp_path / "grid.png"
    result = subprocess.run(
        cli("sample", "--config", str(config), "--lora", str(lora), "--scale", "0", "--scale", "1",
            "--prompt", "sks, a red square", "--out", str(grid)),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(grid)
    assert image.width > 2 * 64 and image.height > 64  # two scale columns plus the label margin

    missing = subprocess.run(cli("sample", "--config", str(config), "--lora", str(tmp_path / "nope.safetensors")),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_sigterm_saves_a_resumable_checkpoint_and_resume_finishes(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    args = [*common(dataset, output), "--set", "train.max_steps=100000", "--set", "output.save_every=0"]
    process = subprocess.Popen(cli("train", *args), stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    seen = ""
    while time.monotonic() < deadline and "Training" not in seen:
        seen += process.stderr.readline()
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)  # a second request is harmless
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 3, stderr
    assert "--resume latest" in stderr
    checkpoints = sorted((output / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "COMPLETE").is_file()
    stopped_step = int(checkpoints[-1].name.split("-")[1])

    resumed = subprocess.run(
        cli("train", *common(dataset, output), "--set", f"train.max_steps={stopped_step + 2}", "--resume", "latest"),
        capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resumed from {checkpoints[-1]}" in resumed.stderr
    rows = (output / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, stopped_step + 3))
