"""The Dataset tab: choose a folder, see every image with its caption, check it with the dataset doctor.

Folders are confined to the workspace's datasets (and outputs) folders, and links that lead outside the
workspace are neither followed nor listed (the file browser hides them, the gallery and report leave them
out and say so). The handlers are small wrappers around ``lora_gui.ui.dataset_view``, which re-checks
every value on the server; problems come back as messages in the tab, never as tracebacks.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
from gradio.components.base import server
from gradio.context import Context
from gradio.exceptions import InvalidPathError

from lora_gui.ui import dataset_view as V
from lora_gui.ui.checked import CheckedDropdown, CheckedNumber
from lora_gui.ui.dataset_view import DatasetViewError
from lora_gui.ui.guard import message_guard
from lora_gui.ui.session import AppSession

INTRO = ("Pick a dataset folder (or create the built-in sample with one click), look through the images and "
         "captions, then click **Check dataset** to see what the trainer will make of every file.")
NOT_CHECKED = "Click **Check dataset** to see the report: problems per file, buckets and trigger coverage."
BUCKET_COLUMNS = ["bucket", "images"]


@dataclass
class DatasetTab:
    folder: gr.Textbox  # the chosen dataset folder, workspace-relative (e.g. "datasets/sample")
    trigger: gr.Textbox  # the trigger word typed on this tab


def build(session: AppSession, panel: gr.Tab | None = None) -> DatasetTab:
    """The tab's contents; with ``panel`` (the Tab itself) the gallery is re-read whenever the tab is opened,
    so captions edited on the Captions tab show."""
    workspace = session.workspace
    thumbnails = V.ThumbnailCache()
    gr.Markdown(INTRO)
    with gr.Row(equal_height=True):
        folder = gr.Textbox(label="Dataset folder", placeholder="datasets/sample", scale=4,
                            info="Relative to the workspace; press Enter to show it")
        existing = CheckedDropdown(workspace.list_datasets(), value=None, label="Existing datasets", scale=3)
        refresh = gr.Button("Refresh list", scale=1)
        sample = gr.Button("Create sample dataset", scale=1)
    with gr.Accordion("Browse the datasets folder", open=False):
        explorer = confine_explorer(gr.FileExplorer(
            glob="**/*", ignore_glob=glob.escape(str(workspace.datasets)) + "*/.*", file_count="single",
            root_dir=workspace.datasets, max_height=320,
            label="Open a folder and tick '.' to choose it, or tick any file in it (new folders: reload the page; "
                  "links that lead outside the workspace are not shown)",
        ))
    with gr.Accordion("Upload images into a new dataset", open=False):
        with gr.Row():
            new_name = gr.Textbox(label="New dataset name", placeholder="my-style", scale=1)
            uploads = gr.File(file_count="multiple", file_types=sorted(V.UPLOAD_EXTENSIONS), scale=3,
                              label=f"Images (up to {V.MAX_IMAGE_BYTES // 1024**2} MB each) and same-name .txt captions "
                                    f"(up to {V.MAX_CAPTION_BYTES // 1024**2} MB)")
        upload = gr.Button("Copy into datasets/<name>")
    message = gr.Markdown()
    gallery = gr.Gallery(label="Images and captions", columns=6, height=520, object_fit="contain",
                         fit_columns=False, format="jpeg", interactive=False)
    with gr.Row(equal_height=True):
        trigger = gr.Textbox(label="Trigger word", placeholder="sks", scale=2,
                             info="The word every caption should contain; its coverage is reported")
        resolution = CheckedNumber(512, label="Resolution", precision=0, minimum=V.MIN_RESOLUTION,
                               maximum=V.MAX_RESOLUTION, scale=1,
                               info="As on the Config tab (buckets, upscaling)")
        check = gr.Button("Check dataset", variant="primary", scale=1)
    with gr.Row():
        summary = gr.Markdown(NOT_CHECKED)
        histogram = gr.BarPlot(no_buckets(), x="bucket", y="images", height=260, sort="x", y_lim=[0, None],
                               title="Images per bucket", x_title="aspect · width x height",
                               y_title="images")
    table = gr.Dataframe(pd.DataFrame(columns=V.TABLE_HEADERS), label="Report: every file with its problems",
                         interactive=False, wrap=True, max_height=600, show_search="search",
                         column_widths=["20%", "10%", "9%", "9%", "52%"])
    shown = gr.State(None)  # the folder the gallery shows

    def show(path: Path, progress=None) -> dict:
        items, note = V.gallery_items(path, thumbnails, progress=_reporter(progress, "Loaded"),
                                      confine=workspace.dataset_root(path))
        relative = workspace.relative(path)
        left_out = V.left_out_note(workspace, path)
        return {gallery: items, message: _joined(f"{V.md_code(relative)}: {note}", left_out), shown: relative,
                existing: _choices(workspace, path),
                summary: NOT_CHECKED, histogram: no_buckets(),
                table: pd.DataFrame(columns=V.TABLE_HEADERS)}

    def checked(path: Path, word, size, progress=None) -> dict:
        word, size = V.check_inputs(word, size)
        report = V.check_folder(workspace, path, word, size, _reporter(progress, "Checked"))
        items, note = V.gallery_items(path, thumbnails, report, _reporter(progress, "Loaded"))
        relative = workspace.relative(path)
        rows = pd.DataFrame(V.report_rows(report), columns=V.TABLE_HEADERS)
        buckets = pd.DataFrame(V.bucket_rows(report), columns=BUCKET_COLUMNS)
        left_out = V.left_out_note(workspace, path)
        return {summary: _joined(V.summary_markdown(report), left_out, sep="\n\n"), table: rows,
                histogram: buckets, gallery: items, shown: relative,
                message: _joined(f"Checked {V.md_code(relative)}: {note}", left_out)}

    def on_typed(text, last, progress=gr.Progress()):  # noqa: B008 (gradio finds the tracker by its default)
        if not isinstance(text, str) or not text.strip():
            return {shown: last}  # leaving an empty box is not an error
        path = V.resolve_dataset(workspace, text)
        return {shown: last} if workspace.relative(path) == last else show(path, progress)  # unchanged: no work

    def on_reopen(text, last, progress=gr.Progress()):  # noqa: B008
        if not isinstance(text, str) or not text.strip() or not last:
            return {shown: last}
        return show(V.resolve_dataset(workspace, text), progress)

    def on_pick(choice, progress=gr.Progress()):  # noqa: B008
        path = V.resolve_dataset(workspace, choice)
        return {folder: workspace.relative(path), **show(path, progress)}

    def on_browse(selection, progress=gr.Progress()):  # noqa: B008
        path = V.folder_from_selection(workspace, selection)
        return {folder: workspace.relative(path), **show(path, progress)}

    def on_sample(word, size, progress=gr.Progress()):  # noqa: B008
        V.check_inputs(word, size)
        path, word, note = V.create_sample(workspace, word)
        outputs = checked(path, word, size, progress)
        return {**outputs, folder: workspace.relative(path), trigger: word, existing: _choices(workspace, path),
                message: f"{note} {outputs[message]}"}

    def on_upload(name, files, word, size, progress=gr.Progress()):  # noqa: B008
        V.check_inputs(word, size)
        result = V.save_uploads(workspace, name, files, source_root=_upload_root())
        if not result.saved:
            return {message: f"⚠ {result.message(workspace)}"}
        outputs = checked(result.folder, word, size, progress)
        return {**outputs, folder: workspace.relative(result.folder), uploads: None,
                existing: _choices(workspace, result.folder), message: result.message(workspace)}

    def on_check(text, word, size, progress=gr.Progress()):  # noqa: B008
        V.check_inputs(word, size)  # the settings first: a wrong one is named even before a folder is picked
        return checked(V.resolve_dataset(workspace, text), word, size, progress)

    everything = [folder, trigger, existing, uploads, message, gallery, summary, histogram, table, shown]
    guard = message_guard(message, (DatasetViewError,), "Check the folder and its files, then try again.")
    gr.on([folder.submit, folder.blur], guard(on_typed), [folder, shown], everything, api_name="dataset_show",
          trigger_mode="always_last")
    existing.input(guard(on_pick), existing, everything, api_name="dataset_pick")
    if panel is not None:
        panel.select(guard(on_reopen), [folder, shown], everything, api_name="dataset_reopen")
    explorer.input(guard(on_browse), explorer, everything, api_name="dataset_browse")
    refresh.click(lambda: _choices(workspace), None, existing, api_name="dataset_refresh")
    if Context.root_block is not None:  # a page load lists the datasets there are now
        Context.root_block.load(lambda: _choices(workspace), None, existing, api_visibility="undocumented")
    writes = dict(concurrency_id="dataset_write", concurrency_limit=1)
    sample.click(guard(on_sample), [trigger, resolution], everything, api_name="dataset_create_sample",
                 **writes)
    upload.click(guard(on_upload), [new_name, uploads, trigger, resolution], everything,
                 api_name="dataset_upload", **writes)
    check.click(guard(on_check), [folder, trigger, resolution], everything, api_name="dataset_check",
                concurrency_limit=2)
    return DatasetTab(folder=folder, trigger=trigger)


def confine_explorer(explorer: gr.FileExplorer) -> gr.FileExplorer:
    """Make ``explorer`` neither list nor open links that lead outside its root folder.

    Gradio's own explorer keeps ``..`` out but follows links, so ``datasets/link -> /etc`` would list /etc.
    The browser calls ``ls`` with any folder it likes; here the folder itself and each listed entry are
    resolved and must stay inside the root. A selection through such a link still reaches the handler,
    which refuses it (``resolve_dataset`` resolves links) with a message. (The method is replaced on the
    instance: a subclass of a Gradio component makes Gradio write a .pyi file beside this module.)"""
    listing = explorer.ls
    root = Path(explorer.root_dir).resolve()

    def ls(subdirectory: list[str] | None = None) -> list[dict[str, str]] | None:
        try:
            folder = Path(explorer._safe_join(subdirectory or [])).resolve()
        except (InvalidPathError, TypeError):  # "..", absolute parts, or not a list of names
            return []
        if not folder.is_relative_to(root):
            return []
        return [entry for entry in listing(subdirectory) or [] if _inside(folder / entry["name"], root)]

    explorer.ls = server(ls)
    return explorer


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _joined(*parts: str, sep: str = " ") -> str:
    return sep.join(part for part in parts if part)


def no_buckets() -> pd.DataFrame:
    """An empty histogram with the column types set, so the plot keeps a numeric y axis."""
    return pd.DataFrame({"bucket": pd.Series(dtype="str"), "images": pd.Series(dtype="int64")})


def _choices(workspace, selected: Path | None = None):
    """The dataset list, showing ``selected`` when it is one of them (a nested folder shows none)."""
    choices = workspace.list_datasets()
    if selected is None:
        return gr.update(choices=choices)
    relative = workspace.relative(selected)
    return gr.update(choices=choices, value=relative if relative in choices else None)


def _upload_root() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def _reporter(progress, verb: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress(done / total if total else 1.0, desc=f"{verb} {done} of {total} images")

    return report
