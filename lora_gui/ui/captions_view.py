"""The Captions tab's logic, free of Gradio: run a captioner, edit captions one by one, bulk edits with undo.

Every function re-checks what it is given (a share link lets anyone send any value to any handler);
problems come back as ``CaptionsError`` with a sentence that says what to do.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.captioning import (
    MODES,
    CaptionerError,
    CaptionOptions,
    CaptionProgress,
    CaptionSummary,
    bulk,
    caption_dataset,
    get_captioner,
    list_captioners,
)
from lora_gui.captioning.bulk import BulkEditError, Change
from lora_gui.captioning.files import caption_target, write_text_atomic
from lora_gui.data.images import ImageLoadError, load_rgb
from lora_gui.data.scan import IMAGE_EXTENSIONS, ImageFile, find_caption, find_image_files, read_caption
from lora_gui.engine.families.loading import HUB_ID
from lora_gui.events import Event, Status
from lora_gui.ui.dataset_view import DatasetViewError, md_code, resolve_dataset
from lora_gui.ui.workspace import OutsideWorkspace, Workspace

EXTENSION = ".txt"
DEFAULT_CAPTIONER = "blip"
DEFAULT_TEMPLATE = "photo of {trigger}"
MODE_CHOICES = [("Skip images that have a caption file", "skip_existing"),
                ("Also re-caption empty caption files", "only_empty"), ("Overwrite every caption", "overwrite")]
EDITOR_HEADERS = ["File", "Caption"]
MAX_ROWS = 2000  # rows in the editor table
MAX_FIELD = 1000  # characters in a one-line field
MAX_CAPTION = 10_000
MAX_LENGTH, MAX_BATCH = 10_000, 256
SHOWN_FAILURES = 20
PREVIEW_SIDE = 768
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
Report = Callable[[Event], None]


class CaptionsError(ValueError):
    pass


# ---------------------------------------------------------------------------- inputs


def resolve_folder(workspace: Workspace, text: Any) -> Path:
    """The dataset folder chosen on the Dataset tab, under datasets/ or outputs/ of the workspace."""
    try:
        return resolve_dataset(workspace, text)
    except DatasetViewError as exc:
        raise CaptionsError(f"{exc} (The Captions tab works on the folder chosen on the Dataset tab.)") from None


def captioner_choices() -> list[tuple[str, str]]:
    return [(info.label, info.name) for info in list_captioners()]


def captioner_fields(name: Any) -> dict[str, Any]:
    """What the form shows for a captioner: its default model, and which of its own options apply."""
    info = _captioner_info(name)
    return {"model": info.default_model or "", "uses_model": info.default_model is not None,
            "template": "template" in info.options, "threshold": "threshold" in info.options}


def resolve_model(workspace: Workspace, name: str, text: Any) -> str | None:
    """None (the captioner's default), a folder inside the workspace (absolute), or a Hub id (owner/name)."""
    model = _plain(text, "The model")
    if not model or not captioner_fields(name)["uses_model"]:
        return None
    try:
        path = workspace.resolve(model)
    except OutsideWorkspace:
        raise CaptionerError(f"The model folder {model} is outside the workspace. Copy it under "
                             f"{workspace.root}, or give a Hugging Face id such as owner/name.") from None
    if path.is_dir():
        return str(path)
    if path.exists():
        raise CaptionerError(f"{model} is a file: give the folder that holds the model.")
    if HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    raise CaptionerError(f"The model {model!r} is neither a folder inside the workspace nor a Hugging Face id "
                         "(owner/name). Leave it empty to use the captioner's default model.")


def build_job(workspace: Workspace, form: dict) -> tuple[Any, CaptionOptions]:
    """The captioner and options described by the form's named values, every value checked."""
    name = _captioner_info(form.get("captioner")).name
    fields = captioner_fields(name)
    trigger = _plain(form.get("trigger"), "The trigger word")
    extra: dict[str, Any] = {}
    if fields["threshold"]:
        extra["threshold"] = _number(form.get("threshold"), "The tag threshold", 0.01, 1.0, 0.35, integer=False)
    if fields["template"]:
        extra.update(template=_plain(form.get("template"), "The template"), trigger=trigger)
        if "{trigger}" in extra["template"] and not trigger:
            raise CaptionsError("The template uses {trigger}: type the trigger word first (or take {trigger} out "
                                "of the template).")
    mode = form.get("mode")
    if mode not in MODES:
        raise CaptionsError(f"Choose what to do with existing captions: one of {', '.join(MODES)}.")
    try:
        model = resolve_model(workspace, name, form.get("model"))
        captioner = get_captioner(name, model=model, cache_dir=str(workspace.cache), **extra)
        options = CaptionOptions(
            trigger=trigger, prefix=_plain(form.get("prefix"), "The prefix"),
            suffix=_plain(form.get("suffix"), "The suffix"), mode=mode, caption_extension=EXTENSION,
            max_length=_number(form.get("max_length"), "The maximum length", 0, MAX_LENGTH),
            batch_size=_number(form.get("batch_size"), "The batch size", 0, MAX_BATCH))
    except CaptionerError as exc:
        raise CaptionsError(str(exc)) from None
    return captioner, options


def _captioner_info(name: Any):
    infos = {info.name: info for info in list_captioners()}
    if not isinstance(name, str) or name not in infos:
        raise CaptionsError(f"Choose a captioner from the list ({', '.join(infos)}).")
    return infos[name]


def _plain(value: Any, what: str, limit: int = MAX_FIELD) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise CaptionsError(f"{what} must be text of at most {limit} characters.")
    return value.strip()


def _number(value: Any, what: str, low: float, high: float, default: float | None = None, integer: bool = True):
    if value is None or value == "":
        return low if default is None else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise CaptionsError(f"{what} must be a number from {low} to {high}.")
    if integer and value != int(value):
        raise CaptionsError(f"{what} must be a whole number.")
    return int(value) if integer else float(value)


# ---------------------------------------------------------------------------- captioning


class CaptionJob:
    """The captioning run of one app session: one at a time (``busy_lock``), stopped between batches."""

    def __init__(self, session) -> None:
        self.session = session
        self.stop = threading.Event()
        self.folder: Path | None = None  # the folder being captioned

    def run(self, folder_text: Any, form: dict, report: Report | None = None, poll: float = 0.2) -> str:
        """Caption the folder on a worker thread; ``report`` gets the latest event on this thread."""
        workspace = self.session.workspace
        root = resolve_folder(workspace, folder_text)
        captioner, options = build_job(workspace, form)
        if captioner.needs_device and self.session.runner.is_active:
            raise CaptionsError("A training run is using the GPU. Captioning models need it too: wait for the run "
                                "to end (or stop it) on the Train tab. The template captioner works meanwhile.")
        if not self.session.busy_lock.acquire(blocking=False):
            raise CaptionsError("Another captioning job or a Test tab comparison is running; wait for it to "
                                "finish, then press Caption dataset again.")
        self.stop.clear()
        self.folder = root
        relay, done, outcome = _Relay(), threading.Event(), {}

        def work() -> None:
            try:
                outcome["summary"] = caption_dataset(root, captioner, options, relay, self.stop.is_set)
            except BaseException as exc:  # handed to the waiting request below
                outcome["error"] = exc
            finally:
                self.folder = None
                self.session.busy_lock.release()
                done.set()

        threading.Thread(target=work, name="captioning", daemon=True).start()
        while not done.wait(poll):
            relay.send(report)
        relay.send(report)
        if isinstance(outcome.get("error"), CaptionerError):
            raise CaptionsError(str(outcome["error"])) from None
        if "error" in outcome:
            raise outcome["error"]
        return summary_markdown(outcome["summary"], root)

    def request_stop(self) -> str:
        if self.folder is None:
            return "Nothing is being captioned."
        self.stop.set()
        return "Stopping after the current batch; the captions already written are kept."

    def check_idle(self, root: Path) -> None:
        if self.folder is not None and self.folder == root:
            raise CaptionsError("Captioning is writing to this folder; wait for it to finish (or press Stop), "
                                "then edit.")


class _Relay:
    """Keeps the latest event from any thread (downloads report from their own); ``send`` passes it on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: Event | None = None

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._latest = event

    def send(self, report: Report | None) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
        if latest is not None and report is not None:
            report(latest)


def describe_event(event: Event) -> tuple[Any, str, str] | None:
    """(progress: a fraction, (done, total) or None; its description; its unit) for a progress bar."""
    if isinstance(event, CaptionProgress):
        return (event.done, event.total), f"Captioned {event.done} of {event.total} image(s)", "images"
    if isinstance(event, Status):
        fraction = min(event.current / event.total, 1.0) if event.current is not None and event.total else None
        return fraction, event.text, "steps"
    return None


def summary_markdown(summary: CaptionSummary, root: Path) -> str:
    icon = "⚠️" if summary.failed or summary.stopped else "✅"
    lines = [f"{icon} {summary.describe()}"]
    if summary.images == 0:
        lines = [f"⚠️ No images found in {md_code(root.name)}: add images on the Dataset tab first."]
    for image, reason in summary.failed[:SHOWN_FAILURES]:
        lines.append(f"- {md_code(_relative(image, root))}: {reason}")
    if len(summary.failed) > SHOWN_FAILURES:
        lines.append(f"- and {len(summary.failed) - SHOWN_FAILURES} more")
    if summary.failed:
        lines.append("\nFix or remove the images listed, then caption again: the others are left as they are.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the caption editor


def editor_rows(root: Path) -> tuple[list[list[str]], dict[str, str], str]:
    """(table rows [file, caption], the captions as loaded, a note) for the images in ``root``."""
    files = find_image_files(root, EXTENSION)
    rows = [[_relative(file.path, root), _read(file.caption_path, root)] for file in files[:MAX_ROWS]]
    note = f"{len(files)} image(s) in {md_code(root.name)}."
    if len(files) > MAX_ROWS:
        note += f" Showing the first {MAX_ROWS}; use the bulk edits below for the rest."
    elif not files:
        note = f"No images in {md_code(root.name)} yet: add some on the Dataset tab."
    return rows, {row[0]: row[1] for row in rows}, note


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
        parts = [f"✅ Saved {len(self.saved)} caption(s)." if self.saved else "No caption was saved."]
        if self.conflicts:
            names = ", ".join(md_code(name) for name in self.conflicts[:5])
            parts.append(f"⚠️ {names} changed on disk since the table was loaded (captioning, a bulk edit or "
                         "another browser tab), so your edit was not saved. Reload shows the new text (and drops "
                         "your edit).")
        return " ".join(parts)


def save_edits(root: Path, edits: dict[str, str], loaded: dict[str, str]) -> SaveResult:
    """Write each edited caption atomically, unless its file changed on disk since it was loaded."""
    result, planned = SaveResult(), []
    for name, text in edits.items():
        if name not in (loaded or {}):
            raise CaptionsError(f"{name} is not in the table as loaded; press Reload, then edit again.")
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
        raise CaptionsError(f"The caption file of {name} is outside the dataset folder; it is left alone.")
    return target


def image_path(root: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or len(name) > MAX_FIELD or "\x00" in name:
        raise CaptionsError("Pick an image from the table.")
    path = root / name
    hidden = any(part.startswith(".") for part in Path(name).parts)
    if (Path(name).is_absolute() or hidden or path.suffix.lower() not in IMAGE_EXTENSIONS
            or not path.resolve().is_relative_to(root.resolve()) or not path.is_file()):
        raise CaptionsError(f"{name} is not an image in the dataset folder {root.name}; press Reload.")
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
        raise CaptionsError(f"The caption of {name} must be text of at most {MAX_CAPTION} characters.")
    return _CONTROL.sub("", text.replace("\r\n", "\n")).strip()


def _read(path: Path | None, root: Path) -> str:
    if path is None or not path.resolve().is_relative_to(root.resolve()):
        return ""
    return read_caption(path)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


# ---------------------------------------------------------------------------- bulk edits

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


def preview_bulk(root: Path, form: dict) -> PendingEdit:
    operation = form.get("operation")
    if operation not in OPERATIONS:
        raise CaptionsError(f"Choose a bulk edit: {', '.join(OPERATIONS.values())}.")
    find = _plain_raw(form.get("find"), "The text to find")
    replace = _plain_raw(form.get("replace"), "The replacement")
    tag, trigger = _plain(form.get("tag"), "The tag"), _plain(form.get("trigger"), "The trigger word")
    position = form.get("position") if form.get("position") in ("start", "end") else "end"
    try:
        if operation == "replace":
            changes = bulk.preview_find_replace(root, find, replace, regex=form.get("regex") is True,
                                                case_sensitive=form.get("case_sensitive") is not False)
            description = f"replace {find!r} with {replace!r}"
        elif operation == "add_tag":
            changes, description = bulk.preview_add_tag(root, tag, position), f"add tag {tag!r} at the {position}"
        elif operation == "remove_tag":
            changes, description = bulk.preview_remove_tag(root, tag), f"remove tag {tag!r}"
        else:
            changes, description = bulk.preview_prepend_trigger(root, trigger), f"add trigger word {trigger!r}"
    except BulkEditError as exc:
        raise CaptionsError(str(exc)) from None
    return PendingEdit(root, tuple(changes), description)


def preview_rows(pending: PendingEdit) -> tuple[list[list[str]], str]:
    rows = [[_relative(c.path, pending.root), "(no caption file yet)" if c.created else c.before, c.after]
            for c in pending.changes[:MAX_PREVIEW_ROWS]]
    count = len(pending.changes)
    if not count:
        return rows, f"Nothing to change: no caption is affected by {md_code(pending.description)}."
    shown = f" (showing the first {MAX_PREVIEW_ROWS})" if count > MAX_PREVIEW_ROWS else ""
    return rows, (f"Preview: {md_code(pending.description)} changes {count} caption file(s){shown}. Nothing is "
                  "written until you press **Apply**.")


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
    return (f"✅ Applied {md_code(record.description)} to {record.files} caption file(s). **Undo last bulk edit** "
            "puts them back.")


def undo_bulk(root: Path) -> str:
    try:
        record = bulk.undo_last(root)
    except BulkEditError as exc:
        raise CaptionsError(str(exc)) from None
    return f"↩️ Undid {md_code(record.description)}: restored {record.files} caption file(s)."


def last_edit_note(root: Path) -> str:
    try:
        record = bulk.last_edit(root)
    except BulkEditError as exc:
        return f"⚠️ {exc}"
    if record is None:
        return "No bulk edit to undo in this folder."
    return (f"Last bulk edit here: {md_code(record.description)} ({record.files} file(s)); **Undo last bulk edit** "
            "reverts it.")


def _plain_raw(value: Any, what: str) -> str:
    """Like ``_plain`` but keeps surrounding spaces, which matter in find/replace."""
    if value is None:
        return ""
    _plain(value, what)
    return value
