"""The Captions tab's bulk edits, free of Gradio: preview, apply exactly what was previewed, undo.

Previews are confined to the dataset folder: an image whose file or caption is a link leading outside
it is left out (the preview names those links), so no outside text is shown or written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_gui.captioning import bulk
from lora_gui.captioning.bulk import BulkEditError, Change
from lora_gui.ui.caption_common import CaptionsError, plain_text, relative_name
from lora_gui.ui.dataset_view import md_code, outside_note
from lora_gui.ui.workspace import clip

OPERATIONS = {"replace": "Find and replace", "add_tag": "Add tag", "remove_tag": "Remove tag",
              "trigger": "Add the trigger word where missing"}
PREVIEW_HEADERS = ["Caption file", "Before", "After"]
MAX_PREVIEW_ROWS = 1000


@dataclass(frozen=True)
class PendingEdit:
    """A previewed bulk edit, kept on the server until Apply writes exactly these changes."""

    root: Path
    changes: tuple[Change, ...]
    description: str
    left_out: str = ""  # the note naming links that lead outside the folder, "" when none


def preview_bulk(root: Path, form: dict) -> PendingEdit:
    operation = form.get("operation")
    if operation not in OPERATIONS:
        raise CaptionsError(f"Choose a bulk edit: {', '.join(OPERATIONS.values())}.")
    find = _plain_raw(form.get("find"), "The text to find")
    replace = _plain_raw(form.get("replace"), "The replacement")
    tag, trigger = plain_text(form.get("tag"), "The tag"), plain_text(form.get("trigger"), "The trigger word")
    position = form.get("position") if form.get("position") in ("start", "end") else "end"
    try:
        if operation == "replace":
            changes = bulk.preview_find_replace(root, find, replace, regex=form.get("regex") is True,
                                                case_sensitive=form.get("case_sensitive") is not False, confine=root)
            description = f"replace {_quoted(find)} with {_quoted(replace)}"
        elif operation == "add_tag":
            changes = bulk.preview_add_tag(root, tag, position, confine=root)
            description = f"add tag {_quoted(tag)} at the {position}"
        elif operation == "remove_tag":
            changes, description = bulk.preview_remove_tag(root, tag, confine=root), f"remove tag {_quoted(tag)}"
        else:
            changes = bulk.preview_prepend_trigger(root, trigger, confine=root)
            description = f"add trigger word {_quoted(trigger)}"
    except BulkEditError as exc:
        raise CaptionsError(str(exc)) from None
    return PendingEdit(root, tuple(changes), description, outside_note(root, root, "the dataset folder"))


def preview_rows(pending: PendingEdit) -> tuple[list[list[str]], str]:
    rows = [[relative_name(c.path, pending.root), "(no caption file yet)" if c.created else c.before, c.after]
            for c in pending.changes[:MAX_PREVIEW_ROWS]]
    count = len(pending.changes)
    if not count:
        message = f"Nothing to change: no caption is affected by {md_code(pending.description)}."
    else:
        shown = f" (showing the first {MAX_PREVIEW_ROWS})" if count > MAX_PREVIEW_ROWS else ""
        message = (f"Preview: {md_code(pending.description)} changes {count} caption file(s){shown}. Nothing is "
                   "written until you press **Apply**.")
    return rows, f"{message} {pending.left_out}" if pending.left_out else message


def apply_bulk(pending: Any, root: Path) -> str:
    """Write exactly the previewed changes (``apply_changes`` refuses any that no longer match the disk)."""
    if not isinstance(pending, PendingEdit):
        raise CaptionsError("Press Preview first: Apply writes exactly the changes the preview shows.")
    if pending.root != root:
        raise CaptionsError("The dataset folder changed since the preview; press Preview again.")
    try:
        record = bulk.apply_changes(list(pending.changes), root, pending.description)
    except BulkEditError as exc:
        raise CaptionsError(str(exc)) from None
    return (f"✓ Applied {md_code(record.description)} to {record.files} caption file(s). **Undo last bulk edit** "
            "puts them back.")


def undo_bulk(root: Path) -> str:
    try:
        record = bulk.undo_last(root)
    except BulkEditError as exc:
        raise CaptionsError(str(exc)) from None
    return f"↩ Undid {md_code(record.description)}: restored {record.files} caption file(s)."


def last_edit_note(root: Path) -> str:
    try:
        record = bulk.last_edit(root)
    except BulkEditError as exc:
        return f"⚠ {exc}"
    if record is None:
        return "No bulk edit to undo in this folder."
    return (f"Last bulk edit here: {md_code(record.description)} ({record.files} file(s)); **Undo last bulk edit** "
            "reverts it.")


def _quoted(text: str) -> str:
    """A typed value in the edit's description, as ``repr`` shows it, cut to a readable length."""
    return clip(repr(text))


def _plain_raw(value: Any, what: str) -> str:
    """Like ``plain_text`` but keeps surrounding spaces, which matter in find/replace."""
    if value is None:
        return ""
    plain_text(value, what)
    return value
