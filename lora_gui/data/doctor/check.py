"""``check_dataset``: a verdict for every image in a dataset folder; it never raises for a bad file."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_gui.data.buckets import Bucket, nearest_bucket, place, training_buckets
from lora_gui.data.doctor.caption_checks import TokenCounter, check_caption, token_counter
from lora_gui.data.doctor.dedupe import Fingerprint, find_duplicates
from lora_gui.data.doctor.image_checks import inspect_image, size_problems
from lora_gui.data.doctor.report import SEVERITIES, DatasetReport, FileReport, problem, relative_path
from lora_gui.data.doctor.summary import summarize
from lora_gui.data.images import MAX_PIXELS, ImageLoadError
from lora_gui.data.scan import ImageFile, check_dataset_dir, find_image_files, normalize_extension

Progress = Callable[[int, int], None]  # (done, total)
_MAX_THREADS = 8


@dataclass(frozen=True)
class CheckSettings:
    resolution: int = 512
    bucket_step: int = 64
    size_multiple: int = 8
    bucketing: bool = True
    caption_extension: str = ".txt"
    trigger: str | None = None
    token_limit: int = 77
    repeats: int = 1
    max_pixels: int = MAX_PIXELS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Context:
    root: Path
    settings: CheckSettings
    buckets: list[Bucket]
    count_tokens: TokenCounter
    exact_tokens: bool


def check_dataset(
    directory: str | Path,
    trigger: str | None = None,
    resolution: int = 512,
    caption_extension: str = ".txt",
    token_limit: int = 77,
    tokenizer: Any | None = None,
    bucket_step: int = 64,
    size_multiple: int = 8,
    progress: Progress | None = None,
    *,
    bucketing: bool = True,
    repeats: int = 1,
    max_pixels: int = MAX_PIXELS,
) -> DatasetReport:
    """Check every image (and its caption) under ``directory`` the way training would load it.

    Raises ``ValueError`` only when ``directory`` is not a folder. ``tokenizer``: see
    ``caption_checks.token_counter``; without one, caption lengths are estimated.
    """
    root = check_dataset_dir(directory)
    settings = CheckSettings(
        resolution, bucket_step, size_multiple, bucketing, normalize_extension(caption_extension),
        (trigger or "").strip() or None, token_limit, repeats, max_pixels,
    )
    count_tokens, exact = token_counter(tokenizer)
    buckets = training_buckets(resolution, bucket_step, size_multiple, bucketing)
    context = _Context(root, settings, buckets, count_tokens, exact)
    files = find_image_files(root, settings.caption_extension, repeats)
    results = _check_all(files, context, progress)
    reports = [report for report, _, _ in results]
    _mark_shared_captions(reports, files, settings.caption_extension)
    _mark_duplicates(reports, [digest for _, digest, _ in results], [fp for _, _, fp in results])
    orphans = _orphan_captions(root, files, settings.caption_extension)
    summary = summarize(root, reports, settings.to_dict(), orphans, exact)
    return DatasetReport(root, reports, summary)


def _check_all(
    files: list[ImageFile], context: _Context, progress: Progress | None
) -> list[tuple[FileReport, str | None, Fingerprint | None]]:
    results = []
    threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(files)))
    with ThreadPoolExecutor(threads) as pool:
        for done, result in enumerate(pool.map(lambda f: _check_file(f, context), files), start=1):
            results.append(result)
            if progress is not None:
                progress(done, len(files))
    return results


def _check_file(file: ImageFile, context: _Context) -> tuple[FileReport, str | None, Fingerprint | None]:
    """One file's verdict, its SHA-256 and its perceptual hash (both None when it is unusable)."""
    report = FileReport(file.path, relative_path(file.path, context.root), file.repeats)
    report.caption_path = file.caption_path
    print_ = _check_image(report, context)
    if report.usable:  # an unusable image's caption matters once the image is fixed
        settings = context.settings
        expected = file.path.with_name(file.path.stem + settings.caption_extension)
        caption = check_caption(
            file.caption_path, expected, settings.trigger, settings.token_limit,
            context.count_tokens, context.exact_tokens,
        )
        report.caption, report.caption_words, report.caption_tokens = caption.text, caption.words, caption.tokens
        report.problems += caption.problems
    if not report.usable:
        report.bucket = None
        return report, None, None
    return report, _sha256(file.path), print_


def _check_image(report: FileReport, context: _Context) -> Fingerprint | None:
    """Fill in the image's size, bucket and problems; its perceptual hash when it could be read."""
    try:
        facts = inspect_image(report.path, context.settings.max_pixels)
    except ImageLoadError as exc:
        code = exc.code if exc.code in SEVERITIES else "unreadable"
        report.problems.append(problem(code, f"Skipped: {exc.reason}."))
        return None
    except Exception as exc:  # a bug in a Pillow plugin must not end the check
        reason = f"{type(exc).__name__}: {exc}"
        report.problems.append(problem(
            "unreadable", f"Skipped: the file can't be read ({reason}); copy it again or remove it."
        ))
        return None
    report.width, report.height = facts.width, facts.height
    placement = place(facts.width, facts.height, nearest_bucket(facts.width, facts.height, context.buckets))
    report.bucket = placement.bucket
    report.problems += facts.problems + size_problems(facts, placement, context.settings.resolution)
    return facts.fingerprint


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _mark_shared_captions(reports: list[FileReport], files: list[ImageFile], extension: str) -> None:
    """``a.png`` + ``a.jpg``: both would read ``a.txt``."""
    groups: dict[Path, list[int]] = {}
    for index, file in enumerate(files):
        key = file.caption_path or file.path.with_name(file.path.stem + extension)
        groups.setdefault(key, []).append(index)
    for caption, members in groups.items():
        if len(members) < 2:
            continue
        for index in (i for i in members if reports[i].usable):
            others = ", ".join(files[i].path.name for i in members if i != index)
            reports[index].problems.append(problem(
                "shared_caption_stem",
                f"{files[index].path.name} and {others} have the same name, so they share the caption "
                f"{caption.name}. Rename one and give it its own caption.",
            ))


def _mark_duplicates(
    reports: list[FileReport], digests: list[str | None], prints: list[Fingerprint | None]
) -> None:
    for index, match in find_duplicates(digests, prints).items():
        other = reports[match.index].relative
        if match.code == "duplicate":
            message = (
                f"A byte-for-byte copy of {other}, so this picture trains twice as often. Delete one copy "
                "unless that is what you want."
            )
        else:
            message = (
                f"Looks almost the same as {other} (hash distance {match.distance}): probably a resized or "
                "re-saved copy. Keep the better one and delete the other."
            )
        reports[index].problems.append(problem(match.code, message))


def _orphan_captions(root: Path, files: list[ImageFile], extension: str) -> list[str]:
    """Caption files that no image uses (often an image renamed or deleted)."""
    used = {file.caption_path for file in files if file.caption_path}
    orphans = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and name.lower().endswith(extension.lower()) and path not in used:
                orphans.append(relative_path(path, root))
    return orphans
