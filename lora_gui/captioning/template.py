"""Template captions without a model: ``"photo of {trigger}"``, or words from the file and folder names."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import TYPE_CHECKING

from lora_gui.captioning.base import Captioner, CaptionerError, Placement
from lora_gui.captioning.text import tidy_caption
from lora_gui.data.scan import folder_repeats
from lora_gui.events import Emit

if TYPE_CHECKING:
    from PIL import Image

PLACEHOLDERS = ("trigger", "filename", "folder")
# Camera and phone prefixes ("IMG_0042") carry no meaning.
_CAMERA_WORDS = frozenset({"img", "dsc", "dscf", "dscn", "pxl", "mvimg", "gopr", "dji", "pict", "cimg"})
_SEPARATORS = re.compile(r"[_\-.+~()\[\]{}]+")
_TRAILING_DIGITS = re.compile(r"^([^\W\d_]{2,})\d+$")
_REPEATS_PREFIX = re.compile(r"^\d+_")


class TemplateCaptioner(Captioner):
    name = "template"
    label = "Template: fixed text such as \"photo of {trigger}\", or words from file names (no model)"
    default_batch_size = 256
    needs_images = False
    needs_device = False

    def __init__(self, model: str | None = None, *, template: str = "photo of {trigger}", trigger: str = "",
                 cache_dir: str | None = None) -> None:
        if model:
            raise CaptionerError("The template captioner uses no model; give the text as its template instead "
                                 f"(placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}).")
        super().__init__(None, cache_dir)
        check_template(template)
        self.template = template
        self.trigger = trigger.strip()

    def _load(self, placement: Placement | None, progress: Emit) -> None:
        return None

    def _caption(self, images: list[Image.Image], paths: list[Path]) -> list[str]:
        return [self.render(path) for path in paths]

    def _release(self) -> None:
        return None

    def render(self, path: Path) -> str:
        values = {"trigger": self.trigger, "filename": filename_words(path), "folder": folder_words(path)}
        return tidy_caption(self.template.format(**values))


def check_template(template: str) -> None:
    allowed = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise CaptionerError(f"The caption template {template!r} is not valid ({exc}). Placeholders are {allowed}; "
                             "write {{ or }} for a literal brace.") from None
    unknown = sorted({field for field in fields if field not in PLACEHOLDERS})
    if unknown:
        raise CaptionerError(f"The caption template uses {', '.join('{' + u + '}' for u in unknown)}, which it "
                             f"does not know. Use {allowed}.")
    if not template.strip():
        raise CaptionerError(f"The caption template is empty. Example: photo of {{trigger}}. Placeholders: {allowed}.")


def filename_words(path: Path) -> str:
    """``IMG_0042_red-car.jpg`` -> ``red car``: separators to spaces, numbers and camera prefixes dropped."""
    return _words(Path(path).stem)


def folder_words(path: Path) -> str:
    """The image's folder name as words; a kohya repeats prefix (``5_dogs``) is dropped."""
    folder = Path(path).parent.name
    if folder_repeats(Path(folder), 0):
        folder = _REPEATS_PREFIX.sub("", folder)
    return _words(folder)


def _words(name: str) -> str:
    words = []
    for word in _SEPARATORS.sub(" ", name).split():
        word = _TRAILING_DIGITS.sub(r"\1", word)  # "cat001" -> "cat"; "3d" and "r2d2" stay
        if not word.isdigit() and word.lower() not in _CAMERA_WORDS:
            words.append(word)
    return " ".join(words)
