"""Continuing an interrupted overwrite run: a small journal of the images already captioned.

Skip-existing and only-empty runs continue by themselves (the captions written so far count as
existing); an overwrite run would start over without this. The journal lives in the dataset
folder as a hidden file, is rewritten atomically after each batch, and is deleted when a run
completes. A run with different settings ignores it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lora_gui.captioning.files import write_text_atomic

JOURNAL_FILE = ".lora-gui-caption-run.json"


class RunJournal:
    def __init__(self, root: Path, settings: dict, done: set[str] | None = None) -> None:
        self.root = root
        self.path = root / JOURNAL_FILE
        self.settings = settings
        self.done = done or set()

    @classmethod
    def open(cls, root: Path, settings: dict) -> RunJournal:
        """The journal of an interrupted run with the same ``settings``, else an empty one."""
        settings = json.loads(json.dumps(settings, default=_plain, sort_keys=True))
        try:
            saved = json.loads((root / JOURNAL_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls(root, settings)
        if not isinstance(saved, dict) or saved.get("settings") != settings:
            return cls(root, settings)
        return cls(root, settings, {str(name) for name in saved.get("done", [])})

    def is_done(self, image: Path) -> bool:
        return self._key(image) in self.done

    def record(self, images: list[Path]) -> None:
        self.done.update(self._key(image) for image in images)
        record = {"settings": self.settings, "done": sorted(self.done)}
        write_text_atomic(self.path, json.dumps(record, ensure_ascii=False))

    def finish(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _key(self, image: Path) -> str:
        return image.relative_to(self.root).as_posix()


def _plain(value: object) -> object:
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)
