"""Caption every image in a dataset folder: plan, caption in batches, write each file atomically.

An interrupted run leaves every caption file either as it was or fully rewritten, and running
it again continues where it stopped: skip-existing and only-empty runs skip what they already
wrote, and an overwrite run keeps a journal of the images it has done (see ``resume``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_gui.captioning.base import Captioner, CaptionerError, unload_all_captioners
from lora_gui.captioning.files import caption_target, write_text_atomic
from lora_gui.captioning.resume import RunJournal
from lora_gui.captioning.text import add_trigger, clean_text, join_parts, truncate
from lora_gui.data.images import ImageLoadError, load_rgb, probe_image
from lora_gui.data.scan import find_image_files, normalize_extension, read_caption
from lora_gui.events import Emit, Event, Status, ignore_events

MODES = ("overwrite", "skip_existing", "only_empty")
StopFlag = Callable[[], bool]

__all__ = ["MODES", "CaptionOptions", "CaptionProgress", "CaptionSummary", "caption_dataset", "finish_caption",
           "unload_all_captioners"]


@dataclass(frozen=True)
class CaptionOptions:
    trigger: str = ""  # put first in every caption that lacks it as a whole word
    prefix: str = ""
    suffix: str = ""
    max_length: int = 0  # characters per caption; 0 = no limit
    mode: str = "skip_existing"  # or "overwrite", "only_empty" (also re-caption empty caption files)
    batch_size: int = 0  # 0 = the captioner's default
    caption_extension: str = ".txt"
    device: str = "auto"
    dtype: str = "auto"
    unload_after: bool = True  # free the model (and GPU memory) when the run ends
    resume: bool = True  # an overwrite run continues an interrupted one with the same settings

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CaptionerError(f"Unknown caption mode {self.mode!r}: use one of {', '.join(MODES)}.")
        if self.max_length < 0 or self.batch_size < 0:
            raise CaptionerError("max_length and batch_size must be 0 (automatic) or more.")


@dataclass(frozen=True)
class CaptionProgress(Event):
    """``done`` of ``total`` images handled; ``path`` is the last caption file written."""

    done: int
    total: int
    path: str = ""


@dataclass
class CaptionSummary:
    images: int = 0
    written: list[Path] = field(default_factory=list)  # caption files written
    skipped: list[Path] = field(default_factory=list)  # images left alone (mode, or a shared caption file)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # image, reason
    stopped: bool = False

    def describe(self) -> str:
        parts = [f"Wrote {len(self.written)} caption(s) for {self.images} image(s)"]
        if self.skipped:
            parts.append(f"left {len(self.skipped)} existing caption(s) as they were")
        if self.failed:
            parts.append(f"{len(self.failed)} image(s) failed")
        text = "; ".join(parts) + "."
        if self.stopped:
            text += " Stopped early: run it again with the same settings to continue where it stopped."
        return text


@dataclass(frozen=True)
class _Job:
    image: Path
    caption_path: Path


def caption_dataset(
    root: str | Path,
    captioner: Captioner,
    options: CaptionOptions | None = None,
    progress: Emit = ignore_events,
    stop_flag: StopFlag | None = None,
) -> CaptionSummary:
    """Caption the images under ``root`` with ``captioner``; see ``CaptionOptions`` for the choices.

    ``progress`` receives ``Status`` (loading, downloads) and ``CaptionProgress`` events;
    ``stop_flag`` is polled between batches (e.g. ``threading.Event().is_set``).
    """
    options = options or CaptionOptions()
    root = _check_folder(root)
    files = find_image_files(root, options.caption_extension)
    summary = CaptionSummary(images=len(files))
    journal = None
    if options.mode == "overwrite" and options.resume:
        journal = RunJournal.open(root, _settings(captioner, options))
        if journal.done:
            progress(Status(f"Continuing an interrupted run: {len(journal.done)} image(s) were already captioned"))
    jobs = _plan(files, root, options, summary, journal)
    if jobs:
        try:
            captioner.load(options.device, options.dtype, progress)
            _run_batches(captioner, jobs, options, summary, progress, stop_flag, journal)
        finally:
            if options.unload_after:
                captioner.unload()
    if journal is not None and not summary.stopped:
        journal.finish()
    return summary


def finish_caption(text: str, options: CaptionOptions) -> str:
    """The model's text with trigger, prefix and suffix added, cut to ``max_length`` at a tag or word."""
    text, prefix, suffix = clean_text(text), clean_text(options.prefix), clean_text(options.suffix)
    if options.max_length:
        fixed = add_trigger(join_parts(prefix, "x", suffix), options.trigger)
        room = options.max_length - len(fixed) + 1  # the trigger, prefix and suffix are never cut
        text = truncate(text, room) if room > 0 else ""
    return add_trigger(join_parts(prefix, text, suffix), options.trigger)


