"""The dataset-level part of the report: counts, statistics, buckets, trigger coverage, readiness."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from lora_gui.data.doctor.report import ERROR, OK, WARNING, FileReport, bucket_name
from lora_gui.data.scan import IMAGE_EXTENSIONS

FEW_IMAGES = 5  # below this a LoRA rarely generalises; said, but training may go ahead


def summarize(
    root: Path, files: list[FileReport], settings: dict[str, Any], orphans: list[str], exact_tokens: bool
) -> dict[str, Any]:
    usable = [f for f in files if f.usable]
    statuses = Counter(f.status for f in files)
    problems = Counter(code for f in files for code in dict.fromkeys(f.codes))
    summary: dict[str, Any] = {
        "root": str(root),
        "settings": settings,
        "images": len(files),
        "usable": len(usable),
        "skipped": len(files) - len(usable),
        "counts": {status: statuses.get(status, 0) for status in (OK, WARNING, ERROR)},
        "problems": dict(sorted(problems.items())),
        "resolution": _resolution_stats(files),
        "captions": _caption_stats(usable, exact_tokens),
        "buckets": _bucket_histogram(usable),
        "trigger": _trigger_coverage(usable, settings.get("trigger")),
        "orphan_captions": orphans,
    }
    reasons = _reasons(root, files, usable, summary)
    summary["ready"] = bool(usable)
    summary["verdict"] = (
        f"Ready to train: {len(usable)} of {len(files)} images will be used."
        if usable
        else "Not ready: there is no image training can use."
    )
    summary["reasons"] = reasons
    return summary


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _resolution_stats(files: list[FileReport]) -> dict[str, Any] | None:
    sized = [f for f in files if f.width is not None and f.height is not None]
    if not sized:
        return None
    return {
        "width": stats([f.width for f in sized]),
        "height": stats([f.height for f in sized]),
        "megapixels": stats([round(f.width * f.height / 1e6, 3) for f in sized]),
    }


def _caption_stats(usable: list[FileReport], exact_tokens: bool) -> dict[str, Any]:
    codes = Counter(code for f in usable for code in f.codes)
    captioned = [f for f in usable if f.caption]
    return {
        "with_caption": len(captioned),
        "missing": codes["caption_missing"],
        "empty": codes["caption_empty"],
        "too_long": codes["caption_too_long"],
        "words": stats([f.caption_words for f in captioned if f.caption_words is not None]),
        "tokens": stats([f.caption_tokens for f in captioned if f.caption_tokens is not None]),
        "tokens_exact": exact_tokens,
    }


def _bucket_histogram(usable: list[FileReport]) -> dict[str, int]:
    counts = Counter(f.bucket for f in usable if f.bucket is not None)
    return {bucket_name(bucket): counts[bucket] for bucket in sorted(counts)}


def _trigger_coverage(usable: list[FileReport], trigger: str | None) -> dict[str, Any] | None:
    if not trigger:
        return None
    without = sum(1 for f in usable if not f.caption or "trigger_missing" in f.codes)
    covered = len(usable) - without
    return {
        "word": trigger,
        "with": covered,
        "without": without,
        "coverage": round(covered / len(usable), 4) if usable else 0.0,
    }


def _reasons(root: Path, files: list[FileReport], usable: list[FileReport], summary: dict) -> list[str]:
    if not files:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        return [f"No images found in {root} (looked for {kinds}). Put your training images there, each "
                "with a same-name .txt caption, or choose the folder that holds them."]
    reasons = []
    errors = _error_breakdown(files)
    if not usable:
        reasons.append(f"None of the {len(files)} images can be used ({errors}). Fix or replace them; the "
                       "report (`lora-gui dataset check`) says what is wrong with each file.")
        return reasons
    if len(usable) < len(files):
        skipped = len(files) - len(usable)
        reasons.append(f"{skipped} of {len(files)} images can't be used and will be skipped ({errors}).")
    if len(usable) < FEW_IMAGES:
        reasons.append(f"Only {len(usable)} usable image(s); a LoRA usually needs 10 or more to generalise.")
    reasons += _caption_reasons(summary["captions"], summary["settings"]["token_limit"])
    trigger = summary["trigger"]
    if trigger and trigger["without"]:
        reasons.append(f"The trigger word {trigger['word']!r} is missing from {trigger['without']} of "
                       f"{len(usable)} usable images' captions.")
    reasons += _duplicate_reasons(summary["problems"])
    if summary["orphan_captions"]:
        reasons.append(f"{len(summary['orphan_captions'])} caption file(s) belong to no image (renamed or "
                       "deleted images?).")
    return reasons


def _caption_reasons(captions: dict, token_limit: int) -> list[str]:
    reasons = []
    if captions["missing"]:
        reasons.append(f"{captions['missing']} usable image(s) have no caption and train with an empty one.")
    if captions["empty"]:
        reasons.append(f"{captions['empty']} caption(s) are empty.")
    if captions["too_long"]:
        reasons.append(f"{captions['too_long']} caption(s) are longer than the {token_limit} tokens the text "
                       "encoder reads; their ends are ignored.")
    return reasons


def _duplicate_reasons(problems: dict[str, int]) -> list[str]:
    exact, near = problems.get("duplicate", 0), problems.get("near_duplicate", 0)
    if not exact and not near:
        return []
    return [f"{exact} exact and {near} near duplicate image(s): they train more often than the others."]


def _error_breakdown(files: list[FileReport]) -> str:
    codes = Counter(p.code for f in files for p in f.errors())
    return ", ".join(f"{code}: {count}" for code, count in sorted(codes.items()))
