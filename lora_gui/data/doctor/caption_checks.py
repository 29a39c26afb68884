"""Read one caption the way training will and say what is wrong with it.

Token counts: with a tokenizer (anything with ``encode(text) -> list`` that adds the start
and end tokens, such as a transformers CLIP tokenizer, or a plain ``count(text) -> int``)
the count is exact. Without one it is an estimate that loads no model: CLIP's own
pre-tokenizer split (words, single digits, punctuation runs), one token per word of up to
8 letters plus one per further 4 letters, one per digit and punctuation mark, plus the
start and end tokens. Common words come out right; rare words may need more tokens.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.data.doctor.report import WARNING, Problem, problem
from lora_gui.data.scan import DecodedCaption, decode_caption_details

TokenCounter = Callable[[str], int]
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)
_WORDS = re.compile(r"\w+")
_BINARY_SHARE = 0.05  # captions with more control characters than this are not text


@dataclass
class CaptionFacts:
    text: str = ""
    problems: list[Problem] = field(default_factory=list)
    words: int | None = None
    tokens: int | None = None


def estimate_clip_tokens(text: str) -> int:
    """About how many CLIP tokens ``text`` needs, including the start and end tokens."""
    count = 2
    for piece in _CLIP_PIECES.findall(text.lower()):
        if piece[0].isalpha():
            count += 1 + (max(0, len(piece) - 8) + 3) // 4
        else:
            count += len(piece)
    return count


def token_counter(tokenizer: Any | None) -> tuple[TokenCounter, bool]:
    """(count, exact): from a tokenizer object, a counting function, or the estimate."""
    if tokenizer is None:
        return estimate_clip_tokens, False
    if hasattr(tokenizer, "encode"):
        return (lambda text: len(tokenizer.encode(text))), True
    if callable(tokenizer):
        return (lambda text: int(tokenizer(text))), True
    raise TypeError("tokenizer must have an encode(text) method or be a function returning a token count")


def check_caption(
    caption_path: Path | None,
    expected_path: Path,
    trigger: str | None,
    token_limit: int,
    count_tokens: TokenCounter,
    exact_tokens: bool,
) -> CaptionFacts:
    """The caption's text and problems. ``expected_path``: where a missing caption should be."""
    if caption_path is None:
        return _missing(expected_path)
    try:
        data = caption_path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return CaptionFacts(problems=[problem(
            "caption_unreadable",
            f"The caption {caption_path.name} can't be read ({reason}), so the image is skipped. Check the "
            "file's permissions or copy it again.",
        )])
    decoded = decode_caption_details(data)
    if _looks_binary(decoded):
        return CaptionFacts(problems=[problem(
            "caption_unreadable",
            f"The caption {caption_path.name} holds binary data, not text (another file renamed?), so the "
            "image is skipped. Replace it with a plain-text caption.",
        )])
    facts = CaptionFacts(text=decoded.text, words=len(_WORDS.findall(decoded.text)))
    encoding = _encoding_problem(caption_path.name, decoded) if decoded.text else None
    if encoding:
        facts.problems.append(encoding)
    if not decoded.text:
        facts.problems.append(problem(
            "caption_empty",
            f"The caption {caption_path.name} is empty, so the image trains without a caption. Write one, "
            "or auto-caption the folder.",
        ))
        return facts
    facts.tokens = count_tokens(decoded.text)
    if facts.tokens > token_limit:
        facts.problems.append(_too_long(facts.tokens, token_limit, exact_tokens))
    if trigger and not contains_trigger(decoded.text, trigger):
        facts.problems.append(problem(
            "trigger_missing",
            f"The caption doesn't contain the trigger word {trigger!r}. Add it (usually first) so the "
            "LoRA learns to respond to it.",
        ))
    return facts


def contains_trigger(text: str, trigger: str) -> bool:
    """The trigger as a whole word or phrase, ignoring case."""
    pattern = r"(?<!\w)" + re.escape(trigger.strip()) + r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def _missing(expected: Path) -> CaptionFacts:
    if expected.exists() and not expected.is_file():
        return CaptionFacts(problems=[problem(
            "caption_unreadable",
            f"{expected.name} is a folder or special file, not a caption, so the image is skipped. Replace "
            "it with a plain-text caption file.",
        )])
    return CaptionFacts(problems=[problem(
        "caption_missing",
        f"No caption file {expected.name}: the image trains with an empty caption. Write one, or "
        "auto-caption the folder.",
    )])


def _looks_binary(decoded: DecodedCaption) -> bool:
    text = decoded.text
    if not text:
        return False
    odd = sum(1 for c in text if c == "\ufffd" or (unicodedata.category(c) == "Cc" and c not in "\n\t"))
    return odd / len(text) > _BINARY_SHARE


def _encoding_problem(name: str, decoded: DecodedCaption) -> Problem | None:
    notes = {
        "utf-8-bom": "starts with a UTF-8 byte-order mark",
        "utf-16-le": "is UTF-16 encoded",
        "utf-16-be": "is UTF-16 (big-endian) encoded",
        "cp1252": "is not valid UTF-8 and was read as Windows-1252 (a guess: check its accented letters)",
    }
    found = [notes[decoded.encoding]] if decoded.encoding in notes else []
    if decoded.line_endings != "lf":
        found.append(f"has {'Windows (CRLF)' if decoded.line_endings == 'crlf' else 'old Mac (CR)'} line endings")
    if decoded.replaced:
        found.append(f"has {decoded.replaced} character(s) that could not be decoded")
    if not found:
        return None
    guessed = decoded.encoding == "cp1252" or decoded.replaced > 0
    outcome = "it may be misread" if guessed else "it is read correctly"
    return problem(
        "caption_encoding",
        f"The caption {name} {_join(found)}; {outcome}. Save it as UTF-8 (`lora-gui dataset prepare` writes "
        "UTF-8 copies).",
        WARNING if guessed else None,
    )


def _too_long(tokens: int, limit: int, exact: bool) -> Problem:
    about = "" if exact else "about "
    reader = "CLIP" if limit == 77 else "the text encoder"
    return problem(
        "caption_too_long",
        f"The caption is {about}{tokens} tokens; {reader} reads {limit} (including start and end), so the "
        "end is ignored. Shorten it or put the important words first.",
    )


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

