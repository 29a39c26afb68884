"""Caption text helpers shared by the captioning runner and the bulk edits."""

from __future__ import annotations

import re

from lora_gui.data.captions import split_tags

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\r\n]+")
_EMPTY_SEGMENTS = re.compile(r"\s*,(\s*,)+\s*")
_SPACE_BEFORE_COMMA = re.compile(r"\s+,")


def clean_text(text: str) -> str:
    """One line: control characters dropped, runs of whitespace collapsed, ends trimmed."""
    return _SPACES.sub(" ", _CONTROL.sub("", text)).strip()


def tidy_caption(text: str) -> str:
    """``clean_text`` plus empty comma segments removed (``a, , b`` -> ``a, b``) and stray end commas."""
    text = _SPACE_BEFORE_COMMA.sub(",", clean_text(text))
    text = _EMPTY_SEGMENTS.sub(", ", text)
    return text.strip(" ,")


def join_parts(*parts: str) -> str:
    """Non-empty parts joined with ``", "``."""
    return ", ".join(part.strip(" ,") for part in parts if part.strip(" ,"))


def contains_word(text: str, word: str) -> bool:
    """``word`` appears in ``text`` as a whole word (or phrase), ignoring case."""
    word = word.strip()
    if not word:
        return False
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def add_trigger(caption: str, trigger: str) -> str:
    """``trigger, caption`` unless the caption already holds the trigger as a whole word."""
    trigger = clean_text(trigger)
    if not trigger or contains_word(caption, trigger):
        return caption
    return join_parts(trigger, caption)


def truncate(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut after the last whole tag (comma) or word that fits."""
    if limit <= 0 or len(text) <= limit:
        return text
    head = text[: limit + 1]  # one extra character shows whether the cut falls on a boundary
    tag_cut, word_cut = head.rfind(","), head.rfind(" ")
    cut = tag_cut if tag_cut > limit // 2 else word_cut  # a tag boundary unless it would lose too much
    return text[:cut].rstrip(" ,;:") if cut > 0 else text[:limit]


def has_tag(caption: str, tag: str) -> bool:
    wanted = tag.strip().lower()
    return any(existing.lower() == wanted for existing in split_tags(caption))
