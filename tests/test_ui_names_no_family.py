"""The app is family-agnostic: a new family is a family file, a registry line and presets, with no UI edits."""

from __future__ import annotations

import re
from pathlib import Path

from lora_gui.engine.families.registry import family_class, family_names

UI = Path(__file__).resolve().parent.parent / "lora_gui" / "ui"


def test_no_ui_file_names_a_family():
    words = set()
    for name in family_names():
        family = family_class(name)
        words |= {name, family.label, family.pipeline_class_name, *family.hub_models}
    words |= {"SD1.5", "SDXL", "Flux"}  # how people write them
    found = []
    for path in sorted(UI.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for word in words:
            for match in re.finditer(rf"(?<![\w.-]){re.escape(word)}(?![\w-])", text, re.IGNORECASE):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(UI.parent.parent)}:{line}: {word}")
    assert not found, "family names in the UI:\n" + "\n".join(found)
