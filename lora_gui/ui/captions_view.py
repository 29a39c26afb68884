"""The Captions tab's logic, free of Gradio: run a captioner, edit captions one by one, bulk edits with undo.

This module checks the captioning form and runs the captioner; the inline editor is in
``lora_gui.ui.caption_editor`` and the bulk edits in ``lora_gui.ui.caption_bulk_view`` (their names are
re-exported here for the tab). Every function re-checks what it is given (a share link lets anyone send
any value to any handler); problems come back as ``CaptionsError`` with a sentence that says what to do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_gui.captioning import (
    MODES,
    CaptionerError,
    CaptionOptions,
    CaptionProgress,
    CaptionSummary,
    caption_dataset,
    get_captioner,
    list_captioners,
)
from lora_gui.data.scan import confined_to
from lora_gui.engine.families.loading import HUB_ID
from lora_gui.events import Event, Status
from lora_gui.ui.caption_bulk_view import (
    MAX_PREVIEW_ROWS,
    OPERATIONS,
    PREVIEW_HEADERS,
    PendingEdit,
    apply_bulk,
    last_edit_note,
    preview_bulk,
    preview_rows,
    undo_bulk,
)
from lora_gui.ui.caption_common import EXTENSION, MAX_FIELD, CaptionsError, plain_text, relative_name
from lora_gui.ui.caption_editor import (
    EDITOR_HEADERS,
    MAX_CAPTION,
    MAX_ROWS,
    PREVIEW_SIDE,
    SaveResult,
    caption_file,
    check_rows,
    editor_rows,
    image_path,
    merge_saved,
    preview_image,
    save_edits,
    table_edits,
)
from lora_gui.ui.dataset_view import DatasetViewError, md_code, outside_note, resolve_dataset
from lora_gui.ui.workspace import BadPath, OutsideWorkspace, Workspace, clip

DEFAULT_CAPTIONER = "blip"
DEFAULT_TEMPLATE = "photo of {trigger}"
MODE_CHOICES = [("Skip images that have a caption file", "skip_existing"),
                ("Also re-caption empty caption files", "only_empty"), ("Overwrite every caption", "overwrite")]
MAX_LENGTH, MAX_BATCH = 10_000, 256
SHOWN_FAILURES = 20
Report = Callable[[Event], None]

# This module's names, then the shared ones and the editor's and bulk edits' (re-exported for the tab).
__all__ = [
    "DEFAULT_CAPTIONER", "DEFAULT_TEMPLATE", "MODE_CHOICES", "MAX_LENGTH", "MAX_BATCH", "SHOWN_FAILURES",
    "Report", "resolve_folder", "writable_folder", "captioner_choices", "captioner_fields", "resolve_model", "build_job",
    "CaptionJob", "describe_event", "summary_markdown",
    "EXTENSION", "MAX_FIELD", "CaptionsError",
    "EDITOR_HEADERS", "MAX_CAPTION", "MAX_ROWS", "PREVIEW_SIDE", "SaveResult", "caption_file", "check_rows",
    "editor_rows", "image_path", "merge_saved", "preview_image", "save_edits", "table_edits",
    "MAX_PREVIEW_ROWS", "OPERATIONS", "PREVIEW_HEADERS", "PendingEdit", "apply_bulk", "last_edit_note",
    "preview_bulk", "preview_rows", "undo_bulk",
]


# ---------------------------------------------------------------------------- inputs


def resolve_folder(workspace: Workspace, text: Any) -> Path:
    """The dataset folder chosen on the Dataset tab, under datasets/ or outputs/ of the workspace (or an extra
    dataset folder, to read)."""
    try:
        return resolve_dataset(workspace, text)
    except DatasetViewError as exc:
        raise CaptionsError(f"{exc} (The Captions tab works on the folder chosen on the Dataset tab.)") from None


def writable_folder(workspace: Workspace, text: Any) -> Path:
    """The chosen dataset folder, to write captions into: refused for the extra dataset folders."""
    root = resolve_folder(workspace, text)
    if workspace.read_only(root):
        raise CaptionsError(f"{md_code(str(root))} is an extra dataset folder (given with --datasets), which the app "
                            f"only reads, so its captions are not changed. To edit them here, copy the folder into "
                            f"{md_code(str(workspace.datasets))} and choose the copy on the Dataset tab.")
    return root


def captioner_choices() -> list[tuple[str, str]]:
    return [(info.label, info.name) for info in list_captioners()]


def captioner_fields(name: Any) -> dict[str, Any]:
    """What the form shows for a captioner: its default model, and which of its own options apply."""
    info = _captioner_info(name)
    return {"model": info.default_model or "", "uses_model": info.default_model is not None,
            "template": "template" in info.options, "threshold": "threshold" in info.options}


def resolve_model(workspace: Workspace, name: str, text: Any) -> str | None:
    """None (the captioner's default), a folder inside the workspace (absolute), or a Hub id (owner/name)."""
    model = plain_text(text, "The model")
    if not model or not captioner_fields(name)["uses_model"]:
        return None
    try:
        path = workspace.resolve(model)
        is_folder, exists = path.is_dir(), path.exists()
        hub_id = bool(HUB_ID.match(model)) and not Path(model).expanduser().exists()
    except BadPath as exc:
        raise CaptionerError(f"The model: {exc}") from None
    except OutsideWorkspace:
        raise CaptionerError(f"The model folder {clip(model)} is outside the workspace. Copy it under "
                             f"{workspace.root}, or give a Hugging Face id such as owner/name.") from None
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise CaptionerError(f"The model {clip(model)} can't be used ({exc.strerror or exc}); give a folder inside "
                             "the workspace or a Hugging Face id such as owner/name.") from None
    if is_folder:
        return str(path)
    if exists:
        raise CaptionerError(f"{clip(model)} is a file: give the folder that holds the model.")
    if hub_id:
        return model
    raise CaptionerError(f"The model {clip(repr(model))} is neither a folder inside the workspace nor a Hugging "
                         "Face id (owner/name). Leave it empty to use the captioner's default model.")


def build_job(workspace: Workspace, form: dict) -> tuple[Any, CaptionOptions]:
    """The captioner and options described by the form's named values, every value checked."""
    name = _captioner_info(form.get("captioner")).name
    fields = captioner_fields(name)
    trigger = plain_text(form.get("trigger"), "The trigger word")
    extra: dict[str, Any] = {}
    if fields["threshold"]:
        extra["threshold"] = _number(form.get("threshold"), "The tag threshold", 0.01, 1.0, 0.35, integer=False)
    if fields["template"]:
        extra.update(template=plain_text(form.get("template"), "The template"), trigger=trigger)
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
            trigger=trigger, prefix=plain_text(form.get("prefix"), "The prefix"),
            suffix=plain_text(form.get("suffix"), "The suffix"), mode=mode, caption_extension=EXTENSION,
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
        root = writable_folder(workspace, folder_text)
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
                with confined_to(root):  # images or captions linked from outside the folder are left out
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
    icon = "⚠" if summary.failed or summary.stopped else "✓"
    lines = [f"{icon} {summary.describe()}"]
    if summary.images == 0:
        lines = [f"⚠ No images found in {md_code(root.name)}: add images on the Dataset tab first."]
    for image, reason in summary.failed[:SHOWN_FAILURES]:
        lines.append(f"- {md_code(relative_name(image, root))}: {reason}")
    if len(summary.failed) > SHOWN_FAILURES:
        lines.append(f"- and {len(summary.failed) - SHOWN_FAILURES} more")
    if summary.failed:
        lines.append("\nFix or remove the images listed, then caption again: the others are left as they are.")
    left_out = outside_note(root, root, "the dataset folder")
    if left_out:
        lines.append(f"\n{left_out}")
    return "\n".join(lines)

