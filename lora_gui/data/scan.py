"""Find training images and their captions in a dataset folder.

Layouts: images with same-stem captions side by side (``a.png`` + ``a.txt``), or an
``images/`` folder with a parallel ``captions/`` folder. Subfolders named like kohya's
``5_name`` repeat their images 5 times per epoch. Files that cannot be used are reported
(one log line each) and skipped; nothing here raises for a bad file.

Links are followed by default: on the user's own machine a dataset may link to images kept
elsewhere. The app confines what it serves: ``find_image_files(..., confine=folder)`` (or any call
inside ``with confined_to(folder):``, which reaches code such as the dataset doctor that calls
``find_image_files`` itself) leaves out every image whose file or caption resolves outside
``folder``; ``outside_links`` names the entries that were left out and why.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from lora_gui.data.images import MAX_PIXELS, ImageLoadError, probe_image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tiff", ".tif"})
_REPEATS_FOLDER = re.compile(r"^([1-9]\d*)_.+$")
MAX_REPEATS = 1000  # a folder such as "2024_holiday" is a name, not 2024 repeats
_MAX_PROBE_THREADS = 8

Log = Callable[[str], None]
# The folder that scans in this context are confined to (None: follow links anywhere). A context
# variable, so each request / thread has its own and two runs never see each other's.
_CONFINE: ContextVar[Path | None] = ContextVar("lora_gui_scan_confine", default=None)


@dataclass(frozen=True)
class ImageFile:
    """An image found on disk, before it is opened."""

    path: Path
    caption_path: Path | None  # None: no caption file found
    repeats: int


@dataclass(frozen=True)
class ImageRecord:
    """A usable training image."""

    path: Path
    caption: str
    repeats: int
    width: int  # after EXIF orientation
    height: int
    caption_path: Path | None  # None: no caption file, the caption is empty


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class ScanReport:
    root: Path
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def missing_captions(self) -> list[ImageRecord]:
        return [record for record in self.records if record.caption_path is None]


def scan_folder(
    root: str | Path,
    caption_extension: str = ".txt",
    default_repeats: int = 1,
    log: Log | None = None,
    max_pixels: int = MAX_PIXELS,
) -> ScanReport:
    """Every image under ``root`` with its caption and repeats; unusable files are skipped and logged."""
    log = log or logging.getLogger(__name__).warning
    root = check_dataset_dir(root)
    files = find_image_files(root, caption_extension, default_repeats)
    report = ScanReport(root)
    with ThreadPoolExecutor(min(_MAX_PROBE_THREADS, os.cpu_count() or 1)) as pool:
        sizes = pool.map(lambda f: _probe_or_error(f.path, max_pixels), files)
        for file, size in zip(files, sizes, strict=True):
            if isinstance(size, ImageLoadError):
                report.skipped.append(SkippedFile(file.path, size.reason))
                log(f"Skipped {_relative(file.path, root)}: {size.reason}")
                continue
            caption = read_caption(file.caption_path) if file.caption_path else ""
            report.records.append(ImageRecord(file.path, caption, file.repeats, *size, file.caption_path))
    _log_missing_captions(report, caption_extension, log)
    return report


def check_dataset_dir(root: str | Path) -> Path:
    if not str(root).strip():
        raise ValueError("dataset.dir is not set: choose the folder that holds your training images.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"dataset.dir {str(path)!r} is not a folder: check the path or pick the folder again."
        )
    return path


def find_image_files(
    root: str | Path, caption_extension: str = ".txt", default_repeats: int = 1, confine: str | Path | None = None
) -> list[ImageFile]:
    """Image files under ``root`` (hidden files and folders ignored), in a stable order.

    ``confine`` (default: the folder of an enclosing ``confined_to``, else none): leave out images whose
    file, or whose caption (existing or where it would be written), resolves outside that folder.
    """
    root = Path(root)
    extension = normalize_extension(caption_extension)
    limit = Path(confine).resolve() if confine is not None else _CONFINE.get()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        folder = Path(dirpath)
        repeats = folder_repeats(folder.relative_to(root), default_repeats)
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = folder / name
            if limit is not None and not _stays_inside(path, root, extension, limit):
                continue
            found.append(ImageFile(path, find_caption(path, root, extension), repeats))
    return found


@contextmanager
def confined_to(folder: str | Path) -> Iterator[Path]:
    """Within this block (this thread or task only), every ``find_image_files`` is confined to ``folder``."""
    limit = Path(folder).resolve()
    token = _CONFINE.set(limit)
    try:
        yield limit
    finally:
        _CONFINE.reset(token)


def outside_links(root: str | Path, confine: str | Path, limit: int = 1000) -> list[SkippedFile]:
    """Entries under ``root`` (hidden ones ignored) that are links resolving outside ``confine``: what a
    confined scan leaves out. Folder links are not entered; at most ``limit`` entries are returned."""
    root, bound = Path(root), Path(confine).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_symlink() or _inside(path, bound):
                continue
            kind = "folder" if path.is_dir() else "file"
            found.append(SkippedFile(path, f"a link to a {kind} outside {bound}"))
            if len(found) >= limit:
                return found
    return found


def _stays_inside(image: Path, root: Path, extension: str, limit: Path) -> bool:
    """The image and every place its caption is read from or written to resolve inside ``limit``."""
    return all(_inside(path, limit) for path in (image, *caption_candidates(image, root, extension)))


def _inside(path: Path, limit: Path) -> bool:
    try:
        return path.resolve().is_relative_to(limit)
    except (OSError, RuntimeError):  # a link loop, an unreadable folder: not known to be inside
        return False


def folder_repeats(relative_folder: Path, default: int) -> int:
    """Repeats from the innermost folder named like ``5_name``, else ``default``."""
    for part in reversed(relative_folder.parts):
        match = _REPEATS_FOLDER.match(part)
        if match and int(match.group(1)) <= MAX_REPEATS:
            return int(match.group(1))
    return default


def find_caption(image: Path, root: Path, extension: str) -> Path | None:
    """``a.txt`` beside ``a.png``, else the same relative path under a ``captions/`` sibling of ``images/``."""
    return next((path for path in caption_candidates(image, root, extension) if path.is_file()), None)


def caption_candidates(image: Path, root: Path, extension: str) -> list[Path]:
    """Where the image's caption may be, in the order ``find_caption`` looks."""
    candidates = [image.with_name(image.stem + extension)]
    parts = image.relative_to(root).parts
    folders = [part.lower() for part in parts[:-1]]
    if "images" in folders:
        i = len(folders) - 1 - folders[::-1].index("images")
        candidates.append(root.joinpath(*parts[:i], "captions", *parts[i + 1 : -1], image.stem + extension))
    return candidates


