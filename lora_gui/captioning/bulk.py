"""Bulk caption edits: preview a change to every caption, apply it, undo the last one.

Each ``preview_*`` returns the ``Change``s it would make and writes nothing. ``apply_changes``
stores the previous texts in ``<dataset>/.lora-gui-undo.json`` first, then writes each caption
atomically; ``undo_last`` puts them back, refusing if a caption was edited in between.

Previews follow links like training does, unless given ``confine=folder``: then images whose file or
caption resolves outside that folder are left out, so their text is never read or shown (the app
passes the dataset folder). ``apply_changes`` never writes outside the dataset folder either way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import regex as re  # the `regex` package: re-compatible, and matching can time out

from lora_gui.captioning.files import caption_target, write_text_atomic
from lora_gui.captioning.text import add_trigger, clean_text, has_tag, join_parts, tidy_caption
from lora_gui.data.captions import split_tags
from lora_gui.data.scan import find_image_files, normalize_extension, read_caption

UNDO_FILE = ".lora-gui-undo.json"
UNDO_VERSION = 1
_SHOWN = 5  # file names listed in an error message


class BulkEditError(ValueError):
    """A bulk edit cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Change:
    path: Path  # the caption file
    before: str  # "" when the file does not exist yet
    after: str
    created: bool = False  # applying creates the file


@dataclass(frozen=True)
class UndoRecord:
    path: Path  # the undo file
    description: str
    files: int


# ----------------------------------------------------------------------------- previews


def preview_find_replace(root: str | Path, find: str, replace: str, regex: bool = False,
                         case_sensitive: bool = True, caption_extension: str = ".txt", *,
                         confine: str | Path | None = None) -> list[Change]:
    """Replace ``find`` (plain text, or a regular expression with ``\\1`` groups) in every caption."""
    if not find:
        raise BulkEditError("Type the text to find.")
    pattern = _compile(find, regex, case_sensitive)
    changes = []
    for path, text, exists in _captions(root, caption_extension, confine):
        if not exists:
            continue
        try:
            after = pattern.sub(replace if regex else lambda _match: replace, text, timeout=REGEX_SECONDS)
        except TimeoutError:
            raise BulkEditError(f"The expression {_shown(find)} takes too long on {Path(path).name} (over "
                                f"{REGEX_SECONDS:g} s); simplify it, for example avoid nested or overlapping repeats like (a|aa)+.") from None
        except (re.error, IndexError) as exc:
            raise BulkEditError(f"The replacement {_shown(replace)} is not valid for this expression ({exc}). "
                                "Refer to groups as \\1 or \\g<name>, and write \\\\ for a backslash.") from None
        if after != text:
            changes.append(Change(path, text, tidy_caption(after)))
    return changes


def preview_add_tag(root: str | Path, tag: str, position: str = "end",
                    caption_extension: str = ".txt", *, confine: str | Path | None = None) -> list[Change]:
    """Add ``tag`` (or several, comma-separated) to every caption that lacks it; creates missing captions."""
    tags = _tags(tag)
    if position not in ("start", "end"):
        raise BulkEditError(f"position must be 'start' or 'end', not {_shown(position)}.")
    changes = []
    for path, text, exists in _captions(root, caption_extension, confine):
        missing = [t for t in tags if not has_tag(text, t)]
        if missing:
            after = join_parts(*missing, text) if position == "start" else join_parts(text, *missing)
            changes.append(Change(path, text, after, created=not exists))
    return changes


def preview_remove_tag(root: str | Path, tag: str, caption_extension: str = ".txt", *,
                       confine: str | Path | None = None) -> list[Change]:
    """Remove ``tag`` (or several, comma-separated) wherever it is a whole comma-separated tag, any case."""
    unwanted = {t.lower() for t in _tags(tag)}
    changes = []
    for path, text, exists in _captions(root, caption_extension, confine):
        tags = split_tags(text)
        kept = [t for t in tags if t.lower() not in unwanted]
        if exists and len(kept) != len(tags):
            changes.append(Change(path, text, ", ".join(kept)))
    return changes


def preview_prepend_trigger(root: str | Path, trigger: str, caption_extension: str = ".txt", *,
                            confine: str | Path | None = None) -> list[Change]:
    """Put ``trigger`` first in every caption that lacks it as a whole word; creates missing captions."""
    trigger = clean_text(trigger)
    if not trigger:
        raise BulkEditError("Type the trigger word to add.")
    changes = []
    for path, text, exists in _captions(root, caption_extension, confine):
        after = add_trigger(text, trigger)
        if after != text:
            changes.append(Change(path, text, after, created=not exists))
    return changes


# ----------------------------------------------------------------------------- apply and undo


def apply_changes(changes: list[Change], root: str | Path, description: str = "bulk edit") -> UndoRecord:
    """Write ``changes`` (from a preview), after saving what they replace for ``undo_last``."""
    root = _folder(root)
    if not changes:
        raise BulkEditError("Nothing to apply: the preview found no caption to change.")
    stale = [c.path for c in changes if _state(_inside(root, c.path), c.before, c.after, c.created) != "before"]
    if stale:
        raise BulkEditError(f"{len(stale)} caption file(s) changed since the preview ({_names(stale, root)}). "
                            "Preview again, then apply.")
    undo = root / UNDO_FILE
    entries = [{"path": _relative(root, c.path), "before": c.before, "after": c.after, "created": c.created}
               for c in changes]
    record = {"version": UNDO_VERSION, "description": description, "time": time.time(), "files": entries}
    write_text_atomic(undo, json.dumps(record, ensure_ascii=False, indent=1))
    for change in changes:
        write_text_atomic(change.path, change.after)
    return UndoRecord(undo, description, len(changes))


