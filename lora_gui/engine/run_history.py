"""What a resumed run already did, read from its folder: the losses in metrics.csv and the validation
images in samples/, up to the checkpoint it resumes from. The Train tab shows the whole run with them."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from lora_gui.events import SamplesReady

SAMPLE_FOLDER = re.compile(r"^step-(\d+)$")


def earlier_losses(output_dir: Path, up_to_step: int) -> list[tuple[int, float, float]]:
    """(step, loss, lr) of every metrics.csv row up to ``up_to_step``; unreadable rows are skipped."""
    rows = []
    try:
        with (Path(output_dir) / "metrics.csv").open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                try:
                    step, loss, lr = int(row["step"]), float(row["loss"]), float(row["lr"])
                except (KeyError, TypeError, ValueError):
                    continue
                if step <= up_to_step:
                    rows.append((step, loss, lr))
    except OSError:
        return []
    return rows


def earlier_samples(output_dir: Path, up_to_step: int, prompts: tuple[str, ...]) -> list[SamplesReady]:
    """The validation images of every step up to ``up_to_step``, oldest first, with the run's prompts."""
    found = []
    for folder in (Path(output_dir) / "samples").glob("step-*"):
        match = SAMPLE_FOLDER.match(folder.name)
        if not match or int(match.group(1)) > up_to_step or not folder.is_dir():
            continue
        paths = tuple(str(path) for path in sorted(folder.glob("[0-9][0-9].png")))
        if paths:
            found.append(SamplesReady(step=int(match.group(1)), paths=paths, prompts=prompts[:len(paths)]))
    return sorted(found, key=lambda event: event.step)
