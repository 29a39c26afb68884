"""The Dataset tab's logic, free of Gradio: folder checks, gallery, report tables, uploads, the sample.

Every function re-checks what it is given (a share link lets anyone send any value), and
problems come back as ``DatasetViewError`` with a sentence that says what to do.
"""

from __future__ import annotations

import math
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lora_gui.data.doctor import ERROR, INFO, WARNING, DatasetReport, check_dataset
from lora_gui.data.doctor.summary import summarize
from lora_gui.data.images import decode_first_frame, open_image, to_rgb, upright
from lora_gui.data.sample_dataset import check_trigger, create_sample_dataset
from lora_gui.data.scan import IMAGE_EXTENSIONS, confined_to, find_image_files, outside_links, read_caption
from lora_gui.ui.workspace import MAX_PATH_CHARS, OutsideWorkspace, Workspace, clip, safe_folder_name

MAX_GALLERY = 200  # images shown; the report covers every file
MAX_TABLE_ROWS = 2000
THUMB_SIDE = 256
SAMPLE_SIZE = 512  # checks clean at the default resolution 512
MIN_RESOLUTION, MAX_RESOLUTION = 64, 4096
CAPTION_EXTENSION = ".txt"
MAX_UPLOAD_FILES = 2000
MAX_IMAGE_BYTES = 200 * 1024**2
MAX_CAPTION_BYTES = 1024**2
MAX_FOLDER_TEXT = 1000  # characters in a typed or picked folder
SHOWN_LINKS = 10  # links left out, named in a message
ICONS = {ERROR: "✗", WARNING: "⚠", INFO: "ℹ", "ok": "✓"}
TABLE_HEADERS = ["File", "Status", "Size", "Bucket", "Problems"]
Progress = Callable[[int, int], None]  # (done, total)


class DatasetViewError(ValueError):
    pass


# ---------------------------------------------------------------------------- folders


def resolve_dataset(workspace: Workspace, text: Any) -> Path:
    """A dataset folder the browser may see: inside the workspace's datasets or outputs or an extra dataset
    folder given at launch, existing.

    Links are resolved first: a folder that is (or passes through) a link leading outside is refused."""
    if not isinstance(text, str) or not text.strip():
        raise DatasetViewError("Choose a dataset folder: pick one from the list, create the sample, or upload "
                               "images.")
    if len(text) > MAX_FOLDER_TEXT or "\x00" in text:
        why = "it contains a NUL character" if "\x00" in text else f"{len(text)} characters, at most {MAX_FOLDER_TEXT}"
        raise DatasetViewError(f"That folder name is not valid ({why}); pick a folder from the list.")
    try:
        path = workspace.resolve_dataset(text)
        typed = Path(text.strip())
        if not path.exists() and not typed.is_absolute() and typed.parts[:1] not in (("datasets",), ("outputs",)):
            path = workspace.resolve_dataset(text, under=workspace.datasets)  # "sample" means datasets/sample
        is_folder = path.is_dir()
    except OutsideWorkspace as exc:
        raise DatasetViewError(str(exc)) from None
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise DatasetViewError(f"{clip(text.strip())} can't be used as a folder ({exc.strerror or exc}); pick a "
                               "folder from the list.") from None
    if not any(path.is_relative_to(Path(root)) for root in workspace.allowed_paths()):
        raise DatasetViewError(f"{clip(text.strip())} is not under datasets/ (or outputs/); put datasets in "
                               f"{workspace.datasets}.")
    if not is_folder:
        raise DatasetViewError(f"{clip(workspace.relative(path))} is not a folder. Pick one from the list, or "
                               "create it by uploading images.")
    return path


def folder_from_selection(workspace: Workspace, selection: Any) -> Path:
    """The folder picked in the file browser: a chosen folder itself, or the folder of a chosen file."""
    if isinstance(selection, list):
        selection = selection[0] if len(selection) == 1 else None
    if not isinstance(selection, str) or not selection.strip():
        raise DatasetViewError("Pick a folder (tick '.' inside it) or any file in it.")
    if len(selection) > MAX_PATH_CHARS or "\x00" in selection:
        raise DatasetViewError("That selection is not a folder in the file browser (too long, or it contains a NUL "
                               "character); pick a folder there.")
    path = Path(selection)
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for the file system: it names nothing
        is_file = False
    return resolve_dataset(workspace, str(path.parent if is_file else path))


def outside_note(folder: Path, confine: Path, where: str = "the workspace") -> str:
    """A sentence naming the links under ``folder`` that lead outside ``confine`` (left out of every view and
    edit), or ""."""
    links = outside_links(folder, confine)
    if not links:
        return ""
    names = ", ".join(md_code(clip(_relative(link.path, folder), 80)) for link in links[:SHOWN_LINKS])
    more = f" and {len(links) - SHOWN_LINKS} more" if len(links) > SHOWN_LINKS else ""
    return (f"⚠ Left out {len(links)} link(s) that lead outside {where}: {names}{more}. The app does not read, "
            "show or write through such links, and leaves out any image whose file or caption is one of them. "
            "Copy the files into the folder if they belong to the dataset.")


