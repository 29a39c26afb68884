"""The report as text for a terminal: problems by file, then the summary and the verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_gui.data.doctor.report import ERROR, INFO, WARNING

if TYPE_CHECKING:
    from lora_gui.data.doctor.report import DatasetReport, FileReport


def render_report(report: DatasetReport) -> str:
    summary = report.summary
    counts = summary["counts"]
    lines = [
        f"Dataset check: {report.root}",
        f"{summary['images']} images: {counts['ok']} ok, {counts['warning']} with warnings, "
        f"{counts['error']} with errors",
    ]
    lines += _section("Errors (these files are skipped):", report.files, ERROR)
    lines += _section("Warnings (these files train; worth a look):", report.files, WARNING)
    lines += _notes(report.files)
    lines += ["", "Summary:"] + [f"  {line}" for line in _summary_lines(summary)]
    lines += ["", summary["verdict"]] + [f"  - {reason}" for reason in summary["reasons"]]
    return "\n".join(lines)


def _section(title: str, files: list[FileReport], severity: str) -> list[str]:
    chosen = [f for f in files if f.status == severity]
    if not chosen:
        return []
    lines = ["", title]
    for file in chosen:
        lines.append(f"  {file.relative}")
        lines += [f"    {p.code}: {p.message}" for p in file.problems if p.severity != INFO]
    return lines


def _notes(files: list[FileReport]) -> list[str]:
    noted = [(f, [p.code for p in f.problems if p.severity == INFO]) for f in files if f.usable]
    noted = [(f, codes) for f, codes in noted if codes]
    if not noted:
        return []
    lines = ["", "Converted automatically (nothing to do; see --json for details):"]
    return lines + [f"  {f.relative}: {', '.join(codes)}" for f, codes in noted]


def _summary_lines(summary: dict) -> list[str]:
    lines = []
    resolution = summary["resolution"]
    if resolution:
        width, height = resolution["width"], resolution["height"]
        lines.append(
            f"Sizes: {width['min']}-{width['max']} px wide (median {width['median']:g}), "
            f"{height['min']}-{height['max']} px high (median {height['median']:g})"
        )
    captions = summary["captions"]
    tokens = captions["tokens"]
    if tokens:
        about = "" if captions["tokens_exact"] else "about "
        lines.append(
            f"Captions: {captions['with_caption']} with text, {captions['missing']} missing, {captions['empty']} "
            f"empty; {about}{tokens['min']}-{tokens['max']} tokens (median {tokens['median']:g})"
        )
    buckets = summary["buckets"]
    if buckets:
        resolution_setting = summary["settings"]["resolution"]
        listed = ", ".join(f"{name}: {count}" for name, count in buckets.items())
        lines.append(f"Buckets at resolution {resolution_setting}: {listed}")
    trigger = summary["trigger"]
    if trigger:
        lines.append(
            f"Trigger {trigger['word']!r}: in {trigger['with']} of {trigger['with'] + trigger['without']} "
            f"usable images ({trigger['coverage']:.0%})"
        )
    return lines
