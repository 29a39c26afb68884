"""The hook for training: exactly the images the doctor passes, one log line per skipped file."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lora_gui.data.doctor.check import Progress, check_dataset
from lora_gui.data.doctor.report import DatasetReport
from lora_gui.data.scan import ImageRecord

if TYPE_CHECKING:
    from lora_gui.config import DatasetSection

Log = Callable[[str], None]


def check_section(
    section: DatasetSection,
    size_multiple: int = 8,
    progress: Progress | None = None,
    tokenizer: Any | None = None,
    token_limit: int = 77,
) -> DatasetReport:
    """``check_dataset`` with the settings of a config's ``dataset`` section."""
    return check_dataset(
        section.dir,
        trigger=section.trigger_word or None,
        resolution=section.resolution,
        caption_extension=section.caption_extension,
        token_limit=token_limit,
        tokenizer=tokenizer,
        bucket_step=section.bucket_step,
        size_multiple=size_multiple,
        progress=progress,
        bucketing=section.bucketing,
        repeats=section.repeats,
    )


def usable_records(report: DatasetReport, log: Log | None = None) -> list[ImageRecord]:
    """The records training uses; logs one line per skipped file, then the report's other findings.

    Raises ``ValueError`` with the report's reasons when no image can be used.
    """
    log = log or (lambda _line: None)
    for file in report.skipped_files():
        log(f"Skipped {file.relative}: {'; '.join(p.message for p in file.errors())}")
    if not report.ready:
        raise ValueError(report.failure_message())
    for reason in report.reasons:
        log(f"Dataset check: {reason}")
    return report.usable_records()


def training_records(
    section: DatasetSection,
    size_multiple: int = 8,
    log: Log | None = None,
    progress: Progress | None = None,
    token_limit: int = 77,
) -> list[ImageRecord]:
    """Check ``section.dir`` and return the records to train on (pass them to ``TrainingData(records=...)``)."""
    return usable_records(check_section(section, size_multiple, progress, token_limit=token_limit), log)
