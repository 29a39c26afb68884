"""Write corrected copies of a dataset into another folder; the originals are never touched.

Each usable image is loaded the way training loads it (first frame, EXIF orientation
applied, RGB with transparency over white), resized to cover its bucket and center-cropped
to it, and saved as PNG (or high-quality JPEG). Its caption is written beside it as UTF-8
with LF line endings. Files the doctor marks as errors are skipped. The folder layout is
kept, so ``5_name`` repeat folders still work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_gui.data.buckets import Bucket, fit_to_bucket, nearest_bucket, place, training_buckets
from lora_gui.data.doctor import DatasetReport, FileReport, check_dataset
from lora_gui.data.doctor.check import Progress
from lora_gui.data.images import MAX_PIXELS, ImageLoadError, load_rgb
from lora_gui.data.scan import check_dataset_dir, normalize_extension

IMAGE_FORMATS = {"png": ".png", "jpg": ".jpg"}


class PrepareError(ValueError):
    """The source or destination folder cannot be used; nothing was written."""


@dataclass
class PrepareSummary:
    source: Path
    destination: Path
    written: list[Path] = field(default_factory=list)  # the images, under ``destination``
    captions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)

    def describe(self) -> str:
        lines = [f"Wrote {len(self.written)} image(s) and {self.captions} caption(s) to {self.destination}."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s):")
            lines += [f"  {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def prepare_dataset(
    src: str | Path,
    dst: str | Path,
    resolution: int = 512,
    bucket_step: int = 64,
    size_multiple: int = 8,
    progress: Progress | None = None,
    *,
    caption_extension: str = ".txt",
    image_format: str = "png",
    bucketing: bool = True,
    report: DatasetReport | None = None,
    max_pixels: int = MAX_PIXELS,
) -> PrepareSummary:
    """Corrected copies of ``src`` in ``dst`` (which must not overlap ``src``).

    ``report``: an earlier ``check_dataset`` of ``src`` with the same settings (checked now if None).
    Raises ``PrepareError`` for unusable folders before anything is written.
    """
    source, target = check_folders(src, dst)
    if image_format not in IMAGE_FORMATS:
        raise PrepareError(f"Image format {image_format!r} is not supported; choose png or jpg.")
    extension = normalize_extension(caption_extension)
    if report is None:
        report = check_dataset(
            source, resolution=resolution, caption_extension=extension, bucket_step=bucket_step,
            size_multiple=size_multiple, bucketing=bucketing, max_pixels=max_pixels,
        )
    buckets = training_buckets(resolution, bucket_step, size_multiple, bucketing)
    summary = PrepareSummary(source, target)
    writer = _Writer(target, buckets, IMAGE_FORMATS[image_format], extension, max_pixels)
    for done, file in enumerate(report.files, start=1):
        if file.usable:
            writer.copy(file, summary)
        else:
            summary.skipped.append((file.relative, "; ".join(p.message for p in file.errors())))
        if progress is not None:
            progress(done, len(report.files))
    return summary


@dataclass
class _Writer:
    target: Path
    buckets: list[Bucket]
    image_suffix: str
    caption_extension: str
    max_pixels: int
    taken: set[Path] = field(default_factory=set)

    def copy(self, file: FileReport, summary: PrepareSummary) -> None:
        stem = _unique_stem(self.target / file.relative, self.taken)
        output = stem.with_name(stem.name + self.image_suffix)
        try:
            image = load_rgb(file.path, self.max_pixels)
            placement = place(*image.size, nearest_bucket(*image.size, self.buckets))
            _save_image(fit_to_bucket(image, placement), output)
            if file.caption_path is not None:
                _write_text(stem.with_name(stem.name + self.caption_extension), file.caption)
                summary.captions += 1
        except (ImageLoadError, ValueError, OSError) as exc:
            summary.skipped.append((file.relative, f"could not be written ({exc})"))
            return
        summary.written.append(output)


def check_folders(src: str | Path, dst: str | Path) -> tuple[Path, Path]:
    """Refuse a destination that is, or is inside, the source (or the other way round)."""
    try:
        source = check_dataset_dir(src).resolve()
    except ValueError as exc:
        raise PrepareError(str(exc).replace("dataset.dir", "The source folder")) from None
    if not str(dst).strip():
        raise PrepareError("No destination folder given: name a new folder for the corrected copies.")
    target = Path(dst).expanduser().resolve()
    if target == source or target.is_relative_to(source):
        raise PrepareError(
            f"The destination {target} is inside the source {source}; the copies would mix with the "
            "originals. Choose a folder outside it."
        )
    if source.is_relative_to(target):
        raise PrepareError(
            f"The source {source} is inside the destination {target}, so copies could overwrite originals. "
            "Choose a folder that does not contain the source."
        )
    if target.exists() and not target.is_dir():
        raise PrepareError(f"The destination {target} is a file; choose a folder.")
    return source, target


def _unique_stem(path: Path, taken: set[Path]) -> Path:
    """``a.png`` and ``a.jpg`` both become ``a.png``: the second is named ``a_jpg`` instead."""
    stem = path.with_name(path.stem)
    if stem in taken:
        stem = stem.with_name(f"{stem.name}_{path.suffix.lstrip('.').lower()}")
    while stem in taken:
        stem = stem.with_name(stem.name + "_")
    taken.add(stem)
    return stem


def _save_image(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    if path.suffix == ".jpg":
        image.save(temporary, "JPEG", quality=95, subsampling=0)
    else:
        image.save(temporary, "PNG")
    os.replace(temporary, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8", newline="\n")
    os.replace(temporary, path)
