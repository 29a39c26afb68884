"""The Captions tab's inline editor, free of Gradio: the table of captions, saving edits, the image preview.

Edits are saved only where the caption file has not changed on disk since the table was loaded. Images
whose file or caption is a link leading outside the dataset folder are left out (and named in the note);
no caption is ever read or written through such a link.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.captioning.files import caption_target, write_text_atomic
from lora_gui.data.images import ImageLoadError, load_rgb
from lora_gui.data.scan import IMAGE_EXTENSIONS, ImageFile, find_caption, find_image_files, read_caption
from lora_gui.ui.caption_common import EXTENSION, MAX_FIELD, CaptionsError, relative_name
from lora_gui.ui.dataset_view import md_code, outside_note
from lora_gui.ui.workspace import clip

EDITOR_HEADERS = ["File", "Caption"]
MAX_ROWS = 2000  # rows in the editor table
MAX_CAPTION = 10_000
PREVIEW_SIDE = 768
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def editor_rows(root: Path) -> tuple[list[list[str]], dict[str, str], str]:
    """(table rows [file, caption], the captions as loaded, a note) for the images in ``root``."""
    files = find_image_files(root, EXTENSION, confine=root)
    rows = [[relative_name(file.path, root), _read(file.caption_path, root)] for file in files[:MAX_ROWS]]
    note = f"{len(files)} image(s) in {md_code(root.name)}."
    if len(files) > MAX_ROWS:
        note += f" Showing the first {MAX_ROWS}; use the bulk edits below for the rest."
    elif not files:
        note = f"No images in {md_code(root.name)} yet: add some on the Dataset tab."
    left_out = outside_note(root, root, "the dataset folder")
    return rows, {row[0]: row[1] for row in rows}, f"{note} {left_out}" if left_out else note


def table_edits(rows: Any, loaded: dict[str, str]) -> dict[str, str]:
    """The rows whose caption differs from the one loaded: {file: new caption}."""
    return {name: text for name, text in check_rows(rows) if loaded.get(name) != text}


def check_rows(rows: Any) -> list[tuple[str, str]]:
    """The editor table as sent by the browser: (file, caption) pairs."""
    if not isinstance(rows, list) or len(rows) > MAX_ROWS:
        raise CaptionsError("The table could not be read; press Reload and edit again.")
    pairs = []
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != 2 or not isinstance(row[0], str):
            raise CaptionsError("The table could not be read; press Reload and edit again.")
        pairs.append((row[0], "" if row[1] is None else row[1]))
    return pairs


@dataclass
class SaveResult:
    saved: dict[str, str] = field(default_factory=dict)  # file: the text written
    conflicts: list[str] = field(default_factory=list)  # files changed on disk since they were loaded

    def message(self) -> str:
        parts = [f"✓ Saved {len(self.saved)} caption(s)." if self.saved else "No caption was saved."]
        if self.conflicts:
            names = ", ".join(md_code(name) for name in self.conflicts[:5])
            parts.append(f"⚠ {names} changed on disk since the table was loaded (captioning, a bulk edit or "
                         "another browser tab), so your edit was not saved. Reload shows the new text (and drops "
                         "your edit).")
        return " ".join(parts)


def save_edits(root: Path, edits: dict[str, str], loaded: dict[str, str]) -> SaveResult:
    """Write each edited caption atomically, unless its file changed on disk since it was loaded."""
    result, planned = SaveResult(), []
    for name, text in edits.items():
        if name not in (loaded or {}):
            raise CaptionsError(f"{clip(name)} is not in the table as loaded; press Reload, then edit again.")
        target = caption_file(root, name)
        if _read(target if target.is_file() else None, root) != loaded[name]:
            result.conflicts.append(name)
        else:
            planned.append((name, target, _caption_text(text, name)))
    for name, target, text in planned:
        write_text_atomic(target, text)
        result.saved[name] = text
    return result


def merge_saved(rows: Any, loaded: dict[str, str], result: SaveResult) -> tuple[list[list[str]], dict[str, str]]:
    """The table after a save: unsaved edits kept, saved captions as written and now counted as loaded."""
    rows = [[name, result.saved.get(name, text)] for name, text in check_rows(rows)]
    return rows, {**loaded, **result.saved}


def caption_file(root: Path, name: Any) -> Path:
    """The caption file of image ``name`` (relative to ``root``), after checking it is an image in there."""
    image = image_path(root, name)
    target = caption_target(ImageFile(image, find_caption(image, root, EXTENSION), 1), root, EXTENSION)
    if not target.resolve().is_relative_to(root.resolve()):
        raise CaptionsError(f"The caption file of {clip(name)} is outside the dataset folder (or a link that leads "
                            "there); it is left alone.")
    return target


def image_path(root: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or len(name) > MAX_FIELD or "\x00" in name:
        raise CaptionsError("Pick an image from the table.")
    path = root / name
    hidden = any(part.startswith(".") for part in Path(name).parts)
    if (Path(name).is_absolute() or hidden or path.suffix.lower() not in IMAGE_EXTENSIONS
            or not path.resolve().is_relative_to(root.resolve()) or not path.is_file()):
        raise CaptionsError(f"{clip(name)} is not an image in the dataset folder {root.name}; press Reload.")
    return path


def preview_image(root: Path, name: Any):
    """The image, upright and RGB, at most ``PREVIEW_SIDE`` pixels a side (None if it cannot be read)."""
    try:
        image = load_rgb(image_path(root, name))
    except ImageLoadError:
        return None
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return image


def _caption_text(text: Any, name: str) -> str:
    if not isinstance(text, str) or len(text) > MAX_CAPTION:
        raise CaptionsError(f"The caption of {clip(name)} must be text of at most {MAX_CAPTION} characters.")
    return _CONTROL.sub("", text.replace("\r\n", "\n")).strip()


def _read(path: Path | None, root: Path) -> str:
    if path is None or not path.resolve().is_relative_to(root.resolve()):
        return ""
    return read_caption(path)

