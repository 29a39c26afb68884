"""The dataset doctor: a verdict for every image and caption, and whether training can go ahead.

``check_dataset(dir, ...)`` returns a ``DatasetReport``; ``training_records(section, ...)``
gives training exactly the images the doctor passes. Severities and problem codes are
listed in ``report.py``.
"""

from lora_gui.data.doctor.caption_checks import estimate_clip_tokens
from lora_gui.data.doctor.check import CheckSettings, check_dataset
from lora_gui.data.doctor.report import (
    ERROR,
    INFO,
    OK,
    REPORT_NAME,
    SEVERITIES,
    WARNING,
    DatasetReport,
    FileReport,
    Problem,
)
from lora_gui.data.doctor.training import check_section, training_records, usable_records

__all__ = [
    "ERROR",
    "INFO",
    "OK",
    "REPORT_NAME",
    "SEVERITIES",
    "WARNING",
    "CheckSettings",
    "DatasetReport",
    "FileReport",
    "Problem",
    "check_dataset",
    "check_section",
    "estimate_clip_tokens",
    "training_records",
    "usable_records",
]
