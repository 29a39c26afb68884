"""What the dataset doctor found: problems per file, the dataset summary, JSON.

Severities (each problem has one; a file's status is its worst):

- ``error``: the image cannot be trained on; training skips it with one log line.
  ``unreadable``, ``empty_file``, ``not_an_image``, ``decompression_bomb``, ``truncated``,
  ``too_small`` (upscaled more than 4x), ``caption_unreadable``.
- ``warning``: the image trains, but a person should look. ``animated_first_frame``,
  ``too_small`` (upscaled 1.25x to 4x), ``extreme_aspect``, ``caption_missing``,
  ``caption_empty``, ``caption_encoding`` (guessed as cp1252, or characters lost),
  ``trigger_missing``, ``caption_too_long``, ``shared_caption_stem``, ``duplicate``,
  ``near_duplicate``.
- ``info``: converted automatically and correctly; the file's status stays ``ok``.
  ``cmyk_converted``, ``16bit_converted``, ``transparency_composited``,
  ``grayscale_converted``, ``exif_rotated``, ``wrong_extension``, ``caption_encoding``
  (BOM, UTF-16 or CRLF: read correctly).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.data.buckets import Bucket
from lora_gui.data.scan import ImageRecord

ERROR, WARNING, INFO, OK = "error", "warning", "info", "ok"
REPORT_NAME = "dataset_report.json"

SEVERITIES: dict[str, str] = {
    "unreadable": ERROR,
    "empty_file": ERROR,
    "not_an_image": ERROR,
    "decompression_bomb": ERROR,
    "truncated": ERROR,
    "caption_unreadable": ERROR,
    "too_small": WARNING,  # ERROR when the upscale is extreme
    "animated_first_frame": WARNING,
    "extreme_aspect": WARNING,
    "caption_missing": WARNING,
    "caption_empty": WARNING,
    "trigger_missing": WARNING,
    "caption_too_long": WARNING,
    "shared_caption_stem": WARNING,
    "duplicate": WARNING,
    "near_duplicate": WARNING,
    "caption_encoding": INFO,  # WARNING when the encoding was guessed or characters were lost
    "cmyk_converted": INFO,
    "16bit_converted": INFO,
    "transparency_composited": INFO,
    "grayscale_converted": INFO,
    "exif_rotated": INFO,
    "wrong_extension": INFO,
}


@dataclass(frozen=True)
class Problem:
    code: str
    message: str  # a sentence for a person: what happened and what to do
    severity: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


def problem(code: str, message: str, severity: str | None = None) -> Problem:
    return Problem(code, message, severity or SEVERITIES[code])


@dataclass
class FileReport:
    """The verdict on one image file (and its caption)."""

    path: Path
    relative: str  # POSIX path relative to the dataset folder
    repeats: int = 1
    problems: list[Problem] = field(default_factory=list)
    width: int | None = None  # after EXIF orientation; None when unreadable
    height: int | None = None
    caption_path: Path | None = None
    caption: str = ""  # decoded, LF line endings, stripped
    caption_words: int | None = None
    caption_tokens: int | None = None
    bucket: Bucket | None = None

    @property
    def status(self) -> str:
        severities = {p.severity for p in self.problems}
        return ERROR if ERROR in severities else WARNING if WARNING in severities else OK

    @property
    def usable(self) -> bool:
        return self.status != ERROR

    @property
    def codes(self) -> list[str]:
        return [p.code for p in self.problems]

    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    def to_record(self) -> ImageRecord:
        if not self.usable or self.width is None or self.height is None:
            raise ValueError(f"{self.relative} has errors and cannot be trained on")
        return ImageRecord(self.path, self.caption, self.repeats, self.width, self.height, self.caption_path)

    def to_dict(self, root: Path) -> dict[str, Any]:
        return {
            "path": self.relative,
            "status": self.status,
            "problems": [p.to_dict() for p in self.problems],
            "width": self.width,
            "height": self.height,
            "bucket": bucket_name(self.bucket) if self.bucket else None,
            "repeats": self.repeats,
            "caption_file": relative_path(self.caption_path, root) if self.caption_path else None,
            "caption_words": self.caption_words,
            "caption_tokens": self.caption_tokens,
        }


@dataclass
class DatasetReport:
    root: Path
    files: list[FileReport]
    summary: dict[str, Any]

    @property
    def ready(self) -> bool:
        return bool(self.summary["ready"])

    @property
    def reasons(self) -> list[str]:
        return list(self.summary["reasons"])

    def usable_files(self) -> list[FileReport]:
        return [f for f in self.files if f.usable]

    def skipped_files(self) -> list[FileReport]:
        return [f for f in self.files if not f.usable]

    def usable_paths(self) -> list[Path]:
        return [f.path for f in self.usable_files()]

    def usable_records(self) -> list[ImageRecord]:
        """The images training uses, exactly the ones the doctor passed (status ok or warning)."""
        return [f.to_record() for f in self.usable_files()]

    def failure_message(self) -> str:
        return f"The dataset in {self.root} cannot be used for training: " + " ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"files": [f.to_dict(self.root) for f in self.files], "summary": self.summary}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def write(self, path: str | Path | None = None) -> Path:
        """Write the JSON report (default: ``dataset_report.json`` in the dataset folder)."""
        target = Path(path) if path else self.root / REPORT_NAME
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(self.to_json(indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, target)
        return target

    def render_text(self) -> str:
        from lora_gui.data.doctor.text import render_report

        return render_report(self)


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def relative_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
