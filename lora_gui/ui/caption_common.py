"""What the Captions tab's logic modules share: the error type, the caption extension, text checks.

Every function of the Captions tab re-checks what it is given (a share link lets anyone send any value to
any handler); problems come back as ``CaptionsError`` with a sentence that says what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXTENSION = ".txt"
MAX_FIELD = 1000  # characters in a one-line field


class CaptionsError(ValueError):
    pass


def plain_text(value: Any, what: str, limit: int = MAX_FIELD) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise CaptionsError(f"{what} must be text of at most {limit} characters.")
    return value.strip()


def relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