def _check_folder(root: str | Path) -> Path:
    path = Path(str(root).strip()).expanduser()
    if not str(root).strip() or not path.is_dir():
        raise CaptionerError(f"{str(root)!r} is not a folder: choose the folder that holds your training images.")
    return path


def _settings(captioner: Captioner, options: CaptionOptions) -> dict:
    wording = {name: getattr(options, name) for name in ("trigger", "prefix", "suffix", "max_length",
                                                         "caption_extension")}
    return {"captioner": captioner.name, **captioner.settings(), **wording}


def _plan(files, root: Path, options: CaptionOptions, summary: CaptionSummary,
          journal: RunJournal | None) -> list[_Job]:
    extension = normalize_extension(options.caption_extension)
    jobs, claimed = [], set()
    for file in files:
        target = caption_target(file, root, extension)
        done = journal is not None and journal.is_done(file.path)
        if done or target in claimed or not _wanted(file.caption_path, options.mode):
            summary.skipped.append(file.path)
            continue
        claimed.add(target)
        jobs.append(_Job(file.path, target))
    return jobs


def _wanted(caption_path: Path | None, mode: str) -> bool:
    if caption_path is None or mode == "overwrite":
        return True
    return mode == "only_empty" and not read_caption(caption_path)


def _run_batches(captioner: Captioner, jobs: list[_Job], options: CaptionOptions, summary: CaptionSummary,
                 progress: Emit, stop_flag: StopFlag | None, journal: RunJournal | None) -> None:
    size = options.batch_size or captioner.default_batch_size
    for start in range(0, len(jobs), size):
        if stop_flag is not None and stop_flag():
            summary.stopped = True
            return
        if not captioner.loaded:
            raise CaptionerError(f"The {captioner.name} captioner was unloaded while it was captioning (was training "
                                 "started?). Run captioning again to continue where it stopped.")
        batch = jobs[start : start + size]
        written = _caption_batch(captioner, batch, options, summary)
        if journal is not None and written:
            journal.record([job.image for job in written])
        last = str(written[-1].caption_path) if written else ""
        progress(CaptionProgress(start + len(batch), len(jobs), last))


def _caption_batch(captioner: Captioner, batch: list[_Job], options: CaptionOptions,
                   summary: CaptionSummary) -> list[_Job]:
    """Caption and write one batch; returns the jobs whose caption file was written."""
    ready, images = _open_images(captioner, batch, summary)
    if not ready:
        return []
    try:
        captions = captioner.caption(images, [job.image for job in ready])
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            raise CaptionerError(
                f"Ran out of GPU memory captioning a batch of {len(ready)} image(s). Lower the batch size (try "
                f"{max(1, len(ready) // 2)}) and run again: it continues where it stopped, keeping the captions "
                "already written."
            ) from exc
        raise
    written = []
    for job, raw in zip(ready, captions, strict=True):
        if not clean_text(raw):
            summary.failed.append((job.image, f"the {captioner.name} captioner returned an empty caption"))
            continue
        write_text_atomic(job.caption_path, finish_caption(raw, options))
        summary.written.append(job.caption_path)
        written.append(job)
    return written


def _open_images(captioner: Captioner, batch: list[_Job], summary: CaptionSummary):
    """The batch's images, decoded; unusable files are left out as failed (a captioner that reads no pixels,
    the template, still gets only the files the dataset doctor and training accept as images)."""
    if not captioner.needs_images:
        ready = []
        for job in batch:
            try:
                probe_image(job.image)
            except ImageLoadError as exc:
                summary.failed.append((job.image, exc.reason))
                continue
            ready.append(job)
        return ready, []
    ready, images = [], []
    for job in batch:
        try:
            images.append(load_rgb(job.image))
        except ImageLoadError as exc:
            summary.failed.append((job.image, exc.reason))
            continue
        ready.append(job)
    return ready, images