def left_out_note(workspace: Workspace, folder: Path) -> str:
    """``outside_note`` for a dataset folder, confined to the workspace or to its extra dataset folder."""
    where = "the workspace" if workspace.contains(folder) else "the extra dataset folder"
    return outside_note(folder, workspace.dataset_root(folder), where)


def check_folder(workspace: Workspace, folder: Path, trigger: str | None, resolution: int,
                 progress: Progress | None = None) -> DatasetReport:
    """The dataset doctor's report, confined to the workspace: links leading outside are neither read nor
    listed (the CLI's ``dataset check`` follows them, on the user's own machine)."""
    with confined_to(workspace.dataset_root(folder)):
        report = check_dataset(folder, trigger=trigger, resolution=resolution, progress=progress)
    # a caption that was left out, or whose image was, is no orphan
    left_out = {Path(_relative(link.path, folder)).with_suffix("")
                for link in outside_links(folder, workspace.dataset_root(folder))}
    orphans = report.summary["orphan_captions"]
    kept = [name for name in orphans if Path(name).with_suffix("") not in left_out]
    if len(kept) != len(orphans):
        summary = report.summary
        report.summary = summarize(report.root, report.files, summary["settings"], kept,
                                   summary["captions"]["tokens_exact"])
    return report


def free_folder(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name-2``, ``name-3`` ... when that exists."""
    candidate, number = parent / name, 1
    while candidate.exists():
        number += 1
        candidate = parent / f"{name}-{number}"
    return candidate


def create_sample(workspace: Workspace, trigger: Any) -> tuple[Path, str, str]:
    """(folder, trigger used, message): the sample in datasets/sample (or sample-2 ... when taken)."""
    try:
        word = check_trigger(trigger if isinstance(trigger, str) and trigger.strip() else "sks")
    except ValueError as exc:
        raise DatasetViewError(str(exc)) from None
    folder = free_folder(workspace.datasets, "sample")
    try:
        create_sample_dataset(folder, trigger=word, size=SAMPLE_SIZE)
    except OSError as exc:  # FileExistsError included: another click took the name first
        raise DatasetViewError(f"Could not create the sample in {workspace.relative(folder)}: {exc}. "
                               "Try again.") from None
    taken = "" if folder.name == "sample" else " (datasets/sample already exists, so this is a new copy)"
    where = md_code(workspace.relative(folder))
    return folder, word, f"Created the sample dataset in {where}{taken} with trigger {md_code(word)}."


def check_inputs(trigger: Any, resolution: Any) -> tuple[str | None, int]:
    if trigger is not None and not isinstance(trigger, str):
        raise DatasetViewError("The trigger word must be text.")
    word = (trigger or "").strip()
    if len(word) > 100 or any(not ch.isprintable() for ch in word):
        raise DatasetViewError("The trigger word must be at most 100 printable characters, e.g. 'sks'.")
    try:
        value = float(resolution)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value.is_integer() and MIN_RESOLUTION <= value <= MAX_RESOLUTION):
        raise DatasetViewError(f"Resolution must be a whole number from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
                               "for example 512 or 1024, the size the model was trained at.")
    return word or None, int(value)


# ---------------------------------------------------------------------------- uploads


@dataclass
class UploadResult:
    folder: Path
    added_to_existing: bool
    saved: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name (why)"

    def message(self, workspace: Workspace) -> str:
        where = md_code(workspace.relative(self.folder))
        where += " (an existing dataset)" if self.added_to_existing else ""
        text = f"Copied {len(self.saved)} file(s) into {where}." if self.saved else "Nothing was copied."
        if self.skipped:
            more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            text += " Not copied: " + md_escape("; ".join(self.skipped[:10])) + more + "."
        return text


_UNSAFE_FILE_CHARS = re.compile(r"[^\w.\- ]+")
UPLOAD_EXTENSIONS = IMAGE_EXTENSIONS | {CAPTION_EXTENSION}


def clean_file_name(name: str) -> str | None:
    """The last part of an uploaded name, made safe (``../x.png`` -> ``x.png``); None when not allowed."""
    base = Path(re.split(r"[\\/]", str(name))[-1])
    stem = _UNSAFE_FILE_CHARS.sub("-", base.stem).strip(" .-")[:120]
    extension = base.suffix.lower()
    return f"{stem}{extension}" if stem and extension in UPLOAD_EXTENSIONS else None


def save_uploads(workspace: Workspace, name: Any, files: Any, source_root: Path | None = None) -> UploadResult:
    """Copy uploaded images and captions into datasets/<name>; existing files are never overwritten."""
    if not isinstance(name, str) or not safe_folder_name(name, fallback=""):
        raise DatasetViewError("Enter a name for the new dataset (letters, digits, '-', '_' or '.').")
    sources = [files] if isinstance(files, str) else files
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise DatasetViewError("Choose the images (and their .txt captions) to upload first.")
    if len(sources) > MAX_UPLOAD_FILES:
        raise DatasetViewError(f"At most {MAX_UPLOAD_FILES} files per upload; upload the rest in another "
                               "batch.")
    try:
        folder = workspace.resolve(safe_folder_name(name), under=workspace.datasets)
    except OutsideWorkspace as exc:
        raise DatasetViewError(str(exc)) from None
    if folder.parent != workspace.datasets.resolve() or (folder.exists() and not folder.is_dir()):
        raise DatasetViewError(f"datasets/{safe_folder_name(name)} can't be used; choose another name.")
    result = UploadResult(folder, added_to_existing=folder.exists())
    folder.mkdir(exist_ok=True)
    for source in map(Path, sources):
        target = clean_file_name(source.name)
        problem = _upload_problem(source, target, source_root)
        if problem is None:
            problem = _copy_new(source, folder / target)  # type: ignore[operator]
        if problem:
            result.skipped.append(f"{clip(source.name, 80)} ({problem})")
        else:
            result.saved.append(target)
    if not result.added_to_existing and not result.saved:
        folder.rmdir()
    return result


def _upload_problem(source: Path, target: str | None, source_root: Path | None) -> str | None:
    if source_root is not None and not source.resolve().is_relative_to(source_root.resolve()):
        return "not uploaded through this page"
    if not source.is_file():
        return "missing; upload it again"
    if target is None:
        kinds = ", ".join(sorted(e.lstrip(".") for e in UPLOAD_EXTENSIONS))
        return f"not an image or caption; allowed: {kinds}"
    size = source.stat().st_size
    if target.endswith(CAPTION_EXTENSION):
        return "caption larger than 1 MB" if size > MAX_CAPTION_BYTES else None
    if size > MAX_IMAGE_BYTES:
        return "image larger than 200 MB"
    try:
        with Image.open(source):
            return None
    except Exception:
        return "not a readable image"


def _copy_new(source: Path, target: Path) -> str | None:
    """Copy into a file that must not exist yet (exclusive create: nothing is ever overwritten)."""
    created = False
    try:
        with source.open("rb") as reader, target.open("xb") as writer:
            created = True
            shutil.copyfileobj(reader, writer)
    except FileExistsError:
        return f"{target.name} already exists in the dataset; not overwritten"
    except OSError as exc:
        if created:
            target.unlink(missing_ok=True)
        return f"could not be copied ({exc.strerror or exc})"
    return None


# ---------------------------------------------------------------------------- gallery


@dataclass
class ThumbnailCache:
    """Recent thumbnails by (path, size, mtime), so checking after showing does not decode twice."""

    capacity: int = MAX_GALLERY
    items: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # galleries are built on several threads

    def get(self, path: Path) -> Image.Image:
        try:
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
        except OSError:
            return placeholder()
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        image = thumbnail(path)
        with self.lock:
            self.items[key] = image
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return image


def thumbnail(path: Path, side: int = THUMB_SIDE) -> Image.Image:
    """A small upright RGB copy, as training sees the image; a gray square when it can't be read."""
    try:
        with open_image(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (side, side))
            decode_first_frame(image, path)
            small = to_rgb(upright(image))
        small.thumbnail((side, side))
        return small
    except Exception:  # a broken file is reported by the check; here it is a placeholder
        return placeholder(side)


def placeholder(side: int = THUMB_SIDE) -> Image.Image:
    return Image.new("RGB", (side, side), (128, 128, 128))


def gallery_items(
    folder: Path, cache: ThumbnailCache, report: DatasetReport | None = None, progress: Progress | None = None,
    confine: Path | None = None,
) -> tuple[list[tuple[Image.Image, str]], str]:
    """(thumbnail, label) for the first MAX_GALLERY images, and a note when there are more.

    ``confine``: leave out images whose file or caption resolves outside that folder (a report from
    ``check_folder`` is confined already)."""
    if report is not None:
        # the doctor reads no caption for an unusable image; show it anyway
        entries = [(f.path, f"{ICONS[f.status]} {f.relative}: {f.caption or _caption(f.caption_path)}")
                   for f in report.files]
    else:
        entries = [(f.path, f"{_relative(f.path, folder)}: {_caption(f.caption_path)}")
                   for f in find_image_files(folder, CAPTION_EXTENSION, confine=confine)]
    shown = entries[:MAX_GALLERY]
    images = []
    with ThreadPoolExecutor(4) as pool:
        for done, image in enumerate(pool.map(lambda e: cache.get(e[0]), shown), start=1):
            images.append(image)
            if progress is not None:
                progress(done, len(shown))
    items = [(image, _shorten(label, 300)) for image, (_, label) in zip(images, shown, strict=True)]
    if not entries:
        return items, "No images in this folder yet."
    more = f" (the first {MAX_GALLERY} of {len(entries)})" if len(entries) > MAX_GALLERY else ""
    return items, f"{len(entries)} image(s){more}."


def _caption(path: Path | None) -> str:
    return (read_caption(path) if path else "") or "(no caption)"


# ---------------------------------------------------------------------------- report


def report_rows(report: DatasetReport, limit: int = MAX_TABLE_ROWS) -> list[list[str]]:
    """One row per file, each problem next to it: errors first, then warnings, then notes, then clean."""
    order = {ERROR: 0, WARNING: 1}
    files = sorted(report.files, key=lambda f: (order.get(f.status, 2 if f.problems else 3), f.relative))
    rows = []
    for file in files[:limit]:
        size = f"{file.width}x{file.height}" if file.width else ""
        bucket = f"{file.bucket[0]}x{file.bucket[1]}" if file.bucket else ""
        problems = "\n".join(f"{ICONS[p.severity]} {p.code}: {p.message}" for p in file.problems)
        rows.append([file.relative, f"{ICONS[file.status]} {file.status}", size, bucket, problems])
    return rows


def bucket_rows(report: DatasetReport) -> list[dict[str, Any]]:
    """Bucket histogram rows, labelled "aspect · WxH" so that sorting by label puts tall before wide."""
    rows = []
    for name, count in report.summary["buckets"].items():
        width, height = (int(side) for side in name.split("x"))
        rows.append({"bucket": f"{width / height:.2f} · {name}", "images": count})
    return sorted(rows, key=lambda row: row["bucket"])


def summary_markdown(report: DatasetReport, limit: int = MAX_TABLE_ROWS) -> str:
    """The verdict and its reasons, then counts, sizes, captions, trigger coverage and buckets."""
    summary, counts = report.summary, report.summary["counts"]
    blocks = [f"### {'✓' if report.ready else '✗'} {summary['verdict']}"]
    if summary["reasons"]:
        blocks.append("\n".join(f"- {md_escape(reason)}" for reason in summary["reasons"]))
    facts = [("Images", f"{summary['images']}: {counts['ok']} ok, {counts['warning']} with warnings, "
                        f"{counts['error']} with errors (skipped)"), *_stat_lines(summary)]
    if summary["problems"]:
        listed = ", ".join(f"{code} ({count})" for code, count in summary["problems"].items())
        facts.append(("Problems", f"{listed}; each is listed next to its file below"))
    orphans = summary["orphan_captions"]
    if orphans:
        more = f" and {len(orphans) - 10} more" if len(orphans) > 10 else ""
        facts.append(("Captions without an image", ", ".join(orphans[:10]) + more))
    if len(report.files) > limit:
        facts.append(("Table", f"the first {limit} of {len(report.files)} files, errors first"))
    blocks.append("\n".join(f"- **{md_escape(name)}:** {md_escape(text)}" for name, text in facts))
    return "\n\n".join(blocks)


def _stat_lines(summary: dict) -> Iterable[tuple[str, str]]:
    if summary["resolution"]:
        w, h = summary["resolution"]["width"], summary["resolution"]["height"]
        yield "Sizes", (f"{w['min']}-{w['max']} px wide (median {w['median']:g}), "
                        f"{h['min']}-{h['max']} px high (median {h['median']:g})")
    captions = summary["captions"]
    text = f"{captions['with_caption']} with text, {captions['missing']} missing, {captions['empty']} empty"
    if captions["tokens"]:
        tokens, about = captions["tokens"], "" if captions["tokens_exact"] else "about "
        text += f"; {about}{tokens['min']}-{tokens['max']} tokens (median {tokens['median']:g})"
    yield "Captions", text
    trigger = summary["trigger"]
    if trigger:
        total = trigger["with"] + trigger["without"]
        coverage = f"in {trigger['with']} of {total} usable images ({trigger['coverage']:.0%})"
        yield f"Trigger '{trigger['word']}'", coverage
    else:
        yield "Trigger", "none given; type it above to see which captions lack it"
    buckets = summary["buckets"]
    if buckets:
        listed = ", ".join(f"{name}: {count}" for name, count in buckets.items())
        yield f"Buckets at resolution {summary['settings']['resolution']}", listed


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def md_code(text: str) -> str:
    """Text in a Markdown code span (where escapes would show literally)."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
