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