def read_caption(path: str | Path) -> str:
    """Caption text: UTF-8 (with or without BOM), UTF-16 (with BOM) or cp1252; newlines normalised, stripped."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    return decode_caption(data)


@dataclass(frozen=True)
class DecodedCaption:
    """A caption file's text and how it was stored, so a report can say what was normalised."""

    text: str  # newlines normalised to LF, NULs dropped, stripped
    encoding: str  # "utf-8", "utf-8-bom", "utf-16-le", "utf-16-be" or "cp1252" (a guess: not valid UTF-8)
    line_endings: str  # "lf" (or none), "crlf" or "cr"
    replaced: int  # bytes that could not be decoded and became U+FFFD


def decode_caption(data: bytes) -> str:
    return decode_caption_details(data).text


def decode_caption_details(data: bytes) -> DecodedCaption:
    """Decode caption bytes: UTF-8 (with or without BOM), UTF-16 (with BOM), else cp1252."""
    replaced = 0
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16-le" if data.startswith(b"\xff\xfe") else "utf-16-be"
        text = data.decode("utf-16", errors="replace")
        replaced = text.count("\ufffd")
    else:
        try:
            text = data.decode("utf-8-sig")
            encoding = "utf-8-bom" if data.startswith(b"\xef\xbb\xbf") else "utf-8"
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
            encoding = "cp1252"
            replaced = text.count("\ufffd")
    line_endings = "crlf" if "\r\n" in text else "cr" if "\r" in text else "lf"
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()
    return DecodedCaption(text, encoding, line_endings, replaced)


def normalize_extension(extension: str) -> str:
    extension = extension.strip() or ".txt"
    return extension if extension.startswith(".") else f".{extension}"


def _probe_or_error(path: Path, max_pixels: int) -> tuple[int, int] | ImageLoadError:
    try:
        return probe_image(path, max_pixels)
    except ImageLoadError as exc:
        return exc
    except Exception as exc:  # a bug in a Pillow plugin must not end the scan
        return ImageLoadError(path, f"cannot be read ({exc})")


def _log_missing_captions(report: ScanReport, extension: str, log: Log) -> None:
    missing = report.missing_captions
    if not missing:
        return
    names = ", ".join(_relative(record.path, report.root) for record in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    log(
        f"{len(missing)} image(s) have no {normalize_extension(extension)} caption and train with an empty "
        f"caption: {names}{more}"
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