def last_edit(root: str | Path) -> UndoRecord | None:
    """The bulk edit that ``undo_last`` would undo, or None."""
    root = _folder(root)
    if not (root / UNDO_FILE).is_file():
        return None
    record = _read_undo(root)
    return UndoRecord(root / UNDO_FILE, record["description"], len(record["files"]))


def undo_last(root: str | Path) -> UndoRecord:
    """Restore the captions the last ``apply_changes`` replaced; refuses if any was edited since."""
    root = _folder(root)
    undo = root / UNDO_FILE
    if not undo.is_file():
        raise BulkEditError(f"Nothing to undo in {root}: no bulk edit was applied there, or it was already undone.")
    record = _read_undo(root)
    entries = [(_inside(root, root / e["path"]), e) for e in record["files"]]
    states = [(path, e, _state(path, e["before"], e["after"], e["created"])) for path, e in entries]
    edited = [path for path, _, state in states if state == "edited"]
    if edited:
        raise BulkEditError(
            f"Cannot undo \"{record['description']}\": {len(edited)} caption file(s) were edited after it "
            f"({_names(edited, root)}), and undoing would throw those edits away. Change them by hand instead, or "
            f"delete {undo} to forget this undo."
        )
    for path, entry, state in states:
        if state != "after":
            continue  # the edit stopped before reaching this file
        if entry["created"]:
            path.unlink()
        else:
            write_text_atomic(path, entry["before"])
    undo.unlink()
    return UndoRecord(undo, record["description"], sum(state == "after" for _, _, state in states))


# ----------------------------------------------------------------------------- helpers


def _captions(root: str | Path, extension: str, confine: str | Path | None = None
              ) -> Iterator[tuple[Path, str, bool]]:
    """(caption path, its text, whether it exists) for each image's caption, each file once; with ``confine``
    only images whose file and caption resolve inside that folder."""
    root = _folder(root)
    extension = normalize_extension(extension)
    seen = set()
    for file in find_image_files(root, extension, confine=confine):
        path = caption_target(file, root, extension)
        if path in seen:
            continue
        seen.add(path)
        exists = path.is_file()
        yield path, read_caption(path) if exists else "", exists


def _state(path: Path, before: str, after: str, created: bool) -> str:
    """'before' or 'after' when the file holds one of the two texts, else 'edited'."""
    if not path.is_file():
        return "before" if created else "edited"
    text = read_caption(path)
    if text == after:
        return "after"
    return "before" if text == before and not created else "edited"


REGEX_SECONDS = 1.0  # per caption: a pathological expression must not occupy the app
_SHOWN_CHARS = 120  # characters of a typed value repeated in a message


def _shown(text: str) -> str:
    """A typed value as an error message repeats it (``repr``), cut to ``_SHOWN_CHARS``."""
    shown = repr(text)
    return shown if len(shown) <= _SHOWN_CHARS else f"{shown[:_SHOWN_CHARS]}... ({len(text)} characters)"


def _compile(find: str, regex: bool, case_sensitive: bool) -> re.Pattern:
    flags = 0 if case_sensitive else re.IGNORECASE
    try:
        return re.compile(find if regex else re.escape(find), flags)
    except re.error as exc:
        raise BulkEditError(f"{_shown(find)} is not a valid regular expression ({exc.msg} at position {exc.pos}). "
                            "Fix it, or turn regex off to search for the text exactly as typed.") from None


def _tags(text: str) -> list[str]:
    tags = split_tags(clean_text(text))
    if not tags:
        raise BulkEditError("Type the tag to add or remove (several can be separated by commas).")
    return tags


def _read_undo(root: Path) -> dict:
    undo = _inside(root, root / UNDO_FILE)  # a link leading out of the folder is not read
    try:
        record = json.loads(undo.read_text(encoding="utf-8"))
        if record.get("version") != UNDO_VERSION or not isinstance(record.get("files"), list):
            raise ValueError("unknown format")
        return record
    except (OSError, ValueError, AttributeError) as exc:
        raise BulkEditError(f"The undo file {root / UNDO_FILE} cannot be read ({exc}); delete it.") from None


def _inside(root: Path, path: Path) -> Path:
    _relative(root, path)
    return Path(path)


def _relative(root: Path, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise BulkEditError(f"{path} is outside the dataset folder {root}; bulk edits only touch that "
                            "folder.") from None


def _folder(root: str | Path) -> Path:
    path = Path(str(root).strip()).expanduser()
    if not str(root).strip() or not path.is_dir():
        raise BulkEditError(f"{str(root)!r} is not a folder: choose the folder that holds your training images.")
    return path


def _names(paths: list[Path], root: Path) -> str:
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths[:_SHOWN]]
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(names) + more
