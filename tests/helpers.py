"""Shared test helpers: a small real dataset on disk and configs for the built-in tiny models."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from lora_gui.config import TrainingConfig, build_config

CAPTIONS = [
    "sks, a red square on white",
    "sks, a blue circle",
    "sks, green stripes",
    "sks, a yellow triangle",
    "sks, a purple cross",
    "sks, orange dots",
]
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (64, 64)]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


def make_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (caption, size, color) in enumerate(zip(CAPTIONS, SIZES, COLORS, strict=True)):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        width, height = size
        draw.rectangle([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=color)
        draw.line([0, 0, width, height], fill="black", width=3)
        image.save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def tiny_config(family: str, dataset: Path, output: Path, *overrides: str) -> TrainingConfig:
    return build_config(
        preset=f"{family}-cpu-demo" if family != "flux-schnell" else "flux-cpu-demo",
        overrides=[
            f"dataset.dir={dataset}",
            f"output.dir={output}",
            "output.name=test-lora",
            "train.max_steps=10",
            "output.save_every=0",
            "sample.every=0",
            "sample.steps=2",
            'sample.prompts=["sks, a red square"]',
            *overrides,
        ],
    )


def stop_resume_and_straight_loras(family: str, tmp_path: Path, *overrides: str):
    """The LoRA tensors of a 4-step run, and of one stopped at step 2 then resumed (expected equal)."""
    from safetensors.torch import load_file

    from lora_gui.engine.train import train
    from lora_gui.events import Controls, Progress

    dataset = make_dataset(tmp_path / "images")
    overrides = ("train.max_steps=4", "sample.every=0", "output.save_every=0", *overrides)
    straight = train(tiny_config(family, dataset, tmp_path / "straight", *overrides))
    controls = Controls()
    stopped = train(tiny_config(family, dataset, tmp_path / "split", *overrides),
                    lambda event: controls.stop() if isinstance(event, Progress) and event.step == 2 else None,
                    controls)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = train(tiny_config(family, dataset, tmp_path / "split", *overrides), resume_from=stopped.checkpoint)
    return load_file(straight.lora_path), load_file(resumed.lora_path), straight.lora_path


def cli_train_from_a_copied_builtin(family: str, tmp_path: Path):
    """``lora-gui train`` with model.family=auto on a local copy of ``builtin:tiny-<family>``."""
    import shutil
    import subprocess
    import sys

    from lora_gui.engine.families.builtin import ensure_builtin

    dataset = make_dataset(tmp_path / "images")
    folder = tmp_path / "base"
    shutil.copytree(ensure_builtin(f"builtin:tiny-{family}"), folder)
    return subprocess.run(
        [sys.executable, "-m", "lora_gui", "train", "--preset", f"{family}-cpu-demo", "--set", "model.family=auto",
         "--set", f"model.base={folder}", "--set", f"dataset.dir={dataset}", "--set", f"output.dir={tmp_path / 'out'}",
         "--set", "train.max_steps=2", "--set", "sample.every=0"],
        capture_output=True, text=True, timeout=300)
